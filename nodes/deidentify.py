"""``fl node deid IN OUT``: a de-identified copy of a node's DICOM data, and a pseudonym map that
never leaves the node.

Every DICOM file under IN goes through one dicognito ``Anonymizer`` per export, seeded from the
node's secret key (HMAC-SHA256 of the key and :data:`SEED_PURPOSE`): names and IDs become
dummies, every instance UID a new one (the same original gives the same new UID, so a SEG's or
RTSTRUCT's references still point at its series), every date shifts back by one offset of 62 to
730 days (the key's, so the same for every export of this node: intervals between studies
survive). Then the PS3.15 basic profile of :mod:`nodes.deid_profile` is applied on top (what
dicognito keeps or replaces but the profile removes: institution, station, free text, private
attributes, and descriptors unless ``keep_descriptors``, which cleans them of the patient's names,
IDs and dates instead: RTSTRUCT ROI names that dataset.json maps to labels need it), and the
object is marked: PatientIdentityRemoved YES, DeidentificationMethod and its code sequence naming
the profile and options, LongitudinalTemporalInformationModified MODIFIED.

An image that may carry burned-in text (:func:`nodes.deid.burned_in`) or whose path spells its
patient or UIDs refuses the whole export, naming the files: leaving them out would break the
cases that list them, and a path is kept as it is so that dataset.json still works. OUT is built
in a staging folder beside it, checked with :func:`nodes.deid.scan` (it must find nothing) and
renamed at the end; on any error nothing is left. ``dataset.json`` is copied with the options
declared, and so are the non-DICOM files it lists (NIfTI labels, say); other files are not.

The pseudonym map (new PatientID and UIDs to the original ones, per export) is appended to
``pseudonyms.jsonl`` in the node's state folder, mode 0600, never inside OUT.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from fl import schema
from fl.errors import DataError
from fl.files import atomic_write
from fl.learn.synth import DATASET_JSON
from fl.privacy.hashchain import locked
from nodes.deid import (
    SECTION,
    DeidOptions,
    burned_in,
    element_values,
    is_dicom,
    keyword,
    listed_cases,
    path_identifiers,
    read_dicom,
    read_manifest,
    scan,
)
from nodes.deid_profile import BASIC_PROFILE_CODE, FILE_META, OPTIONS, PROFILE, UID_KEYWORDS
from nodes.policy import STATE_DIR, node_secret

SEED_PURPOSE = b"oncofed/deidentify/dicognito-seed/v1"
MAP_FILE = "pseudonyms.jsonl"
DATES_OPTION = "retain_longitudinal_modified_dates"  # dicognito shifts every date by one offset
DUMMY = "ANONYMIZED"
# what dicognito replaces by a dummy of its own (besides every PN): these keep it
DICOGNITO_IDS = frozenset({
    "AccessionNumber", "OtherPatientIDs", "FillerOrderNumberImagingServiceRequest",
    "FillerOrderNumberProcedure", "PatientID", "PerformedProcedureStepID",
    "PlacerOrderNumberImagingServiceRequest", "PlacerOrderNumberProcedure", "RequestedProcedureID",
    "ScheduledProcedureStepID", "StationName", "StudyID",
})
TEXT_VRS = frozenset({"AE", "CS", "LO", "LT", "SH", "ST", "UC", "UT"})
STRING_VRS = TEXT_VRS | {"AS", "DA", "DS", "DT", "IS", "PN", "TM", "UI", "UR"}


@dataclass(frozen=True)
class Export:
    """What ``fl node deid`` wrote: counts, the options applied, the files copied or left behind."""

    out: Path
    files: int
    series: int
    patients: int
    options: tuple[str, ...]
    copied: tuple[str, ...]
    skipped: tuple[str, ...]
    map_path: Path

    def lines(self) -> list[str]:
        def some(names: tuple[str, ...]) -> str:
            return ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")

        return [(f"{self.out}: {self.files} DICOM file(s) in {self.series} series of {self.patients} "
                 f"patient(s) de-identified (options: {', '.join(self.options)}); the check finds nothing "
                 f"in them"),
                *([f"  copied as they are (listed in dataset.json): {some(self.copied)}"]
                  if self.copied else []),
                *([f"  not copied (neither DICOM nor listed): {some(self.skipped)}"] if self.skipped else []),
                f"  pseudonym map: {self.map_path} (it stays on this node: never copy it with the data)"]


def anonymizer_seed(state: Path) -> str:
    """The dicognito seed of this node: keyed, so nobody without the node's key can recompute a
    pseudonym from an original ID; fixed, so a rerun gives the same pseudonyms and UIDs."""
    return hmac.new(node_secret(state), SEED_PURPOSE, hashlib.sha256).hexdigest()


# ----- one object ---------------------------------------------------------------------------------
def _identifiers(ds: Dataset) -> tuple[set[str], set[str]]:
    """Words (name parts) and strings (IDs, dates as written) that identify this object's patient,
    to clean descriptors of them."""
    words, strings = set(), set()
    for element in ds.iterall():
        values = element_values(element.value)
        if element.VR == "PN":
            words |= {w.lower() for v in values for w in re.split(r"[\^= ]+", str(v)) if len(w) >= 2}
        elif element.keyword in DICOGNITO_IDS | {"InstitutionName", "MedicalRecordLocator"}:
            strings |= {str(v).strip().lower() for v in values if len(str(v).strip()) >= 3}
        elif element.VR == "DA":
            for v in (str(v) for v in values if len(str(v)) == 8 and str(v).isdigit()):
                y, m, d = v[:4], v[4:6], v[6:]
                strings |= {v, f"{y}-{m}-{d}", f"{d}.{m}.{y}", f"{d}/{m}/{y}", f"{m}/{d}/{y}"}
    return words, strings


def _names(value: Any, identifiers: tuple[set[str], set[str]]) -> bool:
    text = str(value).lower()
    words, strings = identifiers
    return bool(words & set(re.split(r"[^0-9a-z]+", text))) or any(s in text for s in strings)


def _blank(element: Any) -> None:
    element.value = [] if element.VR == "SQ" else "" if element.VR in STRING_VRS else None


def _apply_profile(ds: Dataset, options: DeidOptions, identifiers: tuple[set[str], set[str]]) -> None:
    """The basic profile over dicognito's output, at every depth: X removed, Z blanked, D a dummy,
    dicognito's own dummies (names, IDs) and new UIDs kept, what the options keep kept (a
    descriptor that names the patient blanked)."""
    keeps = options.keeps
    meta = getattr(ds, "file_meta", None)
    for name in FILE_META:
        if meta is not None and name in meta and not FILE_META[name].kept_by & keeps:
            del meta[name]
    for dataset in [ds, *(item for e in ds.iterall() if e.VR == "SQ" for item in e.value)]:
        for element in list(dataset):
            name = keyword(element)
            if name in UID_KEYWORDS and element.VR == "UI" and not element.is_empty and not all(
                    options.regenerated(str(v)) for v in element_values(element.value)):
                del dataset[element.tag]  # a UID dicognito leaves (a *ClassUID the profile replaces)
                continue
            rule = PROFILE.get(name)
            if rule is None or element.tag not in dataset or element.is_empty:
                continue
            actions = set(rule.action.split("/"))
            if rule.kept_by & keeps:
                if ("descriptors" in rule.kept_by and element.VR in TEXT_VRS
                        and _names(element.value, identifiers)):
                    _blank(element)
            elif actions == {"X"}:
                del dataset[element.tag]
            elif "U*" in actions or element.VR == "PN" or name in DICOGNITO_IDS:
                pass  # references with new UIDs; dicognito's dummy names and IDs
            elif "D" in actions and element.VR in TEXT_VRS:
                element.value = DUMMY
            else:
                _blank(element)


def _mark(ds: Dataset, options: DeidOptions) -> None:
    import dicognito

    applied = [BASIC_PROFILE_CODE, *((OPTIONS[o].code, OPTIONS[o].meaning) for o in options.options)]
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = [f"DICOGNITO {dicognito.__version__}", *(meaning for _, meaning in applied)]
    codes = []
    for value, meaning in applied:
        code = Dataset()
        code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = value, "DCM", meaning
        codes.append(code)
    ds.DeidentificationMethodCodeSequence = codes
    if DATES_OPTION in options.options:
        ds.LongitudinalTemporalInformationModified = "MODIFIED"


def _refusal(ds: Dataset, relative: str) -> list[str]:
    why = [str(f) for f in [burned_in(ds, lambda: ds)] if f is not None]
    return why + [f"file path holds its {k}" for k in path_identifiers(ds, relative)]


# ----- the pseudonym map --------------------------------------------------------------------------
class _Pseudonyms:
    """New PatientID to the original, and the new Study and Series UIDs of each patient."""

    def __init__(self) -> None:
        self.patients: dict[str, dict[str, Any]] = {}

    def add(self, original: dict[str, str], ds: Dataset) -> None:
        entry = self.patients.setdefault(original["PatientID"], {
            "patient_id": str(ds.get("PatientID", "")), "original_patient_id": original["PatientID"],
            "studies": {}, "series": {}})
        for kw, key in (("StudyInstanceUID", "studies"), ("SeriesInstanceUID", "series")):
            if original[kw]:
                entry[key][str(ds.get(kw, ""))] = original[kw]

    def records(self, out: Path, options: DeidOptions, when: datetime) -> list[dict[str, Any]]:
        stamp = {**schema.stamp("pseudonym-map"), "exported_at": when.astimezone(UTC).isoformat(timespec="seconds"),
                 "out": str(out), "options": list(options.options)}
        return [{**stamp, **entry} for entry in self.patients.values()]


def _append_map(state: Path, records: list[dict[str, Any]]) -> Path:
    """Append ``records`` to the map, as one atomic replacement of the file (mode 0600)."""
    path = state / MAP_FILE
    state.mkdir(parents=True, exist_ok=True)
    with locked(path):
        old = path.read_bytes() if path.exists() else b""
        atomic_write(path, old + "".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode())
        os.chmod(path, 0o600)
    return path


def lookup(state: Path, pseudonym: str) -> list[dict[str, Any]]:
    """Every record of the map whose new PatientID, Study or Series UID is ``pseudonym``."""
    path = state / MAP_FILE
    if not path.exists():
        raise DataError(f"{path}: no pseudonym map on this node (`fl node deid` writes it)")
    found = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            record = json.loads(line)
        except ValueError:
            raise DataError(f"{path}:{number}: not a JSON record; the map was damaged") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{number}: not a JSON object; the map was damaged")
        schema.check("pseudonym-map", record, f"{path}: line {number}")
        if pseudonym == record.get("patient_id") or pseudonym in record.get("studies", {}) \
                or pseudonym in record.get("series", {}):
            found.append(record)
    return found


def lookup_lines(state: Path, pseudonym: str) -> list[str]:
    """What the map says of ``pseudonym``, one line per export that wrote it."""
    records = lookup(state, pseudonym)
    if not records:
        raise DataError(f"{pseudonym}: not in the pseudonym map {state / MAP_FILE}")
    lines = []
    for r in records:
        if pseudonym == r["patient_id"]:
            kind, original = "PatientID", r["original_patient_id"]
        elif pseudonym in r["studies"]:
            kind, original = "StudyInstanceUID", r["studies"][pseudonym]
        else:
            kind, original = "SeriesInstanceUID", r["series"][pseudonym]
        lines.append(f"{kind} {pseudonym} -> {original} (patient {r['original_patient_id']}; exported "
                     f"{r['exported_at']} to {r['out']}; options: {', '.join(r['options'])})")
    return lines


# ----- the export ---------------------------------------------------------------------------------
def _check_folders(source: Path, out: Path, state: Path) -> None:
    if not source.is_dir():
        raise DataError(f"{source}: not a folder")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out}: exists and is not an empty folder; name a new one")
    if not out.parent.is_dir():
        raise DataError(f"{out.parent}: not found (the folder OUT goes in)")
    if out == source or out.is_relative_to(source) or source.is_relative_to(out):
        raise DataError(f"{out}: must lie outside {source}, and the other way round")
    if state.is_relative_to(out):
        raise DataError(f"{state}: the pseudonym map must stay out of {out}")


def _maps_roi_names(value: Any) -> bool:
    if isinstance(value, dict):
        return "rois" in value or any(_maps_roi_names(v) for v in value.values())
    return isinstance(value, list) and any(_maps_roi_names(v) for v in value)


def deidentify(source: Path, out: Path, *, state: Path, keep_descriptors: bool = False,
               now: datetime | None = None) -> Export:
    """De-identify every DICOM file under ``source`` into the new folder ``out`` (see the module)."""
    source, out, state = source.resolve(), out.resolve(), state.resolve()
    _check_folders(source, out, state)
    options = DeidOptions(tuple(sorted({DATES_OPTION, *(["clean_descriptors"] if keep_descriptors else [])})))
    manifest = _source_manifest(source, keep_descriptors)
    files = sorted(p for p in source.rglob("*")
                   if p.is_file() and STATE_DIR not in p.relative_to(source).parts)
    dicom = [p for p in files if is_dicom(p)]
    if not dicom:
        raise DataError(f"{source}: no DICOM file to de-identify")
    listed = {p for paths in listed_cases(source, manifest).values() for p in paths}
    others = [p for p in files if p not in set(dicom) and p != source / DATASET_JSON]
    copied = [p.relative_to(source) for p in others if p in listed]
    staging = out.parent / f".{out.name}.{secrets.token_hex(6)}.partial"
    staging.mkdir()
    try:
        pseudonyms, series = _write_dicom(source, staging, dicom, options, state)
        _copy_listed(source, staging, copied, manifest, options)
        _verify(staging, out)
        map_path = _append_map(state, pseudonyms.records(out, options, now or datetime.now(UTC)))
        if out.exists():
            out.rmdir()
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Export(out=out, files=len(dicom), series=series, patients=len(pseudonyms.patients),
                  options=options.options, map_path=map_path, copied=tuple(p.as_posix() for p in copied),
                  skipped=tuple(p.relative_to(source).as_posix() for p in others if p not in listed))


def _source_manifest(source: Path, keep_descriptors: bool) -> Any:
    manifest = read_manifest(source)
    if manifest is None and (source / DATASET_JSON).exists():
        raise DataError(f"{source / DATASET_JSON}: not readable JSON")
    if not keep_descriptors and _maps_roi_names(manifest):
        raise DataError(f"{source / DATASET_JSON}: its cases map RTSTRUCT ROI names (\"rois\"), which the basic "
                        f"profile blanks unless descriptors are kept, and those cases would no longer load: pass "
                        f"--keep-descriptors (the Clean Descriptors option: the patient's names, IDs and dates "
                        f"are taken out of descriptions; review what remains)")
    return manifest


def _copy_listed(source: Path, staging: Path, copied: list[Path], manifest: Any, options: DeidOptions) -> None:
    """The non-DICOM files dataset.json lists, as they are, and dataset.json declaring the options."""
    for relative in copied:
        (staging / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source / relative, staging / relative)
    if manifest is not None:
        declared = {**manifest, SECTION: {"options": list(options.options)}}
        (staging / DATASET_JSON).write_text(json.dumps(declared, indent=2) + "\n", encoding="utf-8")


def _verify(staging: Path, out: Path) -> None:
    """The check ``fl node check`` runs, on the copy before it becomes ``out``: it must find nothing."""
    check = scan(staging)
    if check.flagged or check.mismatches:
        raise DataError(f"{out}: the de-identified copy still holds findings, so nothing was written:\n"
                        + "\n".join(check.lines()))


def _write_dicom(source: Path, staging: Path, files: list[Path], options: DeidOptions,
                 state: Path) -> tuple[_Pseudonyms, int]:
    from dicognito.anonymizer import Anonymizer

    anonymizer = Anonymizer(seed=anonymizer_seed(state))
    pseudonyms, refused, series = _Pseudonyms(), [], set()
    for path in files:
        ds = read_dicom(path, pixels=True)
        relative = path.relative_to(source).as_posix()
        if why := _refusal(ds, relative):
            refused.append(f"  {relative}: {', '.join(why)}")
            continue
        original = {k: str(ds.get(k, "")) for k in ("PatientID", "StudyInstanceUID", "SeriesInstanceUID")}
        identifiers = _identifiers(ds)
        anonymizer.anonymize(ds)
        ds.remove_private_tags()
        _apply_profile(ds, options, identifiers)
        _mark(ds, options)
        pseudonyms.add(original, ds)
        series.add(str(ds.get("SeriesInstanceUID", "")) or relative)
        (staging / relative).parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(staging / relative, enforce_file_format=True)
    if refused:
        raise DataError(f"{source}: {len(refused)} DICOM file(s) refused, nothing was written; review each image, "
                        f"then record BurnedInAnnotation NO where it holds no text, or leave the case out "
                        f"(a path naming a patient or a UID must be renamed first):\n"
                        + "\n".join(refused[:10])
                        + (f"\n  ... and {len(refused) - 10} more" if len(refused) > 10 else ""))
    return pseudonyms, len(series)
