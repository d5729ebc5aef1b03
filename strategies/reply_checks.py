"""Check every node's reply before it reaches aggregation.

A reply is accepted only if its arrays have exactly the global model's keys, shapes and
dtypes, every value is finite, the update's L2 norm (all arrays as one vector) is within
``max_update_norm`` when one is configured, and its example count is a positive integer.
Anything else is excluded with the reason, which the server logs and records in the
round's manifest; a broken or hostile node cannot poison the global model this way.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, Message

from fl import wire
from fl.privacy.clipping import l2_norm


def check_reply(reply: Message, global_arrays: ArrayRecord, max_update_norm: float = 0.0) -> str | None:
    """Why ``reply`` must be excluded, or None if it is acceptable."""
    content = reply.content
    if wire.ARRAYS not in content.array_records or wire.METRICS not in content.metric_records:
        return "reply lacks weights or metrics"
    arrays, expected = content[wire.ARRAYS], global_arrays
    missing, extra = set(expected.keys()) - set(arrays.keys()), set(arrays.keys()) - set(expected.keys())
    if missing or extra:
        return f"arrays differ from the global model (missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]})"
    update = {}
    for key in expected.keys():
        got, want = arrays[key].numpy(), expected[key].numpy()
        if got.shape != want.shape or got.dtype != want.dtype:
            return f"array {key!r} is {got.dtype}{list(got.shape)}, the model has {want.dtype}{list(want.shape)}"
        if not np.isfinite(got).all():
            return f"array {key!r} holds NaN or infinite values"
        update[key] = got.astype(np.float64) - want.astype(np.float64)
    count = content[wire.METRICS].get(wire.NUM_EXAMPLES)
    if not isinstance(count, int) or isinstance(count, bool) or count <= 0:
        return f"example count {count!r} is not a positive integer"
    norm = l2_norm(update) if max_update_norm else 0.0
    if norm > max_update_norm > 0:
        return f"update norm {norm:.4g} exceeds strategy.max_update_norm {max_update_norm:g}"
    return None


def check_replies(
    replies: Iterable[Message], global_arrays: ArrayRecord, max_update_norm: float = 0.0
) -> tuple[list[Message], dict[str, str]]:
    """Split ``replies`` into accepted ones and ``{node: reason}`` for the excluded."""
    accepted, excluded = [], {}
    for reply in replies:
        reason = check_reply(reply, global_arrays, max_update_norm)
        if reason is None:
            accepted.append(reply)
        else:
            excluded[str(reply.metadata.src_node_id)] = reason
    return accepted, excluded
