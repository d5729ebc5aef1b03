"""End to end: `fl run` on Flower's Simulation Engine (2 nodes, tiny images), then --resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fl import config
from fl.cli import main
from fl.learn import get_task
from fl.registry import Registry

REPO = Path(__file__).resolve().parents[1]


def _run(tmp: Path, name: str, *extra: str) -> int:
    return main([
        "run", str(REPO / "configs" / "quickstart.toml"), "--out", str(tmp / "runs"),
        "--set", f'data.root="{tmp / "data"}"', "--set", "data.nodes=2", "--set", "data.image_size=32",
        "--set", "train.epochs=3", "--set", f'registry.root="{tmp / "registry"}"',
        "--set", f"output.run_name={name}", *extra,
    ])


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("e2e")  # data/ is absent: generated on first use
    assert _run(tmp, "first", "--set", "rounds=2") == 0
    return tmp


def test_federated_training_beats_the_initial_model(federation: Path) -> None:
    run = federation / "runs" / "first"
    assert all((federation / "data" / f"node-{i}" / "dataset.json").is_file() for i in range(2))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["nodes"] == 2
    assert summary["final_metrics"]["dice"] > summary["initial_metrics"]["dice"] + 0.3
    assert summary["train_seconds"] > 0 and summary["total_seconds"] >= summary["wall_seconds"] > 0

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


def test_every_round_is_a_registry_version_with_provenance(federation: Path) -> None:
    versions = Registry(federation / "registry").verify("quickstart")[:2]
    assert [(v.number, v.manifest["round"], v.manifest["run_id"]) for v in versions] == [(1, 1, "first"), (2, 2, "first")]
    final = load_file(federation / "runs" / "first" / "model.safetensors")
    assert versions[1].weights.read_bytes() and all(
        torch.equal(t, load_file(versions[1].weights)[k]) for k, t in final.items()
    )
    m = versions[1].manifest
    assert len(m["nodes"]) == 2
    for node in m["nodes"]:
        assert node["num_examples"] > 0 and len(node["dataset_fingerprint"]) == 64
        assert node["device"] == "cpu" or node["device"].startswith("cuda:")  # the hardware it trained on
    assert {n["dataset_fingerprint"] for n in m["nodes"]} != {None}
    assert m["strategy"]["name"] == "fedavg" and m["task"] == "seg2d" and m["secure_aggregation"] is None
    assert set(m["software"]) >= {"oncofed", "flwr", "monai", "torch"}
    assert m["config_hash"] == config.from_flat(m["config"]).settings_hash()
    assert m["metrics"]["evaluate"]["aggregate"]["dice"] > 0


def test_resume_continues_the_chain_and_the_round_counter(federation: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(federation, "resumed", "--resume", "--set", "rounds=1") == 0
    registry = Registry(federation / "registry")
    versions = registry.verify("quickstart")
    v3 = versions[2]
    assert (v3.number, v3.manifest["round"], v3.manifest["parent"]) == (3, 3, versions[1].hash)
    assert v3.manifest["resumed_from"] == "quickstart:v2"
    summary = json.loads((federation / "runs" / "resumed" / "summary.json").read_text())
    assert (summary["first_round"], summary["last_round"], summary["versions"]) == (3, 3, ["quickstart:v3"])
    resumed_start = json.loads((federation / "runs" / "resumed" / "metrics.jsonl").read_text().splitlines()[0])
    assert resumed_start["round"] == 2  # the resumed model, evaluated before its first new round
    assert resumed_start["evaluate"]["aggregate"]["dice"] > 0.5

    reg = ["--registry", str(registry.root)]
    capsys.readouterr()
    assert main(["models", "list", "--json", *reg]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["version"], r["round"]) for r in rows] == [(1, 1), (2, 2), (3, 3)]
    assert set(rows[0]) >= {"name", "version", "round", "hash", "parent", "metrics"}

    assert main(["models", "verify", *reg]) == 0
    data = bytearray(versions[1].weights.read_bytes())
    data[-1] ^= 0xFF
    versions[1].weights.write_bytes(bytes(data))
    assert main(["models", "verify", *reg]) == 2
    assert "quickstart:v2: model.safetensors does not match" in capsys.readouterr().err


def test_resume_without_a_version_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(tmp_path, "nothing", "--resume") == 2
    assert "registry.resume: no version of model 'quickstart'" in capsys.readouterr().err


def test_fedadam_runs_several_rounds_and_keeps_the_model_dtypes(tmp_path: Path) -> None:
    """FedAdam's server step computes in float64; the global model must stay in the network's
    dtypes, or round 2's replies fail validation against it (found by `fl bench strategies`)."""
    assert _run(tmp_path, "adam", "--set", "rounds=3", "--set", "strategy.name=fedadam",
                "--set", "strategy.server_lr=0.01") == 0
    lines = [json.loads(line) for line in (tmp_path / "runs" / "adam" / "metrics.jsonl").read_text().splitlines()]
    assert [line["failures"] for line in lines[1:]] == [{}, {}, {}]
    weights = load_file(tmp_path / "runs" / "adam" / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.float32}
