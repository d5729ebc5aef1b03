"""A node's preprocessed cases are kept on its own disk: a fresh process reads them instead of
preprocessing again, and a changed file or another bundle is preprocessed anew."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from monai.data import PersistentDataset

from fl.errors import DataError
from fl.learn import get_task
from fl.learn.data import clear_cache, load_local_data


def _site(tiny_federation: Path, tmp_path: Path) -> Path:
    site = tmp_path / "site"
    shutil.copytree(tiny_federation / "node-0", site, ignore=shutil.ignore_patterns(".oncofed"))
    return site


def test_a_fresh_process_reads_the_cache_instead_of_preprocessing(tiny_federation: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    site, cache = _site(tiny_federation, tmp_path), tmp_path / "state" / "cache"
    task = get_task("seg2d")
    first = load_local_data(site, task, use_cache=False, disk_cache=cache)
    entries = set(cache.rglob("*.pt"))
    assert len(entries) == len(first.train) + len(first.val)  # every case preprocessed (and checked) at load
    clear_cache()  # as a new process: nothing in memory

    def no_preprocessing(*args: object) -> None:
        raise AssertionError("preprocessed again")

    monkeypatch.setattr(PersistentDataset, "_pre_transform", no_preprocessing)
    second = load_local_data(site, task, use_cache=False, disk_cache=cache)
    assert all(torch.equal(first.train.dataset[i]["image"], second.train.dataset[i]["image"])
               for i in range(len(first.train)))
    assert second.digest == first.digest

    # an edited file (new size or time) is preprocessed again, the others are not
    label = site / "labelsTr" / "case_000.nii.gz"
    os.utime(label, ns=(label.stat().st_atime_ns, label.stat().st_mtime_ns + 10**9))
    with pytest.raises(DataError, match="preprocessed again"):
        load_local_data(site, task, use_cache=False, disk_cache=cache)
    monkeypatch.undo()
    load_local_data(site, task, use_cache=False, disk_cache=cache)
    now = set(cache.rglob("*.pt"))
    assert len(now - entries) == 1 and len(entries - now) == 1  # the stale entry is gone


def test_another_task_does_not_read_this_tasks_cache(tiny_federation: Path, tmp_path: Path) -> None:
    site, cache = _site(tiny_federation, tmp_path), tmp_path / "cache"
    load_local_data(site, get_task("seg2d"), use_cache=False, disk_cache=cache)
    folders = {p.name for p in cache.iterdir()}
    seg2d, seg3d = get_task("seg2d").bundle_task(), get_task("seg3d").bundle_task()
    assert folders == {f"bundle-{seg2d.digest[:16]}"} and seg2d.digest != seg3d.digest
