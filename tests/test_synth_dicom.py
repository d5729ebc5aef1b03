"""Synthetic CT sites in DICOM: the same cases as the NIfTI sites of the same seed, read back with
highdicom, pydicom and scikit-image only (independently of the writer and of the node's reader).

Series -> highdicom volume, SEG -> highdicom, RTSTRUCT -> contours rasterised even-odd at pixel
centres; each label rebuilt by painting the ROIs in label order (highest wins); both sides
reoriented to RAS before comparing with the NIfTI image and label."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from skimage.draw import polygon2mask

from fl import config
from fl.cli import main
from fl.errors import ConfigError, DataError
from fl.learn.synth_anatomy import synthesize_anatomy
from fl.learn.synth_dicom import write_dicom_cases
from nodes.deid import scan

SEED, SCALE = 11, 0.25
CT_REQUIRED = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID",
               "FrameOfReferenceUID", "Modality", "PatientName", "PatientID", "InstanceNumber",
               "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness", "Rows",
               "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation", "SamplesPerPixel",
               "PhotometricInterpretation", "RescaleIntercept", "RescaleSlope", "PixelData")


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], list[Path]]:
    root = tmp_path_factory.mktemp("synth")
    nifti = synthesize_anatomy(root / "nifti", nodes=2, kind="ct", seed=SEED, scale=SCALE)
    dicom = synthesize_anatomy(root / "dicom", nodes=2, kind="ct", seed=SEED, scale=SCALE, fmt="dicom")
    return nifti, dicom


def _manifest(site: Path) -> dict:
    return json.loads((site / "dataset.json").read_text())


def _ras(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    image = nib.as_closest_canonical(nib.Nifti1Image(array, affine))
    return np.asarray(image.dataobj), image.affine


def _no_private(ds: pydicom.Dataset) -> bool:
    return not any(elem.tag.is_private for elem in ds.iterall())


def _series(folder: Path) -> list[pydicom.Dataset]:
    slices = [pydicom.dcmread(f) for f in sorted(folder.iterdir())]
    for ds in slices:
        assert ds.file_meta.TransferSyntaxUID and ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert all(key in ds for key in CT_REQUIRED), [key for key in CT_REQUIRED if key not in ds]
        assert ds.SOPClassUID == pydicom.uid.CTImageStorage and ds.Modality == "CT"
        assert ds.PatientIdentityRemoved == "YES" and ds.BurnedInAnnotation == "NO"
        assert "InstitutionName" not in ds
        assert str(ds.PatientName).startswith("SYNTH^") and _no_private(ds)
    for key in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "ImageOrientationPatient"):
        assert len({str(ds[key].value) for ds in slices}) == 1, key
    assert len({ds.SOPInstanceUID for ds in slices}) == len(slices)
    return slices


def _in_volume_order(volume: hd.Volume, slices: list[pydicom.Dataset]) -> list[pydicom.Dataset]:
    """The slice datasets in the order of the volume's first axis, matched by position."""
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in slices])
    order = []
    for i in range(volume.array.shape[0]):
        origin = (volume.affine @ [i, 0, 0, 1])[:3]
        order.append(int(np.argmin(np.linalg.norm(positions - origin, axis=1))))
    assert sorted(order) == list(range(len(slices)))
    return [slices[i] for i in order]


def _paint(masks: dict[int, np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    label = np.zeros(shape, dtype=np.uint8)
    for value in sorted(masks):  # the highest label wins where ROIs overlap
        label[masks[value]] = value
    return label


def _seg_label(path: Path, slices: list[pydicom.Dataset], values: dict[str, int]) -> np.ndarray:
    seg = hd.seg.segread(path)
    assert seg.SegmentationType == "BINARY" and seg.PatientIdentityRemoved == "YES" and _no_private(seg)
    assert seg.FrameOfReferenceUID == slices[0].FrameOfReferenceUID
    numbers = list(seg.segment_numbers)
    names = [seg.get_segment_description(n).SegmentLabel for n in numbers]
    assert sorted(names) == sorted(values)
    pixels = seg.get_pixels_by_source_instance([ds.SOPInstanceUID for ds in slices], segment_numbers=numbers,
                                               assert_missing_frames_are_empty=True)
    masks = {values[name]: pixels[..., i].astype(bool) for i, name in enumerate(names)}
    return _paint(masks, pixels.shape[:3])


def _rtstruct_label(path: Path, slices: list[pydicom.Dataset], values: dict[str, int]) -> np.ndarray:
    rt = pydicom.dcmread(path)
    assert rt.SOPClassUID == pydicom.uid.RTStructureSetStorage and rt.Modality == "RTSTRUCT"
    assert rt.PatientIdentityRemoved == "YES" and _no_private(rt)
    assert rt.StudyInstanceUID == slices[0].StudyInstanceUID
    frame = rt.ReferencedFrameOfReferenceSequence[0]
    series = frame.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert frame.FrameOfReferenceUID == slices[0].FrameOfReferenceUID
    assert series.SeriesInstanceUID == slices[0].SeriesInstanceUID
    referenced = {item.ReferencedSOPInstanceUID for item in series.ContourImageSequence}
    assert referenced == {ds.SOPInstanceUID for ds in slices}
    index = {ds.SOPInstanceUID: k for k, ds in enumerate(slices)}
    rows, columns = slices[0].Rows, slices[0].Columns
    names = {roi.ROINumber: roi.ROIName for roi in rt.StructureSetROISequence}
    assert sorted(names.values()) == sorted(values)
    masks = {}
    for roi in rt.ROIContourSequence:
        mask = np.zeros((len(slices), rows, columns), dtype=bool)
        for contour in roi.get("ContourSequence", []):
            assert contour.ContourGeometricType == "CLOSED_PLANAR"
            ds = slices[index[contour.ContourImageSequence[0].ReferencedSOPInstanceUID]]
            iop = np.array([float(v) for v in ds.ImageOrientationPatient])
            row_spacing, column_spacing = (float(v) for v in ds.PixelSpacing)
            offset = np.array([float(v) for v in contour.ContourData]).reshape(-1, 3) - [
                float(v) for v in ds.ImagePositionPatient]
            assert np.abs(offset @ np.cross(iop[:3], iop[3:])).max() < 1e-3  # in the slice's plane
            vertices = np.stack([offset @ iop[3:] / row_spacing, offset @ iop[:3] / column_spacing], axis=1)
            mask[index[ds.SOPInstanceUID]] ^= polygon2mask((rows, columns), vertices)  # even-odd: holes
        masks[values[names[roi.ReferencedROINumber]]] = mask
    return _paint(masks, (len(slices), rows, columns))


def _check_case(site: Path, entry: dict, values: dict[str, int], image: nib.Nifti1Image,
                label: np.ndarray) -> None:
    """The series equals ``image`` (voxels and RAS geometry), its SEG or RTSTRUCT ``label``."""
    slices = _series(site / entry["image"])
    volume = hd.get_volume_from_series(slices)
    slices = _in_volume_order(volume, slices)
    got, got_affine = _ras(volume.array, volume.get_affine("RAS"))
    want, want_affine = _ras(np.asarray(image.dataobj), image.affine)
    assert np.array_equal(got, want) and np.allclose(got_affine, want_affine, atol=1e-4)
    names = entry["label"]
    if "seg" in names:
        assert set(names) == {"seg", "segments"}
        rois = {roi: values[name] for roi, name in names["segments"].items()}
        painted = _seg_label(site / names["seg"], slices, rois)
    else:
        assert set(names) == {"rtstruct", "rois"}
        rois = {roi: values[name] for roi, name in names["rois"].items()}
        painted = _rtstruct_label(site / names["rtstruct"], slices, rois)
    assert np.array_equal(_ras(painted, volume.get_affine("RAS"))[0], _ras(label, image.affine)[0])


def test_dicom_sites_hold_the_nifti_cases(sites: tuple[list[Path], list[Path]]) -> None:
    nifti_sites, dicom_sites = sites
    lesion_free = with_lesion = 0
    for index, (nifti, dicom) in enumerate(zip(nifti_sites, dicom_sites, strict=True)):
        reference, manifest = _manifest(nifti), _manifest(dicom)
        assert manifest.pop("format") == "dicom"
        assert manifest.pop("deidentification") == {"options": ["retain_longitudinal_modified_dates"]}
        assert {k: v for k, v in manifest.items() if k not in ("training", "validation")} == {
            k: v for k, v in reference.items() if k not in ("training", "validation")}
        values = {name: int(value) for value, name in manifest["labels"].items()}
        for split in ("training", "validation"):
            assert len(manifest[split]) == len(reference[split])
            for entry, ref in zip(manifest[split], reference[split], strict=True):
                assert ("seg" if index % 2 == 0 else "rtstruct") in entry["label"]
                label = np.asarray(nib.load(nifti / ref["label"]).dataobj)
                _check_case(dicom, entry, values, nib.load(nifti / ref["image"]), label)
                lesion_free += int(not (label == 2).any())
                with_lesion += int((label == 2).any())
    assert lesion_free and with_lesion  # both kinds of case (an empty Lesion segment / ROI) were checked


@pytest.mark.parametrize("site", [0, 1], ids=["seg", "rtstruct"])
def test_oblique_anisotropic_geometry_and_holes(tmp_path: Path, site: int) -> None:
    """What the synthetic sites never draw: rows and columns spaced differently, a non-square
    slice, an oblique plane, and masks with holes and islands inside the holes."""
    rows, columns = np.mgrid[:13, :15]  # the NIfTI's y and x
    ring = np.hypot(rows - 6, columns - 7)
    plane = np.where(ring <= 5.5, 1, 0) - (ring <= 3.2) + (ring <= 1.2)  # disk, hole, island in the hole
    plane[3:5, 9:12] = 2  # a lesion in the disk
    label = np.stack([plane.T, np.roll(plane.T, 1, axis=0), np.zeros_like(plane.T), plane.T], axis=-1)
    label = label.astype(np.uint8)
    image = np.random.default_rng(0).integers(-1024, 3071, label.shape).astype(np.int16)
    c, s = np.cos(0.35), np.sin(0.35)
    rotation = np.array([[c, -s, 0, 0], [s, c, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    affine = rotation @ np.diag([-0.7, 0.9, -2.5, 1])  # flipped x and z, rows and columns spaced differently
    affine[:3, 3] = [12.5, -40.25, 7.0]
    folder = tmp_path / "site"
    entries = write_dicom_cases(folder, (1, 0), lambda: (image, label, affine), site=site, seed=5)
    values = {"spleen": 1, "lesion": 2}
    _check_case(folder, entries["training"][0], values, nib.Nifti1Image(image, affine), label)


def test_the_node_de_identification_check_passes(sites: tuple[list[Path], list[Path]]) -> None:
    for site in sites[1]:
        result = scan(site)
        assert result.findings and not result.flagged and not result.mismatches, result.lines()


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(root)).encode() + path.read_bytes())
    return h.hexdigest()


def test_a_dicom_site_is_reproducible_from_its_seed(sites: tuple[list[Path], list[Path]],
                                                    tmp_path: Path) -> None:
    again = synthesize_anatomy(tmp_path / "dicom", nodes=2, kind="ct", seed=SEED, scale=SCALE, fmt="dicom")
    assert [_digest(a) for a in again] == [_digest(b) for b in sites[1]]


def test_dicom_is_for_ct_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(DataError, match="--format dicom"):
        synthesize_anatomy(tmp_path / "mri", nodes=1, kind="brain-mri", scale=SCALE, fmt="dicom")
    with pytest.raises(DataError, match="--format"):
        synthesize_anatomy(tmp_path / "png", nodes=1, kind="ct", scale=SCALE, fmt="png")
    assert main(["data", "synth", "--out", str(tmp_path / "task"), "--nodes", "1", "--format", "dicom"]) == 2
    assert "--kind ct" in capsys.readouterr().err
    assert not (tmp_path / "mri").exists() and not (tmp_path / "task").exists()


def test_the_run_config_writes_dicom_for_ct_only() -> None:
    cfg = config.from_flat({"data.synthetic": "ct", "data.synthetic_format": "dicom"})
    assert cfg.data.synthetic_format == "dicom" and config.Config().data.synthetic_format == "nifti"
    with pytest.raises(ConfigError, match="synthetic_format: dicom is written for data.synthetic = 'ct'"):
        config.from_flat({"data.synthetic": "brain-mri", "data.synthetic_format": "dicom"})
    with pytest.raises(ConfigError, match="did you mean 'dicom'"):
        config.from_flat({"data.synthetic": "ct", "data.synthetic_format": "dicon"})
