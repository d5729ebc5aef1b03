"""The coordinator's side of the nodes' ledger witness (``nodes.witness``).

Every reply carries the node's ledger heads (its pseudonymous site id, and per ledger the entry
count and a MAC under the node's own key). The coordinator keeps the newest head of each site in
``<registry.root>/ledger-heads.json``, with the Flower node ids each site replied from, and sends
each node back the head of its own site only (other nodes never learn a site's id or its counts);
a node whose ledger fell behind what was acknowledged for it refuses to serve. Heads only ever
move forward here: a reply with a shorter ledger than the one acknowledged comes from a node that
was restored from an older copy, and keeping the longer head keeps that node refusing.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fl import schema
from fl.server.run_folder import atomic_write

log = logging.getLogger("flwr.oncofed.server")
HEADS_FILE = "ledger-heads.json"
LEDGERS = ("record", "contributions")


@dataclass
class LedgerWitness:
    path: Path
    heads: dict[str, dict[str, list[Any]]]  # site id -> its newest head per ledger
    nodes: dict[str, str]  # Flower node id -> the site it replied as

    @classmethod
    def of(cls, registry_root: str | Path) -> LedgerWitness:
        path = Path(registry_root) / HEADS_FILE
        try:
            raw = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
        except (OSError, json.JSONDecodeError) as exc:
            raise OSError(f"{path}: unreadable ledger heads ({exc})") from None
        if not isinstance(raw, dict):
            raw = {}
        schema.check("ledger-heads", raw, path)
        return cls(path, dict(raw.get("heads", {})), dict(raw.get("nodes", {})))

    def acks_for(self, node_id: int | str) -> str:
        """What an instruction to ``node_id`` carries (``fl.wire.LEDGER_ACKS``): its own site's head, if known."""
        site = self.nodes.get(str(node_id))
        return json.dumps({site: self.heads[site]} if site in self.heads else {}, sort_keys=True)

    def update(self, reported: Iterable[tuple[str, str]]) -> None:
        """Keep each site's newest head from the replies' ``(node id, ledger-head)``; saved at once."""
        changed = False
        for node, raw in reported:
            head = _parse(raw)
            if head is None:
                continue
            site = head.pop("site")
            if self.nodes.get(str(node)) != site:
                self.nodes[str(node)] = site
                changed = True
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
            data = {"heads": self.heads, "nodes": self.nodes, **schema.stamp("ledger-heads")}
            atomic_write(self.path, (json.dumps(data, sort_keys=True, indent=1) + "\n").encode())

    def with_acks(self, messages: Iterable[Any]) -> list[Any]:
        """``messages`` with each one's config carrying its node's acknowledged head (a copy per message)."""
        from flwr.app import ConfigRecord, RecordDict

        from fl import wire

        out = list(messages)
        for message in out:  # strategies may hand every message the same content: each gets its own
            ack = self.acks_for(message.metadata.dst_node_id)
            config = ConfigRecord({**dict(message.content[wire.CONFIG]), wire.LEDGER_ACKS: ack})
            message.content = RecordDict({**dict(message.content.items()), wire.CONFIG: config})
        return out

    def observe(self, node_info: dict[str, dict[str, str]]) -> None:
        """Keep the heads in a phase's replies (:meth:`fl.server.phases.PhaseResult.node_info`)."""
        from fl import wire

        self.update((node, info[wire.LEDGER_HEAD]) for node, info in node_info.items() if wire.LEDGER_HEAD in info)


def _parse(raw: str) -> dict[str, Any] | None:
    """A reply's head, or None when it is malformed (only modified node code sends one)."""
    try:
        head = json.loads(raw)
    except (TypeError, json.JSONDecodeError):
        return None
    ok = isinstance(head, dict) and isinstance(head.get("site"), str) and all(
        isinstance(head.get(n), list) and len(head[n]) == 2 and type(head[n][0]) is int and head[n][0] >= 0
        and isinstance(head[n][1], str) for n in LEDGERS)
    return {"site": head["site"], **{n: head[n] for n in LEDGERS}} if ok else None
