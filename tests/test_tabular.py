"""Tabular preprocessing is per record: one record added or removed changes no other record's
features (record-level DP's per-sample clipping bounds a record's influence only then)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fl.errors import DataError
from fl.learn.tabular import RANGES, load, write_federation


def test_one_record_more_or_less_changes_no_other_record(tmp_path: Path) -> None:
    site = write_federation(tmp_path / "data", nodes=2, seed=0)[0]
    before = load(site, 30)
    train = site / "train.csv"
    lines = train.read_text().splitlines()
    # an outlier added, one record removed: under training-set standardisation every other
    # record's features moved
    extreme = ",".join(["1e6"] * 30 + ["1"])
    train.write_text("\n".join([*lines[:-1], extreme]) + "\n")
    after = load(site, 30)
    kept = len(lines) - 2  # header and the removed last record
    assert torch.equal(after[0][:kept], before[0][:kept])
    assert torch.equal(after[2], before[2])  # validation features too
    assert after[0].abs().max() <= 1.0  # the outlier is clipped to its declared range


def test_missing_or_malformed_ranges_are_named(tmp_path: Path) -> None:
    site = write_federation(tmp_path / "data", nodes=2, seed=0)[0]
    manifest_path = site / "dataset.json"
    manifest = json.loads(manifest_path.read_text())
    manifest[RANGES]["mean radius"] = [5, 5]
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"feature_ranges\['mean radius'\] must be \[low, high\]"):
        load(site, 30)
    del manifest[RANGES]
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="dataset.json: 'feature_ranges' must map every feature"):
        load(site, 30)
