"""``fl node check``: validate a node's dataset on the node and summarise it; nothing is sent.

The check runs the same validation as training (every file listed in ``dataset.json`` read
through MONAI, shapes, label values, NaN) and then reports cases, image shapes, voxel
spacing and label values per split.

DICOM files in the folder are also checked against the DICOM PS3.15 basic application level
confidentiality profile (Annex E, Table E.1-1): an attribute the profile removes or blanks
that still carries a value is listed by file and keyword, and the dataset is refused unless
the operator passes ``allow_identifiable=True`` (``--allow-identifiable-dicom``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fl.errors import DataError
from fl.learn import IMAGE_KEY, LABEL_KEY, Task
from fl.learn.cases import image_loader
from fl.learn.data import SPLITS, load_local_data, read_datalist
from nodes.policy import keyed_fingerprint, state_dir

# Attributes of PS3.15 Table E.1-1 that identify a patient, a person or an institution, with
# the profile's action: X remove, Z blank or dummy, D dummy. Under "Patient Identity Removed =
# YES" a Z/D attribute may hold a dummy value; an X attribute must be gone either way.
BASIC_PROFILE: dict[str, str] = {
    "PatientName": "Z", "PatientID": "Z", "PatientBirthDate": "Z", "PatientSex": "Z",
    "OtherPatientIDs": "X", "OtherPatientIDsSequence": "X", "OtherPatientNames": "X",
    "PatientBirthName": "X", "PatientMotherBirthName": "X", "PatientAddress": "X",
    "PatientTelephoneNumbers": "X", "PatientBirthTime": "X", "MedicalRecordLocator": "X",
    "MilitaryRank": "X", "BranchOfService": "X", "EthnicGroup": "X", "Occupation": "X",
    "PatientReligiousPreference": "X", "AdditionalPatientHistory": "X", "PatientComments": "X",
    "ResponsiblePerson": "X", "PatientInsurancePlanCodeSequence": "X",
    "ReferringPhysicianName": "Z", "ReferringPhysicianAddress": "X", "ReferringPhysicianTelephoneNumbers": "X",
    "PerformingPhysicianName": "X", "NameOfPhysiciansReadingStudy": "X", "OperatorsName": "X",
    "PhysiciansOfRecord": "X", "RequestingPhysician": "X", "ScheduledPerformingPhysicianName": "X",
    "InstitutionName": "X", "InstitutionAddress": "X", "InstitutionalDepartmentName": "X",
    "StationName": "X", "DeviceSerialNumber": "X", "AccessionNumber": "Z", "StudyID": "Z",
    "StudyDate": "Z", "StudyTime": "Z", "AcquisitionDateTime": "X", "ContentDate": "Z",
    "IssuerOfPatientID": "X", "PatientAge": "X", "PatientSize": "X", "PatientWeight": "X",
    "CountryOfResidence": "X", "RegionOfResidence": "X", "CurrentPatientLocation": "X",
}


@dataclass
class SplitSummary:
    cases: int = 0
    shapes: Counter[tuple[int, ...]] = field(default_factory=Counter)
    spacings: Counter[tuple[float, ...]] = field(default_factory=Counter)
    label_values: set[int] = field(default_factory=set)
    foreground_fraction: float = 0.0


@dataclass
class CheckReport:
    data_dir: Path
    task: str
    fingerprint: str
    splits: dict[str, SplitSummary]
    identifiable: dict[Path, list[str]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "data_dir": str(self.data_dir), "task": self.task, "fingerprint": self.fingerprint,
            "splits": {
                name: {"cases": s.cases, "shapes": {str(list(k)): v for k, v in s.shapes.items()},
                       "spacings": {str(list(k)): v for k, v in s.spacings.items()},
                       "label_values": sorted(s.label_values), "foreground_fraction": s.foreground_fraction}
                for name, s in self.splits.items()
            },
            "identifiable_dicom": {str(p): attrs for p, attrs in self.identifiable.items()},
        }


def _is_dicom(path: Path) -> bool:
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with path.open("rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def identifying_attributes(path: Path) -> list[str]:
    """Keywords of PS3.15 basic-profile attributes in one DICOM file that still carry a value."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as exc:  # pydicom raises several types for a damaged header
        raise DataError(f"{path}: unreadable DICOM header ({exc})") from None
    identity_removed = str(ds.get("PatientIdentityRemoved", "")).strip().upper() == "YES"
    found = []
    for keyword, action in BASIC_PROFILE.items():
        if keyword not in ds:
            continue
        value = ds.data_element(keyword).value
        if value in (None, "", b"") or (hasattr(value, "__len__") and len(value) == 0):
            continue
        if action in ("Z", "D") and identity_removed:
            continue  # a dummy value is what the profile asks for
        found.append(keyword)
    return found


def scan_dicom(data_dir: Path) -> dict[Path, list[str]]:
    """Every DICOM file under ``data_dir`` (the node's own state folder aside) that still
    identifies someone, with the attributes that do."""
    flagged = {}
    for path in sorted(p for p in data_dir.rglob("*") if p.is_file() and ".oncofed" not in p.parts):
        if _is_dicom(path) and (attrs := identifying_attributes(path)):
            flagged[path] = attrs
    return flagged


def _summarise(cases: list[dict[str, Any]]) -> SplitSummary:
    reader = image_loader()
    summary = SplitSummary(cases=len(cases))
    foreground, voxels = 0, 0
    for case in cases:
        files = case[IMAGE_KEY] if isinstance(case[IMAGE_KEY], list) else [case[IMAGE_KEY]]
        image = reader(str(files[0]))  # one modality speaks for the case's grid
        label = np.asarray(reader(str(case[LABEL_KEY])))
        summary.shapes[tuple(int(s) for s in image.shape)] += 1
        spacing = getattr(image, "pixdim", None)
        if spacing is not None:
            summary.spacings[tuple(round(float(s), 4) for s in spacing)] += 1
        summary.label_values.update(int(v) for v in np.unique(label))
        foreground += int((label > 0).sum())
        voxels += label.size
    summary.foreground_fraction = foreground / voxels if voxels else 0.0
    return summary


def check_dataset(data_dir: Path, task: Task, *, allow_identifiable: bool = False,
                  state_folder: Path | None = None) -> CheckReport:
    """Validate ``data_dir`` for ``task`` and summarise it; raises :class:`DataError` naming the
    first problem, or listing the DICOM files that still identify a patient."""
    data_dir = data_dir.resolve()
    identifiable = scan_dicom(data_dir) if data_dir.is_dir() else {}
    if identifiable and not allow_identifiable:
        lines = [f"  {p}: {', '.join(a)}" for p, a in list(identifiable.items())[:10]]
        more = f"\n  ... and {len(identifiable) - 10} more file(s)" if len(identifiable) > 10 else ""
        raise DataError(
            f"{data_dir}: {len(identifiable)} DICOM file(s) still carry identifying attributes "
            f"(DICOM PS3.15 basic profile); de-identify them, or pass --allow-identifiable-dicom "
            f"if your governance allows it:\n" + "\n".join(lines) + more
        )
    data = load_local_data(data_dir, task, use_cache=False)
    datalist = read_datalist(data_dir, modality_lists=True)
    fingerprint = keyed_fingerprint(state_folder or state_dir(data_dir), data.digest)
    return CheckReport(data_dir=data_dir, task=task.name, fingerprint=fingerprint,
                       splits={s: _summarise(datalist[s]) for s in SPLITS}, identifiable=identifiable)
