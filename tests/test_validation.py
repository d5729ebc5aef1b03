"""Hostile or broken replies never reach aggregation; robust aggregators resist scaling."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fl import wire
from fl.config import Config
from strategies import build_strategy
from strategies.validation import validate

GLOBAL = {"w": np.zeros((4, 3), np.float32), "b": np.zeros(3, np.float32)}


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


def _record(values: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in values.items()})


def _reply(node: int, arrays: dict[str, np.ndarray], examples: object = 10) -> Message:
    content = RecordDict({wire.ARRAYS: _record(arrays), wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: examples})})
    msg = Message(content=content, dst_node_id=0, message_type="train")
    msg.metadata.__dict__["_src_node_id"] = node
    return msg


def _honest(value: float = 0.1) -> dict[str, np.ndarray]:
    return {k: np.full_like(v, value) for k, v in GLOBAL.items()}


HOSTILE = {
    "nan": ({"w": np.full((4, 3), np.nan, np.float32), "b": np.zeros(3, np.float32)}, 10, "NaN or infinite"),
    "inf": ({"w": np.zeros((4, 3), np.float32), "b": np.array([np.inf, 0, 0], np.float32)}, 10, "NaN or infinite"),
    "shape": ({"w": np.zeros((3, 4), np.float32), "b": np.zeros(3, np.float32)}, 10, "float32[3, 4], the model has float32[4, 3]"),
    "dtype": ({"w": np.zeros((4, 3), np.float64), "b": np.zeros(3, np.float32)}, 10, "is float64"),
    "missing": ({"w": np.zeros((4, 3), np.float32)}, 10, "missing ['b']"),
    "extra": ({**GLOBAL, "x": np.zeros(1, np.float32)}, 10, "unexpected ['x']"),
    "scaled": ({k: v * 1000 for k, v in _honest().items()}, 10, "exceeds strategy.max_update_norm 5"),
    "count": (_honest(), 0, "example count 0 is not a positive integer"),
    "float-count": (_honest(), 2.5, "example count 2.5"),
}


@pytest.mark.parametrize("kind", list(HOSTILE))
def test_each_kind_of_bad_reply_is_excluded_with_its_reason(kind: str) -> None:
    arrays, count, fragment = HOSTILE[kind]
    accepted, excluded = validate([_reply(1, _honest()), _reply(666, arrays, count)], _record(GLOBAL), 5.0)
    assert [str(m.metadata.src_node_id) for m in accepted] == ["1"]
    assert list(excluded) == ["666"] and fragment in excluded["666"]


def test_validated_fedavg_stays_finite_and_clean_under_attack() -> None:
    replies = [_reply(i, _honest()) for i in range(1, 4)] + [_reply(9, arrays, c) for arrays, c, _ in HOSTILE.values()]
    accepted, excluded = validate(replies, _record(GLOBAL), 5.0)
    strategy = build_strategy(Config())
    arrays, _ = strategy.aggregate_train(1, accepted)
    assert len(excluded) == 1  # one node id, all of its bad replies
    assert all(np.allclose(a.numpy(), 0.1) for a in arrays.values())


@pytest.mark.parametrize("name", ["median", "trimmedavg", "krum"])
def test_robust_aggregators_ignore_one_scaled_update_among_four(name: str) -> None:
    cfg = Config().replace(**{"strategy.name": name, "data.nodes": 4, "strategy.krum_malicious": 1,
                              "strategy.trim_beta": 0.25})

    def replies() -> list[Message]:  # fresh each time: Flower's aggregators consume their input
        honest = [_reply(i, _honest(0.1 + 0.01 * i)) for i in range(1, 4)]
        return [*honest, _reply(9, {k: v * 100 for k, v in _honest(0.1).items()})]

    arrays, _ = build_strategy(cfg).aggregate_train(1, replies())
    for a in arrays.values():
        assert np.all(np.abs(a.numpy()) < 0.2)
    plain, _ = build_strategy(Config()).aggregate_train(1, replies())
    assert np.all(np.abs(plain["w"].numpy()) > 2)  # what the attack does to plain FedAvg
