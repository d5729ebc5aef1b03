"""Append-only, hash-chained records beside the model versions: validations and release tags.

- ``<model>/v<N>/validations.jsonl``: one line per site validation of that version. The first
  record's ``prev`` is the version's own hash, each later one's the previous record's hash, and
  every record names the ``version_hash`` it tested: an edited record fails its hash, a record
  moved to another version fails both links, so a validation can never be attached to weights it
  did not test.
- ``<model>/tags.jsonl``: one line per promotion (``fl models promote``): the tag, the version and
  its hash, the gate it passed and its result; chained the same way from the first line on. A
  tag's current version is its newest line.

Each record's ``hash`` is SHA-256 over the canonical JSON of its other fields.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fl import schema
from fl.errors import RegistryError

VALIDATIONS_FILE = "validations.jsonl"
TAGS_FILE = "tags.jsonl"


def record_hash(record: Mapping[str, Any]) -> str:
    body = {k: v for k, v in record.items() if k != "hash"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()).hexdigest()


def read(path: Path) -> list[dict[str, Any]]:
    """Every record of a chain file (none if it does not exist); unreadable lines name the line."""
    if not path.is_file():
        return []
    out = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RegistryError(f"{path}: line {number} is not JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise RegistryError(f"{path}: line {number} is not a JSON object")
        out.append(record)
    return out


def check_chain(path: Path, first_prev: str | None, kind: str | None = None) -> list[dict[str, Any]]:
    """The records of ``path`` after checking each one's hash and its link to the one before
    (the first to ``first_prev``); raises naming the first bad line. ``kind``: the format
    (:mod:`fl.schema`) whose version every record is checked against first, so a record written by
    a newer OncoFed is refused as such rather than called changed."""
    records = read(path)
    if kind is not None:
        for number, record in enumerate(records, start=1):
            schema.check(kind, record, f"{path}: record {number}", error=RegistryError)
    prev = first_prev
    for number, record in enumerate(records, start=1):
        try:
            recomputed = record_hash(record)
        except ValueError:  # NaN or infinity written in by hand
            recomputed = None
        if recomputed != record.get("hash"):
            raise RegistryError(f"{path}: record {number} was changed after it was written (hash mismatch)")
        if record.get("prev") != prev:
            raise RegistryError(f"{path}: record {number} does not follow the record before it (broken chain)")
        prev = record["hash"]
    return records


def append(path: Path, fields: Mapping[str, Any], first_prev: str | None) -> dict[str, Any]:
    """Check the chain, then append ``fields`` linked to its last record and fsync. Call under the
    model's registry lock."""
    records = check_chain(path, first_prev)
    record = {**fields, "prev": records[-1]["hash"] if records else first_prev}
    record["hash"] = record_hash(record)
    line = json.dumps(record, sort_keys=True, allow_nan=False) + "\n"
    with open(path, "a", encoding="utf-8") as out:
        out.write(line)
        out.flush()
        os.fsync(out.fileno())
    return record
