"""What both secure-aggregation protocols share (Flower's SecAgg+, :mod:`strategies.secagg`, and
OncoFed's malicious-secure stages, :mod:`strategies.secure_sum`): the counts of a round (shares,
threshold), what a round reveals, and the grid that keeps each node's error reply.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.serverapp import Grid

from fl import wire
from fl.packing import PackingGrid


@dataclass
class SecureRoundResult:
    """What one SecAgg+ round reveals: the sum of the updates and who contributed."""

    update_sum: dict[str, np.ndarray] | None
    contributors: int
    metrics: list[dict[str, Any]] = field(default_factory=list)  # per-node scalars (loss, epsilon)
    node_ids: list[int] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)
    skipped: str | None = None  # why this round aggregated nothing (too few contributors)
    # released; halted (the workflow stopped before unmasking); discarded (unmasked, then dropped);
    # skipped (too few nodes sampled: nothing was sent)
    outcome: str = "released"


class RecordingGrid(PackingGrid):
    """The packing grid, keeping each node's last error reply: Flower's workflow drops the node from
    the round and says only that it halted."""

    def __init__(self, grid: Grid) -> None:
        super().__init__(grid)
        self.errors: dict[str, str] = {}

    def pull_messages(self, message_ids: Any) -> Any:
        replies = list(super().pull_messages(message_ids))
        for reply in replies:
            if reply.has_error():
                self.errors[str(reply.metadata.src_node_id)] = f"error {reply.error.code}: {reply.error.reason}"
        return replies


def share_count(sampled: int, shares: float) -> int:
    """How many nodes each node shares its keys with (itself included), by Flower's rule for a
    fraction: ``round(shares * n)``, made odd below ``n``, and all ``n`` when that leaves 2 or fewer."""
    s = round(shares * sampled)
    if s < sampled and s % 2 == 0:
        s += 1
    return sampled if s <= 2 else min(s, sampled)


def min_contributors(sampled: int, threshold: float, shares: float = 1.0) -> int:
    """The SecAgg+ threshold t of a round of ``sampled`` nodes, given to Flower as an integer so that
    Flower itself unmasks no sum of fewer: ``round(threshold * s)``, raised to OncoFed's floor of 3
    and above half the share count s (a guarded node refuses ``2t <= s``: its self-mask and key
    shares could then both be rebuilt)."""
    s = share_count(sampled, shares)
    return min(s, max(wire.SECAGG_MIN_NODES, round(threshold * s), s // 2 + 1))
