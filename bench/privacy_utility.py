"""Privacy-utility table: final global Dice at target epsilons, central and local DP.

    python bench/privacy_utility.py [--suite configs/bench/privacy-utility.toml] [--out DIR]

For each target epsilon the noise multiplier is calibrated (RDP accountant) so that the
whole run stays within it: central DP over `rounds` rounds of all-node sampling; local DP
so that every node's record-level epsilon after all rounds stays within it (the nodes
enforce it as their budget). Each cell runs `fl run` on fresh copies of the same synthetic
federation. Writes results.json, results.csv and report.md under --out.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from fl import accounting, config
from fl.tasks import get_task
from nodes.data import load_local_data
from nodes.dp_train import local_event
from nodes.synth import node_dir, synthesize


def _local_sigma(cfg: config.Config, root: Path, target: float, delta: float) -> float:
    sigmas = []
    for i in range(cfg.data.nodes):
        n = len(load_local_data(node_dir(root, i), get_task(cfg.task)).train)
        per_round = local_event(n, epochs=cfg.train.epochs, batch_size=cfg.train.batch_size, noise_multiplier=1.0)
        sigmas.append(accounting.calibrate(target_epsilon=target, sample_rate=per_round.sample_rate,
                                           steps=per_round.steps * cfg.rounds, delta=delta))
    return max(sigmas)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--suite", default="configs/bench/privacy-utility.toml")
    parser.add_argument("--out", default="bench-results/privacy-utility")
    args = parser.parse_args()
    suite = tomllib.loads(Path(args.suite).read_text())
    base = config.load(suite["base"])
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    pristine = out / "data-pristine"
    if not pristine.exists():
        synthesize(pristine, nodes=base.data.nodes, task=get_task(base.task), seed=suite["seed"])
    delta = float(suite["delta"])
    cells: list[tuple[str, float | None, list[str]]] = [("none", None, [])]
    for mode in suite["modes"]:
        for eps in suite["epsilons"]:
            if mode == "central":
                sigma = accounting.calibrate(target_epsilon=eps, sample_rate=1.0, steps=base.rounds, delta=delta)
                sets = ["central_dp.enabled=true", f"central_dp.noise_multiplier={sigma}", f"central_dp.delta={delta}"]
            else:
                sigma = _local_sigma(base, pristine, eps, delta)
                sets = ["local_dp.enabled=true", f"local_dp.noise_multiplier={sigma}",
                        f"node_policy.epsilon={eps}", f"node_policy.delta={delta}"]
            cells.append((mode, eps, sets))
    rows = []
    for mode, eps, sets in cells:
        name = f"{mode}-{eps if eps is not None else 'inf'}"
        data = out / "data" / name
        shutil.rmtree(data, ignore_errors=True)
        shutil.copytree(pristine, data)
        shutil.rmtree(out / "runs" / name, ignore_errors=True)
        command = [sys.executable, "-m", "fl.cli", "run", suite["base"], "--out", str(out / "runs"),
                   "--set", f"output.run_name={name}", "--set", f'data.root="{data}"',
                   "--set", f'registry.root="{out / "registry"}"', "--set", f"model_name=pu-{name}"]
        for item in sets:
            command += ["--set", item]
        subprocess.run(command, check=True, capture_output=True)
        summary = json.loads((out / "runs" / name / "summary.json").read_text())
        privacy = summary.get("privacy") or {}
        record = privacy.get("record_level") or {}
        rows.append({
            "mode": mode, "target_epsilon": eps, "delta": delta,
            "noise_multiplier": next((float(s.split("=")[1]) for s in sets if "noise_multiplier" in s), None),
            "dice": summary["final_metrics"]["dice"],
            "client_level_epsilon": (privacy.get("client_level") or {}).get("epsilon"),
            "max_record_level_epsilon": max((v["epsilon"] for v in record.values()), default=None),
            "rounds_run": len(summary["versions"]), "wall_seconds": summary["wall_seconds"],
        })
        print(json.dumps(rows[-1]), flush=True)
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    with open(out / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| DP | target epsilon (delta 1e-5) | noise multiplier | global Dice | epsilon spent | rounds |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        spent = r["client_level_epsilon"] if r["mode"] == "central" else r["max_record_level_epsilon"]
        lines.append(f"| {r['mode']} | {r['target_epsilon'] or '-'} | "
                     f"{'-' if r['noise_multiplier'] is None else format(r['noise_multiplier'], '.3f')} | "
                     f"{r['dice']:.4f} | {'-' if spent is None else format(spent, '.3f')} | {r['rounds_run']} |")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
