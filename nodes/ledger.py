"""A node's privacy ledger: every record-level spend, append-only and hash-chained.

One JSON line per local DP training: the mechanism (noise multiplier, sample rate, steps),
the run and round that asked for it, and the cumulative epsilon after it. Each line carries
the SHA-256 of the previous line and its own, so an edited, reordered or truncated-in-the-
middle ledger is detected; a corrupted ledger stops training (fail closed). The ledger lives
on the node, beside its data, and survives restarts and new runs: spent budget only grows.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fl.errors import OncoFedError
from fl.privacy import hashchain
from fl.privacy.accounting import GaussianEvent

LEDGER_FILE = "privacy-ledger.jsonl"


class LedgerError(OncoFedError):
    """The ledger is unreadable or was tampered with; the node refuses to train."""


@dataclass(frozen=True)
class Ledger:
    """The ledger file of one node."""

    path: Path

    @classmethod
    def in_dir(cls, folder: str | Path) -> Ledger:
        return cls(Path(folder) / LEDGER_FILE)

    def entries(self) -> list[dict[str, Any]]:
        """Every entry, after checking the whole chain."""
        try:
            return hashchain.read_chain(self.path, "privacy ledger")
        except hashchain.ChainError as exc:
            raise LedgerError(str(exc)) from None

    def events(self) -> list[GaussianEvent]:
        return [GaussianEvent.from_dict(e["event"]) for e in self.entries()]

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the node's ledger exclusively (check-then-append must not race)."""
        with hashchain.locked(self.path):
            yield

    def append(self, event: GaussianEvent, **fields: Any) -> dict[str, Any]:
        """Append one spend (call inside :meth:`locked`); fsynced before returning."""
        return hashchain.append_entry(self.path, self.entries(), {**fields, "event": event.to_dict()})
