"""``fl node check``: validate a node's dataset on the node and summarise it; nothing is sent.

The check runs the same validation as training (every file listed in ``dataset.json`` read
through MONAI, shapes, label values, NaN) and then reports cases, image shapes, voxel
spacing and label values per split.

Before that, every DICOM file ``dataset.json`` reaches (and any other in the folder) goes
through the de-identification check of :mod:`nodes.deid`: the DICOM PS3.15 basic application
level confidentiality profile (Annex E, Table E.1-1) with the options the provider declares,
private tags, burned-in annotation, scanner UIDs, identity consistency within each case and the
de-identification marks. The dataset is refused, naming the first series and what was found,
unless the operator passes ``allow_identifiable=True`` (``--allow-identifiable-dicom``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fl.errors import DataError
from fl.learn import IMAGE_KEY, LABEL_KEY, Task
from nodes.deid import DeidScan, profile_attributes, read_dicom, scan
from nodes.policy import keyed_fingerprint, state_dir


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
    identifiable: dict[Path, list[str]]  # each DICOM file with a finding, and the findings
    deidentification: DeidScan | None = None

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
            "deidentification": self.deidentification.to_dict() if self.deidentification is not None else None,
        }


def identifying_attributes(path: Path) -> list[str]:
    """Keywords of PS3.15 basic-profile attributes in one DICOM file that still carry a value
    (no option declared; a dummy allowed under PatientIdentityRemoved YES)."""
    return profile_attributes(read_dicom(path))


def _summarise(cases: list[dict[str, Any]]) -> SplitSummary:
    from fl.learn.cases import image_loader

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
    dicom = scan(data_dir) if data_dir.is_dir() else None
    identifiable = {p: [str(f) for f in found] for p, found in dicom.flagged.items()} if dicom else {}
    if dicom is not None and identifiable and not allow_identifiable:
        raise DataError(
            f"{data_dir}: {len(identifiable)} of {len(dicom.findings)} DICOM file(s) may still identify someone "
            f"(DICOM PS3.15 basic profile, options: {', '.join(dicom.options.options) or 'none'}); "
            f"de-identify them (`fl node deid`), declare the options they were de-identified under in "
            f"dataset.json's \"deidentification\", or pass --allow-identifiable-dicom if your governance "
            f"allows it:\n" + "\n".join(dicom.lines())
        )
    # torch and MONAI load only now: identifiable data is refused in a second, before any image is read
    from fl.learn.data import load_local_data

    data = load_local_data(data_dir, task, use_cache=False)
    fingerprint = keyed_fingerprint(state_folder or state_dir(data_dir), data.digest)
    # the cases as training reads them: a DICOM case through its NIfTI conversion
    splits = {"training": _summarise(data.train.items), "validation": _summarise(data.val.items)}
    return CheckReport(data_dir=data_dir, task=task.name, fingerprint=fingerprint, splits=splits,
                       identifiable=identifiable, deidentification=dicom)
