"""A node's cases for a bundle task: one file (or one file per modality) per case, never stacked.

Each case keeps its own size, spacing and orientation; the bundle's preprocessing makes it what
the network takes. The deterministic part of that preprocessing (loading, orientation, spacing,
intensity) runs once per case and is kept on the node's disk (MONAI's ``PersistentDataset``,
under the node's state folder), keyed by the case's files (path, size, modification time) and
the bundle's digest (which covers the transform chain): a restarted node, or a deployed
ClientApp process started fresh, reads it instead of preprocessing again, and an edited file or
bundle is preprocessed anew. Every case is preprocessed, hence checked, when the node's data is
loaded, so a bad file stops the node before training with an error naming it. The random part
(patch sampling, flips) runs every time. A long-lived process (a node's warm worker) also keeps
preprocessed cases in memory up to :data:`MEMORY_BUDGET_ENV` GiB (default 2) per dataset, so
later rounds read no file at all; cases beyond the budget are read from the disk cache each time.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from monai.data import PersistentDataset

from fl.errors import DataError
from fl.learn import IMAGE_KEY, LABEL_KEY
from fl.learn.dicom import IMAGE_SOURCE_KEY, LABEL_SOURCE_KEY

if TYPE_CHECKING:
    from fl.learn.bundle import BundleTask

CACHE_FORMAT = 1  # bump when what the cache holds changes
MEMORY_BUDGET_ENV = "ONCOFED_MEMORY_CACHE_GB"
SOURCE_KEYS = {IMAGE_KEY: IMAGE_SOURCE_KEY, LABEL_KEY: LABEL_SOURCE_KEY}  # a converted DICOM case's sources


@functools.lru_cache(maxsize=1)
def image_loader() -> Any:
    """One MONAI ``LoadImage`` per process. Building one instantiates every reader MONAI knows;
    with pydicom installed and no GPU codec its DICOM reader warns each time, so the loader is
    built once, with that notice (a GPU decoder we don't use) kept out of the node's log."""
    from monai.transforms import LoadImage

    from fl.learn.quiet import quiet_monai

    with quiet_monai():
        return LoadImage(image_only=True)


def memory_budget() -> int:
    """Bytes of preprocessed cases a dataset keeps in memory (``ONCOFED_MEMORY_CACHE_GB``, default 2)."""
    raw = os.environ.get(MEMORY_BUDGET_ENV, "2")
    try:
        gib = float(raw)
    except ValueError:
        gib = -1.0
    if not gib >= 0:
        raise DataError(f"{MEMORY_BUDGET_ENV}: {raw!r} is not a number of GiB >= 0")
    return int(gib * 2**30)


def _nbytes(case: Any) -> int:
    if isinstance(case, torch.Tensor):
        return case.element_size() * case.nelement()
    if isinstance(case, dict):
        return sum(_nbytes(v) for v in case.values())
    if isinstance(case, (list, tuple)):
        return sum(_nbytes(v) for v in case)
    return 0


def file_stamp(path: str) -> list[Any]:
    stat = Path(path).stat()
    return [path, stat.st_size, stat.st_mtime_ns]


def case_key(item: dict[str, Any]) -> bytes:
    """The cache key of one case: its files, their sizes and modification times (a file that
    changes gets a new key); MONAI's ``PersistentDataset`` takes hex bytes."""
    stamps = {k: [file_stamp(p) for p in (v if isinstance(v, list) else [v])]
              for k, v in sorted(item.items()) if k in (IMAGE_KEY, LABEL_KEY)}
    return hashlib.sha256(json.dumps([CACHE_FORMAT, stamps]).encode()).hexdigest().encode()


def _files(item: dict[str, Any], key: str) -> list[str]:
    value = item.get(key)
    return [str(v) for v in value] if isinstance(value, list) else [str(value)]


def _named(item: dict[str, Any], key: str) -> str:
    """What an error names for a case's image or label: its DICOM source where it was converted
    (:mod:`fl.learn.dicom_cache`), else its first file."""
    return str(item.get(SOURCE_KEYS[key]) or _files(item, key)[0])


def _reason(exc: Exception) -> str:
    text = str(exc).strip()
    # MONAI wraps a failing transform; its last line names the real cause
    return (text.splitlines()[-1] if text else type(exc).__name__)[:300]


def _failing_file(item: dict[str, Any], exc: Exception) -> DataError:
    """Name the file a case failed on: the first that MONAI cannot read, else its image."""
    for key in (IMAGE_KEY, LABEL_KEY):
        for path in _files(item, key):
            try:
                image_loader()(path)
            except Exception as read_error:  # MONAI wraps every reader failure
                shown = _named(item, key) if SOURCE_KEYS[key] in item else path
                return DataError(f"{shown}: unreadable image ({_reason(read_error)})")
    return DataError(f"{_named(item, IMAGE_KEY)}: preprocessing failed ({_reason(exc)})")


def check_case(item: dict[str, Any], case: dict[str, Any], task: BundleTask) -> None:
    """What the network can take, checked on a case's preprocessed image and label: finite
    values, the network's number of spatial dimensions, one grid for image and label, and label
    values it can learn (class indices below its outputs, or 0/1 per channel)."""
    image, label = case[IMAGE_KEY], case[LABEL_KEY]
    image_path, label_path = _named(item, IMAGE_KEY), _named(item, LABEL_KEY)
    dims = task.spatial_dims
    if image.ndim - 1 != dims:
        raise DataError(f"{image_path}: {image.ndim - 1}-D image, task {task.name} needs {dims}-D")
    if tuple(label.shape[1:]) != tuple(image.shape[1:]):
        raise DataError(f"{label_path}: label shape {tuple(label.shape[1:])} differs from image shape "
                        f"{tuple(image.shape[1:])}")
    if not bool(torch.isfinite(torch.as_tensor(image)).all()):
        raise DataError(f"{image_path}: image holds NaN or infinite values")
    values = torch.unique(torch.as_tensor(label)).tolist()
    classes = task.out_channels if label.shape[0] == 1 and task.out_channels > 1 else 2
    bad = [int(v) if float(v).is_integer() else v for v in values if v not in range(classes)]
    if bad:
        raise DataError(f"{label_path}: label values {bad[:5]} outside the task's classes 0..{classes - 1}")


class CheckedPersistentDataset(PersistentDataset):  # type: ignore[misc]
    """MONAI's ``PersistentDataset`` whose cases are checked once, when preprocessed
    (:func:`check_case`); a failing case names its file, as the node's other data errors do."""

    def __init__(self, task: BundleTask, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.task = task
        self.budget = memory_budget()
        self.held: dict[bytes, Any] = {}
        self.held_bytes = 0

    def _cachecheck(self, item_transformed: Any) -> Any:
        """A case's preprocessed form: from memory, else from the disk cache (or preprocessed now),
        kept in memory while the budget allows. Random transforms get a copy, never the kept one."""
        key = case_key(item_transformed)
        if key in self.held:
            return copy.deepcopy(self.held[key])
        case = super()._cachecheck(item_transformed)
        size = _nbytes(case)
        if self.held_bytes + size <= self.budget:
            self.held[key] = case
            self.held_bytes += size
            return copy.deepcopy(case)
        return case

    def _pre_transform(self, item: dict[str, Any]) -> Any:
        paths = dict(item)
        try:  # the bundle's transforms see the files only (a case's source names stay out of batches)
            case = super()._pre_transform({k: v for k, v in item.items() if k not in SOURCE_KEYS.values()})
        except Exception as exc:
            raise _failing_file(paths, exc) from None
        check_case(paths, case, self.task)
        return case

    def _transform(self, index: int) -> Any:
        try:
            return super()._transform(index)
        except DataError:
            raise
        except Exception as exc:  # a random transform failing on this case
            raise DataError(f"{_named(self.data[index], IMAGE_KEY)}: preprocessing failed "
                            f"({_reason(exc)})") from None

    def warm(self) -> None:
        """Preprocess (and so check) every case not in the cache yet, and hold every case in memory
        while the budget allows (cached cases were checked when they were written). Entries of files
        that changed or left the dataset are removed."""
        for item in self.data:  # every case into memory now (within the budget), cached or preprocessed:
            self._cachecheck(item)  # a sampled case never waits for the disk in a later round
        if self.cache_dir is not None:
            kept = {self.cache_dir / f"{self.hash_func(item).decode()}.pt" for item in self.data}
            for stale in set(self.cache_dir.glob("*.pt")) - kept:
                stale.unlink(missing_ok=True)


@dataclass(frozen=True)
class Cases:
    """One split of a node's cases: the file lists and the dataset that preprocesses them."""

    items: list[dict[str, Any]]
    dataset: Any  # a PersistentDataset over ``items``

    def __len__(self) -> int:
        return len(self.items)


def as_items(cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Datalist entries (paths as ``Path`` or lists of them) as MONAI reads them: strings."""
    return [{k: [str(p) for p in v] if isinstance(v, (list, tuple)) else str(v) for k, v in case.items()}
            for case in cases]


def bundle_cases(cases: list[dict[str, Any]], task: BundleTask, cache_dir: Path | None, *, train: bool) -> Cases:
    """The split's cases through the bundle's training (``train``) or validation preprocessing;
    DICOM cases as their NIfTI conversion (:func:`fl.learn.dicom_cache.convert_cases`)."""
    from fl.learn.dicom_cache import convert_cases

    items = as_items(convert_cases(cases, task.label_index, cache_dir))
    transform = task.train_transform() if train else task.val_transform()
    folder = None
    if cache_dir is not None:
        folder = cache_dir / f"bundle-{task.digest[:16]}" / ("training" if train else "validation")
        folder.mkdir(parents=True, exist_ok=True)
    dataset = CheckedPersistentDataset(task, data=items, transform=transform, cache_dir=folder, hash_func=case_key)
    dataset.warm()
    return Cases(items=items, dataset=dataset)
