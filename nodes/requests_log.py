"""``requests.jsonl``: every train or evaluate request this node served or refused, and why.

For the node's operator only (the node console, :mod:`nodes.console`): one line per request with
its run, round, kind, outcome and, for a refusal, the code and reason the node replied with.
Nothing of a request's content and nothing of the data is written. A line that cannot be written
is logged and the reply goes out unchanged: this is the operator's view, the privacy ledgers are
the record that guards the budget.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import deque
from pathlib import Path
from typing import Any

from fl import schema

REQUESTS_FILE = "requests.jsonl"
log = logging.getLogger("flwr.oncofed.node")


def record(state: Path, *, kind: str, run: int, server_round: int | None, served: bool, code: int | None = None,
           reason: str = "") -> None:
    line = {"time": time.time(), "kind": kind, "run": run, "server_round": server_round,
            "outcome": "served" if served else "refused", "code": code, "reason": reason,
            **schema.stamp("requests")}
    try:
        state.mkdir(parents=True, exist_ok=True)
        with open(state / REQUESTS_FILE, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(line, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        log.warning("node: could not write %s (%s)", state / REQUESTS_FILE, exc)


def read(state: Path, last: int = 0) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """The newest ``last`` lines (all for 0), oldest first, and counts over the whole file."""
    path = state / REQUESTS_FILE
    kept: deque[dict[str, Any]] = deque(maxlen=last or None)
    counts = {"served": 0, "refused": 0}
    if not path.exists():
        return [], counts
    with open(path, encoding="utf-8") as fh:
        for number, text in enumerate(fh, start=1):
            try:
                entry = json.loads(text)
            except ValueError:
                continue  # a line torn by a crash: the next ones are still whole
            schema.check("requests", entry, f"{path}: line {number}")
            counts[entry.get("outcome", "refused")] = counts.get(entry.get("outcome", "refused"), 0) + 1
            kept.append(entry)
    return list(kept), counts
