"""Exports give the same outputs as the registry weights; the diff reports real deltas."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.serverapp.strategy import FedAdam

from fl.config import Config
from fl.errors import ConfigError
from fl.registry import Registry
from fl.registry.checkpoint import encode_weights
from fl.registry.diff import diff
from fl.registry.export import export, load_network
from fl.server.rounds import initial_arrays
from strategies.state import encode_state, restore_state


@pytest.fixture()
def registry(tmp_path: Path) -> Registry:
    registry = Registry(tmp_path / "reg")
    parent = None
    for seed, dice in ((0, 0.4), (1, 0.7)):
        cfg = Config().replace(task="seg2d", seed=seed, **{"train.lr": 0.01 * (seed + 1)})
        fields = {"task": "seg2d", "round": seed + 1, "config": cfg.to_flat(),
                  "metrics": {"evaluate": {"aggregate": {"dice": dice}}, "train": {"aggregate": {}}}}
        parent = registry.commit("unet", weights=encode_weights(initial_arrays(cfg)), state=b"",
                                 fields=fields, expected_parent=parent).hash
    return registry


def _probe() -> torch.Tensor:
    return torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(0))


def test_monai_bundle_loads_with_monais_config_parser_and_matches(registry: Registry, tmp_path: Path) -> None:
    from monai.bundle import ConfigParser

    version = registry.get("unet:v2")
    folder = export(version, "bundle", tmp_path / "out")
    parser = ConfigParser()
    parser.read_config(folder / "configs" / "inference.json")
    parser.read_meta(folder / "configs" / "metadata.json")
    net = parser.get_parsed_content("network")
    net.load_state_dict(torch.load(folder / "models" / "model.pt", weights_only=True))
    _, reference = load_network(version)
    with torch.no_grad():
        assert torch.equal(net.eval()(_probe()), reference(_probe()))
    assert parser["_meta_"]["oncofed"]["hash"] == version.hash
    assert json.loads((folder / "manifest.json").read_text()) == version.manifest


def test_torchscript_and_safetensors_exports_match(registry: Registry, tmp_path: Path) -> None:
    version = registry.get("unet:v1")
    ts = torch.jit.load(str(export(version, "torchscript", tmp_path) / "model.ts"))
    _, reference = load_network(version)
    with torch.no_grad():
        assert torch.allclose(ts(_probe()), reference(_probe()), atol=1e-6)
    st = export(version, "safetensors", tmp_path) / "model.safetensors"
    assert st.read_bytes() == version.weights.read_bytes()
    with pytest.raises(ConfigError, match="already exists"):
        export(version, "safetensors", tmp_path)


def test_diff_reports_metric_config_and_parameter_deltas(registry: Registry) -> None:
    result = diff(registry.get("unet:v1"), registry.get("unet:v2"))
    assert result["metrics"]["evaluate.dice"]["delta"] == pytest.approx(0.3)
    assert result["config"] == {"seed": {"a": 0, "b": 1}, "train.lr": {"a": 0.01, "b": 0.02}}
    assert result["parameters"]["l2_distance"] > 0
    assert diff(registry.get("unet:v1"), registry.get("unet:v1"))["parameters"]["l2_distance"] == 0


def test_fedadam_moments_and_sampling_rng_survive_a_round_trip() -> None:
    saved = FedAdam()
    saved.m_t = {"w": np.arange(4, dtype=np.float32)}
    saved.v_t = {"w": np.full(4, 0.5, dtype=np.float32)}
    random.seed(123)
    blob = encode_state(saved)
    expected_draw = random.random()
    random.seed(999)
    restored = FedAdam()
    restore_state(restored, blob)
    assert np.array_equal(restored.m_t["w"], saved.m_t["w"]) and np.array_equal(restored.v_t["w"], saved.v_t["w"])
    assert random.random() == expected_draw


def test_fedavgm_server_momentum_survives_a_round_trip_in_array_order() -> None:
    from flwr.serverapp.strategy import FedAvgM

    saved = FedAvgM(server_momentum=0.9)
    saved.momentum_vector = [np.full(3, float(i), dtype=np.float32) for i in range(12)]  # past 10: order by index
    restored = FedAvgM(server_momentum=0.9)
    restore_state(restored, encode_state(saved))
    assert [float(v[0]) for v in restored.momentum_vector] == [float(i) for i in range(12)]
    with pytest.raises(ValueError, match="server momentum"):
        restore_state(FedAdam(), encode_state(saved))


def test_versions_mirror_into_an_mlflow_registry_once(registry: Registry, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from fl.registry.mlflow_mirror import MlflowMirror

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mirror = MlflowMirror(uri)
    assert [mirror.publish(v) for v in registry.versions("unet")] == ["1", "2"]
    assert mirror.publish(registry.get("unet:v2")) == "2"  # idempotent
    found = MlflowClient(tracking_uri=uri, registry_uri=uri).search_model_versions("name='unet'")
    by_version = {int(v.version): v for v in found}
    assert sorted(by_version) == [1, 2]
    for number, mv in by_version.items():
        local = registry.get(f"unet:v{number}")
        assert mv.tags["oncofed.hash"] == local.hash
        assert json.loads(mv.tags["oncofed.metrics"]) == local.manifest["metrics"]["evaluate"]["aggregate"]
        assert mv.source == local.path.resolve().as_uri()
