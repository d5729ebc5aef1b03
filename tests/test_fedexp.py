"""FedExP's server step: 1 when the nodes' updates agree, larger as they cancel; refused where
the server cannot see each update."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, Metadata, MetricRecord, RecordDict
from flwr.common.serde import make_message

from fl import config, wire
from fl.errors import ConfigError
from strategies.fedexp import FedExP


def _reply(node: int, weights: np.ndarray, examples: int) -> Message:
    content = RecordDict({wire.ARRAYS: ArrayRecord({"w": Array(weights.astype(np.float32))}),
                          wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: examples})})
    metadata = Metadata(run_id=1, message_id=f"m{node}", src_node_id=node, dst_node_id=0, reply_to_message_id="q",
                        group_id="1", created_at=0.0, ttl=60.0, message_type="train")
    return make_message(metadata, content)


def _round(start: np.ndarray, updates: list[np.ndarray], examples: list[int]) -> tuple[np.ndarray, float]:
    strategy = FedExP(weighted_by_key=wire.NUM_EXAMPLES, arrayrecord_key=wire.ARRAYS)
    strategy.current = ArrayRecord({"w": Array(start.astype(np.float32))})
    replies = [_reply(i + 1, start + u, n) for i, (u, n) in enumerate(zip(updates, examples, strict=True))]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics is not None and metrics[wire.SERVER_STEP] == strategy.steps[-1]
    return arrays["w"].numpy(), strategy.steps[-1]


def test_agreeing_updates_give_plain_fedavg() -> None:
    start = np.array([0.5, -1.0])
    model, step = _round(start, [np.array([0.2, 0.4])] * 3, [10, 20, 30])
    assert step == 1.0
    np.testing.assert_allclose(model, start + [0.2, 0.4], atol=1e-6)


def test_disagreeing_updates_extrapolate_by_the_papers_step() -> None:
    start = np.zeros(2)
    # weights 1/4 and 3/4: average (1, -1); sum_i p_i ||delta_i||^2 = (1/4)(1 + 25) + (3/4)(1 + 9) = 14
    model, step = _round(start, [np.array([1.0, 5.0]), np.array([1.0, -3.0])], [10, 30])
    expected = 14 / (2 * (2 + 1e-3))
    assert step == pytest.approx(expected, rel=1e-6)
    np.testing.assert_allclose(model, expected * np.array([1.0, -1.0]), rtol=1e-5)


def test_fedexp_is_refused_where_the_server_sees_only_a_sum() -> None:
    with pytest.raises(ConfigError, match="fedexp takes its step from each node's update; under central DP"):
        config.from_flat({"strategy.name": "fedexp", "central_dp.enabled": True})
    config.from_flat({"strategy.name": "fedexp", "local_dp.enabled": True})  # record-level DP: each update is a release
