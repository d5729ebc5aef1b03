"""Client-level DP: clipping bound, noise calibration, sampling, adaptive norm, composition."""

from __future__ import annotations

import math
import secrets
from unittest.mock import MagicMock

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg
from flwr.supercore.task_identity import TaskIdentity
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fl import wire
from fl.privacy.clipping import clip
from fl.privacy.noise import SeededGaussian
from strategies.central_dp import CentralDP, CentralDpSettings

SHAPES = {"w": (30, 40), "b": (40,), "s": ()}


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    # a fresh run for every test: a node serves one contribution per (run, round)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = secrets.randbits(48), 1, 0


def _arrays(values: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v, dtype=np.float32)) for k, v in values.items()})


def _zeros() -> dict[str, np.ndarray]:
    return {k: np.zeros(s, dtype=np.float32) for k, s in SHAPES.items()}


def _reply(node: int, arrays: dict[str, np.ndarray], **metrics: float) -> Message:
    content = RecordDict({wire.ARRAYS: _arrays(arrays),
                          wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: 10, **metrics})})
    msg = Message(content=content, dst_node_id=0, message_type="train")
    msg.metadata.__dict__["_src_node_id"] = node
    return msg


def _grid(n: int) -> MagicMock:
    grid = MagicMock()
    grid.get_node_ids.return_value = list(range(1, n + 1))
    return grid


def _wrapper(settings: CentralDpSettings, inner=None, seed: int = 0) -> CentralDP:  # noqa: ANN001
    inner = inner or FedAvg(min_train_nodes=1, min_available_nodes=1)
    return CentralDP(inner, settings, noise=SeededGaussian(seed))


def _round(dp: CentralDP, replies_for, nodes: int = 3) -> dict[str, np.ndarray]:  # noqa: ANN001
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("flwr.serverapp.strategy.fedavg.sample_nodes", lambda grid, min_avail, size: (list(range(1, size + 1)), list(range(1, nodes + 1))))
        messages = list(dp.configure_train(1, _arrays(_zeros()), ConfigRecord(), _grid(nodes)))
    arrays, _ = dp.aggregate_train(1, replies_for(messages))
    return {k: v.numpy() for k, v in arrays.items()}


def test_noise_std_on_the_average_is_sigma_c_over_m() -> None:
    settings = CentralDpSettings(noise_multiplier=2.0, clipping_norm=0.5, num_nodes=4)
    dp = _wrapper(settings)
    out = _round(dp, lambda msgs: [_reply(i, _zeros()) for i in range(4)], nodes=4)
    noise = np.concatenate([v.ravel() for v in out.values()])
    assert noise.std() == pytest.approx(2.0 * 0.5 / 4, rel=0.05)
    assert abs(noise.mean()) < 0.01


@settings(max_examples=40, deadline=None)
@given(
    w=hnp.arrays(np.float64, (7, 3), elements=st.floats(-1e6, 1e6)),
    s=st.floats(-1e6, 1e6),
    bound=st.floats(1e-3, 10.0),
)
def test_clipped_update_never_exceeds_the_bound(w: np.ndarray, s: float, bound: float) -> None:
    clipped, norm = clip({"w": w, "s": np.array(s), "empty": np.zeros((0, 4))}, bound)
    clipped_norm = math.sqrt(sum(float(np.sum(v**2)) for v in clipped.values()))
    assert clipped_norm <= bound * (1 + 1e-9) + 1e-12
    if norm <= bound:
        assert np.array_equal(clipped["w"], w)


def test_aggregate_moves_at_most_c_over_m_per_node() -> None:
    settings = CentralDpSettings(noise_multiplier=1e-9, clipping_norm=1.0, num_nodes=3)
    huge = {k: np.full(s, 1000.0, dtype=np.float32) for k, s in SHAPES.items()}
    out = _round(_wrapper(settings), lambda msgs: [_reply(1, huge), _reply(2, _zeros()), _reply(3, _zeros())])
    step = math.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in out.values()))
    assert step == pytest.approx(1.0 / 3, rel=1e-4)  # one clipped update over the fixed denominator


def test_client_side_clipping_excludes_oversized_updates() -> None:
    settings = CentralDpSettings(noise_multiplier=1e-9, clipping_norm=1.0, num_nodes=2, clip_on="client")
    dp = _wrapper(settings)
    big = {k: np.full(s, 1.0, dtype=np.float32) for k, s in SHAPES.items()}
    small = {k: v / 1000 for k, v in big.items()}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("flwr.serverapp.strategy.fedavg.sample_nodes", lambda g, a, size: ([1, 2], [1, 2]))
        msgs = list(dp.configure_train(1, _arrays(_zeros()), ConfigRecord(), _grid(2)))
    assert msgs[0].content[wire.CONFIG][wire.CLIENT_CLIP_NORM] == 1.0
    dp.aggregate_train(1, [_reply(1, big, **{wire.UPDATE_NORM_BELOW_CLIP: 0.0}),
                           _reply(2, small, **{wire.UPDATE_NORM_BELOW_CLIP: 1.0})])
    assert list(dp.excluded) == ["1"] and "exceeds the clipping norm" in dp.excluded["1"]


def test_poisson_sampling_follows_the_rate_and_the_injected_source() -> None:
    settings = CentralDpSettings(noise_multiplier=1.0, clipping_norm=1.0, num_nodes=50, sampling="poisson",
                                 sample_rate=0.2)
    dp = _wrapper(settings, seed=5)
    counts = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("flwr.serverapp.strategy.fedavg.sample_nodes",
                   lambda g, a, size: (list(range(1, 51)), list(range(1, 51))))
        for _ in range(200):
            counts.append(len(list(dp.configure_train(1, _arrays(_zeros()), ConfigRecord(), _grid(50)))))
    assert np.mean(counts) == pytest.approx(10, rel=0.05)
    assert settings.round_event().sample_rate == 0.2 and settings.expected_nodes == 10


def test_adaptive_norm_shrinks_when_all_updates_fit_and_grows_when_none_do() -> None:
    settings = CentralDpSettings(noise_multiplier=1e-9, clipping_norm=1.0, num_nodes=20, clipping="adaptive",
                                 count_stddev=1e-9)
    tiny = {k: np.full(s, 1e-4, dtype=np.float32) for k, s in SHAPES.items()}
    huge = {k: np.full(s, 1e3, dtype=np.float32) for k, s in SHAPES.items()}
    shrink = _wrapper(settings)
    _round(shrink, lambda msgs: [_reply(i, tiny) for i in range(20)], nodes=20)
    assert shrink.clip_norm == pytest.approx(math.exp(-0.2 * 0.5))
    grow = _wrapper(settings)
    _round(grow, lambda msgs: [_reply(i, huge) for i in range(20)], nodes=20)
    assert grow.clip_norm == pytest.approx(math.exp(0.2 * 0.5))
    assert settings.round_event().noise_multiplier < 1e-9


def test_fedadam_takes_its_server_step_from_the_noisy_average() -> None:
    settings = CentralDpSettings(noise_multiplier=1e-9, clipping_norm=10.0, num_nodes=2)
    inner = FedAdam(min_train_nodes=1, min_available_nodes=1, eta=0.1)
    dp = _wrapper(settings, inner=inner)
    step = {k: np.full(s, 0.01, dtype=np.float32) for k, s in SHAPES.items()}
    out = _round(dp, lambda msgs: [_reply(1, step), _reply(2, step)], nodes=2)
    assert inner.m_t and inner.v_t  # Adam's moments were updated from the DP aggregate
    assert not np.allclose(out["w"], 0.01)  # Adam's step, not the plain average
    assert np.all(out["w"] > 0)


def test_an_empty_poisson_sample_still_releases_noise_as_accounted() -> None:
    settings = CentralDpSettings(noise_multiplier=1.0, clipping_norm=1.0, num_nodes=10, sampling="poisson",
                                 sample_rate=0.1)
    dp = _wrapper(settings)
    out = _round(dp, lambda msgs: [], nodes=10)  # nobody sampled or every reply lost
    noise = np.concatenate([v.ravel() for v in out.values()])
    assert noise.std() == pytest.approx(1.0 * 1.0 / 1.0, rel=0.05)  # sigma C / (q N), q N = 1


@pytest.mark.parametrize("bit", [1e6, -1e6, float("nan"), float("inf"), 0.5, None])
def test_adaptive_clipping_excludes_a_bit_that_is_not_0_or_1(bit: float | None) -> None:
    settings = CentralDpSettings(noise_multiplier=1.0, clipping_norm=1.0, num_nodes=3, clip_on="client",
                                 clipping="adaptive")
    dp = _wrapper(settings)
    small = {k: np.full(s, 1e-3, dtype=np.float32) for k, s in SHAPES.items()}
    bad = {} if bit is None else {wire.UPDATE_NORM_BELOW_CLIP: bit}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("flwr.serverapp.strategy.fedavg.sample_nodes", lambda g, a, size: ([1, 2, 3], [1, 2, 3]))
        list(dp.configure_train(1, _arrays(_zeros()), ConfigRecord(), _grid(3)))
    dp.aggregate_train(1, [_reply(1, small, **bad), _reply(2, small, **{wire.UPDATE_NORM_BELOW_CLIP: 1.0}),
                           _reply(3, small, **{wire.UPDATE_NORM_BELOW_CLIP: 0.0})])
    assert list(dp.excluded) == ["1"] and "must be 0 or 1" in dp.excluded["1"]
    assert math.isfinite(dp.clip_norm) and 0.1 < dp.clip_norm < 10  # one honest 1 and one 0 moved it little
