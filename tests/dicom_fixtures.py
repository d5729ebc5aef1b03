"""DICOM written for tests and benchmarks: a synthetic CT series (anisotropic, non-square, axial or
oblique), a SEG on it (highdicom) and an RTSTRUCT on it (pydicom, by hand), plus the malformed
cases a node must refuse (:data:`MALFORMED`, each with the words its error must hold)."""

from __future__ import annotations

import copy
import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

RTSTRUCT_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"


@dataclass
class SyntheticSeries:
    """A series on disk; ``values`` (slices, rows, columns) are in HU, slice k at ``origin + k * step * normal``."""

    files: list[Path]
    datasets: list[Dataset]
    values: np.ndarray
    rowdir: np.ndarray  # direction of increasing column index
    coldir: np.ndarray  # direction of increasing row index
    spacing: tuple[float, float]  # (between rows, between columns)
    step: float
    origin: np.ndarray

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.rowdir, self.coldir)

    def point(self, k: float, row: float, col: float) -> np.ndarray:
        """Patient coordinates (LPS, mm) of pixel (row, col) of slice k (the DICOM formula)."""
        return (self.origin + k * self.step * self.normal + col * self.spacing[1] * self.rowdir
                + row * self.spacing[0] * self.coldir)

    def ras_affine(self) -> np.ndarray:
        """The NIfTI twin's affine for ``values.transpose(2, 1, 0)`` (columns, rows, slices), in RAS."""
        lps = np.eye(4)
        lps[:3, 0] = self.spacing[1] * self.rowdir
        lps[:3, 1] = self.spacing[0] * self.coldir
        lps[:3, 2] = self.step * self.normal
        lps[:3, 3] = self.origin
        return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def _slice(series_uid: str, study_uid: str, frame_uid: str, geometry: dict[str, Any], pixels: np.ndarray) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
    ds.Modality, ds.PatientID, ds.PatientName, ds.StudyID, ds.SeriesNumber = "CT", "SYNTH", "Synthetic^Case", "1", 1
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.ReferringPhysicianName = "20240101", "120000", "", ""
    ds.PatientBirthDate, ds.PatientSex, ds.Manufacturer = "", "O", "OncoFed tests"
    for keyword, value in geometry.items():
        setattr(ds, keyword, value)
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
    ds.PixelData = pixels.astype(np.int16).tobytes()
    return ds


def write_series(folder: Path, *, slices: int = 20, rows: int = 40, cols: int = 32, spacing: tuple[float, float] = (0.8, 0.7),
                 step: float = 2.5, angle: float = 0.0, seed: int = 0) -> SyntheticSeries:
    """A CT series of random file names, InstanceNumber running against position; ``angle``
    rotates it (degrees) about the z axis."""
    folder.mkdir(parents=True, exist_ok=True)
    a = np.deg2rad(angle)
    rowdir, coldir = np.array([np.cos(a), np.sin(a), 0.0]), np.array([-np.sin(a), np.cos(a), 0.0])
    origin = np.array([-12.5, -20.25, 31.0])
    stored = np.random.default_rng(seed).integers(0, 2000, (slices, rows, cols)).astype(np.int16)
    uids = (generate_uid(), generate_uid(), generate_uid())
    datasets, files = [], []
    for k in range(slices):
        geometry = {"ImagePositionPatient": [round(float(x), 6) for x in origin + k * step * np.cross(rowdir, coldir)],
                    "ImageOrientationPatient": [round(float(x), 8) for x in (*rowdir, *coldir)],
                    "PixelSpacing": list(spacing), "SliceThickness": step, "InstanceNumber": slices - k}
        ds = _slice(*uids, geometry, stored[k])
        files.append(folder / f"{secrets.token_hex(6)}.dcm")
        ds.save_as(files[-1], enforce_file_format=True)
        datasets.append(ds)
    return SyntheticSeries(files, datasets, stored.astype(np.float32) - 1024, rowdir, coldir, spacing, step, origin)


def write_seg(path: Path, series: SyntheticSeries, mask: np.ndarray, labels: tuple[str, ...] = ("Spleen", "Lesion")) -> Path:
    """A BINARY SEG of ``mask`` (class indices, slices in the series' order): segment i is
    class i + 1, labelled ``labels[i]``; empty frames omitted (highdicom's default)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    descriptions = [hd.seg.SegmentDescription(
        segment_number=i + 1, segment_label=label, segmented_property_category=codes.SCT.Organ,
        segmented_property_type=codes.SCT.Spleen, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
        for i, label in enumerate(labels)]
    onehot = np.stack([mask == i + 1 for i in range(len(labels))], axis=-1).astype(np.uint8)
    seg = hd.seg.Segmentation(
        source_images=series.datasets, pixel_array=onehot, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=generate_uid(), series_number=2,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer="OncoFed tests",
        manufacturer_model_name="tests", software_versions="1", device_serial_number="1")
    seg.save_as(path)
    return path


def write_rtstruct(path: Path, series: SyntheticSeries, rois: dict[str, list[tuple[int, list[tuple[float, float]]]]],
                   *, frame_uid: str | None = None) -> Path:
    """An RTSTRUCT whose ROI ``name`` has, per (slice k, [(row, col), ...]), one closed planar
    contour through those pixel positions (patient coordinates from the series' geometry)."""
    first = series.datasets[0]
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = RTSTRUCT_CLASS
    ds.SOPClassUID, ds.SOPInstanceUID = RTSTRUCT_CLASS, generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.Modality, ds.StudyInstanceUID, ds.SeriesInstanceUID = "RTSTRUCT", first.StudyInstanceUID, generate_uid()
    ds.PatientID, ds.StructureSetLabel = first.PatientID, "tests"
    frame = Dataset()
    frame.FrameOfReferenceUID = frame_uid or first.FrameOfReferenceUID
    study, referenced = Dataset(), Dataset()
    referenced.SeriesInstanceUID = first.SeriesInstanceUID
    study.RTReferencedSeriesSequence = Sequence([referenced])
    frame.RTReferencedStudySequence = Sequence([study])
    ds.ReferencedFrameOfReferenceSequence = Sequence([frame])
    ds.StructureSetROISequence, ds.ROIContourSequence = Sequence(), Sequence()
    for number, (name, contours) in enumerate(rois.items(), start=1):
        roi = Dataset()
        roi.ROINumber, roi.ROIName, roi.ReferencedFrameOfReferenceUID = number, name, frame.FrameOfReferenceUID
        ds.StructureSetROISequence.append(roi)
        item = Dataset()
        item.ReferencedROINumber, item.ContourSequence = number, Sequence()
        for k, vertices in contours:
            contour = Dataset()
            points = [series.point(k, r, c) for r, c in vertices]
            contour.ContourGeometricType, contour.NumberOfContourPoints = "CLOSED_PLANAR", len(points)
            contour.ContourData = [round(float(x), 6) for p in points for x in p]
            item.ContourSequence.append(contour)
        ds.ROIContourSequence.append(item)
    ds.save_as(path, enforce_file_format=True)
    return path


def box(r0: int, r1: int, c0: int, c1: int) -> list[tuple[float, float]]:
    """A rectangle's corners at pixel centres (rows r0..r1, columns c0..c1 inclusive)."""
    return [(r0, c0), (r0, c1), (r1, c1), (r1, c0)]


def write_dataset(folder: Path, image: Any, label: Any) -> Path:
    """A node folder whose dataset.json lists one case for training and validation (a NIfTI label
    that is not there is written empty: the image's error comes first)."""
    if isinstance(label, str) and label.endswith(".nii.gz") and not (folder / label).exists():
        (folder / label).write_bytes(b"")
    case = {"image": image, "label": label}
    (folder / "dataset.json").write_text(json.dumps({"training": [case], "validation": [case]}))
    return folder


def retag(path: Path, **values: Any) -> None:
    ds = pydicom.dcmread(path)
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    ds.save_as(path, enforce_file_format=True)


# --- malformed cases: each writes a node folder, returns (folder, words its DataError must hold) ---
Malformed = Callable[[Path], tuple[Path, list[str]]]


def _series(node: Path, **kwargs: Any) -> SyntheticSeries:
    return write_series(node / "ct", slices=kwargs.pop("slices", 6), rows=8, cols=6, **kwargs)


def mixed_series(node: Path) -> tuple[Path, list[str]]:
    _series(node)
    write_series(node / "ct", slices=2, rows=8, cols=6, seed=1)
    return write_dataset(node, "ct", "label.nii.gz"), [str(node / "ct"), "2 series"]


def two_frames_of_reference(node: Path) -> tuple[Path, list[str]]:
    series = _series(node)
    retag(series.files[0], FrameOfReferenceUID=generate_uid())
    return write_dataset(node, "ct", "label.nii.gz"), [str(node / "ct"), "2 frames of reference"]


def missing_slice(node: Path) -> tuple[Path, list[str]]:
    series = _series(node)
    series.files[2].unlink()
    return write_dataset(node, "ct", "label.nii.gz"), [str(node / "ct"), "1 slice(s) missing between"]


def duplicate_slice(node: Path) -> tuple[Path, list[str]]:
    series = _series(node)
    copy_ = copy.deepcopy(series.datasets[3])
    copy_.SOPInstanceUID = copy_.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    copy_.save_as(node / "ct" / "copy.dcm", enforce_file_format=True)
    return write_dataset(node, "ct", "label.nii.gz"), [str(node / "ct"), "copy.dcm", "duplicate slices"]


def uneven_spacing(node: Path) -> tuple[Path, list[str]]:
    series = _series(node)
    retag(series.files[5], ImagePositionPatient=[float(x) for x in series.point(5.4, 0, 0)])
    return write_dataset(node, "ct", "label.nii.gz"), [str(node / "ct"), "uneven slice spacing"]


def orientation_differs(node: Path) -> tuple[Path, list[str]]:
    series = _series(node)
    retag(series.files[4], ImageOrientationPatient=[1.0, 0.0, 0.0, 0.0, 0.0, -1.0])
    return write_dataset(node, "ct", "label.nii.gz"), [series.files[4].name, "ImageOrientationPatient", "inconsistent"]


def non_dicom_file(node: Path) -> tuple[Path, list[str]]:
    _series(node)
    (node / "ct" / "README.txt").write_text("exported by the PACS\n")
    return write_dataset(node, "ct", "label.nii.gz"), ["README.txt", "not a DICOM file"]


def undecodable(node: Path) -> tuple[Path, list[str]]:
    series = _series(node)
    ds = pydicom.dcmread(series.files[1])
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.70"  # JPEG Lossless, first-order prediction
    ds.PixelData = pydicom.encaps.encapsulate([b"\xff\xd8not a jpeg\xff\xd9"])
    ds["PixelData"].VR = "OB"
    ds.save_as(series.files[1], enforce_file_format=True)
    return write_dataset(node, "ct", "label.nii.gz"), [series.files[1].name, "decoded"]


def label_in_the_series_folder(node: Path) -> tuple[Path, list[str]]:
    series = _series(node)
    write_rtstruct(node / "ct" / "rt.dcm", series, {"GTV": [(2, box(1, 4, 1, 3))]})
    return write_dataset(node, "ct", "label.nii.gz"), [str(node / "ct" / "rt.dcm"), "not an image"]


def empty_folder(node: Path) -> tuple[Path, list[str]]:
    (node / "ct").mkdir()
    return write_dataset(node, "ct", "label.nii.gz"), [str(node / "ct"), "empty folder"]


def series_folder_as_label(node: Path) -> tuple[Path, list[str]]:
    _series(node)
    write_series(node / "other", slices=2, rows=8, cols=6)
    return write_dataset(node, "ct", "other"), [str(node / "other"), "a folder, listed as training[0].label"]


def seg_on_another_series(node: Path) -> tuple[Path, list[str]]:
    _series(node)
    other = write_series(node / "elsewhere", slices=6, rows=8, cols=6, seed=2)
    write_seg(node / "seg.dcm", other, np.ones((6, 8, 6), np.uint8), labels=("Spleen",))
    return write_dataset(node, "ct", "seg.dcm"), [str(node / "seg.dcm"), "references another series"]


def rtstruct_on_another_frame(node: Path) -> tuple[Path, list[str]]:
    series = _series(node)
    write_rtstruct(node / "rt.dcm", series, {"GTV": [(2, box(1, 4, 1, 3))]}, frame_uid=generate_uid())
    label = {"rtstruct": "rt.dcm", "rois": {"GTV": "lesion"}}
    return write_dataset(node, "ct", label), [str(node / "rt.dcm"), "another frame of reference"]


def roi_not_found(node: Path) -> tuple[Path, list[str]]:
    series = _series(node)
    write_rtstruct(node / "rt.dcm", series, {"GTV": [(2, box(1, 4, 1, 3))], "Body": [(2, box(0, 7, 0, 5))]})
    label = {"rtstruct": "rt.dcm", "rois": {"Tumour": "lesion"}}
    return write_dataset(node, "ct", label), [str(node / "rt.dcm"), "ROI 'Tumour' not found", "'GTV', 'Body'"]


def label_not_in_bundle(node: Path) -> tuple[Path, list[str]]:
    series = _series(node)
    write_rtstruct(node / "rt.dcm", series, {"GTV": [(2, box(1, 4, 1, 3))]})
    label = {"rtstruct": "rt.dcm", "rois": {"GTV": "tumour"}}
    return write_dataset(node, "ct", label), [str(node / "rt.dcm"), "no label 'tumour'", "'spleen'"]


def contour_off_the_series(node: Path) -> tuple[Path, list[str]]:
    series = _series(node)
    write_rtstruct(node / "rt.dcm", series, {"GTV": [(9, box(1, 4, 1, 3))]})
    label = {"rtstruct": "rt.dcm", "rois": {"GTV": "lesion"}}
    return write_dataset(node, "ct", label), [str(node / "rt.dcm"), "ROI 'GTV'", "off every slice"]


def bad_label_object(node: Path) -> tuple[Path, list[str]]:
    _series(node)
    return (write_dataset(node, "ct", {"rtstruct": "rt.dcm"}),
            [str(node / "dataset.json"), "training[0].label.rois", "must map"])


MALFORMED: dict[str, Malformed] = {
    "mixed series": mixed_series,
    "two frames of reference": two_frames_of_reference,
    "missing slice": missing_slice,
    "duplicate slice": duplicate_slice,
    "uneven spacing": uneven_spacing,
    "orientation differs": orientation_differs,
    "non-DICOM file in the folder": non_dicom_file,
    "undecodable transfer syntax": undecodable,
    "RTSTRUCT inside the series folder": label_in_the_series_folder,
    "empty folder": empty_folder,
    "series folder given as label": series_folder_as_label,
    "SEG on another series": seg_on_another_series,
    "RTSTRUCT on another frame of reference": rtstruct_on_another_frame,
    "ROI not found": roi_not_found,
    "label name not in the bundle": label_not_in_bundle,
    "contour off every slice": contour_off_the_series,
    "RTSTRUCT without its ROI mapping": bad_label_object,
}
