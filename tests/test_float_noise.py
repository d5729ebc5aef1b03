"""Floating-point noise (Mironov, CCS 2012): an adversary who knows every other node's update
checks, coordinate by coordinate, whether ``m * (released - previous) - known_sum`` lies on the
float32 grid. Noise drawn in float32 and added to a float64 sum keeps that grid only when the
target node did not take part; float64 noise, rounded once at release, leaves nothing to see."""

from __future__ import annotations

from unittest.mock import MagicMock

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity

from fl import wire
from fl.privacy.clipping import clip
from fl.privacy.noise import SecureGaussian
from strategies.central_dp import CentralDP, CentralDpSettings

COORDS = 52_000  # the seg2d network's size
NODES, CLIP = 3, 1.0


class _Float32Noise(SecureGaussian):
    """The noise source as it was: secure bits, but samples on the float32 grid."""

    def gaussian(self, shape: tuple[int, ...], std: float) -> torch.Tensor:
        return super().gaussian(shape, std).to(torch.float32)


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


def _reply(node: int, arrays: dict[str, np.ndarray]) -> Message:
    content = RecordDict({wire.ARRAYS: ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                          wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: 10})})
    msg = Message(content=content, dst_node_id=0, message_type="train")
    msg.metadata.__dict__["_src_node_id"] = node
    return msg


def on_float32_grid(dtype: type, z: float, target_takes_part: bool, noise: SecureGaussian,
                    rng: np.random.Generator) -> float:
    """One release, then the adversary's statistic: the fraction of coordinates of
    ``m (released - previous) - known_sum`` that a float32 holds exactly."""
    previous = {"w": rng.normal(0, 0.1, COORDS).astype(dtype)}
    models = [{"w": (previous["w"] + rng.normal(0, 0.01, COORDS)).astype(dtype)} for _ in range(NODES)]
    dp = CentralDP(FedAvg(min_train_nodes=1, min_available_nodes=1),
                   CentralDpSettings(noise_multiplier=z, clipping_norm=CLIP, num_nodes=NODES), noise=noise)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("flwr.serverapp.strategy.fedavg.sample_nodes", lambda g, a, size: ([1, 2, 3], [1, 2, 3]))
        grid = MagicMock()
        grid.get_node_ids.return_value = [1, 2, 3]
        list(dp.configure_train(1, ArrayRecord({"w": Array(previous["w"])}), ConfigRecord(), grid))
    replies = [_reply(i + 1, m) for i, m in enumerate(models) if target_takes_part or i > 0]
    released = dp.aggregate_train(1, replies)[0]["w"].numpy().astype(np.float64)
    known = sum(clip({"w": m["w"].astype(np.float64) - previous["w"].astype(np.float64)}, CLIP)[0]["w"]
                for m in models[1:])
    d = NODES * (released - previous["w"].astype(np.float64)) - known
    return float(np.mean(d.astype(np.float32).astype(np.float64) == d))


@pytest.mark.parametrize("z", [1.0, 9.0])
def test_float32_noise_is_told_apart_and_float64_noise_is_not(z: float) -> None:
    rng = np.random.default_rng(0)
    # positive control: the old noise on a float64 model gives the node away in every trial
    old_in = on_float32_grid(np.float64, z, True, _Float32Noise(), rng)
    old_out = on_float32_grid(np.float64, z, False, _Float32Noise(), rng)
    assert old_out > 0.5 and old_in < 0.05, (old_in, old_out)
    # the noise as it is: the statistic is the same with and without the node, on float64
    # models and on float32 ones (rounded once, at release)
    for dtype in (np.float64, np.float32):
        with_node = [on_float32_grid(dtype, z, True, SecureGaussian(), rng) for _ in range(2)]
        without = [on_float32_grid(dtype, z, False, SecureGaussian(), rng) for _ in range(2)]
        assert max(with_node + without) - min(with_node + without) < 0.01, (dtype, with_node, without)


def test_noise_is_float64() -> None:
    assert SecureGaussian().gaussian((5,), 1.0).dtype == torch.float64
