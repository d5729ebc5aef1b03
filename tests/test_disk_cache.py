"""A node's preprocessed data is kept on its own disk: a fresh process reads it instead of
preprocessing again, and a changed file or preprocessing invalidates it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from fl.tasks import get_task
from nodes import data as node_data
from nodes.data import clear_cache, load_local_data


def _site(tiny_federation: Path, tmp_path: Path) -> Path:
    site = tmp_path / "site"
    shutil.copytree(tiny_federation / "node-0", site, ignore=shutil.ignore_patterns(".oncofed"))
    return site


def test_a_fresh_process_reads_the_cache_instead_of_preprocessing(tiny_federation: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    site, cache = _site(tiny_federation, tmp_path), tmp_path / "state" / "cache"
    task = get_task("seg2d")
    first = load_local_data(site, task, disk_cache=cache)
    assert len(list(cache.glob("*.safetensors"))) == 1
    clear_cache()  # as a new process: nothing in memory

    def no_preprocessing(*args: object) -> None:
        raise AssertionError("preprocessed again")

    monkeypatch.setattr(node_data, "_load_split", no_preprocessing)
    second = load_local_data(site, task, disk_cache=cache)
    assert torch.equal(first.train.images, second.train.images) and torch.equal(first.val.labels, second.val.labels)
    assert second.digest == first.digest

    # an edited file (new size or time) is read and preprocessed again; the stale entry goes
    label = site / "labelsTr" / "case_000.nii.gz"
    os.utime(label, ns=(label.stat().st_atime_ns, label.stat().st_mtime_ns + 10**9))
    clear_cache()
    with pytest.raises(AssertionError, match="preprocessed again"):
        load_local_data(site, task, disk_cache=cache)
    monkeypatch.undo()
    clear_cache()
    load_local_data(site, task, disk_cache=cache)
    assert len(list(cache.glob("*.safetensors"))) == 1


def test_another_task_does_not_read_this_tasks_cache(tiny_federation: Path, tmp_path: Path) -> None:
    site, cache = _site(tiny_federation, tmp_path), tmp_path / "cache"
    task = get_task("seg2d")
    key = node_data._cache_key(task, node_data._signature(site.resolve(), node_data.read_datalist(site.resolve())))
    other = node_data._cache_key(get_task("seg3d"), node_data._signature(site.resolve(),
                                                                          node_data.read_datalist(site.resolve())))
    assert key != other
    load_local_data(site, task, disk_cache=cache)
    assert (cache / f"{key}.safetensors").is_file()
