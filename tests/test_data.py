from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fl.errors import DataError
from fl.learn import get_task
from fl.learn.data import clear_cache, load_local_data

TASK = get_task("seg2d")


@pytest.fixture()
def node(tiny_federation: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "node"
    shutil.copytree(tiny_federation / "node-0", copy)
    return copy


def _manifest(node: Path) -> dict:
    return json.loads((node / "dataset.json").read_text())


def _save_manifest(node: Path, manifest: dict) -> None:
    (node / "dataset.json").write_text(json.dumps(manifest))


def _first(node: Path, key: str) -> Path:
    return (node / _manifest(node)["training"][0][key]).resolve()


def _missing_file(node: Path) -> str:
    path = _first(node, "image")
    path.unlink()
    return f"{path}: listed as training[0].image in dataset.json but not found"


def _unreadable(node: Path) -> str:
    path = _first(node, "label")
    path.write_bytes(b"this is not a NIfTI file")
    return f"{path}: unreadable image"


def _shape_mismatch(node: Path) -> str:
    path = _first(node, "label")
    nib.save(nib.Nifti1Image(np.zeros((16, 16), np.uint8), np.eye(4)), path)
    return f"{path}: label shape (16, 16) differs from image shape (32, 32)"


def _bad_label_values(node: Path) -> str:
    path = _first(node, "label")
    label = np.asarray(nib.load(path).dataobj).copy()
    label[0, 0] = 7
    nib.save(nib.Nifti1Image(label, np.eye(4)), path)
    return f"{path}: label values [7] outside the task's classes 0..1"


def _empty_training(node: Path) -> str:
    manifest = _manifest(node)
    manifest["training"] = []
    _save_manifest(node, manifest)
    return f"{node / 'dataset.json'}: 'training' must be a non-empty list"


def _no_manifest(node: Path) -> str:
    (node / "dataset.json").unlink()
    return f"{node / 'dataset.json'}: missing"


def _broken_json(node: Path) -> str:
    (node / "dataset.json").write_text("{ not json")
    return f"{node / 'dataset.json'}: not readable JSON"


def _wrong_dims(node: Path) -> str:
    path = _first(node, "image")
    nib.save(nib.Nifti1Image(np.zeros((32, 32, 32), np.float32), np.eye(4)), path)
    return f"{path}: 3-D image, task seg2d needs 2-D"


def _nan_image(node: Path) -> str:
    path = _first(node, "image")
    image = np.asarray(nib.load(path).dataobj).copy()
    image[3, 3] = np.nan
    nib.save(nib.Nifti1Image(image, np.eye(4)), path)
    return f"{path}: image holds NaN or infinite values"


@pytest.mark.parametrize(
    "break_it",
    [_missing_file, _unreadable, _shape_mismatch, _bad_label_values, _empty_training, _no_manifest,
     _broken_json, _wrong_dims, _nan_image],
    ids=lambda f: f.__name__.strip("_"),
)
def test_bad_data_names_the_file_and_the_problem(node: Path, break_it: Callable[[Path], str]) -> None:
    expected = break_it(node)
    with pytest.raises(DataError) as err:
        load_local_data(node, TASK, use_cache=False)
    assert str(err.value).startswith(expected)


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data folder not found"):
        load_local_data(tmp_path / "nowhere", TASK)


def test_cache_serves_later_rounds_and_notices_an_edited_file(node: Path) -> None:
    clear_cache()
    first = load_local_data(node, TASK)
    assert load_local_data(node, TASK) is first
    path = _first(node, "label")
    assert int(first.train.dataset[0]["label"].sum()) > 0
    label = np.asarray(nib.load(path).dataobj).copy()
    label[:] = 0
    nib.save(nib.Nifti1Image(label, np.eye(4)), path)
    os.utime(path, ns=(1, 1))  # a different mtime even on coarse-clock file systems
    reloaded = load_local_data(node, TASK)
    assert reloaded is not first
    assert int(reloaded.train.dataset[0]["label"].sum()) == 0
