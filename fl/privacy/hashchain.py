"""Append-only JSON-lines files whose every line carries the SHA-256 of the previous line and its
own: an edited, reordered or truncated-in-the-middle file is detected. Each append is fsynced
before it returns. A node's privacy ledger and the server's release journal are both such files.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


class ChainError(Exception):
    """The file is unreadable or its chain is broken; the message names the file and the line."""


def _digest(entry: dict[str, Any]) -> str:
    body = {k: v for k, v in entry.items() if k != "hash"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def read_chain(path: Path, what: str,
               check: Callable[[dict[str, Any], int], None] | None = None) -> list[dict[str, Any]]:
    """Every entry of ``path`` (none if it does not exist), after checking the whole chain.
    ``check(entry, line)`` runs on every entry first: a reader refuses a line written in a newer
    format (:mod:`fl.schema`) as such, before its checksum, which a newer format may compute
    otherwise, calls it altered."""
    if not path.exists():
        return []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ChainError(f"{path}: unreadable {what} ({exc})") from None
    entries = []
    for number, line in enumerate(lines, start=1):
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            raise ChainError(f"{path}: line {number} is not JSON; the {what} was damaged") from None
        if not isinstance(entry, dict):
            raise ChainError(f"{path}: line {number} is not a JSON object; the {what} was damaged")
        entries.append(entry)
    if check is not None:
        for number, entry in enumerate(entries, start=1):
            check(entry, number)
    prev = None
    for number, entry in enumerate(entries, start=1):
        if entry.get("seq") != number or entry.get("prev") != prev or _digest(entry) != entry.get("hash"):
            raise ChainError(f"{path}: line {number} fails its checksum chain; the {what} was altered")
        prev = entry["hash"]
    return entries


def append_entry(path: Path, entries: list[dict[str, Any]], fields: dict[str, Any]) -> dict[str, Any]:
    """Append ``fields`` after ``entries`` (the file's verified content; hold :func:`locked`)."""
    entry = {**fields, "seq": len(entries) + 1, "prev": entries[-1]["hash"] if entries else None}
    entry["hash"] = _digest(entry)
    created = not path.exists()
    line = (json.dumps(entry, sort_keys=True) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        try:  # the whole line or nothing: a full disk must not leave a torn line that breaks the chain
            if os.write(fd, line) != len(line):
                raise OSError(errno.ENOSPC, f"{path}: short write (disk full?)")
            os.fsync(fd)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)
                os.fsync(fd)
            raise
    finally:
        os.close(fd)
    if created:  # the new file's name must survive a crash too
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return entry


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold ``path`` exclusively (check-then-append must not race)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
