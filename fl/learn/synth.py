"""Synthetic multi-site data: the embedded default federation.

Each site is a hospital with its own scanner and population: intensity range and offset,
noise level, lesion count and size (so class balance), and number of cases all differ, so
the federation is non-IID. Images come from MONAI's synthetic generators and are written as
NIfTI with a Decathlon-style ``dataset.json`` (``training`` and held-out ``validation``
lists), exactly the layout a real node serves.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from fl.errors import DataError
from fl.learn import ImageSpec, TabularTask

DATASET_JSON = "dataset.json"


def node_dir(root: str | Path, index: int) -> Path:
    """The folder of simulated node ``index`` under a federation's data root."""
    return Path(root) / f"node-{index}"


@dataclass(frozen=True)
class SiteProfile:
    """How one synthetic site's acquisitions and population look."""

    intensity_scale: float
    intensity_offset: float
    noise: float
    lesions: int
    radius_min: int
    radius_max: int
    train_cases: int
    val_cases: int


def site_profiles(nodes: int, image_size: int, rng: np.random.Generator) -> list[SiteProfile]:
    """Profiles spread over the range so that every pair of sites differs.

    Site ``i`` sits at ``t = i / (nodes - 1)`` along each axis (shuffled per axis), with a
    little jitter: a lesion-rich, low-noise site with many cases faces a sparse, noisy one.
    """
    positions = np.linspace(0.0, 1.0, nodes) if nodes > 1 else np.array([0.5])

    def axis() -> np.ndarray:
        return np.clip(rng.permutation(positions) + rng.uniform(-0.05, 0.05, nodes), 0, 1)

    scale, noise, lesions, radius, cases = axis(), axis(), axis(), axis(), axis()
    r_unit = image_size / 64
    profiles = []
    for i in range(nodes):
        radius_max = max(4, round((8 + 8 * radius[i]) * r_unit))
        profiles.append(
            SiteProfile(
                intensity_scale=float(10 ** (3 * scale[i])),
                intensity_offset=float(rng.uniform(-50, 50) * scale[i]),
                noise=float(0.15 + 0.45 * noise[i]),
                lesions=int(round(2 + 8 * lesions[i])),
                radius_min=max(3, radius_max // 2),
                radius_max=radius_max,
                train_cases=int(round(16 + 32 * cases[i])),
                val_cases=int(round(6 + 6 * cases[i])),
            )
        )
    return profiles


def _case(task: ImageSpec, size: int, profile: SiteProfile, rs: np.random.RandomState) -> tuple[np.ndarray, np.ndarray]:
    from monai.data.synthetic import create_test_image_2d, create_test_image_3d

    common = dict(
        num_objs=profile.lesions,
        rad_max=profile.radius_max,
        rad_min=profile.radius_min,
        noise_max=profile.noise,
        num_seg_classes=task.num_classes - 1,
        random_state=rs,
    )
    if task.spatial_dims == 2:
        image, label = create_test_image_2d(size, size, **common)
    else:
        image, label = create_test_image_3d(size, size, size, **common)
    image = image * profile.intensity_scale + profile.intensity_offset
    return image.astype(np.float32), label.astype(np.uint8)


def write_cases(folder: Path, counts: tuple[int, int],
                make_case: Callable[[], tuple[np.ndarray, np.ndarray, np.ndarray]]) -> dict[str, list[dict[str, str]]]:
    """Write ``counts`` (training, validation) cases from ``make_case() -> (image, label, affine)``
    as NIfTI under ``imagesTr``/``labelsTr``; returns the Decathlon ``training``/``validation`` lists."""
    import nibabel as nib

    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    entries: dict[str, list[dict[str, str]]] = {"training": [], "validation": []}
    count = 0
    for split, n in zip(("training", "validation"), counts, strict=True):
        for _ in range(n):
            image, label, affine = make_case()
            name = f"case_{count:03d}.nii.gz"
            nib.save(nib.Nifti1Image(image, affine), folder / "imagesTr" / name)
            nib.save(nib.Nifti1Image(label, affine), folder / "labelsTr" / name)
            entries[split].append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
            count += 1
    return entries


def write_atomically(root: Path, write: Callable[[Path], None]) -> None:
    """Run ``write(staging)`` in a temporary sibling of ``root`` and rename it into place, so an
    interrupted run never leaves a half-written ``root``; a non-empty ``root`` is refused."""
    if root.exists() and any(root.iterdir()):
        raise DataError(f"{root}: already exists and is not empty; remove it or pick another folder")
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        write(staging)
        if root.exists():
            root.rmdir()
        os.replace(staging, root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _write_site(folder: Path, task: ImageSpec, size: int, profile: SiteProfile, seed: int) -> None:
    rs = np.random.RandomState(seed)

    def make_case() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return (*_case(task, size, profile, rs), np.eye(4))

    entries = write_cases(folder, (profile.train_cases, profile.val_cases), make_case)
    _write_dataset_json(folder, task, f"oncofed-synthetic-{folder.name}",
                        "Synthetic lesions from MONAI's generators; OncoFed's embedded default.", entries,
                        site_profile=asdict(profile))


def _write_dataset_json(folder: Path, task: ImageSpec, name: str, description: str,
                        entries: dict[str, list[dict[str, str]]], **extra: object) -> None:
    """The Decathlon-style ``dataset.json`` of synthetic cases written by :func:`write_cases`."""
    manifest = {
        "name": name,
        "description": description,
        "tensorImageSize": f"{task.spatial_dims}D",
        "modality": {"0": "synthetic"},
        "labels": {"0": "background", **{str(c): f"lesion-{c}" for c in range(1, task.num_classes)}},
        "numTraining": len(entries["training"]),
        **extra,
        **entries,
    }
    (folder / DATASET_JSON).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def synthesize(root: str | Path, *, nodes: int, task: ImageSpec | TabularTask, seed: int = 0, image_size: int = 0,
               train_cases: int = 0) -> list[Path]:
    """Synthetic sites of catalogue task ``task`` under ``root`` (images, or a table's records);
    returns the node folders."""
    return task.synthesize(Path(root), nodes=nodes, seed=seed, image_size=image_size, train_cases=train_cases)


def synthesize_images(root: str | Path, *, nodes: int, task: ImageSpec, seed: int = 0, image_size: int = 0,
                      train_cases: int = 0) -> list[Path]:
    """Write one folder per node under ``root``; returns the node folders. ``train_cases``: every
    site gets this many training cases (and a quarter as many validation cases) instead of its
    profile's (16 to 48), e.g. a hospital-size federation for the benchmarks.

    The whole federation is written in a temporary sibling folder and renamed into place, so
    an interrupted run never leaves a half-written ``root``. An existing non-empty ``root`` is
    refused rather than overwritten.
    """
    root = Path(root)
    size = image_size or task.image_size
    if nodes < 1:
        raise DataError(f"--nodes: need at least one node, got {nodes}")
    if size % task.divisor or size < 4 * task.divisor:
        raise DataError(
            f"image size {size}: must be a multiple of {task.divisor} and at least "
            f"{4 * task.divisor} for task {task.name}"
        )
    rng = np.random.default_rng(seed)
    profiles = site_profiles(nodes, size, rng)
    if train_cases > 0:
        profiles = [replace(p, train_cases=train_cases, val_cases=max(1, train_cases // 4)) for p in profiles]

    def write(staging: Path) -> None:
        for i, profile in enumerate(profiles):
            _write_site(node_dir(staging, i), task, size, profile, seed=int(rng.integers(2**31)))

    write_atomically(root, write)
    return [node_dir(root, i) for i in range(nodes)]


def synthesize_public(root: str | Path, *, task: ImageSpec, cases: int, seed: int, image_size: int = 0) -> Path:
    """Public synthetic cases for pretraining (``pretrain.source = synthetic``): ``cases``
    training cases (and one validation case per eight), drawn in turn from four site profiles
    of the same public generator, with a public seed. Nothing here depends on any node's data.
    ``image_size``: 0 takes the task's. Written atomically, like a federation; returns ``root``."""
    root = Path(root)
    if cases < 1:
        raise DataError(f"pretrain.cases: need at least one case, got {cases}")
    size = image_size or task.image_size
    rng = np.random.default_rng(seed)
    profiles = site_profiles(4, size, rng)
    rs = np.random.RandomState(int(rng.integers(2**31)))
    drawn = 0

    def make_case() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        nonlocal drawn
        profile = profiles[drawn % len(profiles)]
        drawn += 1
        return (*_case(task, size, profile, rs), np.eye(4))

    def write(staging: Path) -> None:
        entries = write_cases(staging, (cases, max(1, cases // 8)), make_case)
        _write_dataset_json(staging, task, "oncofed-public-synthetic",
                            f"Public synthetic lesions from MONAI's generators (seed {seed}), for pretraining.", entries)

    write_atomically(root, write)
    return root
