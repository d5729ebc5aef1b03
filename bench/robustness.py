"""One hostile node among four: final Dice of plain FedAvg, validated FedAvg and robust aggregators.

    python bench/robustness.py [--rounds 5] [--out bench-results/robustness]

Node 0 of 4 sends its update x100 in round 1 and NaN weights afterwards
(`simulation.attack = "scale-then-nan"`). Every cell runs `fl run` on the same synthetic
federation; validation (always on) drops the NaN replies, `strategy.max_update_norm` or a
robust aggregator handles the scaled one. Prints a Markdown table and writes results.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CELLS = [
    ("clean", "fedavg", []),
    ("attacked", "fedavg", ["simulation.adversaries=1"]),
    ("attacked", "fedavg + max_update_norm=20", ["simulation.adversaries=1", "strategy.max_update_norm=20"]),
    ("attacked", "median", ["simulation.adversaries=1", "strategy.name=median"]),
    ("attacked", "trimmedavg", ["simulation.adversaries=1", "strategy.name=trimmedavg", "strategy.trim_beta=0.25"]),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default="bench-results/robustness")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    rows = []
    for i, (setting, strategy, sets) in enumerate(CELLS):
        name = f"cell-{i}"
        command = [sys.executable, "-m", "fl.cli", "run", "configs/quickstart.toml", "--out", str(out / "runs"),
                   "--set", f"output.run_name={name}", "--set", f'data.root="{out / "data"}"',
                   "--set", "data.nodes=4", "--set", f"rounds={args.rounds}", "--set", "simulation.attack=scale-then-nan",
                   "--set", f'registry.root="{out / "registry"}"', "--set", f"model_name=robust-{i}"]
        for item in sets:
            command += ["--set", item]
        subprocess.run(["rm", "-rf", str(out / "runs" / name)], check=True)
        subprocess.run(command, check=True, capture_output=True)
        summary = json.loads((out / "runs" / name / "summary.json").read_text())
        lines = [json.loads(x) for x in (out / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        excluded = sum(len(x.get("failures", {})) for x in lines)
        rows.append({"setting": setting, "strategy": strategy, "dice": summary["final_metrics"]["dice"],
                     "excluded_replies": excluded})
        print(json.dumps(rows[-1]), flush=True)
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    print("| setting | strategy | final global Dice | replies excluded |\n| --- | --- | --- | --- |")
    for r in rows:
        dice = "NaN" if r["dice"] is None else f"{r['dice']:.4f}"
        print(f"| {r['setting']} | {r['strategy']} | {dice} | {r['excluded_replies']} |")


if __name__ == "__main__":
    main()
