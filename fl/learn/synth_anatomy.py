"""Realistic synthetic sites for volumetric tasks: CT-like abdomen and brain-MRI-like tumours.

Each site is a hospital with its own scanner: voxel spacing (anisotropic for CT, with a slice
thickness that differs from the in-plane spacing), orientation, image size that varies case by
case, noise, intensity calibration and disease prevalence. Cases are written as NIfTI with the
spacing and orientation in the affine, and a Decathlon-style ``dataset.json``, as a real node
serves them; CT sites also as DICOM (``fl.learn.synth_dicom``), the same cases for the same
seed. The generators draw shapes with NumPy only (no model, no download).

- ``ct``: Hounsfield units (air -1000, fat about -100, soft tissue about 40, bone 400-1000), a
  body ellipse with a spine, one spleen-like organ (label 1) and, in a site-dependent share of
  cases, a hypodense lesion inside it (label 2). int16 images, uint8 labels.
- ``brain-mri``: four co-registered modalities (T1, T1ce, T2, FLAIR) in one 4D NIfTI (channels
  last, as the Medical Segmentation Decathlon's brain task), and the BraTS labels: 1 necrotic
  core, 2 oedema, 4 enhancing tumour, so that the three nested sub-regions hold by construction:
  enhancing tumour (4) inside tumour core (1, 4) inside whole tumour (1, 2, 4).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from fl.errors import DataError
from fl.learn.synth import DATASET_JSON, node_dir, write_atomically, write_cases

KINDS = ("ct", "brain-mri")
FORMATS = ("nifti", "dicom")
MODALITIES = ("T1", "T1ce", "T2", "FLAIR")
BRATS_LABELS = {"0": "background", "1": "necrotic tumour core", "2": "peritumoural oedema", "4": "enhancing tumour"}


@dataclass(frozen=True)
class Scanner:
    """One site's acquisition and population."""

    spacing: tuple[float, float, float]  # mm, (x, y, z)
    flip: tuple[bool, bool, bool]  # axes stored reversed (orientation differs from RAS)
    size_xy: tuple[int, int]  # range of in-plane sizes, voxels
    size_z: tuple[int, int]  # range of slice counts
    noise: float  # HU for CT; fraction of the signal for MRI
    gain: float  # intensity calibration (MRI), 1 for CT
    prevalence: float  # share of cases with a lesion (CT); tumour size factor (MRI)
    train_cases: int
    val_cases: int


def scanners(kind: str, nodes: int, rng: np.random.Generator, scale: float = 1.0) -> list[Scanner]:
    """Sites spread over each axis, shuffled per axis, so every pair of sites differs."""
    t = np.linspace(0.0, 1.0, nodes) if nodes > 1 else np.array([0.5])

    def axis() -> np.ndarray:
        return np.clip(rng.permutation(t) + rng.uniform(-0.05, 0.05, nodes), 0, 1)

    space, size, noise, gain, prev, cases = axis(), axis(), axis(), axis(), axis(), axis()
    out = []
    for i in range(nodes):
        if kind == "ct":
            xy = 0.6 + 0.35 * space[i]
            spacing = (round(xy, 3), round(xy, 3), round(1.0 + 4.0 * space[i], 2))  # thick slices at some sites
            base = int(round(scale * (72 + 40 * size[i])))
            size_xy, size_z = (base - 8, base + 8), (max(12, int(scale * 24)), max(16, int(scale * 40)))
            noise_i, gain_i, prev_i = 8.0 + 22.0 * noise[i], 1.0, 0.3 + 0.6 * prev[i]
        else:
            spacing = (1.0, 1.0, round(1.0 + 0.5 * space[i], 2))
            base = int(round(scale * (56 + 24 * size[i])))
            size_xy, size_z = (base - 4, base + 4), (base - 8, base)
            noise_i, gain_i, prev_i = 0.02 + 0.08 * noise[i], float(10 ** (2 * gain[i])), 0.6 + 0.8 * prev[i]
        out.append(Scanner(spacing=spacing, flip=tuple(bool(b) for b in rng.integers(0, 2, 3)),  # type: ignore[arg-type]
                           size_xy=size_xy, size_z=size_z, noise=float(noise_i), gain=float(gain_i),
                           prevalence=float(prev_i), train_cases=int(round(8 + 12 * cases[i])),
                           val_cases=int(round(3 + 3 * cases[i]))))
    return out


def _grid(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> tuple[np.ndarray, ...]:
    """Coordinates in mm, centred on the volume."""
    axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing)]
    return tuple(np.meshgrid(*axes, indexing="ij"))


def _ellipsoid(coords: tuple[np.ndarray, ...], centre: np.ndarray, radii: np.ndarray) -> np.ndarray:
    return sum(((c - m) / r) ** 2 for c, m, r in zip(coords, centre, radii)) <= 1.0


def ct_case(s: Scanner, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One abdominal CT volume in HU (int16) and its labels: 1 organ, 2 lesion inside it."""
    shape = (int(rng.integers(*s.size_xy)), int(rng.integers(*s.size_xy)), int(rng.integers(*s.size_z)))
    x, y, z = _grid(shape, s.spacing)
    extent = np.array([shape[0] * s.spacing[0], shape[1] * s.spacing[1]]) / 2
    image = np.full(shape, -1000.0)
    body = (x / (0.9 * extent[0])) ** 2 + (y / (0.75 * extent[1])) ** 2 <= 1.0
    image[body] = -100.0  # subcutaneous fat
    inner = (x / (0.8 * extent[0])) ** 2 + (y / (0.65 * extent[1])) ** 2 <= 1.0
    image[inner] = 40.0  # soft tissue
    spine = ((x / 12.0) ** 2 + ((y + 0.45 * extent[1]) / 12.0) ** 2) <= 1.0
    image[spine] = rng.uniform(400, 1000)
    label = np.zeros(shape, dtype=np.uint8)
    centre = np.array([0.45 * extent[0] * rng.uniform(0.7, 1.0), -0.2 * extent[1] * rng.uniform(0.5, 1.0), 0.0])
    radii = np.array([0.18 * extent[0], 0.12 * extent[1], 0.3 * shape[2] * s.spacing[2]]) * rng.uniform(0.8, 1.2, 3)
    organ = _ellipsoid((x, y, z), centre, radii) & inner
    image[organ] = rng.uniform(45, 60)
    label[organ] = 1
    if rng.random() < s.prevalence and organ.any():
        lesion = _ellipsoid((x, y, z), centre + rng.uniform(-0.3, 0.3, 3) * radii, radii * rng.uniform(0.2, 0.4)) & organ
        image[lesion] = rng.uniform(5, 25)  # hypodense
        label[lesion] = 2
    image += rng.normal(0.0, s.noise, shape)
    return np.clip(np.round(image), -1024, 3071).astype(np.int16), label


def brain_case(s: Scanner, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Four MRI modalities (x, y, z, 4; float32) and BraTS labels (0, 1, 2, 4)."""
    shape = (int(rng.integers(*s.size_xy)), int(rng.integers(*s.size_xy)), int(rng.integers(*s.size_z)))
    x, y, z = _grid(shape, s.spacing)
    half = np.array(shape) * np.array(s.spacing) / 2
    head = _ellipsoid((x, y, z), np.zeros(3), 0.9 * half)
    brain = _ellipsoid((x, y, z), np.zeros(3), 0.8 * half)
    size = s.prevalence * rng.uniform(0.8, 1.2)
    centre = rng.uniform(-0.35, 0.35, 3) * half
    whole = _ellipsoid((x, y, z), centre, 0.22 * half * size * rng.uniform(0.85, 1.15, 3)) & brain
    core = _ellipsoid((x, y, z), centre, 0.12 * half * size * rng.uniform(0.85, 1.15, 3)) & whole
    necrosis = _ellipsoid((x, y, z), centre, 0.07 * half * size) & core
    label = np.zeros(shape, dtype=np.uint8)
    label[whole] = 2
    label[core] = 4
    label[necrosis] = 1
    # tissue contrasts: (skull/scalp, brain, oedema, enhancing, necrosis) per modality
    contrast = {"T1": (0.9, 0.6, 0.45, 0.55, 0.25), "T1ce": (0.9, 0.6, 0.45, 1.0, 0.2),
                "T2": (0.3, 0.5, 0.9, 0.6, 0.95), "FLAIR": (0.3, 0.5, 1.0, 0.7, 0.4)}
    bias = 1 + 0.15 * (x / half[0]) * rng.uniform(-1, 1)  # a smooth scanner bias field
    channels = []
    for name in MODALITIES:
        skull, tissue, oedema, enhancing, necrotic = contrast[name]
        img = np.zeros(shape)
        img[head] = skull
        img[brain] = tissue
        img[label == 2] = oedema
        img[label == 4] = enhancing
        img[label == 1] = necrotic
        img = img * bias + rng.normal(0.0, s.noise, shape)
        channels.append(np.clip(img, 0, None) * s.gain)
    return np.stack(channels, axis=-1).astype(np.float32), label


def _affine(s: Scanner, shape: tuple[int, ...]) -> np.ndarray:
    affine = np.diag([*(-sp if f else sp for sp, f in zip(s.spacing, s.flip)), 1.0])
    affine[:3, 3] = [-(n - 1) * a / 2 for n, a in zip(shape[:3], np.diag(affine)[:3])]
    return affine


def _write_site(folder: Path, kind: str, s: Scanner, seed: int, *, index: int, fmt: str) -> None:
    rng = np.random.default_rng(seed)

    def make_case() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        image, label = ct_case(s, rng) if kind == "ct" else brain_case(s, rng)
        return image, label, _affine(s, label.shape)

    counts = (s.train_cases, s.val_cases)
    extra: dict[str, object] = {}  # keys a format adds to dataset.json
    if fmt == "dicom":  # the same cases, drawn in the same order, as series with a SEG or an RTSTRUCT
        from fl.learn.synth_dicom import MANIFEST, write_dicom_cases

        entries, extra = write_dicom_cases(folder, counts, make_case, site=index, seed=seed), MANIFEST
    else:
        entries = write_cases(folder, counts, make_case)
    if kind == "ct":
        modality, labels = {"0": "CT"}, {"0": "background", "1": "spleen", "2": "lesion"}
    else:
        modality, labels = dict(enumerate(MODALITIES)), BRATS_LABELS
    manifest = {
        "name": f"oncofed-synthetic-{kind}-{folder.name}",
        "description": f"Synthetic {kind} site (OncoFed); spacing, orientation, size and prevalence are the site's.",
        "tensorImageSize": "3D" if kind == "ct" else "4D",
        "modality": {str(k): v for k, v in modality.items()},
        "labels": labels,
        "numTraining": s.train_cases,
        "site_profile": asdict(s),
        **extra,
        **entries,
    }
    (folder / DATASET_JSON).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def synthesize_anatomy(root: str | Path, *, nodes: int, kind: str, seed: int = 0, scale: float = 1.0,
                       fmt: str = "nifti") -> list[Path]:
    """Write one ``kind`` site per node under ``root`` (written aside, then renamed into place).

    ``scale`` multiplies the image sizes (1: about 72-112 voxels in-plane for CT, 56-80 per axis
    for MRI; hospital scans are larger, 512 x 512 x 100-600 for CT). ``fmt`` is ``nifti`` or, for
    CT, ``dicom``: the same cases for the same seed, as a PACS export holds them (one series per
    case, labels as DICOM SEG at even-numbered sites and as RTSTRUCT at odd-numbered ones)."""
    root = Path(root)
    if kind not in KINDS:
        raise DataError(f"--kind: {kind!r} is not one of {', '.join(KINDS)}")
    if fmt not in FORMATS:
        raise DataError(f"--format: {fmt!r} is not one of {', '.join(FORMATS)}")
    if fmt == "dicom" and kind != "ct":
        raise DataError(f"--format dicom: only --kind ct is written as DICOM, not {kind!r}; use --format nifti")
    if nodes < 1:
        raise DataError(f"--nodes: need at least one node, got {nodes}")
    if not 0.25 <= scale <= 8:
        raise DataError(f"--scale: must be between 0.25 and 8, got {scale}")
    rng = np.random.default_rng(seed)
    sites = scanners(kind, nodes, rng, scale)

    def write(staging: Path) -> None:
        for i, site in enumerate(sites):
            _write_site(node_dir(staging, i), kind, site, seed=int(rng.integers(2**31)), index=i, fmt=fmt)

    write_atomically(root, write)
    return [node_dir(root, i) for i in range(nodes)]
