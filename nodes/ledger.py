"""A node's privacy ledger: every record-level spend, append-only and hash-chained.

One JSON line per local DP training: the mechanism (noise multiplier, sample rate, steps),
the run and round that asked for it, and the cumulative epsilon after it. Each line carries
the SHA-256 of the previous line and its own, so an edited, reordered or truncated-in-the-
middle ledger is detected; a corrupted ledger stops training (fail closed). The ledger lives
on the node, beside its data, and survives restarts and new runs: spent budget only grows.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fl.accounting import GaussianEvent
from fl.errors import OncoFedError

LEDGER_FILE = "privacy-ledger.jsonl"


class LedgerError(OncoFedError):
    """The ledger is unreadable or was tampered with; the node refuses to train."""


def _digest(entry: dict[str, Any]) -> str:
    body = {k: v for k, v in entry.items() if k != "hash"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass(frozen=True)
class Ledger:
    """The ledger file of one node."""

    path: Path

    @classmethod
    def in_dir(cls, folder: str | Path) -> Ledger:
        return cls(Path(folder) / LEDGER_FILE)

    def entries(self) -> list[dict[str, Any]]:
        """Every entry, after checking the whole chain."""
        if not self.path.exists():
            return []
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise LedgerError(f"{self.path}: unreadable privacy ledger ({exc})") from None
        entries, prev = [], None
        for number, line in enumerate(lines, start=1):
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                raise LedgerError(f"{self.path}: line {number} is not JSON; the ledger was damaged") from None
            if entry.get("seq") != number or entry.get("prev") != prev or _digest(entry) != entry.get("hash"):
                raise LedgerError(f"{self.path}: line {number} fails its checksum chain; the ledger was altered")
            entries.append(entry)
            prev = entry["hash"]
        return entries

    def events(self) -> list[GaussianEvent]:
        return [GaussianEvent.from_dict(e["event"]) for e in self.entries()]

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the node's ledger exclusively (check-then-append must not race)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "a+b") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def append(self, event: GaussianEvent, **fields: Any) -> dict[str, Any]:
        """Append one spend (call inside :meth:`locked`); fsynced before returning."""
        entries = self.entries()
        entry = {
            **fields,
            "seq": len(entries) + 1,
            "event": event.to_dict(),
            "prev": entries[-1]["hash"] if entries else None,
        }
        entry["hash"] = _digest(entry)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        return entry
