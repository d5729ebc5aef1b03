"""Test-sized copies of the shipped bundles: same layout, components and code path, smaller
networks, patches and voxel grids, so that CI's two cores train them in seconds."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SPLEEN = REPO / "configs" / "bundles" / "spleen_ct_segmentation"
BRATS = REPO / "configs" / "bundles" / "brats_mri_segmentation"


def _edit(path: Path, change: Any) -> None:
    content = json.loads(path.read_text())
    change(content)
    path.write_text(json.dumps(content, indent=4))


def small_spleen(out: Path, *, patch: int = 32) -> Path:
    """The spleen-style bundle with a 3-level UNet (BatchNorm kept), 3 mm voxels and 32^3 patches."""
    shutil.copytree(SPLEEN, out)

    def change(c: dict[str, Any]) -> None:
        c["network_def"].update(channels=[8, 16, 32], strides=[2, 2], num_res_units=1)
        det = c["train"]["deterministic_transforms"]
        det[3]["pixdim"] = [3.0, 3.0, 3.0]
        det[5]["spatial_size"] = [patch] * 3
        c["train"]["random_transforms"][0].update(spatial_size=[patch] * 3, num_samples=2)
        c["validate"]["inferer"].update(roi_size=[patch] * 3, sw_batch_size=2, overlap=0.25)
        c["optimizer"]["lr"] = 0.01

    _edit(out / "configs" / "train.json", change)

    def change_inference(c: dict[str, Any]) -> None:
        c["network_def"].update(channels=[8, 16, 32], strides=[2, 2], num_res_units=1)
        c["preprocessing"]["transforms"][3]["pixdim"] = [3.0, 3.0, 3.0]
        c["inferer"]["roi_size"] = [patch] * 3

    _edit(out / "configs" / "inference.json", change_inference)
    return out


def small_brats(out: Path, *, patch: int = 32) -> Path:
    """The BraTS-style bundle with a 2-level SegResNet, 2 mm voxels and 32^3 crops."""
    shutil.copytree(BRATS, out)

    def change(c: dict[str, Any]) -> None:
        c["network_def"].update(blocks_down=[1, 1], blocks_up=[1], init_filters=8)
        pre = c["train"]["preprocessing_transforms"]
        pre[4]["pixdim"] = [2.0, 2.0, 2.0]
        pre[6]["spatial_size"] = [patch] * 3
        c["train"]["random_transforms"][0]["roi_size"] = [patch] * 3
        c["validate"]["inferer"]["roi_size"] = [patch] * 3
        c["optimizer"]["lr"] = 0.01

    _edit(out / "configs" / "train.json", change)
    return out


def brats_boolean_label(bundle: Path) -> Path:
    """``bundle`` (a BraTS-style copy) edited in place as Model Zoo's BraTS bundle 0.5.2 writes its
    preprocessing: no ``Spacingd`` (its data is resampled to 1 mm already). ``Spacingd`` is what turns
    the boolean label of ``ConvertToMultiChannelBasedOnBratsClassesd`` into floats; without it the
    label reaches ``DiceLoss`` boolean, which MONAI 1.6 refuses with ``squared_pred``
    (``linalg.vector_norm`` takes floating point tensors only)."""

    def change(c: dict[str, Any]) -> None:
        pre = c["train"]["preprocessing_transforms"]
        pre[:] = [t for t in pre if t["_target_"] != "Spacingd"]

    _edit(bundle / "configs" / "train.json", change)
    return bundle


def broken_flip(bundle: Path) -> Path:
    """``bundle`` (a BraTS-style copy) edited in place: its first ``RandFlipd`` always flips, along an
    axis the volumes lack, so that preprocessing fails in a random transform (after the data check)."""

    def change(c: dict[str, Any]) -> None:
        flip = next(t for t in c["train"]["random_transforms"] if t["_target_"] == "RandFlipd")
        flip.update(prob=1.0, spatial_axis=5)

    _edit(bundle / "configs" / "train.json", change)
    return bundle
