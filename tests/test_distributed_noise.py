"""Distributed discrete Gaussian noise under SecAgg+: each node's share, on SecAgg+'s own integer
grid, sums to at least the claimed z C, and the coordinator never sees an un-noised sum."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from flwr.common.secure_aggregation.quantization import quantize
from safetensors.torch import load_file

from fl import config
from fl.errors import ConfigError
from fl.learn import get_task
from fl.learn.synth import synthesize
from fl.privacy import accounting
from fl.privacy import distributed as distributed_dp
from fl.privacy.noise import SecureGaussian
from fl.server.rounds import initial_arrays

REPO = Path(__file__).resolve().parents[1]
DIM, TARGET = 52_000, 2**22  # the seg2d network's size; SecAgg+'s default quantisation range


def _plan(z: float, clip: float = 1.0, nodes: int = 3) -> distributed_dp.Plan:
    r = distributed_dp.clipping_range(clip, z, nodes)
    return distributed_dp.plan(clip=clip, noise_multiplier=z, min_contributors=nodes, dim=DIM, range_=r,
                               target_range=TARGET)


@pytest.mark.parametrize("z", [0.5, 1.0, 3.0])
def test_the_sum_of_three_shares_carries_z_c(z: float) -> None:
    plan = _plan(z)
    source = SecureGaussian()
    shares = [distributed_dp.encode(np.zeros(DIM), plan, source) for _ in range(3)]
    total = np.sum(shares, axis=0)
    # claimed: z C (the sensitivity after rounding, B s, exceeds C = 1 by about 2e-6)
    assert total.std() == pytest.approx(z * 1.0, rel=0.02)
    assert abs(total.mean()) < 0.02 * z
    one = shares[0].std()
    assert one == pytest.approx(z / math.sqrt(3), rel=0.02)  # a single share is not enough on its own


def test_shares_pass_secagg_quantisation_unchanged() -> None:
    """Flower's mod clips to [-r, r] and rounds (x + r) T / 2r stochastically: the encoding lands
    exactly on that grid, so the mod's rounding (from NumPy's global generator) changes nothing."""
    plan = _plan(1.0)
    update = np.random.default_rng(0).normal(size=DIM)
    update *= 3.0 / np.linalg.norm(update)  # over the clipping norm: clipped to C first
    encoded = distributed_dp.encode(update, plan, SecureGaussian())
    exact = (encoded + plan.range_) / plan.step
    assert np.array_equal(exact, np.round(exact))
    for _ in range(3):
        assert np.array_equal(quantize([encoded], plan.range_, TARGET)[0], exact.astype(np.int64))
    # what was added to the clipped update is noise of the share's size, not the update itself
    clipped = update / 3.0
    assert np.std(encoded - clipped) == pytest.approx(1.0 / math.sqrt(3), rel=0.02)


def test_settings_that_cannot_be_honoured_are_refused() -> None:
    with pytest.raises(ValueError, match="powers of two"):
        distributed_dp.plan(clip=1.0, noise_multiplier=1.0, min_contributors=3, dim=DIM, range_=6.0,
                            target_range=TARGET)
    with pytest.raises(ValueError, match="cannot hold a clipped coordinate"):
        distributed_dp.plan(clip=1.0, noise_multiplier=1.0, min_contributors=3, dim=DIM, range_=2.0,
                            target_range=TARGET)
    with pytest.raises(ValueError, match="away from one"):  # a grid so coarse the shares are 1 step wide
        distributed_dp.plan(clip=1.0, noise_multiplier=0.001, min_contributors=3, dim=4, range_=2.0,
                            target_range=4)
    base = {"secagg.enabled": True, "central_dp.enabled": True, "central_dp.clip_on": "client",
            "secagg.noise": "distributed"}
    config.from_flat(base)
    for extra, message in (({"central_dp.enabled": False}, "distributed noise is central DP's noise"),
                           ({"secagg.shares": 0.5}, "use 1.0"), ({"secagg.clipping_range": 4.0}, "leave it 0")):
        with pytest.raises(ConfigError, match=message):
            config.from_flat({**base, **extra})


def test_three_nodes_release_the_nodes_noise_and_account_it(tmp_path: Path) -> None:
    """End to end under SecAgg+: with updates near 0 the released model minus the initial one is
    the nodes' summed noise over m = 3; its std, times 3, is z C."""
    from fl.cli import main

    synthesize(tmp_path / "data", nodes=3, task=get_task("seg2d"), image_size=32)
    z = 2.0
    assert main([
        "run", str(REPO / "configs" / "quickstart.toml"), "--out", str(tmp_path / "runs"),
        "--set", f'data.root="{tmp_path / "data"}"', "--set", "data.nodes=3", "--set", "data.image_size=32",
        "--set", "rounds=1", "--set", "train.epochs=1", "--set", "train.lr=1e-12",
        "--set", "strategy.evaluate_initial=false", "--set", f'registry.root="{tmp_path / "reg"}"',
        "--set", "model_name=ddp", "--set", "output.run_name=ddp", "--set", "secagg.enabled=true",
        "--set", "central_dp.enabled=true", "--set", "central_dp.clip_on='client'",
        "--set", f"central_dp.noise_multiplier={z}", "--set", "secagg.noise='distributed'",
        "--set", "node_policy.require_distributed_noise=true",
    ]) == 0
    released = load_file(tmp_path / "runs" / "ddp" / "model.safetensors")
    initial = initial_arrays(config.from_flat({"data.image_size": 32})).to_torch_state_dict()
    moved = np.concatenate([(released[k].double() - initial[k].double()).numpy().ravel()
                            for k in initial if initial[k].is_floating_point()])
    assert moved.size > 50_000
    assert (3 * moved).std() == pytest.approx(z * 1.0, rel=0.1)
    manifest = json.loads((tmp_path / "reg" / "ddp" / "v1" / "manifest.json").read_text())
    assert manifest["secure_aggregation"]["secagg.noise"] == "distributed"
    expected = accounting.epsilon([accounting.GaussianEvent(z, 1.0, 1)], 1e-5)
    assert manifest["privacy"]["client_level"]["epsilon"] == pytest.approx(expected)


def test_a_node_requiring_distributed_noise_refuses_server_noise(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from fl.cli import main

    synthesize(tmp_path / "data", nodes=3, task=get_task("seg2d"), image_size=32)
    assert main([
        "run", str(REPO / "configs" / "quickstart.toml"), "--out", str(tmp_path / "runs"),
        "--set", f'data.root="{tmp_path / "data"}"', "--set", "data.nodes=3", "--set", "data.image_size=32",
        "--set", "rounds=1", "--set", "train.epochs=1", "--set", "strategy.evaluate_initial=false",
        "--set", f'registry.root="{tmp_path / "reg"}"', "--set", "secagg.enabled=true",
        "--set", "central_dp.enabled=true", "--set", "central_dp.clip_on='client'",
        "--set", "node_policy.require_distributed_noise=true",
    ]) == 2
    assert "own share of the noise" in capsys.readouterr().err
