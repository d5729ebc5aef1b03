"""The coordinator's side of the nodes' ledger witness (``nodes.witness``).

Every reply carries the node's ledger heads (its pseudonymous site id, and per ledger the entry
count and a MAC under the node's own key). The coordinator keeps the newest head of each site in
``<registry.root>/ledger-heads.json`` and sends them all back with every instruction; a node whose
ledger fell behind what was acknowledged for it refuses to serve. Heads only ever move forward
here: a reply with a shorter ledger than the one acknowledged comes from a node that was restored
from an older copy, and keeping the longer head keeps that node refusing.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fl.server.run_folder import atomic_write

log = logging.getLogger("flwr.oncofed.server")
HEADS_FILE = "ledger-heads.json"
LEDGERS = ("record", "contributions")


@dataclass
class LedgerWitness:
    path: Path
    heads: dict[str, dict[str, list[Any]]]

    @classmethod
    def of(cls, registry_root: str | Path) -> LedgerWitness:
        path = Path(registry_root) / HEADS_FILE
        try:
            heads = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
        except (OSError, json.JSONDecodeError) as exc:
            raise OSError(f"{path}: unreadable ledger heads ({exc})") from None
        return cls(path, heads if isinstance(heads, dict) else {})

    def acks(self) -> str:
        """What every instruction carries (``fl.wire.LEDGER_ACKS``)."""
        return json.dumps(self.heads, sort_keys=True)

    def update(self, reported: Iterable[str]) -> None:
        """Keep each site's newest head from the replies' ``ledger-head`` values; saved at once."""
        changed = False
        for raw in reported:
            head = _parse(raw)
            if head is None:
                continue
            site = head.pop("site")
            known = self.heads.get(site, {})
            behind = [n for n in LEDGERS if known and head[n][0] < known[n][0]]
            if behind:
                log.warning("site %s reports a shorter %s ledger than acknowledged: it will refuse until restored",
                            site, " and ".join(behind))
                continue
            if head != known:
                self.heads[site] = head
                changed = True
        if changed:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.path, (json.dumps(self.heads, sort_keys=True, indent=1) + "\n").encode())


def _parse(raw: str) -> dict[str, Any] | None:
    """A reply's head, or None when it is malformed (only modified node code sends one)."""
    try:
        head = json.loads(raw)
    except (TypeError, json.JSONDecodeError):
        return None
    ok = isinstance(head, dict) and isinstance(head.get("site"), str) and all(
        isinstance(head.get(n), list) and len(head[n]) == 2 and isinstance(head[n][0], int)
        and isinstance(head[n][1], str) for n in LEDGERS)
    return {"site": head["site"], **{n: head[n] for n in LEDGERS}} if ok else None
