"""Realistic synthetic sites: CT-like (HU, anisotropic spacing that differs per site, per-case
sizes, an organ with a lesion) and brain-MRI-like (4 modalities, nested BraTS sub-regions)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fl.cli import main
from fl.errors import DataError
from fl.learn.synth_anatomy import synthesize_anatomy


def _cases(site: Path) -> list[tuple[nib.Nifti1Image, np.ndarray]]:
    manifest = json.loads((site / "dataset.json").read_text())
    return [(nib.load(site / e["image"]), np.asarray(nib.load(site / e["label"]).dataobj))
            for e in manifest["training"] + manifest["validation"]]


@pytest.fixture(scope="module")
def ct_sites(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return synthesize_anatomy(tmp_path_factory.mktemp("ct") / "data", nodes=3, kind="ct", seed=4, scale=0.5)


def test_ct_sites_differ_in_spacing_and_size_and_hold_hu(ct_sites: list[Path]) -> None:
    spacings = []
    for site in ct_sites:
        cases = _cases(site)
        zooms = {tuple(round(float(z), 3) for z in img.header.get_zooms()) for img, _ in cases}
        assert len(zooms) == 1  # one scanner per site
        spacings.append(zooms.pop())
        assert len({img.shape for img, _ in cases}) > 1  # sizes vary case by case
        image = np.asarray(cases[0][0].dataobj)
        assert image.dtype == np.int16 and image.min() <= -1000 and image.max() >= 300  # air and bone, in HU
    assert len(set(spacings)) == 3  # every site its own spacing
    assert any(z[2] > 1.5 * z[0] for z in spacings)  # thick slices: anisotropic


def test_ct_lesions_lie_inside_the_organ_and_are_hypodense(ct_sites: list[Path]) -> None:
    lesion_hu, organ_hu = [], []
    for site in ct_sites:
        for img, label in _cases(site):
            image = np.asarray(img.dataobj).astype(float)
            lesion_hu.extend(image[label == 2])
            organ_hu.extend(image[label == 1])
            assert set(np.unique(label)) <= {0, 1, 2}
            if (label == 2).any():  # inside the body, where the organ is
                assert image[label == 2].mean() > -200
    assert len(lesion_hu) > 100
    assert np.mean(lesion_hu) < np.mean(organ_hu) - 20  # hypodense against the organ, pooled over cases


def test_brain_mri_has_four_modalities_and_nested_sub_regions(tmp_path: Path) -> None:
    site = synthesize_anatomy(tmp_path / "data", nodes=2, kind="brain-mri", seed=1, scale=0.5)[0]
    img, label = _cases(site)[0]
    image = np.asarray(img.dataobj)
    assert image.shape == (*label.shape, 4)
    assert set(np.unique(label)) == {0, 1, 2, 4}
    whole, core, enhancing = label > 0, np.isin(label, (1, 4)), label == 4
    assert enhancing.sum() < core.sum() < whole.sum()
    t1ce, flair = image[..., 1], image[..., 3]
    assert flair[label == 2].mean() > flair[(label == 0) & (flair > 0)].mean()  # oedema bright on FLAIR
    assert t1ce[label == 4].mean() > t1ce[label == 1].mean()  # enhancing rim around a dark necrotic core


def test_cli_and_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "synth", "--out", str(tmp_path / "ct"), "--nodes", "1", "--kind", "ct", "--scale", "0.5"]) == 0
    assert (tmp_path / "ct" / "node-0" / "dataset.json").is_file()
    assert main(["data", "synth", "--out", str(tmp_path / "ct"), "--nodes", "1", "--kind", "ct"]) == 2
    assert "already exists" in capsys.readouterr().err
    with pytest.raises(DataError, match="--scale"):
        synthesize_anatomy(tmp_path / "x", nodes=1, kind="ct", scale=100)
