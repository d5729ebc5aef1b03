"""A node's local data: its Decathlon-style ``dataset.json`` and the files it lists.

The node reads only its own folder. Every image case goes through MONAI's reader and the
task's bundle preprocessing once, is checked (readable, finite, image and label on one grid,
label values the network can learn) and kept on the node's disk (:mod:`fl.learn.cases`); the
loaded dataset is also kept in the node process, keyed by the folder, the task and the size and
modification time of every file, so later rounds reuse it and an edited dataset is read again.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fl.errors import DataError
from fl.learn import IMAGE_KEY, LABEL_KEY, Task
from fl.learn.dicom import (
    RTSTRUCT_CLASS,
    SEG_CLASSES,
    RtLabel,
    SegLabel,
    Series,
    header,
    image_source,
    is_nifti,
    label_class,
)
from fl.learn.synth import DATASET_JSON

if TYPE_CHECKING:
    from fl.learn.bundle import BundleTask
    from fl.learn.catalogue import TabularTask

SPLITS = ("training", "validation")
CACHE_DIR = "cache"  # in a node's state folder: its preprocessed cases, kept between processes


@dataclass(frozen=True)
class Split:
    """Preprocessed cases of one split, stacked: ``images`` float32, ``labels`` uint8."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.images.shape[0])


@dataclass(frozen=True)
class LocalData:
    """A node's training and held-out validation cases, and the dataset's SHA-256 digest (it never
    leaves the node: what does is :func:`nodes.policy.keyed_fingerprint` of it)."""

    train: Any  # Split (tabular records) or fl.learn.cases.Cases (image cases)
    val: Any
    digest: str


def read_datalist(data_dir: Path, *, modality_lists: bool = False) -> dict[str, list[dict[str, Any]]]:
    """Parse ``dataset.json``: each split becomes a list of ``{image, label}`` with absolute paths.

    An image is a file, or a DICOM series (:class:`fl.learn.dicom.Series`: a folder, or
    ``{"series": [files]}``; a multi-frame DICOM file too); with ``modality_lists``, a list of
    files, one per modality. A label is a file (a DICOM SEG among them becomes a
    :class:`~fl.learn.dicom.SegLabel`), ``{"seg": file, "segments": {SegmentLabel: bundle label}}``
    or ``{"rtstruct": file, "rois": {ROI name: bundle label}}``."""
    manifest_path = data_dir / DATASET_JSON
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: data folder not found")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{manifest_path}: missing (each node folder needs a Decathlon-style dataset.json)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{manifest_path}: not readable JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise DataError(f"{manifest_path}: expected a JSON object with 'training' and 'validation' lists")
    out: dict[str, list[dict[str, Any]]] = {}
    for split in SPLITS:
        entries = manifest.get(split)
        if not isinstance(entries, list) or not entries:
            raise DataError(f"{manifest_path}: '{split}' must be a non-empty list of {{image, label}} entries")
        out[split] = [_entry(manifest_path, f"{split}[{i}]", e, modality_lists) for i, e in enumerate(entries)]
    return out


def _entry(manifest_path: Path, where: str, entry: Any, modality_lists: bool) -> dict[str, Any]:
    if not isinstance(entry, dict):
        raise DataError(f"{manifest_path}: {where}: expected an object with 'image' and 'label'")
    value = entry.get(IMAGE_KEY)
    image: Any
    if modality_lists and isinstance(value, list) and value:
        image = [_listed(manifest_path, f"{where}.{IMAGE_KEY}[{j}]", v) for j, v in enumerate(value)]
    else:
        image = _image(manifest_path, f"{where}.{IMAGE_KEY}", value)
    label = _label(manifest_path, f"{where}.{LABEL_KEY}", entry.get(LABEL_KEY))
    if isinstance(label, (SegLabel, RtLabel)) and not isinstance(image, Series):
        if isinstance(image, list) or is_nifti(image) or header(image) is None:
            raise DataError(f"{manifest_path}: {where}.{LABEL_KEY}: a DICOM SEG or RTSTRUCT label needs its image "
                            f"as DICOM (a series folder, {{\"series\": [...]}}, or a DICOM file)")
        image = Series((image,), where=str(image))
    return {IMAGE_KEY: image, LABEL_KEY: label}


def _listed(manifest_path: Path, what: str, value: Any, *, folder: bool = False) -> Path:
    """A path relative to the dataset folder, which must exist (a folder only where ``folder``)."""
    if not isinstance(value, str) or not value:
        raise DataError(f"{manifest_path}: {what}: must be a path relative to the dataset folder")
    path = (manifest_path.parent / value).resolve()
    if path.is_dir() and not folder:
        wanted = ("one file (NIfTI or DICOM SEG), {\"seg\": ...} or {\"rtstruct\": ..., \"rois\": {...}}"
                  if what.endswith(LABEL_KEY) else "a file")
        raise DataError(f"{path}: a folder, listed as {what} in {manifest_path.name}; {what} must be {wanted}")
    if not path.exists():
        raise DataError(f"{path}: listed as {what} in {manifest_path.name} but not found")
    return path


def _image(manifest_path: Path, what: str, value: Any) -> Path | Series:
    if not isinstance(value, dict):
        return image_source(_listed(manifest_path, what, value, folder=True), what)
    files = value.get("series")
    if set(value) != {"series"} or not isinstance(files, list) or not files:
        raise DataError(f"{manifest_path}: {what}: an image object is {{\"series\": [file, ...]}} (the files of "
                        f"one DICOM series), got keys {sorted(value)}")
    paths = [_listed(manifest_path, f"{what}.series[{j}]", f) for j, f in enumerate(files)]
    if len(set(paths)) < len(paths):
        raise DataError(f"{manifest_path}: {what}.series: lists a file twice")
    return Series(tuple(paths), where=f"{manifest_path}: {what}")


def _label(manifest_path: Path, what: str, value: Any) -> Path | SegLabel | RtLabel:
    if isinstance(value, dict):
        return _label_object(manifest_path, what, value)
    path = _listed(manifest_path, what, value)
    sop_class = label_class(path)
    if sop_class == RTSTRUCT_CLASS:
        raise DataError(f"{path}: an RTSTRUCT, listed as {what}, needs its ROI mapping: "
                        f"{{\"rtstruct\": \"{value}\", \"rois\": {{\"<ROI name>\": \"<bundle label>\"}}}}")
    return SegLabel(path) if sop_class in SEG_CLASSES else path


def _label_object(manifest_path: Path, what: str, value: dict[str, Any]) -> SegLabel | RtLabel:
    kind = "seg" if "seg" in value else "rtstruct"
    names = "segments" if kind == "seg" else "rois"
    if set(value) - {kind, names} or ("seg" in value) == ("rtstruct" in value):
        raise DataError(f"{manifest_path}: {what}: a label object is {{\"seg\": file, \"segments\": {{...}}}} "
                        f"(segments optional) or {{\"rtstruct\": file, \"rois\": {{...}}}}, got keys {sorted(value)}")
    mapping = value.get(names)
    if mapping is None and kind == "seg":
        return SegLabel(_listed(manifest_path, f"{what}.{kind}", value[kind]))
    if not isinstance(mapping, dict) or not mapping or not all(
            isinstance(k, str) and k and isinstance(v, str) and v for k, v in mapping.items()):
        raise DataError(f"{manifest_path}: {what}.{names}: must map each {'segment' if kind == 'seg' else 'ROI'} "
                        f"name to a bundle label name ({{\"<name>\": \"<bundle label>\", ...}})")
    path = _listed(manifest_path, f"{what}.{kind}", value[kind])
    pairs = tuple(mapping.items())
    return SegLabel(path, pairs) if kind == "seg" else RtLabel(path, pairs)


def case_files(case: dict[str, Any]) -> list[Path]:
    """Every file of a case, in order: an image's modality files or its series' slices (sorted,
    for a folder), then the label."""
    return [p for key in (IMAGE_KEY, LABEL_KEY) for p in _files(case[key])]


def _files(value: Any) -> list[Path]:
    if isinstance(value, Series):
        return list(value.files)
    if isinstance(value, (SegLabel, RtLabel)):
        return [value.path]
    return list(value) if isinstance(value, list) else [value]


def digest(data_dir: Path, datalist: dict[str, list[dict[str, Path]]]) -> str:
    """SHA-256 over ``dataset.json`` and the bytes of every file it lists, in list order.

    It stays on the node: anyone holding a candidate dataset could confirm it against this plain
    hash. The keyed fingerprint made from it (:func:`nodes.policy.keyed_fingerprint`) is what
    goes into the registry's provenance.
    """
    digest = hashlib.sha256((data_dir / DATASET_JSON).read_bytes())
    for split in SPLITS:
        for case in datalist[split]:
            for path in case_files(case):
                digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def _signature(data_dir: Path, datalist: dict[str, list[dict[str, Path]]]) -> tuple[Any, ...]:
    files = [data_dir / DATASET_JSON] + [p for s in SPLITS for case in datalist[s] for p in case_files(case)]
    stats = [(f, f.stat()) for f in files]
    return tuple((str(f), st.st_size, st.st_mtime_ns) for f, st in stats)


class _DataCache:
    """Least-recently-used cache of loaded datasets inside one node process."""

    def __init__(self, max_entries: int) -> None:
        self._entries: OrderedDict[tuple[Any, ...], LocalData] = OrderedDict()
        self._max = max_entries
        self._lock = threading.Lock()

    def get_or_load(self, key: tuple[Any, ...], load: Any) -> LocalData:
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
        data = load()
        with self._lock:
            self._entries[key] = data
            while len(self._entries) > self._max:
                self._entries.popitem(last=False)
        return data

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


_CACHE = _DataCache(max_entries=4)


def load_local_data(data_dir: str | Path, task: Task, *, use_cache: bool = True,
                    disk_cache: Path | None = None) -> LocalData:
    """Validate and load a node's dataset; raises :class:`DataError` naming the bad file.

    Image tasks (a bundle, or a catalogue task's shipped bundle) get their cases one by one
    (:mod:`fl.learn.cases`), each preprocessed and checked now, and kept in ``disk_cache`` (this
    node's state folder's ``cache``) between processes, keyed by every file's path, size and
    modification time and by the bundle; a fresh process reads it instead of preprocessing again."""
    return task.load_data(Path(data_dir).resolve(), use_cache=use_cache, disk_cache=disk_cache)


def load_bundle_cases(data_dir: Path, task: BundleTask, use_cache: bool, disk_cache: Path | None) -> LocalData:
    """A bundle task's cases, each preprocessed and checked now (or found in ``disk_cache``); DICOM
    cases are converted to NIfTI first (:mod:`fl.learn.dicom_cache`, kept in ``disk_cache`` too)."""
    from fl.learn.cases import bundle_cases
    from fl.learn.dicom_cache import prune

    datalist = read_datalist(data_dir, modality_lists=True)

    def load() -> LocalData:
        if disk_cache is not None:
            prune(disk_cache)  # converted DICOM cases whose files changed
        return LocalData(bundle_cases(datalist["training"], task, disk_cache, train=True),  # type: ignore[arg-type]
                         bundle_cases(datalist["validation"], task, disk_cache, train=False),  # type: ignore[arg-type]
                         digest=digest(data_dir, datalist))

    if not use_cache:
        return load()
    key = (task.digest, task.private, str(disk_cache), _signature(data_dir, datalist))
    return _CACHE.get_or_load(key, load)


def load_tabular(data_dir: Path, task: TabularTask, use_cache: bool) -> LocalData:
    from fl.learn import tabular

    if not (data_dir / DATASET_JSON).is_file():
        raise DataError(f"{data_dir / DATASET_JSON}: missing (a tabular node folder needs dataset.json)")
    if not tabular.is_tabular(data_dir):
        raise DataError(f"{data_dir / DATASET_JSON}: not a tabular dataset (\"format\": \"tabular\")")

    def load() -> LocalData:
        x_train, y_train, x_val, y_val, digest = tabular.load(data_dir, task.features)
        return LocalData(Split(x_train, y_train), Split(x_val, y_val), digest)

    if not use_cache:
        return load()
    files = sorted(p for p in data_dir.iterdir() if p.is_file())
    key = (task.name, str(data_dir), tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files))
    return _CACHE.get_or_load(key, load)


def clear_cache() -> None:
    """Forget every cached dataset in this process (tests, or a node told to re-read)."""
    _CACHE.clear()
