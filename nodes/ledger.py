"""A node's privacy ledgers: append-only and hash-chained.

- ``privacy-ledger.jsonl``, the record-level ledger: one JSON line per local DP training or
  noisy release, with the mechanism (noise multiplier, sample rate, steps), the run and round that
  asked for it, and the cumulative epsilon after it.
- ``contributions.jsonl``, the client-level ledger: one line per contribution of this node's
  update to a sum (plain, SecAgg+ or with its share of distributed noise), keyed by (run, round),
  with the noise multiplier the node itself applied, and one line per evaluation request served,
  written before the work starts. A second contribution to the same round is refused; the
  client-level budget counts only the node's own noise, with no amplification (the coordinator
  knows who took part).
 Each line carries
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

from fl import schema
from fl.errors import OncoFedError
from fl.privacy import hashchain
from fl.privacy.accounting import GaussianEvent

LEDGER_FILE = "privacy-ledger.jsonl"
CONTRIBUTIONS_FILE = "contributions.jsonl"


class LedgerError(OncoFedError):
    """The ledger is unreadable or was tampered with; the node refuses to train."""


@dataclass(frozen=True)
class Ledger:
    """The ledger file of one node."""

    path: Path

    @classmethod
    def in_dir(cls, folder: str | Path) -> Ledger:
        """The node's record-level ledger."""
        return cls(Path(folder) / LEDGER_FILE)

    @classmethod
    def contributions_in(cls, folder: str | Path) -> Ledger:
        """The node's client-level ledger: contributions and evaluation requests."""
        return cls(Path(folder) / CONTRIBUTIONS_FILE)

    @property
    def kind(self) -> str:
        """The ledger's format (:mod:`fl.schema`): record-level or client-level."""
        return "contributions" if self.path.name == CONTRIBUTIONS_FILE else "privacy-ledger"

    def entries(self) -> list[dict[str, Any]]:
        """Every entry, after checking the whole chain and each entry's schema version."""
        def version(entry: dict[str, Any], number: int) -> None:
            schema.check(self.kind, entry, f"{self.path}: line {number}", error=LedgerError)

        try:
            return hashchain.read_chain(self.path, "privacy ledger", check=version)
        except hashchain.ChainError as exc:
            raise LedgerError(str(exc)) from None

    def events(self, entries: list[dict[str, Any]] | None = None) -> list[GaussianEvent]:
        """The mechanisms of the entries that carry one (a contribution without noise has none)."""
        return [GaussianEvent.from_dict(e["event"]) for e in (self.entries() if entries is None else entries)
                if e.get("event")]

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the node's ledger exclusively (check-then-append must not race)."""
        with hashchain.locked(self.path):
            yield

    def append(self, event: GaussianEvent | None, **fields: Any) -> dict[str, Any]:
        """Append one entry (call inside :meth:`locked`); fsynced before returning."""
        return hashchain.append_entry(self.path, self.entries(),
                                      {**fields, "event": event.to_dict() if event is not None else None,
                                       **schema.stamp(self.kind)})
