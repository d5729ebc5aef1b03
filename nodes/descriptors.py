"""What a site's dataset is, never what one of its cases is: the dataset descriptors a site
releases with ``fl validate`` for the model card, as its policy allows (``release_descriptors``).

- **Declarations**, released as the node's ``dataset.json`` states them: the modality names and
  the label names. They are the operator's description of the dataset, not statistics of its
  records. The case count per split is public in OncoFed (it sets the DP-SGD sampling rate).
- **Statistics of the records**, as counts over public bins: each case's finest and coarsest voxel
  spacing in mm (:data:`SPACING_EDGES`), for each declared foreground label the number of cases
  that hold it, and per split the number of cases read from a DICOM series (so a model card can
  say how many series trained it). Adding or removing one case moves each spacing histogram by
  one, each label count and one split's series count by at most one: L2 sensitivity
  ``sqrt(3 + labels)`` (``sqrt(labels)`` for tabular records, which have no spacing or series).

  - ``exact``: the counts, and the exact smallest and largest spacing.
  - ``noisy``: every count with ``N(0, (z * sensitivity)^2)``: one Gaussian mechanism of
    multiplier z, charged to the node's ledger before a case is read. The release is kept on the
    node, keyed by the dataset's digest, the mode and z, and served again unchanged
    (post-processing): asking again costs no budget and tells nothing new.

What a reader derives (a spacing range from the bins above a noise threshold, a prevalence with
its interval) is post-processing of these counts and the public case counts
(:func:`fl.registry.card.describe`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from fl import schema
from fl.errors import DataError
from fl.learn.dicom import IMAGE_SOURCE_KEY
from fl.learn.synth import DATASET_JSON

SPACING_EDGES = (0.0, 0.5, 0.8, 1.0, 1.5, 2.0, 3.0, 5.0, math.inf)  # mm, public
CACHE_FILE = "descriptors.json"  # in the node's state folder
FORMAT = 1
MAX_NAME = 64  # a declared name longer than this is cut: names describe, they do not carry data


def declared(data_dir: Path) -> tuple[list[str], dict[int, str]]:
    """The modality names and the foreground labels (value -> name) that ``dataset.json`` declares."""
    path = data_dir / DATASET_JSON
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not readable JSON ({exc})") from None
    modality = manifest.get("modality") or {}
    if not isinstance(modality, dict):
        raise DataError(f"{path}: 'modality' must be an object of index -> name")
    labels = manifest.get("labels") or {}
    if not isinstance(labels, dict):
        raise DataError(f"{path}: 'labels' must be an object of value -> name")
    out: dict[int, str] = {}
    for value, name in labels.items():
        try:
            number = int(value)
        except ValueError:
            raise DataError(f"{path}: labels: key {value!r} is not an integer label value") from None
        if number != 0:
            out[number] = str(name)[:MAX_NAME]
    order = sorted(modality, key=lambda k: (0, int(k), "") if str(k).isdigit() else (1, 0, str(k)))
    return [str(modality[k])[:MAX_NAME] for k in order], dict(sorted(out.items()))


def _bin(value: float) -> int:
    return next(i for i in range(len(SPACING_EDGES) - 1) if value < SPACING_EDGES[i + 1])


def _read_case(label_path: Path) -> tuple[tuple[float, ...], np.ndarray]:
    """A label file's voxel spacing (mm, spatial axes, to 0.1 um: headers store float32) and its
    distinct values."""
    name = label_path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        import nibabel as nib

        image = nib.load(str(label_path))
        spatial = min(3, len(image.shape))
        return tuple(round(float(z), 4) for z in image.header.get_zooms()[:spatial]), \
            np.unique(np.asanyarray(image.dataobj))
    from fl.learn.cases import image_loader

    image = image_loader()(str(label_path))
    spacing = tuple(round(float(z), 4) for z in np.asarray(getattr(image, "pixdim", [1.0] * 3)).ravel()[:3])
    return spacing, np.unique(np.asarray(image))


def count(data_dir: Path, tabular_labels: Callable[[], np.ndarray] | None = None,
          cases: dict[str, list[dict[str, Any]]] | None = None) -> dict[str, Any]:
    """The exact counts of this node's cases (training and validation together), on the node only.
    ``cases``: each split's cases as the data loader gives them (a DICOM case converted to the
    files the bundle reads, naming its series), else ``dataset.json``'s files."""
    from fl.learn.data import SPLITS, read_datalist

    modality, labels = declared(data_dir)
    finest, coarsest = [0] * (len(SPACING_EDGES) - 1), [0] * (len(SPACING_EDGES) - 1)
    spacings: list[float] = []
    if tabular_labels is not None:  # records of a table: no spacing; the label column's values
        values = tabular_labels()
        labels = labels or {1: "label 1"}
        holds = [int(np.sum(values == v)) for v in labels]
        return {"modality": modality or ["tabular"], "labels": list(labels.values()), "label_cases": holds,
                "spacing_finest": None, "spacing_coarsest": None, "spacing_range": None, "dicom_series": None,
                "sensitivity": math.sqrt(len(labels))}
    datalist = cases if cases is not None else read_datalist(data_dir, modality_lists=True)
    holds = [0] * len(labels)
    dicom = [sum(IMAGE_SOURCE_KEY in case for case in datalist[split]) for split in SPLITS]
    for split in SPLITS:
        for case in datalist[split]:
            try:
                spacing, present = _read_case(Path(case["label"]))
            except Exception as exc:  # noqa: BLE001 (any reader's failure names the file, on the node)
                raise DataError(f"{case['label']}: cannot read its header and values ({exc})") from None
            if not spacing or not all(math.isfinite(s) and s > 0 for s in spacing):
                raise DataError(f"{case['label']}: voxel spacing {spacing} is not positive")
            finest[_bin(min(spacing))] += 1
            coarsest[_bin(max(spacing))] += 1
            spacings += [min(spacing), max(spacing)]
            present_set = {int(v) for v in present.ravel()}
            for i, value in enumerate(labels):
                holds[i] += value in present_set
    return {"modality": modality, "labels": list(labels.values()), "label_cases": holds,
            "spacing_finest": finest, "spacing_coarsest": coarsest,
            "spacing_range": [min(spacings), max(spacings)], "dicom_series": dicom,
            "sensitivity": math.sqrt(3 + len(labels))}


def release(exact: dict[str, Any], *, cases: tuple[int, int], noise_multiplier: float | None,
            noise: Callable[[int, float], np.ndarray]) -> dict[str, Any]:
    """What leaves the node: ``exact`` as is (``noise_multiplier`` None), or every count with
    Gaussian noise of std ``noise_multiplier * sensitivity`` drawn by ``noise(count, std)``
    and the exact spacing range left out."""
    out = {"release": "exact", "noise_std": 0.0, "cases_training": cases[0], "cases_validation": cases[1],
           "modality": exact["modality"], "labels": exact["labels"], "spacing_edges": list(SPACING_EDGES[1:-1]),
           **{k: exact[k] for k in ("label_cases", "spacing_finest", "spacing_coarsest", "spacing_range",
                                    "dicom_series")}}
    if noise_multiplier is None:
        return out
    std = noise_multiplier * exact["sensitivity"]
    out.update(release="noisy", noise_std=std, spacing_range=None)
    for key in ("label_cases", "spacing_finest", "spacing_coarsest", "dicom_series"):
        if out[key] is not None:
            values = np.asarray(out[key], dtype=np.float64)
            out[key] = [float(v) for v in values + noise(values.size, std)]
    return out


def cached(state: Path, key: str) -> dict[str, Any] | None:
    try:
        entries = json.loads((state / CACHE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if isinstance(entries, dict):
        schema.check("descriptors-cache", entries, state / CACHE_FILE)
    entry = entries.get(key) if isinstance(entries, dict) else None
    return entry if isinstance(entry, dict) else None


def keep(state: Path, key: str, value: dict[str, Any]) -> None:
    """Keep a release for later requests (atomically; a failed write only means a later request
    pays again)."""
    path = state / CACHE_FILE
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
        entries = entries if isinstance(entries, dict) else {}
    except (OSError, ValueError):
        entries = {}
    schema.check("descriptors-cache", entries, path)  # never rewrite a newer OncoFed's file in the old format
    entries.update(schema.stamp("descriptors-cache"))
    entries[key] = value
    tmp = path.with_name(f".{CACHE_FILE}.tmp")
    tmp.write_text(json.dumps(entries, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def cache_key(digest: str, mode: str, noise_multiplier: float) -> str:
    return hashlib.sha256(f"{FORMAT}|{digest}|{mode}|{noise_multiplier!r}".encode()).hexdigest()[:32]


def release_for(state: Path, data_dir: Path, data: Any, policy: Any, ledger: Any, *, dp_requested: bool,
                server_round: int, labels: Callable[[], np.ndarray | None]) -> tuple[dict[str, Any] | None, str | None]:
    """This node's descriptors as its policy allows, with the reason when it releases none. A
    noisy release is charged (written ahead) before any case is read; a budget or policy refusal
    declines the descriptors alone. ``labels``: the records' labels where they are a table's
    column (the task's :meth:`~fl.learn.task.Task.record_labels`), else None (label maps in the
    node's files)."""
    import time

    from fl.privacy.accounting import GaussianEvent
    from fl.privacy.noise import SecureGaussian
    from nodes.policy import NOISY, NONE, Refusal, charge

    mode = policy.descriptors_mode(dp_requested)
    if mode == NONE:
        return None, "its policy releases no dataset descriptors"
    z = float(policy.descriptors_noise_multiplier) if mode == NOISY else 0.0
    key = cache_key(data.digest, mode, z)
    kept = cached(state, key)
    if kept is not None:
        return kept, None
    out: dict[str, Any] = {}
    if mode == NOISY:
        try:
            with ledger.locked():
                entry = charge(policy, ledger, GaussianEvent(z, 1.0, 1), num_records=len(data.train) + len(data.val),
                               release="descriptors", server_round=server_round, time=time.time())
        except Refusal as refusal:
            return None, refusal.reason
        out["epsilon_after"] = float(entry["epsilon_after"])
    column = labels()
    source = SecureGaussian()
    splits = {"training": getattr(data.train, "items", None), "validation": getattr(data.val, "items", None)}
    loaded = splits if all(v is not None for v in splits.values()) else None
    out.update(release(count(data_dir, None if column is None else lambda: column, loaded),
                       cases=(len(data.train), len(data.val)),
                       noise_multiplier=z if mode == NOISY else None,
                       noise=lambda n, std: source.gaussian((n,), std).numpy()))
    keep(state, key, out)
    return out, None
