"""Moving a global model by an update, in the model's own dtypes."""

from __future__ import annotations

from typing import Any

from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import Strategy

from fl import wire


def same_dtypes(new: ArrayRecord, old: ArrayRecord) -> ArrayRecord:
    """``new`` in ``old``'s dtypes: some aggregators (FedAdam) compute in float64, but the global
    model keeps the task network's dtypes, which every node's reply is validated against."""
    if all(new[k].dtype == old[k].dtype for k in old.keys() if k in new):
        return new
    return ArrayRecord({k: Array(a.numpy().astype(old[k].numpy().dtype, copy=False)) if k in old else a
                        for k, a in new.items()})


def apply_update(strategy: Strategy, server_round: int, arrays: ArrayRecord, update: dict[str, Any]) -> ArrayRecord:
    """Hand ``arrays + update`` to ``strategy`` as the round's only reply; its aggregate."""
    moved = {k: Array((a.numpy().astype("float64") + update[k]).astype(a.numpy().dtype)) for k, a in arrays.items()}
    reply = Message(RecordDict({wire.ARRAYS: ArrayRecord(moved), wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: 1})}),
                    dst_node_id=0, message_type="train")
    new_arrays, _ = strategy.aggregate_train(server_round, [reply])
    return new_arrays
