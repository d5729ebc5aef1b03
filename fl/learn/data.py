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
    """Parse ``dataset.json``: each split becomes a list of ``{image, label}`` absolute paths
    (with ``modality_lists``, an image may be a list of files, one per modality)."""
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
    out: dict[str, list[dict[str, Path]]] = {}
    for split in SPLITS:
        entries = manifest.get(split)
        if not isinstance(entries, list) or not entries:
            raise DataError(f"{manifest_path}: '{split}' must be a non-empty list of {{image, label}} entries")
        out[split] = [_entry(manifest_path, split, i, e, modality_lists) for i, e in enumerate(entries)]
    return out


def _entry(manifest_path: Path, split: str, index: int, entry: Any, modality_lists: bool) -> dict[str, Any]:
    where = f"{manifest_path}: {split}[{index}]"
    if not isinstance(entry, dict):
        raise DataError(f"{where}: expected an object with 'image' and 'label'")
    paths: dict[str, Any] = {}
    for key in (IMAGE_KEY, LABEL_KEY):
        value = entry.get(key)
        if modality_lists and key == IMAGE_KEY and isinstance(value, list) and value:
            paths[key] = [_listed(manifest_path, f"{split}[{index}].{key}[{j}]", v, where, key)
                          for j, v in enumerate(value)]
            continue
        paths[key] = _listed(manifest_path, f"{split}[{index}].{key}", value, where, key)
    return paths


def _listed(manifest_path: Path, what: str, value: Any, where: str, key: str) -> Path:
    if not isinstance(value, str) or not value:
        raise DataError(f"{where}: '{key}' must be a file path relative to the dataset folder")
    path = (manifest_path.parent / value).resolve()
    if not path.is_file():
        raise DataError(f"{path}: listed as {what} in {manifest_path.name} but not found")
    return path


def case_files(case: dict[str, Any]) -> list[Path]:
    """Every file of a case, in order (an image's modality files, then the label)."""
    return [p for key in (IMAGE_KEY, LABEL_KEY) for p in (case[key] if isinstance(case[key], list) else [case[key]])]


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
    """A bundle task's cases, each preprocessed and checked now (or found in ``disk_cache``)."""
    from fl.learn.cases import bundle_cases

    datalist = read_datalist(data_dir, modality_lists=True)

    def load() -> LocalData:
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
