from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fl.errors import DataError
from fl.learn import get_task
from fl.learn.data import load_local_data
from fl.learn.synth import synthesize


def _stats(folder: Path) -> dict[str, float]:
    import nibabel as nib

    manifest = json.loads((folder / "dataset.json").read_text())
    images = [np.asarray(nib.load(folder / e["image"]).dataobj) for e in manifest["training"]]
    labels = [np.asarray(nib.load(folder / e["label"]).dataobj) for e in manifest["training"]]
    return {
        "cases": len(manifest["training"]),
        "max_intensity": float(np.mean([im.max() for im in images])),
        "foreground": float(np.mean([lb.mean() for lb in labels])),
        "background_noise": float(np.mean([im[lb == 0].std() / (im.max() - im.min()) for im, lb in zip(images, labels)])),
    }


def test_sites_differ_in_scanner_population_and_size(tiny_federation: Path) -> None:
    a, b = (_stats(tiny_federation / f"node-{i}") for i in range(2))
    assert a["cases"] != b["cases"]
    ratio = max(a["max_intensity"], b["max_intensity"]) / min(a["max_intensity"], b["max_intensity"])
    assert ratio > 5, "intensity ranges should differ like different scanners"
    assert abs(a["foreground"] - b["foreground"]) > 0.02, "class balance should differ"
    assert abs(a["background_noise"] - b["background_noise"]) > 0.02


def test_each_site_holds_out_validation_cases_that_load(tiny_federation: Path) -> None:
    task = get_task("seg2d")
    for i in range(2):
        data = load_local_data(tiny_federation / f"node-{i}", task)
        assert len(data.train) >= 16 and len(data.val) >= 6
        case = data.train.dataset[0]
        assert case["image"].shape == (1, 32, 32)
        assert float(case["image"].min()) == 0.0 and float(case["image"].max()) == 1.0
        assert set(case["label"].unique().tolist()) <= {0, 1}


def test_same_seed_same_data_other_seed_other_data(tmp_path: Path) -> None:
    task = get_task("seg3d")
    first = synthesize(tmp_path / "a", nodes=1, task=task, seed=3, image_size=32)[0]
    again = synthesize(tmp_path / "b", nodes=1, task=task, seed=3, image_size=32)[0]
    other = synthesize(tmp_path / "c", nodes=1, task=task, seed=4, image_size=32)[0]
    def read(folder: Path) -> np.ndarray:
        cases = load_local_data(folder, task, use_cache=False).train
        return np.stack([np.asarray(cases.dataset[i]["image"]) for i in range(len(cases))])

    assert read(first).shape[2:] == (32, 32, 32)
    assert np.array_equal(read(first), read(again))
    assert read(first).shape != read(other).shape or not np.array_equal(read(first), read(other))


def test_refuses_to_overwrite_and_bad_sizes(tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("keep me")
    with pytest.raises(DataError, match="already exists and is not empty"):
        synthesize(tmp_path / "taken", nodes=1, task=get_task("seg2d"))
    assert (tmp_path / "taken" / "x").read_text() == "keep me"
    with pytest.raises(DataError, match="must be a multiple of 8"):
        synthesize(tmp_path / "odd", nodes=1, task=get_task("seg2d"), image_size=36)
    assert not (tmp_path / "odd").exists()
