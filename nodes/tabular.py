"""Tabular node data for the ``tabular`` task: ``dataset.json`` naming ``train.csv`` and
``val.csv`` (numeric feature columns and a 0/1 ``label`` column).

:func:`write_federation` splits a real public cancer dataset that ships inside scikit-learn,
the Breast Cancer Wisconsin Diagnostic set (569 records, 30 features, malignant = 1), or a
synthetic one of any size, across nodes with label skew (Dirichlet), so sites differ in their
share of malignant cases as hospitals do; synthetic records are dealt out evenly,
``records_per_node`` each (the scale benchmark). Each node keeps a held-out fifth for validation.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from fl.errors import DataError

DATASET_JSON = "dataset.json"
LABEL = "label"
SOURCES = ("breast-cancer", "synthetic")


def _records(source: str, seed: int, n: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    if source == "breast-cancer":
        from sklearn.datasets import load_breast_cancer

        data = load_breast_cancer()
        # scikit-learn codes benign as 1; a cancer task calls malignant the positive class
        return data.data.astype(np.float64), (data.target == 0).astype(np.int64), [str(f) for f in data.feature_names]
    if source == "synthetic":
        from sklearn.datasets import make_classification

        x, y = make_classification(n_samples=n, n_features=30, n_informative=8, n_redundant=6, flip_y=0.02,
                                   class_sep=1.0, random_state=seed)
        return x, y.astype(np.int64), [f"f{i}" for i in range(30)]
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
    x, y, names = _records(source, seed, nodes * records_per_node)
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
                        "numTraining": int(len(idx) - n_val), "positives": int(y[idx].sum())}
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


def _read_csv(path: Path, features: int) -> tuple[np.ndarray, np.ndarray]:
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
    return np.delete(table, label_col, axis=1), labels.astype(np.uint8)


def load(data_dir: Path, features: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """Standardised train/val features and labels, and the dataset's SHA-256 fingerprint."""
    manifest_path = data_dir / DATASET_JSON
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    paths = {}
    for split in ("training", "validation"):
        value = manifest.get(split)
        if not isinstance(value, str):
            raise DataError(f"{manifest_path}: '{split}' must name a CSV file")
        paths[split] = (data_dir / value).resolve()
    x_train, y_train = _read_csv(paths["training"], features)
    x_val, y_val = _read_csv(paths["validation"], features)
    mean, std = x_train.mean(axis=0), x_train.std(axis=0) + 1e-8
    digest = hashlib.sha256(manifest_path.read_bytes())
    for path in paths.values():
        digest.update(path.read_bytes())
    as_tensor = lambda a: torch.from_numpy(((a - mean) / std).astype(np.float32))  # noqa: E731
    return (as_tensor(x_train), torch.from_numpy(y_train), as_tensor(x_val), torch.from_numpy(y_val),
            digest.hexdigest())
