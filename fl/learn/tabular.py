"""Tabular node data for the ``tabular`` task: ``dataset.json`` naming ``train.csv`` and
``val.csv`` (numeric feature columns and a 0/1 ``label`` column).

:func:`write_federation` splits a real public cancer dataset that ships inside scikit-learn,
the Breast Cancer Wisconsin Diagnostic set (569 records, 30 features, malignant = 1), or a
synthetic one of any size, across nodes with label skew (Dirichlet), so sites differ in their
share of malignant cases as hospitals do; synthetic records are dealt out evenly,
``records_per_node`` each (the scale benchmark). Each node keeps a held-out fifth for validation.

Features are scaled record by record, with ranges declared in ``dataset.json``
(``feature_ranges``: name -> [low, high]) from public knowledge, never computed from the node's
records: each value is clipped to its range and mapped to [-1, 1]. Standardising with the
training set's own mean and standard deviation would make every record's features depend on
every other record, so one record's influence would pass the per-sample clipping bound that
record-level DP relies on. For Breast Cancer Wisconsin the ranges are the published summary
statistics of the dataset's documentation; for synthetic records, a bound that follows from the
generator's public parameters.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from fl.errors import DataError

DATASET_JSON = "dataset.json"
LABEL = "label"
SOURCES = ("breast-cancer", "synthetic")
RANGES = "feature_ranges"
SYNTHETIC_RANGE = (-8.0, 8.0)  # make_classification: unit-variance clusters at +-class_sep, combined


def _published_ranges(description: str, names: list[str]) -> dict[str, list[float]]:
    """The Min/Max table of the dataset's documentation ("Summary Statistics"), feature by feature."""
    rows = re.findall(r"^[a-z ()]+:\s+([0-9.]+)\s+([0-9.]+)\s*$", description, flags=re.MULTILINE)
    if len(rows) != len(names):
        raise DataError(f"breast-cancer: the dataset's documentation lists {len(rows)} feature ranges, "
                        f"expected {len(names)}")
    return {name: [float(lo), float(hi)] for name, (lo, hi) in zip(names, rows, strict=True)}


def _records(source: str, seed: int, n: int) -> tuple[np.ndarray, np.ndarray, dict[str, list[float]]]:
    """Records, labels, and each feature's public range (in column order)."""
    if source == "breast-cancer":
        from sklearn.datasets import load_breast_cancer

        data = load_breast_cancer()
        names = [str(f) for f in data.feature_names]
        # scikit-learn codes benign as 1; a cancer task calls malignant the positive class
        return data.data.astype(np.float64), (data.target == 0).astype(np.int64), _published_ranges(data.DESCR, names)
    if source == "synthetic":
        from sklearn.datasets import make_classification

        x, y = make_classification(n_samples=n, n_features=30, n_informative=8, n_redundant=6, flip_y=0.02,
                                   class_sep=1.0, random_state=seed)
        return x, y.astype(np.int64), {f"f{i}": list(SYNTHETIC_RANGE) for i in range(30)}
    raise DataError(f"tabular source {source!r}: one of {', '.join(SOURCES)}")


def _split(labels: np.ndarray, nodes: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    """Indices per node: each class spread over nodes by Dirichlet(alpha) proportions."""
    parts: list[list[int]] = [[] for _ in range(nodes)]
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        cuts = (np.cumsum(rng.dirichlet([alpha] * nodes)) * len(idx)).astype(int)[:-1]
        for node, chunk in enumerate(np.split(idx, cuts)):
            parts[node].extend(chunk.tolist())
    return [rng.permutation(np.array(p, dtype=np.int64)) for p in parts]


def write_federation(root: str | Path, *, nodes: int, source: str = "breast-cancer", seed: int = 0,
                     alpha: float = 1.0, records_per_node: int = 60) -> list[Path]:
    """One folder per node under ``root`` (written aside, then renamed into place)."""
    root = Path(root)
    if nodes < 1:
        raise DataError(f"--nodes: need at least one node, got {nodes}")
    if root.exists() and any(root.iterdir()):
        raise DataError(f"{root}: exists and is not empty")
    rng = np.random.default_rng(seed)
    x, y, ranges = _records(source, seed, nodes * records_per_node)
    names = list(ranges)
    if source == "synthetic":  # a scale workload: every node holds records_per_node records
        parts = np.array_split(rng.permutation(len(y)), nodes)
    else:
        parts = _split(y, nodes, alpha, rng)
    small = [i for i, p in enumerate(parts) if len(p) < 5]
    if small:
        raise DataError(f"{source}: node {small[0]} would hold fewer than 5 records; use fewer nodes or "
                        "a larger alpha")
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        for node, idx in enumerate(parts):
            folder = staging / f"node-{node}"
            folder.mkdir()
            n_val = max(1, len(idx) // 5)
            for split, rows in (("val.csv", idx[:n_val]), ("train.csv", idx[n_val:])):
                with open(folder / split, "w", newline="", encoding="utf-8") as fh:
                    writer = csv.writer(fh)
                    writer.writerow([*names, LABEL])
                    writer.writerows([*map(repr, x[i].tolist()), int(y[i])] for i in rows)
            manifest = {"name": f"oncofed-{source}-node-{node}", "format": "tabular", "source": source,
                        "training": "./train.csv", "validation": "./val.csv", "label": LABEL,
                        "numTraining": int(len(idx) - n_val), "positives": int(y[idx].sum()), RANGES: ranges}
            (folder / DATASET_JSON).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        if root.exists():
            root.rmdir()
        os.replace(staging, root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [root / f"node-{i}" for i in range(nodes)]


def is_tabular(data_dir: Path) -> bool:
    try:
        return json.loads((data_dir / DATASET_JSON).read_text(encoding="utf-8")).get("format") == "tabular"
    except (OSError, ValueError, AttributeError):
        return False


def _read_csv(path: Path, features: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    if not path.is_file():
        raise DataError(f"{path}: listed in {DATASET_JSON} but not found")
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: unreadable CSV ({exc})") from None
    if len(rows) < 2:
        raise DataError(f"{path}: no records")
    header = rows[0]
    if LABEL not in header:
        raise DataError(f"{path}: no '{LABEL}' column")
    if len(header) - 1 != features:
        raise DataError(f"{path}: {len(header) - 1} feature columns, the task needs {features}")
    label_col = header.index(LABEL)
    try:
        table = np.array([[float(v) for v in row] for row in rows[1:]], dtype=np.float64)
    except ValueError as exc:
        raise DataError(f"{path}: non-numeric value ({exc})") from None
    if not np.isfinite(table).all():
        raise DataError(f"{path}: NaN or infinite values")
    labels = table[:, label_col]
    if not np.isin(labels, (0, 1)).all():
        raise DataError(f"{path}: '{LABEL}' must be 0 or 1")
    return np.delete(table, label_col, axis=1), labels.astype(np.uint8), [h for h in header if h != LABEL]


def _declared_ranges(manifest_path: Path, manifest: dict, names: list[str]) -> tuple[np.ndarray, np.ndarray]:  # type: ignore[type-arg]
    """Each feature's declared [low, high], in column order; named when missing or malformed."""
    declared = manifest.get(RANGES)
    if not isinstance(declared, dict):
        raise DataError(f"{manifest_path}: '{RANGES}' must map every feature to a public [low, high] range "
                        "(statistics of the node's own records would void record-level DP)")
    lows, highs = [], []
    for name in names:
        pair = declared.get(name)
        ok = (isinstance(pair, list) and len(pair) == 2 and all(isinstance(v, (int, float)) for v in pair)
              and all(math.isfinite(v) for v in pair) and pair[0] < pair[1])
        if not ok:
            raise DataError(f"{manifest_path}: {RANGES}[{name!r}] must be [low, high] with low < high, got {pair!r}")
        lows.append(float(pair[0]))
        highs.append(float(pair[1]))
    return np.array(lows), np.array(highs)


def scale(x: np.ndarray, low: np.ndarray, high: np.ndarray) -> torch.Tensor:
    """Per record: clip each feature to its public range and map it to [-1, 1]."""
    return torch.from_numpy((2 * (np.clip(x, low, high) - low) / (high - low) - 1).astype(np.float32))


def load(data_dir: Path, features: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """Scaled train/val features and labels, and the dataset's SHA-256 digest (kept on the node)."""
    manifest_path = data_dir / DATASET_JSON
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    paths = {}
    for split in ("training", "validation"):
        value = manifest.get(split)
        if not isinstance(value, str):
            raise DataError(f"{manifest_path}: '{split}' must name a CSV file")
        paths[split] = (data_dir / value).resolve()
    x_train, y_train, names = _read_csv(paths["training"], features)
    x_val, y_val, val_names = _read_csv(paths["validation"], features)
    if val_names != names:
        raise DataError(f"{paths['validation']}: feature columns differ from {paths['training'].name}'s")
    low, high = _declared_ranges(manifest_path, manifest, names)
    digest = hashlib.sha256(manifest_path.read_bytes())
    for path in paths.values():
        digest.update(path.read_bytes())
    return (scale(x_train, low, high), torch.from_numpy(y_train), scale(x_val, low, high), torch.from_numpy(y_val),
            digest.hexdigest())
