"""FedExP: FedAvg with a server step that extrapolates when the nodes' updates disagree.

Jhunjhunwala, Wang and Joshi, "FedExP: Speeding Up Federated Averaging via Extrapolation"
(ICLR 2023). Averaging M updates that point in different directions shrinks the step: the
average moves the model about as far as one node's local steps, a third of what pooled
training over the same cases moves it on three sites. FedExP takes the round's step along the
(weighted) average update ``u = sum_i p_i delta_i`` as

    eta = max(1, sum_i p_i ||delta_i||^2 / (2 (||u||^2 + epsilon)))

so the step is 1 (plain FedAvg) when the updates agree and grows as they cancel. It reads every
node's update: under SecAgg+ or client-level DP the server sees only their (noisy) sum, and the
config refuses the combination rather than quietly running FedAvg. Under record-level DP each
update is a DP release and the step is post-processing of them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fl import wire

log = logging.getLogger(__name__)


class FedExP(FedAvg):
    """FedAvg with FedExP's adaptive server step; :attr:`steps` lists the step of each round, and
    each round's train metrics carry it (:data:`fl.wire.SERVER_STEP`)."""

    def __init__(self, *, epsilon: float = 1e-3, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.epsilon = epsilon
        self.current: ArrayRecord | None = None
        self.steps: list[float] = []

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.current = arrays
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        average, metrics = super().aggregate_train(server_round, replies)
        if average is None or self.current is None:
            return average, metrics
        keys = list(average.keys())
        start = {k: self.current[k].numpy().astype(np.float64) for k in keys}
        # the replies and weights FedAvg averaged: every reply without an error, its one array
        # record and the weight in its one metric record (Flower's aggregate_arrayrecords)
        used = [r.content for r in replies if not r.has_error()]
        weights = np.array([float(next(iter(c.metric_records.values()))[self.weighted_by_key]) for c in used])
        weights = weights / weights.sum()
        received = [next(iter(c.array_records.values())) for c in used]
        spread = sum(w * sum(float(np.sum((r[k].numpy() - start[k]) ** 2)) for k in keys)
                     for w, r in zip(weights, received, strict=True))
        update = {k: average[k].numpy().astype(np.float64) - start[k] for k in keys}
        length = sum(float(np.sum(u ** 2)) for u in update.values())
        step = max(1.0, spread / (2.0 * (length + self.epsilon)))
        self.steps.append(step)
        log.info("fedexp: round %d takes %.3g times the average update", server_round, step)
        metrics = MetricRecord({**dict(metrics or {}), wire.SERVER_STEP: step})  # kept in the round's record
        dtype = {k: average[k].numpy().dtype for k in keys}
        return ArrayRecord({k: Array(np.asarray(start[k] + step * update[k], dtype=dtype[k])) for k in keys}), metrics
