"""DICOM cases converted once to NIfTI, kept on the node's disk.

A case whose image is a DICOM series (:class:`fl.learn.dicom.Series`) or whose label is a SEG or
an RTSTRUCT becomes a cache entry: ``image.nii`` (the series' values after the modality
transform, int16 where they are whole numbers in its range, else float32), ``label.nii`` (uint8
class indices; a NIfTI label is used where it is) and ``case.json``, a sidecar naming the
source series (:func:`fl.learn.dicom.source_series`) and the source files' stamps. The NIfTI
affine is the series' geometry in RAS, so the bundle's unchanged ``LoadImaged`` and
``Orientationd`` give what they give for a NIfTI twin of the series.

An entry is keyed by SHA-256 over :data:`FORMAT`, every source file's (path, size, mtime_ns) and
the resolved label mapping; it is written into a temporary folder renamed into place, so a crash
never leaves half a case and a second start reuses it. Entries live in ``<disk cache>/dicom``, or
in a temporary folder removed when the process exits when the caller has no disk cache.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fl.errors import DataError
from fl.learn import IMAGE_KEY, LABEL_KEY
from fl.learn.dicom import IMAGE_SOURCE_KEY, LABEL_SOURCE_KEY, SIDECAR, RtLabel, SegLabel, Series, read_series

FORMAT = 1  # bump when what an entry holds, or how it is made, changes
FOLDER = "dicom"
IMAGE_FILE, LABEL_FILE = "image.nii", "label.nii"
STALE_TEMP_S = 3600.0  # a writer's temporary folder older than this was left by a crash
_TEMP_LOCK = threading.Lock()
_TEMP: list[Path] = []


def is_dicom_case(case: dict[str, Any]) -> bool:
    return isinstance(case.get(IMAGE_KEY), Series) or isinstance(case.get(LABEL_KEY), (SegLabel, RtLabel))


def convert_cases(cases: list[dict[str, Any]], label_index: Callable[[str], int],
                  cache_dir: Path | None) -> list[dict[str, Any]]:
    """``cases`` with every DICOM case replaced by its converted item (others as they are)."""
    if not any(is_dicom_case(c) for c in cases):
        return cases
    root = entries_root(cache_dir)
    return [convert(c, label_index, root) if is_dicom_case(c) else c for c in cases]


def entries_root(cache_dir: Path | None) -> Path:
    """``<cache_dir>/dicom``, or this process's temporary folder (removed at exit)."""
    if cache_dir is not None:
        return Path(cache_dir) / FOLDER
    with _TEMP_LOCK:
        if not _TEMP:
            _TEMP.append(Path(tempfile.mkdtemp(prefix="oncofed-dicom-")))
            atexit.register(shutil.rmtree, _TEMP[0], True)
        return _TEMP[0]


def convert(case: dict[str, Any], label_index: Callable[[str], int], root: Path) -> dict[str, Any]:
    """One DICOM case as an item of NIfTI files (from its cache entry, written now if missing);
    the item also names its sources (for error messages) and leads to its sidecar."""
    from fl.learn.dicom_labels import mapping

    image, label = case[IMAGE_KEY], case[LABEL_KEY]
    if not isinstance(image, Series):
        raise DataError(f"{_label_path(label)}: a DICOM SEG or RTSTRUCT label needs its image as a DICOM series")
    pairs = mapping(label, label_index) if isinstance(label, (SegLabel, RtLabel)) else []
    stamps = [_stamp(p) for p in (*image.files, _label_path(label))]
    entry = root / _key(stamps, label, pairs)
    if not (entry / SIDECAR).is_file():
        _write(entry, image, label, pairs, stamps)
    labelled = entry / LABEL_FILE if isinstance(label, (SegLabel, RtLabel)) else label
    return {IMAGE_KEY: str(entry / IMAGE_FILE), LABEL_KEY: str(labelled),
            IMAGE_SOURCE_KEY: image.where, LABEL_SOURCE_KEY: str(_label_path(label))}


def _label_path(label: Any) -> Path:
    return label.path if isinstance(label, (SegLabel, RtLabel)) else Path(label)


def _stamp(path: Path) -> list[Any]:
    stat = path.stat()
    return [str(path), stat.st_size, stat.st_mtime_ns]


def _key(stamps: list[list[Any]], label: Any, pairs: list[tuple[str, int]]) -> str:
    kind = type(label).__name__ if isinstance(label, (SegLabel, RtLabel)) else "nifti"
    payload = json.dumps([FORMAT, stamps, kind, pairs])
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def _write(entry: Path, image: Series, label: Any, pairs: list[tuple[str, int]], stamps: list[list[Any]]) -> None:
    """Convert into a temporary folder, then rename it into place (a concurrent writer's entry wins)."""
    from fl.learn.dicom_labels import rtstruct_labels, seg_labels

    volume, series_uid = read_series(image)
    uids = [series_uid]
    labels = None
    if isinstance(label, (SegLabel, RtLabel)):
        labels, label_uid = (seg_labels if isinstance(label, SegLabel) else rtstruct_labels)(
            label, volume, series_uid, pairs)
        uids += [label_uid] if label_uid and label_uid not in uids else []
    temp = entry.parent / f".{entry.name}.{os.getpid()}.{secrets.token_hex(4)}"
    temp.mkdir(parents=True)
    try:
        _save(temp / IMAGE_FILE, _stored(volume.array), volume)
        if labels is not None:
            _save(temp / LABEL_FILE, labels, volume)
        sidecar = {"format": FORMAT, "series": uids, "sources": stamps}
        (temp / SIDECAR).write_text(json.dumps(sidecar, indent=1) + "\n", encoding="utf-8")
        try:
            temp.rename(entry)
        except OSError:
            if not (entry / SIDECAR).is_file():
                raise
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def _stored(array: np.ndarray) -> np.ndarray:
    """int16 where every value is a whole number in its range (CT, most MR), else float32."""
    info = np.iinfo(np.int16)
    if array.size and info.min <= array.min() and array.max() <= info.max and np.array_equal(array, np.round(array)):
        return array.astype(np.int16)
    return array.astype(np.float32)


def _save(path: Path, array: np.ndarray, volume: Any) -> None:
    """``array`` (slices, rows, columns) as NIfTI (columns, rows, slices) with the RAS affine."""
    import nibabel as nib

    affine = volume.get_affine("RAS")[:, [2, 1, 0, 3]]
    image = nib.Nifti1Image(array.transpose(2, 1, 0), affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    nib.save(image, path)


def prune(cache_dir: Path) -> int:
    """Remove entries whose source files changed or are gone, and temporary folders left by a
    crash; returns how many were removed."""
    root = Path(cache_dir) / FOLDER
    if not root.is_dir():
        return 0
    removed = 0
    for entry in root.iterdir():
        if entry.name.startswith(".") and time.time() - entry.stat().st_mtime > STALE_TEMP_S or _stale(entry):
            shutil.rmtree(entry, ignore_errors=True)
            removed += 1
    return removed


def _stale(entry: Path) -> bool:
    if entry.name.startswith("."):
        return False  # a writer's temporary folder (its age decides)
    try:
        stamps = json.loads((entry / SIDECAR).read_text(encoding="utf-8"))["sources"]
        return any(_stamp(Path(s[0])) != s for s in stamps)
    except (OSError, ValueError, KeyError, TypeError):
        return True
