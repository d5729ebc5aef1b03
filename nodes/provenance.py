"""Which of a site's DICOM series trained a model version, answered on the node, no UID released.

A node keeps, in its state folder, ``series-index.jsonl``: one hash-chained line per dataset it
trained on, keyed by the dataset's keyed fingerprint (:func:`nodes.policy.keyed_fingerprint`, the
value the coordinator's manifests name), listing each case's series as **series tokens**:
HMAC-SHA256 of the Series Instance UID under the node's secret key (domain-separated from the
dataset fingerprint). Nobody without the key can confirm a candidate UID against a token; the node
can, by hashing its own series again. The contributions ledger (:mod:`nodes.ledger`) records the
dataset fingerprint of every round the node contributed to, before it trains.

To answer "which of my series trained version vN", the node takes the version's lineage from the
registry (each version's Flower run and round, public configuration) and matches it against its
own contributions ledger: the rounds it contributed to (recorded before training: a round whose
update was then dropped counts too, so the answer is "may have trained"), the datasets, their series
tokens, and, with ``reveal``, the node's current series whose tokens match (shown on the node
only). Nothing of this is ever sent: the coordinator learns nothing it did not know.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fl import schema
from fl.errors import DataError
from fl.privacy import hashchain
from nodes.ledger import Ledger
from nodes.policy import node_secret

INDEX_FILE = "series-index.jsonl"
DOMAIN = b"oncofed series-instance-uid\x00"  # tokens never equal a dataset fingerprint


def series_token(folder: Path, uid: str) -> str:
    """The node's token for one Series Instance UID (keyed: only this node can recompute it)."""
    return hmac.new(node_secret(folder), DOMAIN + uid.encode(), hashlib.sha256).hexdigest()


def _entries(path: Path) -> list[dict[str, Any]]:
    def version(entry: dict[str, Any], number: int) -> None:
        schema.check("series-index", entry, f"{path}: line {number}")

    try:
        return hashchain.read_chain(path, "series index", check=version)
    except hashchain.ChainError as exc:
        raise DataError(str(exc)) from None


def case_tokens(folder: Path, cases: list[dict[str, Any]]) -> list[list[str]]:
    """Each case's series tokens (image series first, then its label's), [] for a NIfTI case."""
    from fl.learn.dicom import source_series  # highdicom: only where series are read

    return [[series_token(folder, uid) for uid in source_series(case)] for case in cases]


def index_dataset(folder: Path, fingerprint: str, splits: dict[str, list[dict[str, Any]]]) -> bool:
    """Record the series tokens of the dataset ``fingerprint`` names, once (True when written now).
    ``splits`` maps a split's name to its cases as the data loader gives them."""
    path = folder / INDEX_FILE
    with hashchain.locked(path):
        entries = _entries(path)
        if any(e.get("dataset") == fingerprint for e in entries):
            return False
        tokens = {name: case_tokens(folder, cases) for name, cases in splits.items()}
        hashchain.append_entry(path, entries, {"dataset": fingerprint, "time": time.time(), "cases": tokens,
                                               **schema.stamp("series-index")})
    return True


@dataclass
class Answer:
    """What a node finds about one version: the rounds of its lineage the node contributed to
    (``(run, round) -> dataset fingerprint``), the rounds it did not, and each dataset's series."""

    version: str
    contributed: dict[tuple[int, int], str | None] = field(default_factory=dict)
    absent: list[tuple[int, int]] = field(default_factory=list)
    series: dict[str, list[list[str]]] = field(default_factory=dict)  # dataset -> training cases' tokens
    # rounds whose dataset is unknown here: a ledger entry naming none, or a dataset with no index entry
    unknown: list[tuple[int, int]] = field(default_factory=list)
    revealed: dict[str, str] = field(default_factory=dict)  # token -> the node's own UID (reveal only)

    def training_series(self) -> set[str]:
        """Distinct image-series tokens of the training cases of every dataset that trained it."""
        return {case[0] for cases in self.series.values() for case in cases if case}


def answer(folder: Path, version: str, rounds: list[tuple[int, int]], *,
           current_cases: list[dict[str, Any]] | None = None) -> Answer:
    """Match the version's lineage ``rounds`` (Flower run id, round) against the node's ledger.
    With ``current_cases`` (the node's cases now), tokens that match one of them are revealed."""
    found = Answer(version)
    contributions = {(int(e["run"]), int(e["server_round"])): e.get("dataset")
                     for e in Ledger.contributions_in(folder).entries() if e.get("kind") == "train"}
    for key in rounds:
        if key in contributions:
            found.contributed[key] = contributions[key]
        else:
            found.absent.append(key)
    index = {e["dataset"]: e["cases"] for e in _entries(folder / INDEX_FILE)}
    for key, dataset in found.contributed.items():
        if dataset is None or dataset not in index:
            found.unknown.append(key)
        else:
            found.series[dataset] = list(index[dataset].get("training", []))
    if current_cases is not None:
        from fl.learn.dicom import source_series

        wanted = {t for cases in found.series.values() for case in cases for t in case}
        for case in current_cases:
            for uid in source_series(case):
                token = series_token(folder, uid)
                if token in wanted:
                    found.revealed[token] = uid
    return found


def lineage_rounds(manifests: list[dict[str, Any]]) -> list[tuple[int, int]]:
    """(Flower run id, round) of each version in a lineage, from their manifests; a manifest
    without the Flower run id (written before it was recorded) is an error naming the version."""
    out = []
    for manifest in manifests:
        run = manifest.get("flower_run_id")
        if not isinstance(run, int):
            raise DataError(f"version {manifest.get('version', '?')}: its manifest names no Flower run "
                            "(written by an older OncoFed); its rounds cannot be matched to this node's ledger")
        out.append((run, int(manifest["round"])))
    return out


def index_local_data(folder: Path, fingerprint: str, data: Any) -> bool:
    """:func:`index_dataset` for a node's loaded data (image cases; tabular records have no series)."""
    splits = {name: getattr(getattr(data, attr), "items", None) for name, attr in (("training", "train"),
                                                                                  ("validation", "val"))}
    if any(cases is None for cases in splits.values()):
        return False
    return index_dataset(folder, fingerprint, splits)
