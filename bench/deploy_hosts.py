"""Deployed round overhead across separate hosts against localhost, with OncoFed's gateway and nginx.

    python bench/deploy_hosts.py [--out DIR] [--seeds 3] [--rounds 3]

Four deployments, one after the other in one sitting: {localhost, separate hosts (network
namespaces)} x {OncoFed's Fleet gateway, nginx}. Each runs, for every seed, a FedAvg run and a
SecAgg+ run of the demo's federation (seg2d, 3 hospitals, no DP, as `fl bench deploy`), so every
cell holds 3 seeds. Per run: the later rounds' mean wall, slowest node's training and overhead (wall
minus that training; the first round apart, as `fl bench deploy`). Writes ``hosts.json`` and prints
a Markdown table (mean and standard deviation over seeds).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fl.bench.runners import _deploy_rounds  # noqa: E402
from fl.deploy import processes as deploy  # noqa: E402
from fl.deploy.demo import Cluster, run_config  # noqa: E402


def measure(out: Path, hosts: bool, front: str, seeds: int, rounds: int) -> list[dict[str, Any]]:
    cluster = Cluster(out, nodes=3, hosts=hosts, front=front, budget=None, say=lambda _: None)
    rows = []
    with deploy.stopped_on_exit(cluster.procs):
        try:
            cluster.start()
            for seed in range(1, seeds + 1):
                for mode in ("fedavg", "secagg"):
                    name = f"{mode}-{seed}"
                    flat = run_config(cluster.out, rounds, 3, ["local_dp.enabled=false", f"seed={seed}",
                                                              f"secagg.enabled={'true' if mode == 'secagg' else 'false'}",
                                                              f"output.run_name='{name}'", f"model_name='{name}'"])
                    run = cluster.submit(flat, name, 900)
                    if run.get("status") != "finished:completed":
                        raise RuntimeError(f"{name}: {run.get('status')}; see {cluster.out / 'logs' / (name + '.log')}")
                    rows.append({"where": "separate hosts" if hosts else "localhost", "front": front, "mode": mode,
                                 "seed": seed, **_deploy_rounds(cluster.out / "runs" / name)})
                    print(json.dumps(rows[-1]), flush=True)
        finally:
            cluster.stop()
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| where | front | mode | overhead s (mean ± sd, 3 seeds) | round wall s | slowest training s |",
             "|---|---|---|---|---|---|"]
    keys = sorted({(r["where"], r["front"], r["mode"]) for r in rows}, key=lambda k: (k[2], k[0], k[1]))
    for key in keys:
        cell = [r for r in rows if (r["where"], r["front"], r["mode"]) == key]
        over = [r["overhead_s"] for r in cell]
        sd = statistics.stdev(over) if len(over) > 1 else 0.0
        lines.append(f"| {key[0]} | {key[1]} | {'SecAgg+' if key[2] == 'secagg' else 'FedAvg'} | "
                     f"{statistics.mean(over):.2f} ± {sd:.2f} | {statistics.mean(r['round_wall_s'] for r in cell):.2f} | "
                     f"{statistics.mean(r['slowest_train_s'] for r in cell):.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench-results/deploy-hosts")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    root = Path(args.out).resolve()
    if root.exists():
        shutil.rmtree(root)
    rows: list[dict[str, Any]] = []
    started = time.monotonic()
    for hosts in (False, True):
        for front in ("gateway", "nginx"):
            rows += measure(root / f"{'hosts' if hosts else 'localhost'}-{front}", hosts, front, args.seeds, args.rounds)
            (root / "hosts.json").write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    print(table(rows))
    print(f"\n{len(rows)} runs in {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
