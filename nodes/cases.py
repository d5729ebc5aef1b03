"""A node's cases for a bundle task: one file (or one file per modality) per case, never stacked.

Each case keeps its own size, spacing and orientation; the bundle's preprocessing makes it what
the network takes. The deterministic part of that preprocessing (loading, orientation, spacing,
intensity) runs once per case and is kept on the node's disk (MONAI's ``PersistentDataset``,
under the node's state folder), keyed by the case's files (path, size, modification time) and
the bundle's digest (which covers the transform chain): a restarted node, or a deployed
ClientApp process started fresh, reads it instead of preprocessing again, and an edited file or
bundle is preprocessed anew. The random part (patch sampling, flips) runs every time. Memory
holds the cases a step uses, not the dataset.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fl.errors import DataError
from fl.tasks import IMAGE_KEY, LABEL_KEY
from fl.tasks.bundle import BundleTask

CACHE_FORMAT = 1  # bump when what the cache holds changes


def file_stamp(path: str) -> list[Any]:
    stat = Path(path).stat()
    return [path, stat.st_size, stat.st_mtime_ns]


def case_key(item: dict[str, Any]) -> bytes:
    """The cache key of one case: its files, their sizes and modification times (a file that
    changes gets a new key); MONAI's ``PersistentDataset`` takes hex bytes."""
    stamps = {k: [file_stamp(p) for p in (v if isinstance(v, list) else [v])]
              for k, v in sorted(item.items()) if k in (IMAGE_KEY, LABEL_KEY)}
    return hashlib.sha256(json.dumps([CACHE_FORMAT, stamps]).encode()).hexdigest().encode()


def _describe(item: dict[str, Any]) -> str:
    image = item.get(IMAGE_KEY)
    return str(image[0] if isinstance(image, list) and image else image)


def _dataset_class() -> Any:
    from monai.data import PersistentDataset

    class NamedPersistentDataset(PersistentDataset):  # type: ignore[misc]
        """A failing case names its file, as the node's other data errors do."""

        def _transform(self, index: int) -> Any:
            try:
                return super()._transform(index)
            except DataError:
                raise
            except Exception as exc:
                text = str(exc).strip()
                # MONAI wraps a failing transform; its last line names the real cause
                reason = (text.splitlines()[-1] if text else type(exc).__name__)[:300]
                raise DataError(f"{_describe(self.data[index])}: preprocessing failed ({reason})") from None

    return NamedPersistentDataset


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
    """The split's cases through the bundle's training (``train``) or validation preprocessing."""
    items = as_items(cases)
    transform = task.train_transform() if train else task.val_transform()
    folder = None
    if cache_dir is not None:
        folder = cache_dir / f"bundle-{task.digest[:16]}" / ("training" if train else "validation")
        folder.mkdir(parents=True, exist_ok=True)
    dataset = _dataset_class()(data=items, transform=transform, cache_dir=folder, hash_func=case_key)
    return Cases(items=items, dataset=dataset)
