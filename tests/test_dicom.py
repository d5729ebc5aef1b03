"""Hospital DICOM as a node's cases: series assembled and checked, SEG and RTSTRUCT labels on the
series' grid, the NIfTI conversion kept on disk, and every malformed input refused with its file
named. Real files from the installed pydicom and nibabel packages, plus a synthetic anisotropic,
non-square series (axial and oblique) with a SEG and a hand-written RTSTRUCT."""

from __future__ import annotations

import gzip
import json
import os
import random
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from bundles import small_spleen
from dicom_fixtures import (
    MALFORMED,
    SyntheticSeries,
    box,
    retag,
    write_dataset,
    write_rtstruct,
    write_seg,
    write_series,
)
from monai.transforms import Compose, EnsureChannelFirst, LoadImage, Orientation
from pydicom.data import get_testdata_file

from fl.errors import DataError
from fl.learn import dicom_cache
from fl.learn.bundle import BundleTask
from fl.learn.data import case_files, clear_cache, digest, load_local_data, read_datalist
from fl.learn.dicom import RtLabel, SegLabel, Series, read_series, source_series
from fl.learn.dicom_labels import mapping

TEST_FILES = Path(get_testdata_file("CT_small.dcm")).parent
CT5N = TEST_FILES / "dicomdirtests" / "98892001" / "CT5N"
MR2 = TEST_FILES / "dicomdirtests" / "98892003" / "MR2"
MPRAGE = Path(nib.__file__).parent / "nicom" / "tests" / "data" / "philips_mprage.dcm.gz"
LOAD_RAS = Compose([LoadImage(image_only=True), EnsureChannelFirst(), Orientation(axcodes="RAS")])


@pytest.fixture(scope="module")
def spleen(tmp_path_factory: pytest.TempPathFactory) -> BundleTask:
    return BundleTask.load(str(small_spleen(tmp_path_factory.mktemp("bundle") / "spleen_ct_segmentation")))


def _twin(path: Path, values_kji: np.ndarray, affine: np.ndarray) -> Path:
    """A NIfTI of ``values`` (slices, rows, columns) stored as (columns, rows, slices)."""
    nib.save(nib.Nifti1Image(values_kji.transpose(2, 1, 0), affine), path)
    return path


def _same_after_ras(converted: str | Path, twin: Path) -> None:
    a, b = LOAD_RAS(str(converted)), LOAD_RAS(str(twin))
    assert a.shape == b.shape
    assert torch.equal(a.as_tensor().float(), b.as_tensor().float())
    np.testing.assert_allclose(a.affine.numpy(), b.affine.numpy(), atol=1e-4)


# --- real files shipped in pydicom and nibabel ------------------------------------------------
def test_a_shuffled_series_equals_the_ordered_one_and_its_nifti_twin(tmp_path: Path) -> None:
    ordered = sorted(CT5N.iterdir())
    shuffled = tmp_path / "ct5n"
    shuffled.mkdir()
    for path in random.Random(3).sample(ordered, len(ordered)):
        shutil.copy(path, shuffled / f"{random.Random(path.name).getrandbits(40):x}")
    volume, uid = read_series(Series(tuple(sorted(shuffled.iterdir())), str(shuffled)))
    reference, _ = read_series(Series(tuple(ordered), str(CT5N)))
    assert np.array_equal(volume.array, reference.array) and np.allclose(volume.affine, reference.affine)
    assert uid == str(pydicom.dcmread(ordered[0]).SeriesInstanceUID)

    datasets = [pydicom.dcmread(p) for p in ordered]  # the twin by the DICOM formula, slices by position
    datasets.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
    first = datasets[0]
    rowdir, coldir = np.array(first.ImageOrientationPatient[:3], float), np.array(first.ImageOrientationPatient[3:], float)
    step = np.subtract(datasets[1].ImagePositionPatient, first.ImagePositionPatient).astype(float)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1] = rowdir * float(first.PixelSpacing[1]), coldir * float(first.PixelSpacing[0])
    lps[:3, 2], lps[:3, 3] = step, np.array(first.ImagePositionPatient, float)
    values = np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in datasets])
    twin = _twin(tmp_path / "twin.nii.gz", values.astype(np.float32), np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps)
    item = dicom_cache.convert({"image": Series(tuple(sorted(shuffled.iterdir())), str(shuffled)),
                                "label": twin}, _no_labels, tmp_path / "cache")
    _same_after_ras(item["image"], twin)


def _no_labels(name: str) -> int:
    raise AssertionError(f"no label mapping expected, asked for {name}")


def test_three_series_in_one_folder_are_refused() -> None:
    with pytest.raises(DataError, match="3 series") as err:
        read_series(Series(tuple(sorted(MR2.iterdir())), str(MR2)))
    assert str(err.value).startswith(str(MR2))


def test_the_shipped_seg_is_read_and_refused_on_another_series(tmp_path: Path, spleen: BundleTask) -> None:
    liver = Path(get_testdata_file("liver_1frame.dcm"))
    assert mapping(SegLabel(liver, (("Liver", "spleen"),)), spleen.label_index) == [("Liver", 1)]
    with pytest.raises(DataError, match="segment 'Liver': bundle spleen_ct_segmentation has no label 'Liver'"):
        mapping(SegLabel(liver), spleen.label_index)
    node = write_dataset(tmp_path, str(CT5N), {"seg": str(liver), "segments": {"Liver": "spleen"}})
    with pytest.raises(DataError, match="references another series") as err:
        load_local_data(node, spleen, use_cache=False)
    assert str(err.value).startswith(str(liver))


def test_the_shipped_rtstruct_lists_its_rois_when_one_is_missing(spleen: BundleTask) -> None:
    rtstruct = Path(get_testdata_file("rtstruct.dcm"))
    with pytest.raises(DataError) as err:
        mapping(RtLabel(rtstruct, (("GTV", "lesion"),)), spleen.label_index)
    assert str(err.value) == f"{rtstruct}: ROI 'GTV' not found; it holds 'patient', 'Isocenter 1', 'Isocenter 2'"


def test_an_enhanced_multiframe_file_has_its_frames_geometry(tmp_path: Path) -> None:
    path = tmp_path / "mprage.dcm"
    path.write_bytes(gzip.decompress(MPRAGE.read_bytes()))
    volume, _ = read_series(Series((path,), str(path)))
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    frame = ds.PerFrameFunctionalGroupsSequence[0]  # Philips puts the plane in every frame's groups
    iop = np.array(frame.PlaneOrientationSequence[0].ImageOrientationPatient, float)
    rows, cols = (float(s) for s in frame.PixelMeasuresSequence[0].PixelSpacing)
    positions = np.array([f.PlanePositionSequence[0].ImagePositionPatient for f in ds.PerFrameFunctionalGroupsSequence],
                         float)
    assert volume.spatial_shape == (int(ds.NumberOfFrames), ds.Rows, ds.Columns) == (176, 256, 256)
    np.testing.assert_allclose(volume.affine[:3, 1], iop[3:] * rows, atol=1e-5)
    np.testing.assert_allclose(volume.affine[:3, 2], iop[:3] * cols, atol=1e-5)
    corners = (volume.affine @ np.c_[np.arange(176), np.zeros((176, 2)), np.ones(176)].T).T[:, :3]
    np.testing.assert_allclose(np.sort(corners, axis=0), np.sort(positions, axis=0), atol=1e-3)


# --- a synthetic series with a SEG and an RTSTRUCT -------------------------------------------
@pytest.fixture(scope="module", params=[0.0, 20.0], ids=["axial", "oblique"])
def synthetic(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> SyntheticSeries:
    return write_series(tmp_path_factory.mktemp("series") / "ct", angle=request.param, seed=int(request.param))


def _mask(series: SyntheticSeries) -> np.ndarray:
    mask = np.zeros(series.values.shape, np.uint8)
    mask[3:9, 5:15, 10:20] = 1
    mask[11, 20:31, 2:9] = 2  # one slice only (the SEG omits empty frames)
    return mask


def test_a_seg_lands_exactly_on_its_series(synthetic: SyntheticSeries, tmp_path: Path, spleen: BundleTask) -> None:
    seg = write_seg(tmp_path / "seg.dcm", synthetic, _mask(synthetic))
    case = {"image": Series(tuple(synthetic.files), "ct"), "label": SegLabel(seg)}
    item = dicom_cache.convert(case, spleen.label_index, tmp_path / "cache")
    _same_after_ras(item["image"], _twin(tmp_path / "image.nii.gz", synthetic.values, synthetic.ras_affine()))
    _same_after_ras(item["label"], _twin(tmp_path / "mask.nii.gz", _mask(synthetic), synthetic.ras_affine()))


def test_rtstruct_contours_fill_exactly_their_pixels_with_holes(synthetic: SyntheticSeries, tmp_path: Path,
                                                                spleen: BundleTask) -> None:
    rois = {"GTV": [(k, box(5, 14, 10, 19)) for k in range(3, 9)],
            "Ring": [(12, box(4, 30, 3, 25)), (12, box(10, 20, 8, 15))],  # the inner contour cuts a hole
            "Empty": []}  # an ROI this case does not have
    rtstruct = write_rtstruct(tmp_path / "rt.dcm", synthetic, rois)
    expected = np.zeros(synthetic.values.shape, np.uint8)
    expected[3:9, 5:15, 10:20] = 2
    expected[12, 4:31, 3:26] = 1
    expected[12, 10:21, 8:16] = 0
    case = {"image": Series(tuple(synthetic.files), "ct"), "label": RtLabel(rtstruct, (("GTV", "lesion"), ("Ring", "spleen"), ("Empty", "spleen")))}
    item = dicom_cache.convert(case, spleen.label_index, tmp_path / "cache")
    got = LOAD_RAS(item["label"]).as_tensor()
    want = LOAD_RAS(str(_twin(tmp_path / "expected.nii.gz", expected, synthetic.ras_affine()))).as_tensor()
    for index in (1, 2):
        union = ((got == index) | (want == index)).sum()
        assert union > 0 and ((got == index) & (want == index)).sum() / union == 1.0  # IoU 1.0
    assert torch.equal(got.float(), want.float())


def test_a_dicom_node_trains_on_what_its_nifti_twin_gives(tmp_path: Path, spleen: BundleTask) -> None:
    series = write_series(tmp_path / "dicom" / "ct", slices=12, seed=5)
    mask = np.zeros(series.values.shape, np.uint8)
    mask[2:9, 8:30, 6:25] = 1
    write_seg(tmp_path / "dicom" / "seg.dcm", series, mask, labels=("SPLEEN",))
    dicom_node = write_dataset(tmp_path / "dicom", "ct", "seg.dcm")
    twin_node = tmp_path / "twin"
    twin_node.mkdir()
    _twin(twin_node / "ct.nii.gz", series.values, series.ras_affine())
    _twin(twin_node / "label.nii.gz", mask, series.ras_affine())
    write_dataset(twin_node, "ct.nii.gz", "label.nii.gz")
    cache = tmp_path / "state" / "cache"
    data = load_local_data(dicom_node, spleen, use_cache=False, disk_cache=cache)
    twin = load_local_data(twin_node, spleen, use_cache=False)
    got, want = data.val.dataset[0], twin.val.dataset[0]
    assert torch.equal(got["image"], want["image"]) and torch.equal(got["label"], want["label"])
    assert "image_source" not in got and data.val.items[0]["image_source"] == str(dicom_node / "ct")
    assert source_series(data.val.items[0]) == source_series(read_datalist(dicom_node)["validation"][0]) == [
        str(series.datasets[0].SeriesInstanceUID), str(pydicom.dcmread(dicom_node / "seg.dcm").SeriesInstanceUID)]
    assert source_series(read_datalist(twin_node)["training"][0]) == []

    entries = sorted((cache / "dicom").iterdir())
    written = [(p / "image.nii").stat().st_mtime_ns for p in entries]
    clear_cache()
    load_local_data(dicom_node, spleen, disk_cache=cache)  # a second start: the entry is reused
    assert sorted((cache / "dicom").iterdir()) == entries and [(p / "image.nii").stat().st_mtime_ns
                                                               for p in entries] == written
    os.utime(series.files[0], ns=(1, 1))  # a slice changed: converted anew, the old entry pruned
    clear_cache()
    load_local_data(dicom_node, spleen, disk_cache=cache)
    assert len(list((cache / "dicom").iterdir())) == 1 and sorted((cache / "dicom").iterdir()) != entries


def test_a_crash_while_converting_leaves_no_half_case(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      spleen: BundleTask) -> None:
    series = write_series(tmp_path / "ct", slices=4, rows=8, cols=6)
    rtstruct = write_rtstruct(tmp_path / "rt.dcm", series, {"GTV": [(1, box(1, 4, 1, 3))]})
    case = {"image": Series(tuple(series.files), "ct"), "label": RtLabel(rtstruct, (("GTV", "spleen"),))}
    real_save = dicom_cache._save

    def crash(path: Path, *args: object) -> None:
        if path.name == dicom_cache.LABEL_FILE:
            raise OSError("disk full")
        real_save(path, *args)

    monkeypatch.setattr(dicom_cache, "_save", crash)
    with pytest.raises(OSError, match="disk full"):
        dicom_cache.convert(case, spleen.label_index, tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []
    monkeypatch.setattr(dicom_cache, "_save", real_save)
    item = dicom_cache.convert(case, spleen.label_index, tmp_path / "cache")
    assert json.loads((Path(item["image"]).parent / "case.json").read_text())["format"] == dicom_cache.FORMAT


def test_a_series_folder_counts_every_slice_in_the_dataset_digest(tmp_path: Path) -> None:
    series = write_series(tmp_path / "ct", slices=4, rows=8, cols=6)
    write_dataset(tmp_path, "ct", "label.nii.gz")
    datalist = read_datalist(tmp_path)
    assert case_files(datalist["training"][0]) == sorted(series.files) + [tmp_path / "label.nii.gz"]
    before = digest(tmp_path, datalist)
    retag(series.files[2], InstanceNumber=99)
    assert digest(tmp_path, read_datalist(tmp_path)) != before


@pytest.mark.parametrize(("image", "label", "words"), [
    ({"files": ["a.dcm"]}, "label.nii.gz", ["training[0].image", "series"]),
    ({"series": []}, "label.nii.gz", ["training[0].image", "series"]),
    ("ct", {"seg": "seg.dcm", "rois": {"a": "b"}}, ["training[0].label", "label object"]),
    ("ct", {"rtstruct": "rt.dcm", "rois": {"GTV": 1}}, ["training[0].label.rois", "must map"]),
    ("label.nii.gz", {"seg": "label.nii.gz"}, ["training[0].label", "needs its image as DICOM"]),
], ids=["unknown key", "empty series", "seg with rois", "rois to a number", "seg on nifti"])
def test_bad_shapes_in_dataset_json_name_the_entry(tmp_path: Path, image: object, label: object, words: list[str]) -> None:
    write_series(tmp_path / "ct", slices=2, rows=8, cols=6)
    (tmp_path / "label.nii.gz").write_bytes(b"")
    write_dataset(tmp_path, image, label)
    with pytest.raises(DataError) as err:
        read_datalist(tmp_path)
    assert str(err.value).startswith(f"{tmp_path / 'dataset.json'}: training[0]") or str(err.value).startswith(
        str(tmp_path / "label.nii.gz"))
    assert all(w in str(err.value) for w in words), str(err.value)


@pytest.mark.parametrize("kind", list(MALFORMED))
def test_malformed_dicom_is_refused_naming_the_file_and_the_reason(kind: str, tmp_path: Path,
                                                                   spleen: BundleTask) -> None:
    node, words = MALFORMED[kind](tmp_path)
    with pytest.raises(DataError) as err:
        load_local_data(node, spleen, use_cache=False)
    assert all(w in str(err.value) for w in words), str(err.value)
