"""Synthetic CT sites as a hospital's PACS exports them: one DICOM series per case, its labels
as a DICOM SEG or an RTSTRUCT.

The cases are ``fl.learn.synth_anatomy``'s (its generator hands over each case's int16 HU volume,
uint8 label and RAS affine), so a site written as DICOM holds, voxel for voxel, what the NIfTI
site of the same seed holds.

- Images: CT Image Storage, one file per slice under ``imagesTr/case_NNN/``. The array's first
  axis runs along a row (DICOM column index), its second down a column (row index), its third
  over the slices (``InstanceNumber`` = index + 1). Patient coordinates are LPS, so the geometry
  (``ImageOrientationPatient``, ``ImagePositionPatient``, ``PixelSpacing`` = row then column
  spacing) is that of ``diag(-1, -1, 1, 1) @ affine``. Pixel values are HU (slope 1, intercept 0).
- Labels: each ROI covers its label value and every higher one (the spleen encloses its lesion),
  so a reader rebuilds the label map by painting the ROIs in order, the highest winning.
  Even-numbered sites write a SEG (BINARY, highdicom; segments overlap), odd-numbered ones an
  RTSTRUCT of CLOSED_PLANAR contours: the marching-squares iso-lines at 0.5 of each slice's mask
  (scikit-image). Their vertices lie half-way between pixel centres and never on one, so an
  even-odd point-in-polygon test at the centres gives the mask back exactly.
- Identity: synthetic and marked de-identified (PatientIdentityRemoved YES, BurnedInAnnotation
  NO, no institution, no private tags, DeidentificationMethod and its codes), so the node's
  de-identification check finds nothing. Every UID derives from the site's seed (UUID-derived
  ``2.25`` UIDs) and every date is one fixed date, marked modified (a SEG must carry a content
  date; ``dataset.json`` declares the retain-modified-dates option), so a site is byte-for-byte
  reproducible.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, RTStructureSetStorage
from pydicom.valuerep import format_number_as_ds
from skimage.measure import approximate_polygon, find_contours

MANUFACTURER, MODEL, SOFTWARE = "OncoFed", "synthetic anatomy", "oncofed-synth-dicom 1"
DATE, TIME = "20000101", "120000"  # fixed: a synthetic acquisition has no real date
DEIDENTIFICATION = "synthetic data: no patient; identity generated"
# the PS3.15 options the files follow (CID 7050): the basic profile, dates kept but not the real ones
PROFILE_CODES = (("113100", "Basic Application Confidentiality Profile"),
                 ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"))
# what dataset.json adds for a DICOM site: its format and the de-identification options it declares
MANIFEST = {"format": "dicom", "deidentification": {"options": ["retain_longitudinal_modified_dates"]}}
STUDY_SOP_CLASS = "1.2.840.10008.3.1.2.3.1"  # what RTReferencedStudySequence names the study as
_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://oncofed.invalid/synthetic-dicom")
_LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class Roi:
    """One labelled structure: its DICOM name, the ``dataset.json`` label it maps to, and codes."""

    name: str
    label: str
    value: int  # label value; the ROI covers it and every higher value
    category: Code
    type: Code
    interpreted_type: str  # RTROIInterpretedType
    colour: tuple[int, int, int]


ROIS = (
    Roi("Spleen", "spleen", 1, codes.SCT.AnatomicalStructure, codes.SCT.Spleen, "ORGAN", (255, 160, 0)),
    Roi("Lesion", "lesion", 2, codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Lesion, "GTV",
        (255, 0, 0)),
)


@dataclass(frozen=True)
class _Case:
    """A case's identity: its number in the site and the seed its UIDs derive from."""

    site: int
    seed: int
    number: int

    def uid(self, role: str) -> str:
        name = f"{self.seed}/{self.site}/{self.number}/{role}"
        return f"2.25.{uuid.uuid5(_NAMESPACE, name).int}"

    @property
    def name(self) -> str:
        return f"case_{self.number:03d}"


def write_dicom_cases(folder: Path, counts: tuple[int, int],
                      make_case: Callable[[], tuple[np.ndarray, np.ndarray, np.ndarray]], *, site: int,
                      seed: int) -> dict[str, list[dict[str, object]]]:
    """Write ``counts`` (training, validation) cases from ``make_case() -> (image, label, affine)``:
    a series folder under ``imagesTr`` and a SEG (even ``site``) or RTSTRUCT (odd) under
    ``labelsTr`` each; returns the ``training``/``validation`` lists of ``dataset.json``."""
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    entries: dict[str, list[dict[str, object]]] = {"training": [], "validation": []}
    count = 0
    for split, n in zip(("training", "validation"), counts, strict=True):
        for _ in range(n):
            image, label, affine = make_case()
            case = _Case(site=site, seed=seed, number=count)
            entries[split].append(_write_case(folder, case, image, label, affine))
            count += 1
    return entries


def _write_case(folder: Path, case: _Case, image: np.ndarray, label: np.ndarray,
                affine: np.ndarray) -> dict[str, object]:
    """One case's series and its SEG or RTSTRUCT; returns its ``dataset.json`` entry."""
    series = ct_series(image, affine, case)
    series_dir = folder / "imagesTr" / case.name
    series_dir.mkdir()
    for ds in series:
        ds.save_as(series_dir / f"{ds.InstanceNumber:04d}.dcm", enforce_file_format=True)
    rois = {roi.name: roi.label for roi in ROIS}
    if case.site % 2 == 0:
        path = f"labelsTr/{case.name}.seg.dcm"
        segmentation(series, label, case).save_as(folder / path, enforce_file_format=True)
        entry: dict[str, object] = {"seg": path, "segments": rois}
    else:
        path = f"labelsTr/{case.name}.rtstruct.dcm"
        rtstruct(series, label, affine, case).save_as(folder / path, enforce_file_format=True)
        entry = {"rtstruct": path, "rois": rois}
    return {"image": f"imagesTr/{case.name}", "label": entry}


def slice_geometry(affine: np.ndarray) -> tuple[np.ndarray, list[float], list[float]]:
    """For a volume indexed (column, row, slice) with a RAS ``affine``: the LPS affine (index to
    patient mm), ``ImageOrientationPatient`` and ``PixelSpacing`` (between rows, then between
    columns)."""
    lps = _LPS_FROM_RAS @ np.asarray(affine, dtype=float)
    along_row, along_column = np.linalg.norm(lps[:3, 0]), np.linalg.norm(lps[:3, 1])
    orientation = [*(lps[:3, 0] / along_row), *(lps[:3, 1] / along_column)]
    return lps, [float(v) for v in orientation], [float(along_column), float(along_row)]


def _ds(values: list[float] | np.ndarray) -> list[str]:
    return [format_number_as_ds(float(v)) for v in values]


def _mark_deidentified(ds: Dataset) -> None:
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = DEIDENTIFICATION
    ds.DeidentificationMethodCodeSequence = [Dataset() for _ in PROFILE_CODES]
    for item, (value, meaning) in zip(ds.DeidentificationMethodCodeSequence, PROFILE_CODES, strict=True):
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
    ds.LongitudinalTemporalInformationModified = "MODIFIED"


def _identity(ds: Dataset, case: _Case) -> None:
    """Patient and study modules: a synthetic patient per case, marked de-identified."""
    ds.PatientName = f"SYNTH^CASE{case.number:03d}"
    ds.PatientID = f"SYNTH-{case.site}-{case.number:03d}"
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    _mark_deidentified(ds)
    ds.StudyInstanceUID = case.uid("study")
    ds.StudyDate, ds.StudyTime = DATE, TIME
    ds.StudyID = ""
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""


def _file_meta(sop_class: str, sop_instance: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return meta


def ct_series(image: np.ndarray, affine: np.ndarray, case: _Case) -> list[Dataset]:
    """One CT Image Storage dataset per slice of ``image`` (x, y, z; int16 HU)."""
    lps, orientation, spacing = slice_geometry(affine)
    common = Dataset()
    _identity(common, case)
    common.SOPClassUID = CTImageStorage
    common.Modality = "CT"
    common.SeriesInstanceUID = case.uid("ct-series")
    common.SeriesNumber = 1
    common.SeriesDate, common.SeriesTime = DATE, TIME
    common.FrameOfReferenceUID = case.uid("frame-of-reference")
    common.PositionReferenceIndicator = ""
    common.Manufacturer, common.ManufacturerModelName, common.SoftwareVersions = MANUFACTURER, MODEL, SOFTWARE
    common.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    common.ContentDate, common.ContentTime = DATE, TIME
    common.AcquisitionNumber = 1
    common.BurnedInAnnotation = "NO"
    common.KVP = ""
    common.ImageOrientationPatient = _ds(orientation)
    common.PixelSpacing = _ds(spacing)
    common.SliceThickness = format_number_as_ds(float(np.linalg.norm(lps[:3, 2])))
    common.SamplesPerPixel = 1
    common.PhotometricInterpretation = "MONOCHROME2"
    common.Rows, common.Columns = int(image.shape[1]), int(image.shape[0])
    common.BitsAllocated, common.BitsStored, common.HighBit = 16, 16, 15
    common.PixelRepresentation = 1  # signed
    common.RescaleIntercept, common.RescaleSlope, common.RescaleType = "0", "1", "HU"
    common.WindowCenter, common.WindowWidth = "40", "400"
    series = []
    for k in range(image.shape[2]):
        ds = Dataset()
        ds.update(common)
        ds.SOPInstanceUID = case.uid(f"ct-{k}")
        ds.file_meta = _file_meta(CTImageStorage, ds.SOPInstanceUID)
        ds.InstanceNumber = k + 1
        position = lps @ [0.0, 0.0, float(k), 1.0]
        ds.ImagePositionPatient = _ds(position[:3])
        ds.SliceLocation = format_number_as_ds(float(position[2]))
        ds.PixelData = np.ascontiguousarray(image[:, :, k].T, dtype="<i2").tobytes()
        series.append(ds)
    return series


def _roi_masks(label: np.ndarray) -> np.ndarray:
    """(slice, row, column, ROI) masks of the label (x, y, z); ROI ``r`` covers values >= its own."""
    frames = np.transpose(label, (2, 1, 0))
    return np.stack([frames >= roi.value for roi in ROIS], axis=-1)


def segmentation(series: list[Dataset], label: np.ndarray, case: _Case) -> hd.seg.Segmentation:
    """A BINARY DICOM SEG of the ROIs on ``series`` (its frames follow the series' slices)."""
    algorithm = hd.AlgorithmIdentificationSequence(name=MANUFACTURER + " " + MODEL, version=SOFTWARE,
                                                   family=codes.cid7162.MorphologicalOperations)
    segments = [hd.seg.SegmentDescription(segment_number=i + 1, segment_label=roi.name,
                                          segmented_property_category=roi.category,
                                          segmented_property_type=roi.type, algorithm_type="AUTOMATIC",
                                          algorithm_identification=algorithm)
                for i, roi in enumerate(ROIS)]
    seg = hd.seg.Segmentation(
        source_images=series, pixel_array=_roi_masks(label).astype(np.uint8), segmentation_type="BINARY",
        segment_descriptions=segments, series_instance_uid=case.uid("seg-series"), series_number=2,
        sop_instance_uid=case.uid("seg"), instance_number=1, manufacturer=MANUFACTURER,
        manufacturer_model_name=MODEL, software_versions=SOFTWARE, device_serial_number="0",
        content_date=DATE, content_time=TIME, series_date=DATE, series_time=TIME)
    # highdicom stamps creation times, describes its contribution in free text and draws a random
    # dimension-organisation UID: fix the times, drop the text (type 3), derive the UID
    seg.InstanceCreationDate, seg.InstanceCreationTime = DATE, TIME
    for equipment in seg.get("ContributingEquipmentSequence", []):
        for keyword in ("ContributionDateTime", "ContributionDescription"):
            equipment.pop(keyword, None)
    dimension_uid = case.uid("seg-dimensions")
    for item in [*seg.DimensionOrganizationSequence, *seg.DimensionIndexSequence]:
        item.DimensionOrganizationUID = dimension_uid
    _mark_deidentified(seg)
    return seg


def mask_contours(mask: np.ndarray) -> list[np.ndarray]:
    """Closed iso-lines at 0.5 of a 2D mask as (row, column) vertices, the first not repeated
    at the end; collinear vertices dropped (the polygons are unchanged)."""
    padded = np.pad(mask.astype(np.uint8), 1)  # closes contours that would touch the border
    return [approximate_polygon(c, tolerance=0)[:-1] - 1 for c in find_contours(padded, 0.5)]


def _referenced_image(ds: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = ds.SOPClassUID
    item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    return item


def _contour_sequence(masks: np.ndarray, lps: np.ndarray, series: list[Dataset]) -> list[Dataset]:
    """CLOSED_PLANAR contours of one ROI's (slice, row, column) masks, in patient mm."""
    contours = []
    for k, mask in enumerate(masks):
        for vertices in mask_contours(mask):
            rows, columns = vertices[:, 0], vertices[:, 1]
            index = np.stack([columns, rows, np.full_like(rows, k), np.ones_like(rows)])
            points = (lps @ index)[:3].T
            item = Dataset()
            item.ContourImageSequence = [_referenced_image(series[k])]
            item.ContourGeometricType = "CLOSED_PLANAR"
            item.NumberOfContourPoints = len(points)
            item.ContourData = [f"{v:.4f}" for v in points.ravel()]
            contours.append(item)
    return contours


def rtstruct(series: list[Dataset], label: np.ndarray, affine: np.ndarray, case: _Case) -> Dataset:
    """An RT Structure Set of the ROIs on ``series``, written with pydicom."""
    lps, _, _ = slice_geometry(affine)
    first = series[0]
    ds = Dataset()
    ds.file_meta = _file_meta(RTStructureSetStorage, case.uid("rtstruct"))
    _identity(ds, case)
    ds.SOPClassUID, ds.SOPInstanceUID = RTStructureSetStorage, case.uid("rtstruct")
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID, ds.SeriesNumber = case.uid("rtstruct-series"), 2
    ds.SeriesDate, ds.SeriesTime = DATE, TIME
    ds.Manufacturer, ds.ManufacturerModelName, ds.SoftwareVersions = MANUFACTURER, MODEL, SOFTWARE
    ds.InstanceNumber = 1
    ds.StructureSetLabel = "SYNTH"
    ds.StructureSetDate, ds.StructureSetTime = DATE, TIME
    ds.ReferencedFrameOfReferenceSequence = [_referenced_frame(series)]
    masks = _roi_masks(label)
    ds.StructureSetROISequence, ds.ROIContourSequence, ds.RTROIObservationsSequence = [], [], []
    for number, roi in enumerate(ROIS, start=1):
        item = Dataset()
        item.ROINumber, item.ReferencedFrameOfReferenceUID = number, first.FrameOfReferenceUID
        item.ROIName, item.ROIGenerationAlgorithm = roi.name, "AUTOMATIC"
        ds.StructureSetROISequence.append(item)
        contour = Dataset()
        contour.ReferencedROINumber, contour.ROIDisplayColor = number, list(roi.colour)
        sequence = _contour_sequence(masks[..., number - 1], lps, series)
        if sequence:  # an ROI absent from the case (no lesion) has no contours, as in a planning system
            contour.ContourSequence = sequence
        ds.ROIContourSequence.append(contour)
        observation = Dataset()
        observation.ObservationNumber, observation.ReferencedROINumber = number, number
        observation.RTROIInterpretedType, observation.ROIInterpreter = roi.interpreted_type, ""
        ds.RTROIObservationsSequence.append(observation)
    return ds


def _referenced_frame(series: list[Dataset]) -> Dataset:
    """Frame of reference -> study -> series -> every slice, as an RTSTRUCT references its images."""
    first = series[0]
    referenced_series = Dataset()
    referenced_series.SeriesInstanceUID = first.SeriesInstanceUID
    referenced_series.ContourImageSequence = [_referenced_image(ds) for ds in series]
    study = Dataset()
    study.ReferencedSOPClassUID, study.ReferencedSOPInstanceUID = STUDY_SOP_CLASS, first.StudyInstanceUID
    study.RTReferencedSeriesSequence = [referenced_series]
    frame = Dataset()
    frame.FrameOfReferenceUID = first.FrameOfReferenceUID
    frame.RTReferencedStudySequence = [study]
    return frame
