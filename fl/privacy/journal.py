"""The server's write-ahead journal of client-level DP releases.

A release is journaled, fsynced, before the noisy model leaves the server (for evaluation or
the next round's training), and the registry commit follows. A crash in between would
otherwise lose that release from the accountant, and the resumed run would release again on
the same data: the journal keeps it. Entries belong to a lineage (one run and every resume of
it), recorded in each version's manifest; a resumed run continues its lineage's history from
the journal, not from the manifest, so releases that never reached a commit still count.

``<registry.root>/<model_name>/privacy-journal.jsonl``, hash-chained like a node's ledger.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fl import schema
from fl.errors import OncoFedError
from fl.privacy import hashchain
from fl.privacy.accounting import GaussianEvent

JOURNAL_FILE = "privacy-journal.jsonl"


class JournalError(OncoFedError):
    """The journal is unreadable or was altered: the client-level history cannot be trusted."""


@dataclass(frozen=True)
class ReleaseJournal:
    """The journal of one model name in one registry."""

    path: Path

    @classmethod
    def of(cls, registry_root: str | Path, model_name: str) -> ReleaseJournal:
        """The journal beside the model's versions (``model_name`` is validated by the config)."""
        return cls(Path(registry_root) / model_name / JOURNAL_FILE)

    def _version(self, entry: dict[str, Any], number: int) -> None:
        """Refuse an entry written by a newer OncoFed (:mod:`fl.schema`), before its checksum."""
        schema.check("privacy-journal", entry, f"{self.path}: line {number}", error=JournalError)

    def entries(self, lineage: str) -> list[dict[str, Any]]:
        try:
            entries = hashchain.read_chain(self.path, "release journal", check=self._version)
        except hashchain.ChainError as exc:
            raise JournalError(f"{exc}; the client-level privacy history cannot be trusted") from None
        return [e for e in entries if e.get("lineage") == lineage]

    def events(self, lineage: str) -> list[GaussianEvent]:
        return [GaussianEvent.from_dict(e["event"]) for e in self.entries(lineage) if e.get("event")]

    def outcomes(self, lineage: str) -> dict[str, int]:
        """How the journaled rounds of ``lineage`` ended (released, halted, discarded, skipped), counted."""
        counts: dict[str, int] = {}
        for entry in self.entries(lineage):
            if "outcome" in entry:
                counts[entry["outcome"]] = counts.get(entry["outcome"], 0) + 1
        return counts

    def record(self, lineage: str, event: GaussianEvent | None, **fields: Any) -> None:
        """Append one release of ``lineage`` (or, with no event, a note on how a journaled round
        ended); durable when this returns."""
        with hashchain.locked(self.path):
            try:
                entries = hashchain.read_chain(self.path, "release journal", check=self._version)
            except hashchain.ChainError as exc:
                raise JournalError(str(exc)) from None
            hashchain.append_entry(self.path, entries, {**fields, "lineage": lineage,
                                                        "event": event.to_dict() if event is not None else None,
                                                        "time": time.time(), **schema.stamp("privacy-journal")})
