"""One phase of a round: instructions out over Flower's Grid, replies in, each node's outcome kept.

Flower's ``Strategy.start`` waits for all replies of a phase at once and keeps no per-node
record; exchanging the messages here lets the server report progress as each node replies and
name the nodes that failed. Under SecAgg+ the training phase is Flower's SecAgg+ workflow
(:func:`strategies.secagg.secure_train`), seen through the same :class:`PhaseResult`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid

from fl import wire
from fl.config import Config
from strategies.secagg import secure_train

log = logging.getLogger("flwr.oncofed.server")
PULL_INTERVAL_S = 0.05


@dataclass
class PhaseResult:
    """Replies of one phase, split into successes and per-node failures."""

    ok: list[Message] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)
    codes: dict[str, int] = field(default_factory=dict)
    secure: dict[str, dict[str, Any]] = field(default_factory=dict)  # SecAgg+ round: scalars by node
    outcome: str | None = None  # SecAgg+ round: released, halted, discarded or skipped

    @property
    def replied(self) -> int:
        return len(self.ok) + len(self.secure)

    def per_node(self) -> dict[str, dict[str, float]]:
        out = {str(m.metadata.src_node_id): dict(m.content[wire.METRICS]) for m in self.ok}
        for node, scalars in self.secure.items():
            out[node] = {k: float(v) for k, v in scalars.items() if isinstance(v, (int, float))}
        return out

    def node_info(self) -> dict[str, dict[str, str]]:
        """Each replying node's keyed dataset fingerprint and device (strings; nothing about its data)."""
        keys = (wire.DATASET_FINGERPRINT, wire.DEVICE_NAME, wire.LEDGER_HEAD)
        out: dict[str, dict[str, str]] = {}
        for m in self.ok:
            if wire.NODE_INFO in m.content.config_records:
                record = m.content[wire.NODE_INFO]
                out[str(m.metadata.src_node_id)] = {k: str(record[k]) for k in keys if k in record}
        for node, scalars in self.secure.items():
            out[node] = {k: str(scalars[k]) for k in keys if k in scalars}
        return out


def secure_phase(grid: Grid, strategy: Any, server_round: int, arrays: ArrayRecord, train_cfg: ConfigRecord,
                 cfg: Config, acks: Callable[[int], str] | None = None,
                 ) -> tuple[PhaseResult, ArrayRecord | None, dict[str, float] | None]:
    """One training round under SecAgg+ (:func:`strategies.secagg.secure_train`), as a phase; ``acks``
    gives each node's acknowledged ledger head."""
    result = secure_train(grid, strategy, server_round, arrays, train_cfg, cfg, acks=acks)
    if result.skipped:
        log.warning("round %d: %s", server_round, result.skipped)
    res = PhaseResult(failures=dict(result.failures), outcome=result.outcome)
    res.secure = result.scalars
    return res, result.arrays, result.train_aggregate


def exchange(
    grid: Grid, messages: Iterable[Message], *, timeout: float, report: Callable[[int, int], None]
) -> PhaseResult:
    """Send ``messages`` and collect replies until all arrive or ``timeout`` passes."""
    messages = list(messages)
    pending = {mid: m.metadata.dst_node_id for mid, m in zip(grid.push_messages(messages), messages)}
    total, result = len(pending), PhaseResult()
    deadline = time.monotonic() + timeout
    report(0, total)
    while pending and time.monotonic() < deadline:
        replies = list(grid.pull_messages(list(pending)))
        for reply in replies:
            pending.pop(reply.metadata.reply_to_message_id, None)
            node = str(reply.metadata.src_node_id)
            if reply.has_error():
                result.failures[node] = f"error {reply.error.code}: {reply.error.reason}"
                result.codes[node] = reply.error.code
            else:
                result.ok.append(reply)
        if replies:
            report(total - len(pending), total)
        elif pending:
            time.sleep(PULL_INTERVAL_S)
    for node_id in pending.values():
        result.failures[str(node_id)] = f"no reply within {timeout:g} s"
    return result
