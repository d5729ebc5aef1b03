"""The de-identification check ``fl node check`` runs on a node's DICOM files; nothing is sent.

Every DICOM file reached from ``dataset.json`` (any string under a case that names a file or a
folder of files: an image, a series folder, ``{"series": [...]}``, a SEG or RTSTRUCT label) and
every other DICOM file in the data folder is read, headers only, and checked for:

* attributes of PS3.15 Table E.1-1 (:mod:`nodes.deid_profile`) that still carry a value, less
  those the options declared in ``dataset.json`` keep
  (``"deidentification": {"options": [...], "uid_roots": [...]}``);
* private attributes;
* burned-in annotation (:func:`burned_in`; the only check that reads pixels);
* UIDs still the scanner's: not in a re-generated form (UUID-derived ``2.25.``, dicognito's) nor
  under a root the provider declares, unless ``retain_uids``;
* a case whose files disagree on PatientID, PatientName or StudyInstanceUID;
* PatientIdentityRemoved not YES, or no DeidentificationMethod (nor its code sequence);
* a file path that names its own patient or UIDs (de-identification keeps the folder layout).

Findings name files and attributes, never their values.
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence

from fl.errors import DataError
from fl.learn.synth import DATASET_JSON
from nodes.deid_profile import (
    CAPTURE_MODALITIES,
    CAPTURE_SOP_CLASSES,
    CAPTURE_SOP_PREFIXES,
    FILE_META,
    NO_PICTURE_SOP_CLASSES,
    OPTIONS,
    PROFILE,
    UID_FORMS,
    UID_KEYWORDS,
    UID_ROOT,
)
from nodes.policy import STATE_DIR

SECTION = "deidentification"  # the key of dataset.json that declares the options
DATE_VRS = frozenset({"DA", "DT", "TM"})
IDENTITY_KEYWORDS = ("PatientID", "PatientName", "StudyInstanceUID")

ATTRIBUTE, PRIVATE, BURNED_IN, SCANNER_UID = "attribute", "private_tag", "burned_in", "scanner_uid"
IDENTITY, NOT_MARKED = "identity_mismatch", "not_marked"
DATES, PATH = "dates_not_modified", "identifier_in_path"
_LABELS = {ATTRIBUTE: "{}", PRIVATE: "private tags", BURNED_IN: "burned-in annotation: {}",
           SCANNER_UID: "scanner UIDs ({})", IDENTITY: "{} differs within its case", NOT_MARKED: "{}",
           DATES: "dates kept but LongitudinalTemporalInformationModified is not MODIFIED",
           PATH: "file path holds its {}"}


@dataclass(frozen=True, order=True)
class Finding:
    """One thing a DICOM file still identifies: a kind (for the summary) and what, by name."""

    kind: str
    detail: str = ""

    def __str__(self) -> str:
        return _LABELS[self.kind].format(self.detail)


@dataclass(frozen=True)
class DeidOptions:
    """The PS3.15 options and UID roots a provider declares in ``dataset.json``."""

    options: tuple[str, ...] = ()
    uid_roots: tuple[str, ...] = ()

    @classmethod
    def from_manifest(cls, manifest: Any, where: Path) -> DeidOptions:
        section = manifest.get(SECTION) if isinstance(manifest, dict) else None
        if section is None:
            return cls()
        if not isinstance(section, dict) or set(section) - {"options", "uid_roots"}:
            raise DataError(f"{where}: '{SECTION}' must be an object with only 'options' and 'uid_roots' "
                            f"lists")
        options, roots = section.get("options", []), section.get("uid_roots", [])
        if not (isinstance(options, list) and all(isinstance(o, str) for o in options)):
            raise DataError(f"{where}: {SECTION}.options must be a list of option names")
        for name in options:
            if name not in OPTIONS:
                raise DataError(f"{where}: unknown de-identification option {name!r}; known: "
                                f"{', '.join(sorted(OPTIONS))}")
        if {"retain_longitudinal_full_dates", "retain_longitudinal_modified_dates"} <= set(options):
            raise DataError(f"{where}: declare one of retain_longitudinal_full_dates and "
                            f"retain_longitudinal_modified_dates, not both")
        if not (isinstance(roots, list)
                and all(isinstance(r, str) and UID_ROOT.fullmatch(r) and len(r) <= 55 for r in roots)):
            raise DataError(f"{where}: {SECTION}.uid_roots must be a list of UID roots (digits and dots, "
                            f"at most 55 characters), such as \"1.2.826.0.1.3680043.10.99\"")
        return cls(tuple(sorted(set(options))), tuple(sorted(set(roots))))

    @property
    def keeps(self) -> frozenset[str]:
        """The option groups of Table E.1-1 the declared options keep."""
        return frozenset(OPTIONS[name].keeps for name in self.options)

    def regenerated(self, uid: str) -> bool:
        """Whether ``uid`` is a re-generated one: a form of :data:`UID_FORMS` or a declared root's."""
        return (any(form.fullmatch(uid) for form in UID_FORMS)
                or any(uid.startswith(root + ".") for root in self.uid_roots))


# ----- one file's header -------------------------------------------------------------------------
def _empty(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, Sequence):
        return len(value) == 0
    if isinstance(value, (MultiValue, list, tuple)):
        return all(_empty(v) for v in value)
    if isinstance(value, bytes):
        return not value.strip(b"\0 ")
    return not str(value).strip("\0 ")


def element_values(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (MultiValue, list, tuple)) else [value]


def keyword(element: Any) -> str:
    """An element's keyword; for the repeating curve (50xx) and overlay (60xx) groups, the name the
    profile gives them."""
    group, number = element.tag.group, element.tag.element
    if 0x5000 <= group <= 0x50FF and group % 2 == 0:
        return "CurveData"
    if 0x6000 <= group <= 0x60FF and group % 2 == 0 and number in (0x3000, 0x4000):
        return "OverlayData" if number == 0x3000 else "OverlayComments"
    return str(element.keyword)


def identity_removed(ds: Any) -> bool:
    return str(ds.get("PatientIdentityRemoved", "")).strip().upper() == "YES"


def profile_attributes(ds: Any, options: DeidOptions = DeidOptions(), *,
                       removed: bool | None = None) -> list[str]:
    """Keywords of Table E.1-1 attributes (at any depth; and of :data:`FILE_META`) that still carry
    a value the profile and the declared options do not allow, the patient module's first, then in
    tag order.

    Under PatientIdentityRemoved YES a Z or D attribute may hold a dummy value, except a date or
    time: nobody can tell a dummy date from the real one, so one is kept only under a
    retain_longitudinal option."""
    removed = identity_removed(ds) if removed is None else removed
    keeps, found = options.keeps, {}
    meta = getattr(ds, "file_meta", None)
    for element in [*(meta if meta is not None else ()), *ds.iterall()]:
        name = keyword(element)
        rule = FILE_META.get(name) if element.tag.group == 0x0002 else PROFILE.get(name)
        if rule is None or name in found or _empty(element.value) or rule.kept_by & keeps:
            continue
        if removed and rule.allows_dummy and element.VR not in DATE_VRS:
            continue
        found[name] = element.tag
    return sorted(found, key=lambda k: (found[k].group != 0x0010, found[k]))


def scanner_uids(ds: Any, options: DeidOptions) -> list[str]:
    """Keywords of UID attributes (file meta included) whose value is not a re-generated one."""
    if "uids" in options.keeps:
        return []
    meta = getattr(ds, "file_meta", None)
    found = set()
    for element in [*(meta.iterall() if meta is not None else ()), *ds.iterall()]:
        if (element.keyword in UID_KEYWORDS and element.VR == "UI" and not _empty(element.value)
                and any(str(v) and not options.regenerated(str(v)) for v in element_values(element.value))):
            found.add(element.keyword)
    return sorted(found)


def _keeps_dates(ds: Any) -> bool:
    return any(not _empty(e.value) and (rule := PROFILE.get(e.keyword)) and "dates" in rule.kept_by
               for e in ds.iterall())


def path_identifiers(ds: Any, relative: str) -> list[str]:
    """Keywords of this file's identifiers that its path (relative to the data folder) spells out:
    PatientID or a part of PatientName as a whole word, or one of its instance UIDs."""
    words = {w.lower() for w in re.split(r"[^0-9A-Za-z]+", relative) if w}
    found = []
    patient_id = str(ds.get("PatientID", "")).strip().lower()
    if len(patient_id) >= 3 and (patient_id in words or re.sub(r"[^0-9a-z]", "", patient_id) in words):
        found.append("PatientID")
    name_parts = {p.lower() for p in re.split(r"[\^ ,=]+", str(ds.get("PatientName", ""))) if len(p) >= 2}
    if name_parts & words:
        found.append("PatientName")
    found += [k for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
              if len(uid := str(ds.get(k, ""))) >= 8 and uid in relative]
    return found


def header_findings(ds: Any, options: DeidOptions, relative: str | None = None) -> list[Finding]:
    """What one header still holds (burned-in annotation aside: :func:`burned_in`)."""
    removed = identity_removed(ds)
    found = [Finding(ATTRIBUTE, k) for k in profile_attributes(ds, options, removed=removed)]
    if any(element.tag.is_private for element in ds.iterall()):
        found.append(Finding(PRIVATE))
    if uids := scanner_uids(ds, options):
        found.append(Finding(SCANNER_UID, ", ".join(uids)))
    if ("retain_longitudinal_modified_dates" in options.options and _keeps_dates(ds)
            and str(ds.get("LongitudinalTemporalInformationModified", "")).upper() != "MODIFIED"):
        found.append(Finding(DATES))
    if not removed:
        found.append(Finding(NOT_MARKED, "PatientIdentityRemoved is not YES"))
    if _empty(ds.get("DeidentificationMethod")) and _empty(ds.get("DeidentificationMethodCodeSequence")):
        found.append(Finding(NOT_MARKED, "no DeidentificationMethod"))
    if relative is not None:
        found += [Finding(PATH, k) for k in path_identifiers(ds, relative)]
    return found


# ----- burned-in annotation ----------------------------------------------------------------------
BORDER = 0.05  # the band: this fraction of rows at the top and bottom, of columns left and right
STROKE = 5  # the opening's square: bright structures narrower than this many pixels are strokes
CONTRAST, LEVEL = 0.5, 0.6  # of the frame's range: a stroke's height above its opening, its own level
MIN_PIXELS, MIN_FRACTION = 20, 0.001  # text-like pixels in the band that flag the frame


def _filter(frame: np.ndarray, size: int, reduce: np.ufunc) -> np.ndarray:
    """Grey-level erosion (``np.minimum``) or dilation (``np.maximum``) by a ``size`` x ``size``
    square, separably: along rows, then along columns."""
    pad, (rows, cols) = size // 2, frame.shape
    padded = np.pad(frame, pad, mode="edge")
    along_rows = reduce.reduce([padded[:, i:i + cols] for i in range(size)])
    return reduce.reduce([along_rows[i:i + rows] for i in range(size)])


def _text_like(strip: np.ndarray, low: float, high: float) -> np.ndarray:
    opening = _filter(_filter(strip, STROKE, np.minimum), STROKE, np.maximum)
    return (strip - opening >= CONTRAST * (high - low)) & (strip >= low + LEVEL * (high - low))


def text_like_border_pixels(frame: np.ndarray) -> tuple[int, int]:
    """(text-like pixels in the frame's border band, pixels in the band); see :func:`looks_burned_in`.
    Only the band and the few pixels its opening reaches are filtered."""
    frame = np.asarray(frame, dtype=np.float32)
    low, high = float(frame.min()), float(frame.max())
    rows, cols = frame.shape
    br, bc = max(1, int(np.ceil(BORDER * rows))), max(1, int(np.ceil(BORDER * cols)))
    band = rows * cols - max(0, rows - 2 * br) * max(0, cols - 2 * bc)
    if not high > low:
        return 0, band
    reach = 2 * (STROKE // 2)  # the opening reads this far from a pixel
    if rows <= 2 * (br + reach) or cols <= 2 * (bc + reach):
        text = _text_like(frame, low, high)
        text[br:rows - br, bc:cols - bc] = False
        return int(text.sum()), band
    top = _text_like(frame[:br + reach], low, high)[:br]
    bottom = _text_like(frame[rows - br - reach:], low, high)[-br:]
    left = _text_like(frame[:, :bc + reach], low, high)[br:rows - br, :bc]
    right = _text_like(frame[:, cols - bc - reach:], low, high)[br:rows - br, -bc:]
    return int(top.sum() + bottom.sum() + left.sum() + right.sum()), band


def looks_burned_in(frame: np.ndarray) -> bool:
    """Whether a 2-D frame may carry burned-in text in its border: a screen, kept conservative.

    Scanners and viewers burn text (names, dates, IDs) into the margins of the picture as thin
    bright strokes, one to four pixels wide, at or near the brightest value, over the dark
    background around the body. A pixel is text-like when the white top-hat of the frame (the
    frame minus its grey-level opening by a 5x5 square, which keeps only bright structures
    narrower than 5 pixels) is at least half the frame's range, and the pixel itself lies in the
    upper 40% of that range. The band is the outer 5% of rows and of columns (one pixel at
    least). The frame is flagged when the band holds at least 20 text-like pixels and at least
    0.1% of its pixels are: two or three characters of a small font.

    A CT or MR slice of a body passes: its margins are air, the body's edge is broad rather than
    thin, the CT table is far below the brightest value and thin bright anatomy (cortical bone,
    vessels with contrast) seldom reaches the band. The screen does not look for dark text on a
    bright background, nor for text inside the picture: objects that are captures (ultrasound,
    secondary capture, photographs) are never cleared by it, only by an operator's review
    recorded as BurnedInAnnotation NO."""
    count, band = text_like_border_pixels(frame)
    return count >= max(MIN_PIXELS, MIN_FRACTION * band)


def _frames(ds: Any) -> np.ndarray:
    pixels = np.asarray(ds.pixel_array)
    if int(ds.get("SamplesPerPixel", 1)) > 1:
        pixels = pixels.max(axis=-1)  # the brightest channel: text is bright in some channel
    pixels = pixels.reshape(-1, *pixels.shape[-2:])
    if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        pixels = pixels.max() - pixels
    return pixels


def burned_in(ds: Any, with_pixels: Callable[[], Any]) -> Finding | None:
    """Burned-in annotation a header declares, or that its pixels may hold. ``with_pixels`` reads
    the full dataset; it is called only when BurnedInAnnotation is absent (or neither YES nor NO)
    and the object is a picture that is not a capture."""
    declared = str(ds.get("BurnedInAnnotation", "")).strip().upper()
    if declared == "YES":
        return Finding(BURNED_IN, "BurnedInAnnotation is YES")
    if declared == "NO":
        return None
    meta = getattr(ds, "file_meta", None)
    sop_class = str(ds.get("SOPClassUID", "") or getattr(meta, "MediaStorageSOPClassUID", ""))
    if (sop_class in CAPTURE_SOP_CLASSES or sop_class.startswith(CAPTURE_SOP_PREFIXES)
            or str(ds.get("Modality", "")).upper() in CAPTURE_MODALITIES):
        return Finding(BURNED_IN, "a capture (ultrasound, secondary capture, photograph) not marked "
                                  "BurnedInAnnotation NO")
    if sop_class in NO_PICTURE_SOP_CLASSES:
        return None
    try:
        full = with_pixels()
        if "PixelData" not in full and "FloatPixelData" not in full and "DoubleFloatPixelData" not in full:
            return None
        frames = _frames(full)
    except Exception:  # noqa: BLE001 - a codec missing here, damaged pixel data: unsure, so flagged
        return Finding(BURNED_IN, "pixel data not decodable here")
    if any(looks_burned_in(frame) for frame in frames):
        return Finding(BURNED_IN, "text-like pixels in the image border")
    return None


# ----- the files dataset.json reaches ------------------------------------------------------------
_NOT_DICOM = (".nii", ".nii.gz", ".json", ".jsonl", ".gz", ".npy", ".npz", ".csv", ".txt", ".md", ".png",
              ".jpg", ".jpeg", ".mha", ".nrrd", ".h5", ".pt", ".safetensors")
_UID = re.compile(r"[0-9]+(\.[0-9]+)+")


def is_dicom(path: Path) -> bool:
    """A ``.dcm`` file, a Part 10 file (``DICM`` after the preamble), or a bare data set with no
    preamble and any name (as some exports write them) that holds a SOP Class UID: such a file is
    checked and de-identified like the others, never copied as it is."""
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with path.open("rb") as fh:
            fh.seek(128)
            if fh.read(4) == b"DICM":
                return True
    except OSError:
        return False
    if path.name.lower().endswith(_NOT_DICOM):
        return False
    import pydicom

    try:
        ds = pydicom.dcmread(path, force=True, stop_before_pixels=True, specific_tags=["SOPClassUID"])
        return bool(_UID.fullmatch(str(ds.get("SOPClassUID", "")).strip()))
    except Exception:  # noqa: BLE001 - whatever pydicom raises on a file that is not DICOM
        return False


def read_manifest(data_dir: Path) -> Any:
    """``dataset.json`` parsed, or None where it is missing or unreadable (the data loader names
    that problem)."""
    try:
        return json.loads((data_dir / DATASET_JSON).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def _reached(data_dir: Path, text: str) -> list[Path]:
    """The files a string of dataset.json names: a file, or the files of a folder (recursively)."""
    if not text.strip() or "\0" in text:
        return []
    try:
        path = (data_dir / text).resolve()
        if path == data_dir or path in data_dir.parents:
            return []  # "." or "..": a whole tree is no case's series
        if path.is_file():
            return [path]
        if path.is_dir():
            return sorted(p for p in path.rglob("*") if p.is_file() and STATE_DIR not in p.parts)
    except OSError:
        pass
    return []


def listed_cases(data_dir: Path, manifest: Any) -> dict[str, list[Path]]:
    """Every case of dataset.json (each item of a top-level list, e.g. ``training[3]``) with the
    files its string values reach, walked tolerantly: whatever form an image or label takes."""
    cases: dict[str, list[Path]] = {}
    if not isinstance(manifest, dict):
        return cases
    for key, items in manifest.items():
        if key == SECTION or not isinstance(items, list):
            continue
        for index, item in enumerate(items):
            files = [p for text in _strings(item) for p in _reached(data_dir, text)]
            cases[f"{key}[{index}]"] = list(dict.fromkeys(files))
    return cases


def read_dicom(path: Path, *, pixels: bool = False) -> Any:
    """A DICOM file's dataset: its header alone unless ``pixels``. A file without preamble is read
    too (``force``); one with no data element at all is refused, naming the file."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=not pixels, force=True)
    except Exception as exc:  # noqa: BLE001 - pydicom raises several types for a damaged file
        raise DataError(f"{path}: unreadable DICOM header ({exc})") from None
    if len(ds) == 0:
        raise DataError(f"{path}: not a DICOM file (no data element could be read)")
    if "TransferSyntaxUID" not in ds.file_meta:  # a bare data set: its encoding is the one it was read in
        from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

        implicit, little = ds.original_encoding
        ds.file_meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
                                          if little else ExplicitVRBigEndian)
    return ds


# ----- the whole dataset -------------------------------------------------------------------------
@dataclass(frozen=True)
class Mismatch:
    """A case whose files disagree on identity attributes: the files, one group per value."""

    case: str
    keywords: tuple[str, ...]
    groups: tuple[tuple[Path, ...], ...]


@dataclass
class DeidScan:
    """Every DICOM file checked (in order) with its findings, its series, and the cases whose
    files disagree on who the patient is."""

    data_dir: Path
    options: DeidOptions
    findings: dict[Path, list[Finding]] = field(default_factory=dict)
    series: dict[Path, str] = field(default_factory=dict)
    mismatches: list[Mismatch] = field(default_factory=list)

    @property
    def flagged(self) -> dict[Path, list[Finding]]:
        return {path: found for path, found in self.findings.items() if found}

    def relative(self, path: Path) -> str:
        return path.relative_to(self.data_dir).as_posix() if path.is_relative_to(self.data_dir) else str(path)

    def by_kind(self) -> Counter[str]:
        """Files with at least one finding of each kind."""
        return Counter(kind for found in self.findings.values() for kind in {f.kind for f in found})

    def groups(self) -> list[tuple[list[Path], Counter[str]]]:
        """Per series with a finding: its files and, per finding, how many of them have it."""
        members: dict[str, list[Path]] = defaultdict(list)
        for path in self.findings:
            members[self.series[path]].append(path)
        return [(files, Counter(str(f) for p in files for f in dict.fromkeys(self.findings[p])))
                for files in members.values() if any(self.findings[p] for p in files)]

    def lines(self, limit: int = 10) -> list[str]:
        """One line per series with a finding, then one per case whose files disagree."""
        out = []
        for files, counts in self.groups():
            where = self.relative(files[0]) + (f" and {len(files) - 1} more file(s) of its series"
                                               if len(files) > 1 else "")
            what = ", ".join(label + (f" ({n}/{len(files)})" if n < len(files) else "")
                             for label, n in counts.items())
            out.append(f"  {where}: {what}")
        for m in self.mismatches:
            sides = " | ".join(", ".join(self.relative(p) for p in files[:3])
                               + (f" +{len(files) - 3}" if len(files) > 3 else "") for files in m.groups)
            out.append(f"  {m.case}: {', '.join(m.keywords)} differ(s) between its files: {sides}")
        return out[:limit] + ([f"  ... and {len(out) - limit} more"] if len(out) > limit else [])

    def summary(self) -> str:
        kinds = ", ".join(f"{kind} {n}" for kind, n in sorted(self.by_kind().items())) or "nothing found"
        return (f"{len(self.findings)} DICOM file(s) in {len(set(self.series.values()))} series checked "
                f"(options: {', '.join(self.options.options) or 'none'}); files with findings: {kinds}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "options": list(self.options.options), "uid_roots": list(self.options.uid_roots),
            "files": len(self.findings), "series": len(set(self.series.values())),
            "findings_by_kind": dict(sorted(self.by_kind().items())),
            "series_with_findings": [{"files": [self.relative(p) for p in files], "findings": dict(counts)}
                                     for files, counts in self.groups()],
            "case_mismatches": [{"case": m.case, "attributes": list(m.keywords),
                                 "files": [[self.relative(p) for p in files] for files in m.groups]}
                                for m in self.mismatches],
        }


def _mismatches(cases: dict[str, list[Path]], identity: dict[Path, dict[str, str]]) -> list[Mismatch]:
    found = []
    for case, files in cases.items():
        split: dict[tuple[tuple[Path, ...], ...], list[str]] = defaultdict(list)
        for keyword in IDENTITY_KEYWORDS:
            by_value: dict[str, list[Path]] = defaultdict(list)
            for path in files:
                by_value[identity[path][keyword]].append(path)
            if len(by_value) > 1:
                split[tuple(tuple(group) for group in by_value.values())].append(keyword)
        found += [Mismatch(case, tuple(keywords), groups) for groups, keywords in split.items()]
    return found


def scan(data_dir: Path) -> DeidScan:
    """Check every DICOM file ``dataset.json`` reaches under ``data_dir``, and every other DICOM
    file there (the node's state folder aside), against the declared options."""
    data_dir = data_dir.resolve()
    manifest = read_manifest(data_dir)
    result = DeidScan(data_dir, DeidOptions.from_manifest(manifest, data_dir / DATASET_JSON))
    cases = {case: [p for p in files if is_dicom(p)]
             for case, files in listed_cases(data_dir, manifest).items()}
    listed = dict.fromkeys(p for files in cases.values() for p in files)
    others = sorted(p for p in data_dir.rglob("*") if p not in listed and p.is_file()
                    and STATE_DIR not in p.relative_to(data_dir).parts and is_dicom(p))
    identity: dict[Path, dict[str, str]] = {}
    for path in [*listed, *others]:
        ds = read_dicom(path)
        identity[path] = {k: str(ds.get(k, "")) for k in IDENTITY_KEYWORDS}
        relative = path.relative_to(data_dir).as_posix() if path.is_relative_to(data_dir) else path.name
        found = header_findings(ds, result.options, relative)
        if (mark := burned_in(ds, lambda path=path: read_dicom(path, pixels=True))) is not None:
            found.append(mark)
        result.findings[path] = found
        result.series[path] = f"{path.parent}|{ds.get('SeriesInstanceUID', '') or path.name}"
    result.mismatches = _mismatches(cases, identity)
    for m in result.mismatches:
        for path in (p for files in m.groups for p in files):
            result.findings[path] += [Finding(IDENTITY, keyword) for keyword in m.keywords]
    return result
