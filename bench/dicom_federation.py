"""The spleen-style bundle trained on the same synthetic CT sites written twice: as NIfTI, and as
DICOM series (SEG labels at node-0, RTSTRUCT at node-1).

1. Federated, each format its own run: Dice per round. A node seeds its random transforms from
   the run's seed, the round and its dataset's digest (nodes.client_app), and the two formats'
   files differ, so the two runs draw different patches and flips: the curves agree as two seeds do.
2. Each site trained locally from the same initial network with the same random stream, on its
   NIfTI and on its DICOM cases: the weights and the Dice after training must be identical, since
   the preprocessed cases are (tests/test_dicom_sites.py checks the tensors case by case).

    .venv/bin/python bench/dicom_federation.py [--rounds 2] [--scale 1.0] [--out bench-results/dicom-federation]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from fl.cli import main

REPO = Path(__file__).resolve().parents[1]


def run(out: Path, fmt: str, rounds: int, scale: float) -> tuple[list[float], float]:
    started = time.perf_counter()
    code = main(["run", str(REPO / "configs" / "spleen-ct.toml"), "--out", str(out / fmt / "runs"),
                 "--set", f'data.root="{out / fmt / "data"}"', "--set", f'data.synthetic_format="{fmt}"',
                 "--set", f"data.synthetic_scale={scale}", "--set", f"rounds={rounds}",
                 "--set", f'registry.root="{out / fmt / "registry"}"', "--set", "output.run_name=run"])
    if code != 0:
        raise SystemExit(f"{fmt} run failed with exit code {code}")
    lines = (out / fmt / "runs" / "run" / "metrics.jsonl").read_text().splitlines()
    dice = [json.loads(x)["evaluate"]["aggregate"]["dice"] for x in lines]
    return dice, time.perf_counter() - started


def same_stream(out: Path) -> list[str]:
    """Part 2: per site, one epoch from the same network and generator on each format's cases."""
    import torch

    from fl.config import load
    from fl.learn.data import load_local_data
    from fl.learn.task import TrainSettings

    task = load(REPO / "configs" / "spleen-ct.toml").resolved_task()
    rows = []
    for node in sorted(p.name for p in (out / "nifti" / "data").iterdir() if p.is_dir()):
        results = {}
        for fmt in ("nifti", "dicom"):
            torch.manual_seed(0)
            net = task.build_network()
            data = load_local_data(out / fmt / "data" / node, task, use_cache=False,
                                   disk_cache=out / fmt / "cache" / node)
            task.train(net, data.train, TrainSettings(epochs=1, generator=torch.Generator().manual_seed(0)))
            results[fmt] = (net.state_dict(), task.evaluate(net, data.val).score)
        (a, dice_a), (b, dice_b) = results["nifti"], results["dicom"]
        worst = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
        rows.append(f"| {node} | {dice_a:.6f} | {dice_b:.6f} | {worst:.3g} |")
    return rows


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--out", default=str(REPO / "bench-results" / "dicom-federation"))
    parser.add_argument("--local-only", action="store_true", help="part 2 only, on the sites of an earlier run")
    args = parser.parse_args()
    out = Path(args.out)
    if not args.local_only:
        shutil.rmtree(out, ignore_errors=True)
        results = {fmt: run(out, fmt, args.rounds, args.scale) for fmt in ("nifti", "dicom")}
        print("| sites | Dice per evaluation (initial, then each round) | whole command (s) |")
        print("| --- | --- | --- |")
        for fmt, (dice, seconds) in results.items():
            print(f"| {fmt} | {', '.join(f'{d:.6f}' for d in dice)} | {seconds:.1f} |")
        print()
    print("| site | Dice after one local epoch, NIfTI | the same, DICOM | largest weight difference |")
    print("| --- | --- | --- | --- |")
    print("\n".join(same_stream(out)))


if __name__ == "__main__":
    cli()
