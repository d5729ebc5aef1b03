"""Schema versions of the files OncoFed writes and reads back (ledgers, journal, manifests, ...).

Every record or file carries its format's version as a top-level integer field ``schema``
(:data:`KEY`); in a safetensors file it is the header metadata entry ``oncofed.schema`` (a string,
as safetensors metadata must be). A file written before versions existed has none: version 0,
read as before. A reader calls :func:`check`, which accepts versions 0 up to :data:`CURRENT` and
refuses a newer one, naming the file, rather than misread it. The compatibility rule, and when a
version must be bumped, is ``docs/reference/formats.md``.

Pure: the standard library and :mod:`fl.errors` only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fl.errors import DataError, OncoFedError

KEY = "schema"
METADATA_KEY = "oncofed.schema"  # the same version in a safetensors header's metadata (a string)

# Each format's current version: what this OncoFed writes, and the newest it reads.
CURRENT: dict[str, int] = {
    # on a node, in its state folder (<data>/.oncofed)
    "privacy-ledger": 1,  # privacy-ledger.jsonl, one hash-chained entry per line
    "contributions": 1,  # contributions.jsonl, one hash-chained entry per line
    "node-witness": 1,  # witness.json
    "policy": 1,  # policy.toml
    "roster": 1,  # roster.json (the file a consortium distributes, and the node's pinned copy)
    "descriptors-cache": 1,  # descriptors.json
    "fedbn": 1,  # fedbn/<run>.safetensors (header metadata)
    "series-index": 1,  # series-index.jsonl, one hash-chained entry per dataset trained on
    "pseudonym-map": 1,  # pseudonyms.jsonl, one record per de-identified export (fl node deid)
    "approvals": 1,  # approvals.jsonl, one hash-chained entry per app approved or revoked
    "requests": 1,  # requests.jsonl, one line per request the node served or refused, and why
    "check-summary": 1,  # check-summary.json, the last `fl node check`'s summary
    # on the coordinator, in the registry (registry.root)
    "manifest": 1,  # <model>/v<N>/manifest.json
    "validations": 1,  # <model>/v<N>/validations.jsonl, one hash-chained record per line
    "tags": 1,  # <model>/tags.jsonl, one hash-chained record per line
    "privacy-journal": 1,  # <model>/privacy-journal.jsonl, one hash-chained entry per line
    "ledger-heads": 1,  # ledger-heads.json
    "strategy-state": 1,  # <model>/v<N>/state.safetensors (header metadata)
    # on the coordinator, in a run folder (output.dir/<run>)
    "run-metrics": 1,  # metrics.jsonl, one record per line
    "run-status": 1,  # status.json: the round and phase a run is in
    "run-summary": 1,  # summary.json
}


class NewerFormatError(DataError):
    """A file written by a newer OncoFed (a schema version this one does not know)."""


def version(kind: str) -> int:
    """The version a writer of ``kind`` puts in what it writes now."""
    return CURRENT[kind]


def stamp(kind: str) -> dict[str, int]:
    """``{"schema": version(kind)}``, to spread into a new record."""
    return {KEY: CURRENT[kind]}


def check(kind: str, record: Mapping[str, Any], path: Any, *, error: type[OncoFedError] = DataError) -> int:
    """The schema version of ``record`` (a record or file of format ``kind``, read from ``path``):
    0 when it carries none (written before versions existed). A version that is not a non-negative
    integer raises ``error``; a version newer than this OncoFed reads raises :class:`NewerFormatError`
    (and is an ``error`` too when ``error`` is not a :class:`DataError`), naming the file and both versions."""
    newest = CURRENT[kind]
    found = record.get(KEY, 0) if isinstance(record, Mapping) else 0
    if type(found) is not int or found < 0:
        raise error(f"{path}: {kind} schema version {found!r} is not a version number; the file was damaged")
    if found > newest:
        message = (f"{path}: {kind} schema version {found} was written by a newer OncoFed (this one reads up to "
                   f"version {newest}); upgrade OncoFed to read it, and do not edit the file")
        cls = error if issubclass(error, NewerFormatError) else _newer(error)
        raise cls(message)
    return found


def check_metadata(kind: str, metadata: Mapping[str, str] | None, path: Any, *,
                   error: type[OncoFedError] = DataError) -> int:
    """:func:`check` for a safetensors header's metadata (its ``oncofed.schema`` entry)."""
    metadata = metadata or {}
    found: Any = metadata.get(METADATA_KEY)
    if isinstance(found, str) and found.isdigit():  # safetensors metadata holds strings
        found = int(found)
    return check(kind, {KEY: found} if METADATA_KEY in metadata else {}, path, error=error)


def refuse_newer_file(kind: str, path: Path, parse: Callable[[str], Any], *,
                      error: type[OncoFedError] = DataError) -> None:
    """Before a writer replaces ``path`` whole: refuse if it holds a newer version of ``kind`` (an
    unreadable or absent file is the writer's to replace)."""
    try:
        existing = parse(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # absent, unreadable or not parseable (JSON and TOML errors are ValueErrors)
        return
    check(kind, existing, path, error=error)


_NEWER: dict[type[OncoFedError], type[OncoFedError]] = {}


def _newer(error: type[OncoFedError]) -> type[OncoFedError]:
    """A subclass of both ``error`` (what the reader's callers catch) and :class:`NewerFormatError`."""
    if error is DataError:
        return NewerFormatError
    if error not in _NEWER:
        _NEWER[error] = type(f"Newer{error.__name__}", (error, NewerFormatError), {})
    return _NEWER[error]
