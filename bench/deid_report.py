"""De-identification on real DICOM: what the check finds in the files shipped with pydicom and
nibabel, before and after ``fl node deid``, as a markdown table, and one pseudonym map record.

Each file (the CT5N series as one) is a case of its own in a temporary node folder; the export
runs through the command line with a fresh node key, so the pseudonyms differ from run to run.
A last section runs the check and the export on pydicom's ultrasound with a burned-in header:

    python bench/deid_report.py
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import tempfile
from pathlib import Path

import nibabel
from pydicom.data import get_testdata_file

from fl.cli import main
from nodes.deid import ATTRIBUTE, MIN_PIXELS, DeidScan, read_dicom, scan, text_like_border_pixels
from nodes.deidentify import MAP_FILE

PYDICOM = Path(get_testdata_file("CT_small.dcm")).parent
FILES = {  # name in the node folder: (shipped file or folder, what the table calls it)
    "ct.dcm": (PYDICOM / "CT_small.dcm", "pydicom CT_small.dcm"),
    "mr.dcm": (PYDICOM / "MR_small.dcm", "pydicom MR_small.dcm"),
    "ct5n": (PYDICOM / "dicomdirtests" / "98892001" / "CT5N", "pydicom dicomdirtests/98892001/CT5N (5 slices)"),
    "rtstruct.dcm": (PYDICOM / "rtstruct.dcm", "pydicom rtstruct.dcm"),
    "seg.dcm": (PYDICOM / "liver_1frame.dcm", "pydicom liver_1frame.dcm (SEG)"),
    "siemens.dcm": (Path(nibabel.__file__).parent / "nicom" / "tests" / "data" / "0.dcm", "nibabel nicom/tests/data/0.dcm"),
}


def _cell(result: DeidScan, name: str) -> str:
    """The findings of one file (of a series: its first file's, with how many files share each)."""
    files = [p for p in result.findings if result.relative(p).split("/")[0] == name]
    found = list(dict.fromkeys(f for p in files for f in result.findings[p]))
    if not found:
        return "nothing"
    attributes = [f.detail for f in found if f.kind == ATTRIBUTE]
    rest = [str(f) for f in found if f.kind != ATTRIBUTE]
    shown = ", ".join(attributes[:8]) + (f" +{len(attributes) - 8} more" if len(attributes) > 8 else "")
    return "; ".join(([f"{len(attributes)} attributes ({shown})"] if attributes else []) + rest)


def _quiet(argv: list[str]) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue() + err.getvalue()


def main_report() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        site, out = Path(tmp) / "site", Path(tmp) / "out"
        site.mkdir()
        for name, (source, _) in FILES.items():
            (shutil.copytree if source.is_dir() else shutil.copy)(source, site / name)
        cases = [{"image": name} for name in FILES]
        (site / "dataset.json").write_text(json.dumps({"training": cases[:4], "validation": cases[4:]}))
        before = scan(site)
        code, said = _quiet(["node", "deid", str(site), str(out)])
        if code:
            raise SystemExit(said)
        after = scan(out)
        print(f"Check on {len(before.findings)} shipped DICOM files in {len(set(before.series.values()))} series, "
              f"before and after `fl node deid` (options applied: retain_longitudinal_modified_dates)\n")
        print("| file | findings before | after |\n| --- | --- | --- |")
        for name, (_, label) in FILES.items():
            print(f"| {label} | {_cell(before, name)} | {_cell(after, name)} |")
        print(f"\nFiles with findings, by kind: before {dict(sorted(before.by_kind().items()))}; "
              f"after {dict(sorted(after.by_kind().items())) or 'none'}\n")
        records = [json.loads(line) for line in (site / ".oncofed" / MAP_FILE).read_text().splitlines()]
        record = next(r for r in records if len(r["series"]) and r["original_patient_id"] == "98890234")
        print(f"One pseudonym map record ({site.name}/.oncofed/{MAP_FILE}, mode 0600, not in OUT):\n")
        print("```json\n" + json.dumps(record, indent=2) + "\n```\n")

        us = Path(tmp) / "us"
        us.mkdir()
        shutil.copy(get_testdata_file("examples_palette.dcm"), us / "us.dcm")
        (us / "dataset.json").write_text(json.dumps({"training": [{"image": "us.dcm"}]}))
        code, said = _quiet(["node", "deid", str(us), str(Path(tmp) / "us_out")])
        count, band = text_like_border_pixels(read_dicom(us / "us.dcm", pixels=True).pixel_array)
        clean = [text_like_border_pixels(read_dicom(p, pixels=True).pixel_array)[0]
                 for p in sorted(site.rglob("*.dcm")) + sorted((site / "ct5n").iterdir())
                 if p.name not in ("rtstruct.dcm", "seg.dcm")]
        print(f"pydicom examples_palette.dcm (ultrasound, device header burned in): check: "
              f"{_cell(scan(us), 'us.dcm')}. The pixel screen alone finds {count} text-like pixels in its "
              f"border band of {band} (it flags from {MIN_PIXELS}); in the CT and MR images above it finds "
              f"{max(clean)} at most.\n\n`fl node deid` exit {code}, OUT written: "
              f"{(Path(tmp) / 'us_out').exists()}:\n\n```\n{said.strip()}\n```")
    return 0


if __name__ == "__main__":
    raise SystemExit(main_report())
