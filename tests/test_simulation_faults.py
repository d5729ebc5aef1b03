"""A hostile virtual node in a real simulation: the model stays finite and the node is named."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from fl.cli import main
from fl.registry import Registry

REPO = Path(__file__).resolve().parents[1]


def test_one_hostile_node_of_three_cannot_poison_a_median_federation(tmp_path: Path) -> None:
    code = main([
        "run", str(REPO / "configs" / "quickstart.toml"), "--out", str(tmp_path / "runs"),
        "--set", f'data.root="{tmp_path / "data"}"', "--set", "data.nodes=3", "--set", "data.image_size=32",
        "--set", "rounds=2", "--set", "train.epochs=3", "--set", f'registry.root="{tmp_path / "reg"}"',
        "--set", "output.run_name=attacked", "--set", "strategy.name=median",
        "--set", "simulation.adversaries=1", "--set", "simulation.attack=scale-then-nan",
    ])
    assert code == 0
    run = tmp_path / "runs" / "attacked"
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    round2 = lines[2]
    assert len(round2["failures"]) == 1  # the NaN reply, excluded and named
    (node, reason), = round2["failures"].items()
    assert "NaN or infinite" in reason and node not in round2["train"]["nodes"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final_metrics"]["dice"] > summary["initial_metrics"]["dice"] + 0.3
    assert all(torch.isfinite(t).all() for t in load_file(run / "model.safetensors").values())
    manifest = json.loads((tmp_path / "reg" / "quickstart" / "v2" / "manifest.json").read_text())
    assert manifest["failures"] == round2["failures"]


def _dropout_run(tmp_path: Path, name: str, *extra: str) -> int:
    return main([
        "run", str(REPO / "configs" / "quickstart.toml"), "--out", str(tmp_path / "runs"),
        "--set", f'data.root="{tmp_path / "data"}"', "--set", "data.nodes=3", "--set", "data.image_size=32",
        "--set", "rounds=2", "--set", f'registry.root="{tmp_path / "reg"}"', "--set", f"output.run_name={name}",
        "--set", f"model_name={name}", "--set", "simulation.adversaries=1", "--set", "simulation.attack=drop-round-1",
        *extra,
    ])


def test_a_node_that_dies_is_named_the_round_completes_and_it_rejoins(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    assert _dropout_run(tmp_path, "dropout", "--set", "strategy.min_replies=2") == 0
    lines = [json.loads(x) for x in (tmp_path / "runs" / "dropout" / "metrics.jsonl").read_text().splitlines()]
    (dead, reason), = lines[1]["failures"].items()
    assert reason.startswith("train: error") and len(lines[1]["train"]["nodes"]) == 2
    assert dead in lines[2]["train"]["nodes"] and lines[2]["failures"] == {}  # rejoined in round 2
    manifest = json.loads((tmp_path / "reg" / "dropout" / "v1" / "manifest.json").read_text())
    assert dead in manifest["failures"] and dead not in {n["node_id"] for n in manifest["nodes"]}

    capsys.readouterr()
    assert _dropout_run(tmp_path, "strict", "--set", "strategy.min_replies=3") == 2
    err = capsys.readouterr().err
    assert "round 1: 2 valid update(s), fewer than strategy.min_replies = 3" in err
    assert Registry(tmp_path / "reg").versions("strict") == []  # nothing committed


def test_every_kind_of_hostile_update_is_excluded_with_fedavg_and_a_norm_bound(tmp_path: Path) -> None:
    code = main([
        "run", str(REPO / "configs" / "quickstart.toml"), "--out", str(tmp_path / "runs"),
        "--set", f'data.root="{tmp_path / "data"}"', "--set", "data.nodes=3", "--set", "data.image_size=32",
        "--set", "rounds=5", "--set", f'registry.root="{tmp_path / "reg"}"', "--set", "output.run_name=cycle",
        "--set", "simulation.adversaries=1", "--set", "simulation.attack=cycle", "--set", "strategy.max_update_norm=50",
    ])
    assert code == 0
    lines = [json.loads(x) for x in (tmp_path / "runs" / "cycle" / "metrics.jsonl").read_text().splitlines()]
    reasons = []
    for line in lines[1:]:
        (node, reason), = line["failures"].items()
        reasons.append(reason)
    assert "exceeds strategy.max_update_norm 50" in reasons[0]
    assert "NaN or infinite" in reasons[1] and "NaN or infinite" in reasons[2]
    assert "the model has float32" in reasons[3] and "missing" in reasons[4]
    summary = json.loads((tmp_path / "runs" / "cycle" / "summary.json").read_text())
    assert summary["final_metrics"]["dice"] > summary["initial_metrics"]["dice"] + 0.3
    assert all(torch.isfinite(t).all() for t in load_file(tmp_path / "runs" / "cycle" / "model.safetensors").values())
