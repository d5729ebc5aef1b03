"""Round wall time on the Deployment Engine against the Simulation Engine, same config, one run.

    python bench/deploy_vs_sim.py [--rounds 2] [--out bench-results/deploy-vs-sim]

Runs ``fl demo deploy`` (SuperLink, Fleet gateway, 3 SuperNodes, TLS, node authentication,
local DP), then the very same run config (same data, same DP settings) on the Simulation
Engine, and prints per-round wall, summed node training and their ratio, plus where the
deployment's extra time goes: Flower's fixed polling intervals and the start-up of the
ClientApp process Flower launches for every message. Writes results.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def rounds_of(run_dir: Path) -> list[dict]:  # type: ignore[type-arg]
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def per_round(records: list[dict]) -> dict[str, float]:  # type: ignore[type-arg]
    trained = [r for r in records if r["round"] >= 1]
    wall = sum(r["seconds"] for r in trained) / len(trained)
    train = sum(max(n.get("train-seconds", 0.0) for n in r["train"]["nodes"].values()) for r in trained) / len(trained)
    return {"round_wall_s": wall, "slowest_node_train_s": train, "initial_eval_s": records[0]["seconds"]}


def clientapp_start_seconds() -> float:
    """A fresh Python process importing the ClientApp (torch, MONAI, Opacus, Flower), as Flower
    starts one per message in deployment."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import nodes.client_app"], cwd=REPO, check=True)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default="bench-results/deploy-vs-sim")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    if out.exists():
        raise SystemExit(f"{out}: exists; choose another --out")
    sys.path.insert(0, str(REPO))
    from fl.config import from_flat
    from fl.deploy.demo import run_config, run_demo
    from fl.server.simulation import simulate

    run_demo(out / "deploy", rounds=args.rounds)
    flat = run_config(out / "deploy", args.rounds, 3, [])  # the config the deployment ran
    cfg = from_flat({**flat, "output.dir": str(out / "sim"), "output.run_name": "sim",
                     "registry.root": str(out / "sim-registry")}, source="demo run config")
    simulate(cfg)
    deploy, sim = per_round(rounds_of(out / "deploy" / "runs" / "deploy")), per_round(rounds_of(out / "sim" / "sim"))
    startup = clientapp_start_seconds()
    result = {
        "deployment": deploy, "simulation": sim, "ratio_round_wall": deploy["round_wall_s"] / sim["round_wall_s"],
        "clientapp_process_start_s": startup,
        "flower_fixed_waits_s": {"supernode_idle_poll": 3.0, "superexec_task_poll": 1.0},
        "phases_per_round": 2,
    }
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print("| engine | round wall (s) | slowest node training (s) |")
    print("| --- | --- | --- |")
    print(f"| simulation | {sim['round_wall_s']:.2f} | {sim['slowest_node_train_s']:.2f} |")
    print(f"| deployment | {deploy['round_wall_s']:.2f} | {deploy['slowest_node_train_s']:.2f} |")
    print(f"\nratio deployment / simulation: {result['ratio_round_wall']:.1f}x")
    print(f"per phase (train, evaluate) deployment adds up to 3 s SuperNode idle poll + up to 1 s SuperExec "
          f"poll + {startup:.1f} s ClientApp process start (import torch, MONAI, Opacus, Flower)")


if __name__ == "__main__":
    main()
