"""A case's DICOM image: one series, checked, then assembled into a volume.

A case's image may be a DICOM series (a folder holding exactly one series, or the list of its
files) or one multi-frame file; its label a DICOM SEG or an RTSTRUCT (:mod:`fl.learn.dicom_labels`).
The node turns such a case into NIfTI files once (:mod:`fl.learn.dicom_cache`), so every bundle's
own ``LoadImaged`` reads it as it reads a NIfTI case.

Slices are checked before they are assembled, each problem named with the file or folder: files
that are not DICOM or not image slices, pixel data this node cannot decode, several series or
frames of reference in one folder, orientations or grids that differ, duplicate positions, missing
slices and uneven spacing. Assembly is highdicom's (:func:`highdicom.get_volume_from_series`): it
sorts the slices along their normal (not by InstanceNumber) and applies the modality transform
(CT rescale). A volume's array is ``(slices, rows, columns)`` and its affine maps those indices
to patient coordinates (LPS, millimetres).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fl.errors import DataError

if TYPE_CHECKING:
    import highdicom as hd
    from pydicom import Dataset

NIFTI_SUFFIXES = (".nii", ".nii.gz")
SEG_CLASSES = ("1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.7")  # binary/fractional, label map
RTSTRUCT_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"
GEOMETRY = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
SIDECAR = "case.json"  # in a converted case's cache entry: where it came from (never leaves the node)
IMAGE_SOURCE_KEY, LABEL_SOURCE_KEY = "image_source", "label_source"  # a converted item's source names
SPACING_RTOL = 1e-2  # as highdicom's own check: a gap may differ from the series' spacing by 1 %
SAME_POSITION_MM = 1e-3


@dataclass(frozen=True)
class Series:
    """A case's image as DICOM: the slices of one series (in any order) or one multi-frame file,
    and ``where`` it was listed (its folder, or the ``dataset.json`` entry that lists the files)."""

    files: tuple[Path, ...]
    where: str


@dataclass(frozen=True)
class SegLabel:
    """A DICOM SEG label; ``segments`` maps its SegmentLabels to the bundle's label names, others
    left out (None: every segment goes to the bundle label of the same name, case aside)."""

    path: Path
    segments: tuple[tuple[str, str], ...] | None = None


@dataclass(frozen=True)
class RtLabel:
    """An RTSTRUCT label; ``rois`` maps its ROI names to the bundle's label names (others left out)."""

    path: Path
    rois: tuple[tuple[str, str], ...]


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def header(path: Path, *, force: bool = False) -> Dataset | None:
    """A file's DICOM header (no pixel data), or None when it is not a DICOM file."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    if is_nifti(path):
        return None
    try:
        return pydicom.dcmread(path, stop_before_pixels=True, force=force)
    except InvalidDicomError:
        return None
    except Exception as exc:  # pydicom raises many kinds on a damaged file
        raise DataError(f"{path}: unreadable DICOM header ({exc})") from None


def image_source(path: Path, what: str) -> Path | Series:
    """What a ``dataset.json`` image path stands for: a folder is a series (its files, sorted), a
    multi-frame DICOM file a one-file series; any other file stays a file for MONAI's reader."""
    if path.is_dir():
        files = sorted(path.iterdir())
        if not files:
            raise DataError(f"{path}: empty folder listed as {what}; it should hold one DICOM series")
        folders = [p.name for p in files if p.is_dir()]
        if folders:
            raise DataError(f"{path}: holds folders ({', '.join(folders[:3])}); a series folder, listed as "
                            f"{what}, holds only the files of one DICOM series")
        return Series(tuple(files), where=str(path))
    ds = header(path)
    if ds is not None and int(ds.get("NumberOfFrames", 1) or 1) > 1:
        return Series((path,), where=str(path))
    return path


def label_class(path: Path) -> str:
    """A label file's DICOM SOP Class UID ("" for a file that is not DICOM)."""
    ds = header(path)
    return str(ds.get("SOPClassUID", "")) if ds is not None else ""


def read_series(series: Series) -> tuple[hd.Volume, str]:
    """The series' volume and its Series Instance UID, after the checks in this module's docstring."""
    datasets = [_read(path, len(series.files)) for path in series.files]
    if len(datasets) == 1 and int(datasets[0].get("NumberOfFrames", 1) or 1) > 1:
        return _multiframe(series.files[0]), str(datasets[0].SeriesInstanceUID)
    _check_one_series(datasets, series)
    _check_grid(datasets, series)
    _check_positions(datasets, series)
    return _assemble(datasets, series), str(datasets[0].SeriesInstanceUID)


def _read(path: Path, count: int) -> Dataset:
    """One file of a series: a DICOM image whose pixel data this node decodes."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError:
        raise DataError(f"{path}: not a DICOM file; a series folder holds only the series' DICOM files") from None
    except Exception as exc:  # pydicom raises many kinds on a damaged file
        raise DataError(f"{path}: unreadable DICOM ({exc})") from None
    if not any(k in ds for k in PIXEL_KEYWORDS) or str(ds.get("SOPClassUID", "")) in SEG_CLASSES:
        raise DataError(f"{path}: not an image ({_sop_name(ds)}); a series holds image slices only (a SEG or an "
                        f"RTSTRUCT is the case's label)")
    _check_decodable(ds, path)
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise DataError(f"{path}: colour image ({ds.get('PhotometricInterpretation')}); a case's image is "
                        f"greyscale")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if count > 1 and frames > 1:
        raise DataError(f"{path}: a multi-frame file among {count} files; list a multi-frame image as its own file")
    missing = [k for k in GEOMETRY if k not in ds]
    if frames == 1 and missing:
        raise DataError(f"{path}: no {', '.join(missing)}; a slice of a 3-D series needs {', '.join(GEOMETRY)}")
    return ds


def _sop_name(ds: Dataset) -> str:
    uid = ds.get("SOPClassUID")
    return getattr(uid, "name", None) or str(uid or "no SOP Class UID")


def _check_decodable(ds: Dataset, path: Path) -> None:
    from pydicom.pixels import get_decoder

    syntax = ds.file_meta.get("TransferSyntaxUID")
    if syntax is None or not syntax.is_compressed:
        return
    try:
        available = get_decoder(syntax).is_available
    except NotImplementedError:
        available = False
    if not available:
        raise DataError(f"{path}: pixel data in {syntax.name} ({syntax}) cannot be decoded on this node; "
                        f"install a pydicom decoder for it (pylibjpeg-libjpeg for JPEG Lossless) or export "
                        f"the series uncompressed")


def _check_one_series(datasets: list[Dataset], series: Series) -> None:
    for keyword, what in (("SeriesInstanceUID", "series"), ("FrameOfReferenceUID", "frames of reference")):
        groups: dict[str, list[Path]] = {}
        for ds, path in zip(datasets, series.files):
            groups.setdefault(str(ds.get(keyword, "")), []).append(path)
        if len(groups) > 1:
            listed = "; ".join(f"{uid or 'none'}: {len(files)} file(s), e.g. {files[0].name}"
                               for uid, files in groups.items())
            raise DataError(f"{series.where}: {len(groups)} {what} among its files ({listed}); a case's image is "
                            f"one series on one frame of reference: give each series its own folder")


def _check_grid(datasets: list[Dataset], series: Series) -> None:
    first = datasets[0]
    for ds, path in zip(datasets[1:], series.files[1:]):
        if (ds.Rows, ds.Columns) != (first.Rows, first.Columns):
            raise DataError(f"{path}: {ds.Rows}x{ds.Columns} pixels, {series.files[0].name} has "
                            f"{first.Rows}x{first.Columns}; the slices of a series share one grid")
        for keyword, tol in (("ImageOrientationPatient", 1e-4), ("PixelSpacing", 1e-4)):
            if not np.allclose(np.asarray(ds[keyword].value, float), np.asarray(first[keyword].value, float),
                               atol=tol):
                raise DataError(f"{path}: {keyword} {_numbers(ds[keyword].value)} differs from "
                                f"{series.files[0].name}'s {_numbers(first[keyword].value)} (inconsistent "
                                f"orientation or pixel spacing within the series)")


def _numbers(values: Any) -> str:
    return "[" + ", ".join(f"{float(v) + 0.0:g}" for v in values) + "]"


def _check_positions(datasets: list[Dataset], series: Series) -> None:
    """No two slices at one position, none missing, one spacing between neighbours."""
    iop = np.asarray(datasets[0].ImageOrientationPatient, float)
    normal = np.cross(iop[:3], iop[3:])
    distance = np.array([np.dot(np.asarray(ds.ImagePositionPatient, float), normal) for ds in datasets])
    order = np.argsort(distance, kind="stable")
    gaps = np.diff(distance[order])
    if not gaps.size:
        return
    names = [series.files[i].name for i in order]
    same = np.flatnonzero(gaps < SAME_POSITION_MM)
    if same.size:
        i = int(same[0])
        raise DataError(f"{series.where}: {names[i]} and {names[i + 1]} are at the same position "
                        f"({distance[order][i]:.3f} mm along the slice normal): duplicate slices")
    step = float(np.median(gaps))
    off = np.flatnonzero(np.abs(gaps - step) > SPACING_RTOL * step)
    if off.size:
        i = int(off[0])
        ratio = gaps[i] / step
        pair = f"{names[i]} and {names[i + 1]}"
        if round(ratio) >= 2 and abs(ratio - round(ratio)) <= SPACING_RTOL:
            raise DataError(f"{series.where}: {round(ratio) - 1} slice(s) missing between {pair} (gap "
                            f"{gaps[i]:.3f} mm, slice spacing {step:.3f} mm)")
        raise DataError(f"{series.where}: uneven slice spacing: {pair} are {gaps[i]:.3f} mm apart, the other "
                        f"slices {step:.3f} mm")


def _assemble(datasets: list[Dataset], series: Series) -> hd.Volume:
    import highdicom as hd

    try:
        return hd.get_volume_from_series(datasets, dtype=np.float32)
    except Exception as exc:  # highdicom's geometry checks and pixel decoders
        raise _assembly_error(datasets, series, exc) from None


def _assembly_error(datasets: list[Dataset], series: Series, exc: Exception) -> DataError:
    """Name the slice whose pixel data fails to decode, else the series and highdicom's reason."""
    for ds, path in zip(datasets, series.files):
        try:
            ds.pixel_array  # noqa: B018 (decodes)
        except Exception as decode_error:  # pydicom's decoders raise many kinds
            return DataError(f"{path}: pixel data cannot be decoded ({decode_error})")
    return DataError(f"{series.where}: the slices do not form a regular volume ({exc})")


def _multiframe(path: Path) -> hd.Volume:
    import highdicom as hd

    try:
        return hd.imread(path).get_volume(dtype=np.float32)
    except Exception as exc:  # highdicom's geometry checks and pixel decoders
        raise DataError(f"{path}: multi-frame image without a regular 3-D geometry, or undecodable ({exc})") from None


def source_series(case: dict[str, Any]) -> list[str]:
    """The Series Instance UIDs a case comes from: its image series first, then its label's own
    series (a SEG's or an RTSTRUCT's, or a DICOM label image's); [] for a NIfTI case. ``case`` is
    a case as :func:`fl.learn.data.read_datalist` gives it, or as converted for the bundle (whose
    cache entry's sidecar holds them). The UIDs are the hospital's: they never leave the node."""
    if IMAGE_SOURCE_KEY in case:
        sidecar = Path(case["image"]).parent / SIDECAR
        try:
            return list(json.loads(sidecar.read_text(encoding="utf-8"))["series"])
        except (OSError, ValueError, KeyError) as exc:
            raise DataError(f"{sidecar}: unreadable ({exc}); load the node's data again to convert "
                            f"{case[IMAGE_SOURCE_KEY]} anew") from None
    uids: list[str] = []
    for key in ("image", "label"):
        value = case.get(key)
        first = _first_file(value)
        ds = header(first, force=isinstance(value, RtLabel)) if first is not None else None
        uid = str(ds.get("SeriesInstanceUID", "")) if ds is not None else ""
        if uid and uid not in uids:
            uids.append(uid)
    return uids


def _first_file(value: Any) -> Path | None:
    if isinstance(value, Series):
        return value.files[0]
    if isinstance(value, (SegLabel, RtLabel)):
        return value.path
    if isinstance(value, (str, Path)):
        return Path(value)
    return None  # a list of modality files: NIfTI or single DICOM files that MONAI reads
