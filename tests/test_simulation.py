"""End to end: `fl run` on Flower's Simulation Engine, 2 nodes, 2 rounds, tiny images."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from fl import config
from fl.cli import main
from fl.tasks import get_task

REPO = Path(__file__).resolve().parents[1]


def test_federated_training_beats_the_initial_model(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    data_root = tmp_path / "data"  # absent: generated on first use
    code = main([
        "run", str(REPO / "configs" / "quickstart.toml"), "--out", str(tmp_path / "runs"),
        "--set", f'data.root="{data_root}"', "--set", "data.nodes=2", "--set", "data.image_size=32",
        "--set", "rounds=2", "--set", "train.epochs=3", "--set", "output.run_name=e2e",
    ])
    assert code == 0, capsys.readouterr().err
    run = tmp_path / "runs" / "e2e"
    assert (data_root / "node-0" / "dataset.json").is_file() and (data_root / "node-1" / "dataset.json").is_file()

    summary = json.loads((run / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["nodes"] == 2
    assert summary["final_metrics"]["dice"] > summary["initial_metrics"]["dice"] + 0.3
    assert summary["train_seconds"] > 0 and summary["wall_seconds"] > 0
    assert summary["total_seconds"] >= summary["wall_seconds"]

    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["round"] for line in lines] == [0, 1, 2]
    for line in lines[1:]:
        assert len(line["train"]["nodes"]) == 2 and len(line["evaluate"]["nodes"]) == 2
        assert line["failures"] == {}
        node_dice = [n["dice"] for n in line["evaluate"]["nodes"].values()]
        counts = [n["num-examples"] for n in line["evaluate"]["nodes"].values()]
        weighted = sum(d * c for d, c in zip(node_dice, counts)) / sum(counts)
        assert abs(line["evaluate"]["aggregate"]["dice"] - weighted) < 1e-9
    assert lines[-1]["evaluate"]["aggregate"]["dice"] == summary["final_metrics"]["dice"]

    saved = config.load(run / "config.toml")
    assert (saved.rounds, saved.data.nodes, saved.train.epochs) == (2, 2, 3)
    net = get_task("seg2d").build_network()
    net.load_state_dict(load_file(run / "model.safetensors"))
    assert all(torch.isfinite(p).all() for p in net.parameters())
