"""A case's DICOM label (a SEG or an RTSTRUCT) as class indices on its image series' grid.

The mapping from the label's segments or ROIs to the bundle's classes is resolved first
(:func:`mapping`; the bundle's ``channel_def`` names the classes), from the label's header alone.
Then the label must refer to the image's series (a SEG's ReferencedSeriesSequence, an RTSTRUCT's
ReferencedFrameOfReferenceSequence) and frame of reference.

- SEG: highdicom reads the segments (``omit_empty_frames`` SEGs hold only some slices) and lays
  them on the series' grid (:meth:`highdicom.Volume.match_geometry`: no resampling; frames off the
  series' slices are an error). Binary segments are taken as they are, fractional ones at 0.5.
- RTSTRUCT: each closed planar contour goes from patient coordinates to (slice, row, column)
  through the inverse of the volume's affine; it must lie on one slice. A pixel is inside when its
  centre is inside the polygon or on its edge (scikit-image's ``polygon``); contours on one slice
  combine even-odd, so a contour inside another cuts a hole.

Where classes overlap the highest class index wins (an organ's lesion, of a higher index than the
organ, stays on top of it whatever the order of the mapping).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fl.errors import DataError
from fl.learn.dicom import RTSTRUCT_CLASS, SEG_CLASSES, RtLabel, SegLabel, header

if TYPE_CHECKING:
    import highdicom as hd
    from pydicom import Dataset

Mapping = list[tuple[str, int]]  # (segment label or ROI name, class index)
ON_SLICE = 0.1  # a contour lies on a slice when within this fraction of the spacing of its centre
VERTEX_DECIMALS = 3  # vertices at pixel centres stay there despite float noise in the affine


def mapping(label: SegLabel | RtLabel, label_index: Callable[[str], int]) -> Mapping:
    """The label's segments or ROIs and the class each one paints; raises :class:`DataError` for
    a name the label does not hold or a class the bundle does not have."""
    if isinstance(label, SegLabel):
        present = _segment_names(label.path)
        pairs = list(label.segments) if label.segments is not None else None
        kind = "segment"
    else:
        present = _roi_names(_read_rtstruct(label.path))
        pairs, kind = list(label.rois), "ROI"
    if pairs is None:
        return [(name, _automatic(label.path, name, label_index)) for name in present]
    out = []
    for name, target in pairs:
        if name not in present:
            raise DataError(f"{label.path}: {kind} {name!r} not found; it holds {', '.join(map(repr, present))}")
        try:
            out.append((name, label_index(target)))
        except DataError as exc:
            raise DataError(f"{label.path}: {kind} {name!r}: {exc}") from None
    return out


def _automatic(path: Path, name: str, label_index: Callable[[str], int]) -> int:
    try:
        return label_index(name)
    except DataError as exc:
        raise DataError(f"{path}: segment {name!r}: {exc}; map the SEG's segments in dataset.json "
                        f"({{\"seg\": ..., \"segments\": {{\"{name}\": \"<bundle label>\"}}}})") from None


def _segment_names(path: Path) -> list[str]:
    ds = header(path)
    if ds is None or str(ds.get("SOPClassUID", "")) not in SEG_CLASSES:
        found = "not a DICOM file" if ds is None else f"SOP class {ds.get('SOPClassUID')}"
        raise DataError(f"{path}: not a DICOM SEG ({found})")
    names = [str(item.get("SegmentLabel", "")) for item in ds.get("SegmentSequence", [])]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise DataError(f"{path}: segment label(s) {', '.join(map(repr, repeated))} name several segments")
    return names


def _read_rtstruct(path: Path) -> Dataset:
    ds = header(path, force=True)
    if ds is None or str(ds.get("SOPClassUID", "")) != RTSTRUCT_CLASS:
        found = "not a DICOM file" if ds is None else f"SOP class {ds.get('SOPClassUID', 'none')}"
        raise DataError(f"{path}: not an RTSTRUCT ({found})")
    return ds


def _roi_names(ds: Dataset) -> list[str]:
    return [str(item.get("ROIName", "")) for item in ds.get("StructureSetROISequence", [])]


def seg_labels(label: SegLabel, volume: hd.Volume, series_uid: str, pairs: Mapping) -> tuple[np.ndarray, str]:
    """The SEG's classes on ``volume``'s grid (uint8, ``volume``'s shape) and the SEG's own series UID."""
    import highdicom as hd

    try:
        seg = hd.seg.segread(label.path)
    except Exception as exc:  # highdicom rejects a malformed SEG in many ways
        raise DataError(f"{label.path}: unreadable DICOM SEG ({exc})") from None
    referenced = [str(item.SeriesInstanceUID) for item in seg.get("ReferencedSeriesSequence", [])]
    if series_uid not in referenced:
        raise DataError(f"{label.path}: the SEG references another series ({', '.join(referenced) or 'none'}), "
                        f"not the case's image series {series_uid}")
    _check_frame_of_reference(label.path, "SEG", [str(seg.get("FrameOfReferenceUID", ""))], volume)
    numbers = {seg.get_segment_description(n).SegmentLabel: n for n in seg.segment_numbers}
    try:
        channels = seg.get_volume(segment_numbers=[numbers[name] for name, _ in pairs], combine_segments=False)
        on_grid = channels.match_geometry(volume)
    except Exception as exc:  # highdicom: frames off the series' slices, or no volume geometry
        raise DataError(f"{label.path}: the SEG's frames do not lie on the image series' slices ({exc})") from None
    out = np.zeros(volume.spatial_shape, np.uint8)
    for j in _painting_order(pairs):
        out[on_grid.array[..., j] >= 0.5] = pairs[j][1]
    return out, str(seg.SeriesInstanceUID)


def _painting_order(pairs: Mapping) -> list[int]:
    """Positions in ``pairs`` by class index, so that the highest is painted last."""
    return sorted(range(len(pairs)), key=lambda j: pairs[j][1])


def rtstruct_labels(label: RtLabel, volume: hd.Volume, series_uid: str, pairs: Mapping) -> tuple[np.ndarray, str]:
    """The RTSTRUCT's ROIs rasterised on ``volume``'s grid (uint8) and the RTSTRUCT's own series UID."""
    ds = _read_rtstruct(label.path)
    frames = [str(item.get("FrameOfReferenceUID", "")) for item in ds.get("ReferencedFrameOfReferenceSequence", [])]
    _check_frame_of_reference(label.path, "RTSTRUCT", frames, volume)
    referenced = [str(series.SeriesInstanceUID)
                  for ref in ds.get("ReferencedFrameOfReferenceSequence", [])
                  for study in ref.get("RTReferencedStudySequence", [])
                  for series in study.get("RTReferencedSeriesSequence", [])]
    if referenced and series_uid not in referenced:
        raise DataError(f"{label.path}: the RTSTRUCT references another series ({', '.join(referenced)}), not the "
                        f"case's image series {series_uid}")
    numbers = {str(item.ROIName): int(item.ROINumber) for item in ds.get("StructureSetROISequence", [])}
    contours = {int(item.ReferencedROINumber): list(item.get("ContourSequence", []))
                for item in ds.get("ROIContourSequence", [])}
    inverse = np.linalg.inv(volume.affine)
    out = np.zeros(volume.spatial_shape, np.uint8)
    for j in _painting_order(pairs):
        name, index = pairs[j]
        out[roi_mask(contours.get(numbers[name], []), inverse, volume.spatial_shape,
                     where=f"{label.path}: ROI {name!r}")] = index
    return out, str(ds.get("SeriesInstanceUID", ""))


def _check_frame_of_reference(path: Path, kind: str, frames: list[str], volume: hd.Volume) -> None:
    if volume.frame_of_reference_uid not in frames:
        raise DataError(f"{path}: the {kind} is on another frame of reference ({', '.join(f for f in frames if f) or 'none'}) than "
                        f"the case's image series ({volume.frame_of_reference_uid})")


def roi_mask(contours: list[Dataset], inverse: np.ndarray, shape: tuple[int, int, int], *, where: str) -> np.ndarray:
    """One ROI's closed planar contours as a boolean mask of ``shape`` (slices, rows, columns),
    empty for an ROI without contours; ``inverse`` maps patient coordinates (LPS, mm) to those
    indices."""
    from skimage.draw import polygon2mask

    closed = [c for c in contours if str(c.get("ContourGeometricType", "")) == "CLOSED_PLANAR"]
    if contours and not closed:  # an ROI without contours is empty in this case; points are no area
        kinds = sorted({str(c.get("ContourGeometricType", "")) for c in contours})
        raise DataError(f"{where}: no closed planar contour (contour types: {', '.join(kinds)})")
    mask = np.zeros(shape, bool)
    for number, contour in enumerate(closed, start=1):
        data = np.asarray(contour.get("ContourData", []), float)
        if data.size < 9 or data.size % 3:
            raise DataError(f"{where}, contour {number}: {data.size} coordinates, not a polygon of (x, y, z) points")
        points = data.reshape(-1, 3)
        index = (inverse @ np.c_[points, np.ones(len(points))].T).T[:, :3]
        k = _slice_of(index[:, 0], shape[0], where=f"{where}, contour {number}")
        mask[k] ^= polygon2mask(shape[1:], np.round(index[:, 1:], VERTEX_DECIMALS))
    return mask


def _slice_of(positions: np.ndarray, slices: int, *, where: str) -> int:
    k = int(np.round(positions.mean()))
    if not 0 <= k < slices:
        raise DataError(f"{where}: lies off every slice of the image series (at slice index "
                        f"{positions.mean():.2f}; the series has slices 0..{slices - 1})")
    if np.abs(positions - k).max() > ON_SLICE:
        raise DataError(f"{where}: lies between slices (at slice index {positions.mean():.2f}) or is not planar")
    return k
