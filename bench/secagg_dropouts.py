"""Distributed noise under dropouts: the noise on every sum the coordinator unmasks, against the
claimed z C, and the journal's count against the sums the coordinator actually saw.

One round of seg2d (32x32 images, learning rate 1e-12 so that every update is ~0 and the released
model minus the initial one is the nodes' summed noise over m = N) on the nodes' real code and
Flower's real SecAgg+ workflow, in one process (fl.bench.inprocess), for each dropout case:

    python bench/secagg_dropouts.py [--out DIR]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np

import fl.engine_env  # noqa: F401  (before Flower is imported)
from fl import config
from fl.bench.inprocess import InProcessGrid, unmasked_sums
from fl.errors import FederationError
from fl.learn import get_task
from fl.learn.synth import node_dir, synthesize
from fl.privacy import hashchain
from fl.privacy.journal import ReleaseJournal
from fl.registry.checkpoint import decode_weights
from fl.server.observer import LogObserver
from fl.server.rounds import initial_arrays, run_federation
from strategies.secure_round import min_contributors

Z, CLIP = 2.0, 1.0
CASES = ("none", "drop-one-before-masking", "drop-two-before-masking", "crash-while-masking", "silent-at-unmask")


def _tamper(case: str, nodes: int):  # noqa: ANN202 - a Tamper
    from flwr.app import Error

    from fl import wire
    from fl.flower_compat.secagg import RECORD_KEY_CONFIGS, Key, Stage

    def inject(msg):  # noqa: ANN001, ANN202
        node = msg.metadata.dst_node_id
        masking = "fitins.config" in msg.content.config_records
        configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        unmask = configs is not None and configs.get(Key.STAGE) == Stage.UNMASK
        if case == "drop-one-before-masking" and masking and node == nodes:
            return None
        if case == "drop-two-before-masking" and masking and node >= nodes - 1:
            return None
        if case == "crash-while-masking" and masking and node == nodes:
            return Error(code=wire.ERROR_TRAINING_FAILED, reason="killed while masking")
        if case == "silent-at-unmask" and unmask and node == nodes:
            return None
        return msg

    return inject


def measure(root: Path, work: Path, nodes: int, case: str) -> dict[str, object]:
    shutil.rmtree(work, ignore_errors=True)
    folders = {}
    for i in range(nodes):
        folders[i + 1] = node_dir(work / "data", i)
        shutil.copytree(node_dir(root, i), folders[i + 1], ignore=shutil.ignore_patterns(".oncofed"))
    cfg = config.from_flat({
        "data.root": str(work / "data"), "data.nodes": nodes, "data.image_size": 32, "rounds": 1, "train.lr": 1e-12,
        "strategy.evaluate_initial": False, "strategy.timeout": 5.0, "registry.root": str(work / "reg"),
        "model_name": "m", "secagg.enabled": True, "central_dp.enabled": True, "central_dp.clip_on": "client",
        "central_dp.noise_multiplier": Z, "central_dp.clipping_norm": CLIP, "secagg.noise": "distributed"})
    grid = InProcessGrid(folders, tamper=_tamper(case, nodes))
    t = min_contributors(nodes, cfg.secagg.threshold)
    try:
        run_federation(grid, cfg, work / "run", LogObserver())
        released = decode_weights((work / "reg" / "m" / "v1" / "model.safetensors").read_bytes())
        initial = initial_arrays(cfg)
        moved = np.concatenate([(released[k].numpy().astype(np.float64) - initial[k].numpy()).ravel()
                                for k in initial.keys() if np.issubdtype(initial[k].numpy().dtype, np.floating)])
        std = float((nodes * moved).std())  # the fixed denominator m = N
    except FederationError:
        std = None
    journal = ReleaseJournal.of(work / "reg", "m").path
    entries = hashchain.read_chain(journal, "journal") if journal.exists() else []
    return {"nodes": nodes, "t": t, "case": case, "noise_std_over_zC": None if std is None else std / (Z * CLIP),
            "sums_unmasked": unmasked_sums(grid, t), "journaled": sum(1 for e in entries if e.get("event")),
            "outcome": next((e["outcome"] for e in reversed(entries) if "outcome" in e), None)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="also write the table as Markdown here")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "sites"
        synthesize(root, nodes=5, task=get_task("seg2d"), seed=3, image_size=32)
        for nodes in (3, 5):
            for case in CASES:
                if nodes == 3 and case == "drop-two-before-masking":
                    continue
                rows.append(measure(root, Path(tmp) / "work", nodes, case))
    lines = ["| nodes | t | case | outcome | noise std / (z C) on the unmasked sum | sums unmasked | journaled |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        std = "nothing unmasked" if r["noise_std_over_zC"] is None else f"{r['noise_std_over_zC']:.3f}"
        lines.append(f"| {r['nodes']} | {r['t']} | {r['case']} | {r['outcome']} | {std} | {r['sums_unmasked']} "
                     f"| {r['journaled']} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "secagg_dropouts.md").write_text(table + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
