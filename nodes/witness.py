"""The coordinator as a witness of this node's ledgers: a ledger restored from an older copy is caught.

A hash chain shows that a ledger was not edited, but not that it is whole: last week's backup of a
node's state folder is a shorter chain that still verifies, and with it the budget spent since
would be forgotten. So every reply carries this node's ledger heads, for the record-level ledger
and the client-level one, each as the entry count and an HMAC, under the node's own key, of the
newest entry's hash (the bare hash would let anyone test guesses of an entry's content). The
coordinator keeps the newest head it saw from each site (by the site's pseudonymous id) and sends
each node its own back with every instruction. A node whose ledger is shorter than the head acknowledged
for it, or holds another entry at that place, refuses to serve: its operator must put back the
ledger it replaced. The coordinator can only make a node stricter this way, never looser: a head it
invents or inflates makes the node refuse; one it withholds leaves the node as it would be alone.

The last time the acknowledged heads matched is kept in ``witness.json``; ``fl node budget`` shows it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import time
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord

from fl import schema, wire
from fl.files import atomic_write
from nodes.ledger import Ledger
from nodes.policy import Refusal, node_secret
from nodes.site_scores import site_id

WITNESS_FILE = "witness.json"
_LEDGERS = {"record": Ledger.in_dir, "contributions": Ledger.contributions_in}


def _mac(folder: Path, entry_hash: str) -> str:
    return hmac.new(node_secret(folder), b"oncofed-ledger-head:" + entry_hash.encode(), hashlib.sha256).hexdigest()


def head(folder: Path) -> str:
    """This node's ledger heads as the coordinator may see them (JSON): its site id, and per ledger
    the entry count and the keyed MAC of the newest entry."""
    heads: dict[str, Any] = {"site": site_id(folder)}
    for name, ledger in _LEDGERS.items():
        entries = ledger(folder).entries()
        heads[name] = [len(entries), _mac(folder, entries[-1]["hash"]) if entries else ""]
    return json.dumps(heads, sort_keys=True)


def check_acknowledged(folder: Path, config: ConfigRecord) -> None:
    """Refuse to serve while a ledger is behind the head the coordinator acknowledged for this site,
    or differs from it; record the match otherwise. Nothing acknowledged: nothing to compare."""
    if wire.LEDGER_ACKS not in config:
        return
    try:
        acks = json.loads(str(config[wire.LEDGER_ACKS]))
        mine = acks.get(site_id(folder)) if isinstance(acks, dict) else None
    except json.JSONDecodeError:
        mine, acks = None, None
    if acks is None or not isinstance(acks, dict):
        raise Refusal(wire.ERROR_LEDGER, "the coordinator's ledger acknowledgements are malformed; refusing to serve")
    if mine is None:
        return
    matched = {}
    for name, ledger in _LEDGERS.items():
        count, mac = _acknowledged(mine, name)
        entries = ledger(folder).entries()
        if count > len(entries):
            raise Refusal(wire.ERROR_LEDGER, f"the {name} ledger holds {len(entries)} entries, fewer than the {count} "
                                             "the coordinator acknowledged: it was restored from an older copy or cut; "
                                             "the node refuses to serve until its operator puts back the whole ledger")
        if count and not hmac.compare_digest(_mac(folder, entries[count - 1]["hash"]), mac):
            raise Refusal(wire.ERROR_LEDGER, f"the {name} ledger's entry {count} is not the one the coordinator "
                                             "acknowledged: the ledger was replaced; the node refuses to serve")
        matched[name] = count
    _record_match(folder, matched)


def _acknowledged(mine: Any, name: str) -> tuple[int, str]:
    value = mine.get(name) if isinstance(mine, dict) else None
    if not (isinstance(value, list) and len(value) == 2 and type(value[0]) is int and value[0] >= 0
            and isinstance(value[1], str)):
        raise Refusal(wire.ERROR_LEDGER, f"the coordinator's acknowledgement of the {name} ledger is malformed; "
                                         "refusing to serve")
    return value[0], value[1]


def _record_match(folder: Path, matched: dict[str, int]) -> None:
    """``witness.json``, replaced whole (:func:`fl.files.atomic_write`: a private temporary name per writer)."""
    schema.refuse_newer_file("node-witness", folder / WITNESS_FILE, json.loads)
    atomic_write(folder / WITNESS_FILE, json.dumps({"matched_at": time.time(), **matched,
                                                    **schema.stamp("node-witness")}).encode())


def last_match(folder: Path) -> dict[str, Any] | None:
    """When the coordinator's acknowledged heads last matched this node's ledgers, and at which counts."""
    path = folder / WITNESS_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(data, dict):
        return None
    schema.check("node-witness", data, path)
    data.pop(schema.KEY, None)
    return data if math.isfinite(float(data.get("matched_at", math.nan))) else None
