"""De-identification: the whole-series check (nodes.deid) on real DICOM files shipped in pydicom
and nibabel, and ``fl node deid`` (nodes.deidentify) on the same files."""

from __future__ import annotations

import json
import shutil
import stat
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.filebase import DicomBytesIO

from fl.cli import main
from fl.errors import DataError
from nodes.deid import (
    ATTRIBUTE,
    BURNED_IN,
    DATES,
    IDENTITY,
    NOT_MARKED,
    PRIVATE,
    SCANNER_UID,
    DeidOptions,
    Finding,
    burned_in,
    looks_burned_in,
    read_dicom,
    scan,
)
from nodes.deidentify import MAP_FILE, lookup

PYDICOM = Path(get_testdata_file("CT_small.dcm")).parent
CT5N = PYDICOM / "dicomdirtests" / "98892001" / "CT5N"
NIBABEL_MR = Path(pytest.importorskip("nibabel").__file__).parent / "nicom" / "tests" / "data" / "0.dcm"
SHIPPED = {"ct.dcm": PYDICOM / "CT_small.dcm", "mr.dcm": PYDICOM / "MR_small.dcm", "series": CT5N,
           "rtstruct.dcm": PYDICOM / "rtstruct.dcm", "seg.dcm": PYDICOM / "liver_1frame.dcm", "siemens.dcm": NIBABEL_MR}


def _site(root: Path, files: dict[str, Path], cases: list[dict], **manifest: object) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, source in files.items():
        (shutil.copytree if source.is_dir() else shutil.copy)(source, root / name)
    (root / "dataset.json").write_text(json.dumps({"training": cases, **manifest}))
    return root


def _by_name(result) -> dict[str, list[Finding]]:  # type: ignore[no-untyped-def]
    return {result.relative(p): found for p, found in result.findings.items()}


def _attributes(found: list[Finding]) -> set[str]:
    return {f.detail for f in found if f.kind == ATTRIBUTE}


def _scanner_uids(found: list[Finding]) -> set[str]:
    return {k for f in found if f.kind == SCANNER_UID for k in f.detail.split(", ")}


# ----- the check ---------------------------------------------------------------------------------
def test_check_flags_what_the_shipped_files_hold(tmp_path: Path) -> None:
    site = _site(tmp_path / "site", SHIPPED, [{"image": "ct.dcm"}, {"image": "mr.dcm"}, {"image": {"series": "series"}},
                                              {"label": {"rtstruct": "rtstruct.dcm"}}, {"label": {"seg": "seg.dcm"}},
                                              {"image": ["siemens.dcm"]}])
    result = scan(site)
    found = _by_name(result)
    assert len(found) == 10 and len(set(result.series.values())) == 6

    ct = found["ct.dcm"]
    assert {"PatientName", "PatientID", "PatientAge", "InstitutionName", "StationName", "StudyDate",
            "ImageComments", "StudyDescription", "SourceApplicationEntityTitle"} <= _attributes(ct)
    assert Finding(PRIVATE) in ct and Finding(NOT_MARKED, "PatientIdentityRemoved is not YES") in ct
    assert {"StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID"} <= _scanner_uids(ct)
    assert not [f for f in ct if f.kind in (BURNED_IN, IDENTITY)]  # a clean CT slice, a case of its own

    assert {"OperatorsName", "NameOfPhysiciansReadingStudy", "DeviceSerialNumber", "PatientWeight"} <= _attributes(
        found["mr.dcm"])
    rtstruct = found["rtstruct.dcm"]
    assert {"PatientBirthDate", "OperatorsName", "ROIName", "StructureSetLabel"} <= _attributes(rtstruct)
    assert "ReferencedSOPInstanceUID" in _scanner_uids(rtstruct) and Finding(PRIVATE) not in rtstruct
    assert {"SourceImageSequence", "SeriesDescription", "AccessionNumber"} <= _attributes(found["seg.dcm"])
    siemens = found["siemens.dcm"]
    assert {"StudyComments", "ProtocolName", "PatientBirthDate"} <= _attributes(siemens) and Finding(PRIVATE) in siemens

    # CT5N was de-identified once (PatientIdentityRemoved YES, a dummy name): its dummies pass, its
    # dates, private tags and scanner UIDs do not; the 5 slices make one line
    series = found["series/2062"]
    assert "PatientName" not in _attributes(series) and {"StudyDate", "PatientAge"} <= _attributes(series)
    assert not [f for f in series if f.kind == NOT_MARKED]
    lines = result.lines(50)
    assert sum("series/" in line for line in lines) == 1
    assert any(line.startswith("  series/2062 and 4 more file(s) of its series: ") for line in lines)
    assert result.to_dict()["findings_by_kind"][SCANNER_UID] == 10


def test_declared_options_change_the_verdict(tmp_path: Path) -> None:
    files = {"series": CT5N, "mr.dcm": PYDICOM / "MR_small.dcm"}
    cases = [{"image": "series/"}, {"image": "mr.dcm"}]

    def attrs(name: str, **section: object) -> list[Finding]:
        return _by_name(scan(_site(tmp_path / name, files, cases, deidentification=section)))

    plain = attrs("plain")
    assert {"StudyDate", "AcquisitionTime", "PatientAge", "SeriesDescription"} <= _attributes(plain["series/2062"])
    assert {"StationName", "DeviceSerialNumber", "InstitutionName", "PatientSex"} <= _attributes(plain["mr.dcm"])

    kept = attrs("kept", options=["retain_longitudinal_full_dates", "retain_patient_characteristics",
                                  "clean_descriptors", "retain_device_identity", "retain_institution_identity"])
    assert not {"StudyDate", "AcquisitionTime", "PatientAge", "SeriesDescription"} & _attributes(kept["series/2062"])
    assert not {"StationName", "DeviceSerialNumber", "InstitutionName", "PatientSex"} & _attributes(kept["mr.dcm"])
    assert "PatientName" in _attributes(kept["mr.dcm"])  # no option keeps a name

    modified = attrs("modified", options=["retain_longitudinal_modified_dates"])["series/2062"]
    assert "StudyDate" not in _attributes(modified) and Finding(DATES) in modified  # not marked MODIFIED

    assert _scanner_uids(plain["series/2062"])
    assert not _scanner_uids(attrs("roots", uid_roots=["1.3.6.1.4.1.5962"])["series/2062"])
    assert not _scanner_uids(attrs("uids", options=["retain_uids"])["mr.dcm"])

    with pytest.raises(DataError, match=r"unknown de-identification option 'retain_everything'; known: clean_desc"):
        attrs("typo", options=["retain_everything"])
    with pytest.raises(DataError, match="not both"):
        attrs("both", options=["retain_longitudinal_full_dates", "retain_longitudinal_modified_dates"])
    with pytest.raises(DataError, match="uid_roots"):
        attrs("root", uid_roots=["1.2.x"])


def _burn_text(pixels: np.ndarray, text: str = "DOE^JANE 1234567 19610203") -> np.ndarray:
    from PIL import Image, ImageDraw

    mask = Image.new("L", pixels.shape[::-1])
    ImageDraw.Draw(mask).text((2, 0), text, fill=255)
    out = pixels.copy()
    out[np.asarray(mask) > 0] = pixels.max()
    return out


def test_border_check_flags_burned_in_text_and_passes_a_body(tmp_path: Path) -> None:
    ct = pydicom.dcmread(PYDICOM / "CT_small.dcm")
    assert not looks_burned_in(ct.pixel_array)  # a CT slice of a body, tissue up to its borders
    assert not any(looks_burned_in(pydicom.dcmread(p).pixel_array) for p in sorted(CT5N.iterdir()))
    assert looks_burned_in(_burn_text(ct.pixel_array))
    block = ct.pixel_array.copy()
    block[:5, :60] = block.max()  # bright but broad: not text
    assert not looks_burned_in(block)
    # the real ultrasound shipped with pydicom: a device header burned into its top rows
    assert looks_burned_in(pydicom.dcmread(get_testdata_file("examples_palette.dcm")).pixel_array)

    ct.PixelData = _burn_text(ct.pixel_array).astype(ct.pixel_array.dtype).tobytes()
    ct.save_as(tmp_path / "burned.dcm")
    header = read_dicom(tmp_path / "burned.dcm")
    assert burned_in(header, lambda: read_dicom(tmp_path / "burned.dcm", pixels=True)) == Finding(
        BURNED_IN, "text-like pixels in the image border")
    header.BurnedInAnnotation = "NO"  # an operator's review
    assert burned_in(header, lambda: pytest.fail("pixels read")) is None
    header.BurnedInAnnotation = "YES"
    assert burned_in(header, lambda: pytest.fail("pixels read")).detail == "BurnedInAnnotation is YES"
    us = read_dicom(Path(get_testdata_file("examples_palette.dcm")))
    assert "capture" in burned_in(us, lambda: pytest.fail("pixels read")).detail


def test_a_case_with_two_patients_is_flagged_naming_its_files(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    site = _site(tmp_path / "site", {"ct.dcm": PYDICOM / "CT_small.dcm", "mr.dcm": PYDICOM / "MR_small.dcm"},
                 [{"image": "ct.dcm", "label": "mr.dcm"}])
    result = scan(site)
    assert all(Finding(IDENTITY, "PatientID") in found for found in result.findings.values())
    [mismatch] = result.mismatches
    assert mismatch.case == "training[0]" and mismatch.keywords == ("PatientID", "PatientName", "StudyInstanceUID")
    assert "  training[0]: PatientID, PatientName, StudyInstanceUID differ(s) between its files: ct.dcm | mr.dcm" \
        in result.lines()
    assert main(["node", "check", "--data", str(site)]) == 2  # refused before any image is loaded
    err = capsys.readouterr().err
    assert "2 of 2 DICOM file(s) may still identify someone" in err and "PS3.15" in err
    assert "  ct.dcm: PatientName, PatientID, PatientSex" in err and "training[0]: PatientID" in err


# ----- fl node deid ------------------------------------------------------------------------------
def _segmentation(series: list[pydicom.Dataset]) -> tuple[pydicom.Dataset, np.ndarray]:
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    mask = np.zeros((len(series), 16, 16), np.uint8)
    mask[1:4, 4:12, 4:12] = 1
    segment = hd.seg.SegmentDescription(1, "lesion", codes.SCT.Tissue, codes.SCT.Neoplasm,
                                        hd.seg.SegmentAlgorithmTypeValues.MANUAL)
    seg = hd.seg.Segmentation(source_images=series, pixel_array=mask, segmentation_type="BINARY",
                              segment_descriptions=[segment], series_instance_uid=generate_uid(), series_number=9,
                              sop_instance_uid=generate_uid(), instance_number=1, manufacturer="OncoFed tests",
                              manufacturer_model_name="fixture", software_versions="1", device_serial_number="1")
    return seg, mask


def _linked_site(root: Path) -> Path:
    """Case 0: the CT5N series, a SEG of it, the shipped RTSTRUCT pointed at it; then single files."""
    site = _site(root, {"series": CT5N, "ct.dcm": PYDICOM / "CT_small.dcm", "mr.dcm": PYDICOM / "MR_small.dcm",
                        "siemens.dcm": NIBABEL_MR},
                 [{"image": {"series": ["series"]}, "label": {"seg": "labels/seg.dcm"}, "rt": {"rtstruct": "rt.dcm"}},
                  {"image": "ct.dcm", "label": "labels/ct_mask.nii.gz"}, {"image": "mr.dcm"}, {"image": "siemens.dcm"}])
    series = [pydicom.dcmread(p) for p in sorted((site / "series").iterdir())]
    (site / "labels").mkdir()
    _segmentation(series)[0].save_as(site / "labels" / "seg.dcm")
    (site / "labels" / "ct_mask.nii.gz").write_bytes(b"a NIfTI label, copied as it is")
    (site / "README.txt").write_text("notes of the site")
    rt = pydicom.dcmread(PYDICOM / "rtstruct.dcm", force=True)
    for kw in ("PatientID", "PatientName", "StudyInstanceUID"):
        setattr(rt, kw, series[0].data_element(kw).value)
    ref = rt.ReferencedFrameOfReferenceSequence[0]
    ref.FrameOfReferenceUID = series[0].FrameOfReferenceUID
    ref.RTReferencedStudySequence[0].ReferencedSOPInstanceUID = series[0].StudyInstanceUID
    ref.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0].SeriesInstanceUID = series[0].SeriesInstanceUID
    for roi in rt.StructureSetROISequence:
        roi.ReferencedFrameOfReferenceUID = series[0].FrameOfReferenceUID
    rt.save_as(site / "rt.dcm")
    return site


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_deid_leaves_nothing_to_flag_and_keeps_references(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import highdicom as hd

    site = _linked_site(tmp_path / "in")
    before = scan(site)
    assert len(before.flagged) == 10 and not before.mismatches
    out = tmp_path / "out"
    assert main(["node", "deid", str(site), str(out)]) == 0
    assert "10 DICOM file(s) in 6 series of 4 patient(s)" in capsys.readouterr().out

    after = scan(out)
    assert len(after.findings) == 10 and not after.flagged  # fl node check finds nothing
    assert json.loads((out / "dataset.json").read_text())["deidentification"] == {
        "options": ["retain_longitudinal_modified_dates"]}
    assert (out / "labels" / "ct_mask.nii.gz").exists() and not (out / "README.txt").exists()

    series = [pydicom.dcmread(p) for p in sorted((out / "series").iterdir())]
    seg, rt = pydicom.dcmread(out / "labels" / "seg.dcm"), pydicom.dcmread(out / "rt.dcm")
    original = pydicom.dcmread(CT5N / "2062")
    assert len({(d.PatientID, str(d.PatientName), d.StudyInstanceUID) for d in [*series, seg, rt]}) == 1
    assert series[0].PatientID != original.PatientID and series[0].StudyInstanceUID != original.StudyInstanceUID
    assert not [e for d in [*series, seg, rt] for e in d.iterall() if e.tag.is_private]
    assert series[0].PatientIdentityRemoved == "YES" and series[0].LongitudinalTemporalInformationModified == "MODIFIED"
    assert "113107" in {c.CodeValue for c in series[0].DeidentificationMethodCodeSequence}
    # references still resolve: SEG -> its source slices, RTSTRUCT -> the frame of reference and series
    sop_uids = {d.SOPInstanceUID for d in series}
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series[0].SeriesInstanceUID
    assert {i.ReferencedSOPInstanceUID for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence} <= sop_uids
    assert seg.FrameOfReferenceUID == series[0].FrameOfReferenceUID
    ref = rt.ReferencedFrameOfReferenceSequence[0]
    assert ref.FrameOfReferenceUID == series[0].FrameOfReferenceUID
    assert ref.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0].SeriesInstanceUID == series[0].SeriesInstanceUID
    labels = hd.seg.segread(out / "labels" / "seg.dcm").get_pixels_by_source_instance(
        source_sop_instance_uids=[d.SOPInstanceUID for d in series], combine_segments=True)
    assert labels.sum() == _segmentation([pydicom.dcmread(p) for p in sorted(CT5N.iterdir())])[1].sum()

    # the pseudonym map: on the node, outside OUT, mode 0600, one record per patient
    map_path = site / ".oncofed" / MAP_FILE
    assert stat.S_IMODE(map_path.stat().st_mode) == 0o600 and not list(out.rglob(MAP_FILE))
    [record] = lookup(site / ".oncofed", series[0].PatientID)
    assert record["original_patient_id"] == original.PatientID == "98890234"
    assert record["series"][series[0].SeriesInstanceUID] == original.SeriesInstanceUID
    assert record["options"] == ["retain_longitudinal_modified_dates"] and record["schema"] == 1
    assert main(["node", "deid", str(site), "--lookup", series[0].StudyInstanceUID]) == 0
    assert f"-> {original.StudyInstanceUID}" in capsys.readouterr().out

    # a rerun (the same node key) writes the same bytes
    assert main(["node", "deid", str(site), str(tmp_path / "again")]) == 0
    assert _tree(tmp_path / "again") == _tree(out)

    # ROI names are descriptors: blanked, unless kept (cleaned) where dataset.json maps them to labels
    assert not {roi.ROIName for roi in rt.StructureSetROISequence} - {""}
    manifest = json.loads((site / "dataset.json").read_text())
    manifest["training"][0]["rt"]["rois"] = {"patient": "body"}
    (site / "dataset.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="--keep-descriptors"):
        _deid(site, tmp_path / "rois")
    assert main(["node", "deid", str(site), str(tmp_path / "rois"), "--keep-descriptors"]) == 0
    kept = pydicom.dcmread(tmp_path / "rois" / "rt.dcm")
    assert [roi.ROIName for roi in kept.StructureSetROISequence] == ["patient", "Isocenter 1", "Isocenter 2"]
    assert not scan(tmp_path / "rois").flagged and "113105" in {
        c.CodeValue for c in kept.DeidentificationMethodCodeSequence}


def test_deid_refuses_burned_in_text_and_leaves_nothing(tmp_path: Path) -> None:
    site = _site(tmp_path / "in", {"ct.dcm": PYDICOM / "CT_small.dcm", "mr.dcm": PYDICOM / "MR_small.dcm"},
                 [{"image": "ct.dcm"}, {"image": "mr.dcm"}])
    ct = pydicom.dcmread(site / "ct.dcm")
    ct.PixelData = _burn_text(ct.pixel_array).astype(ct.pixel_array.dtype).tobytes()
    ct.save_as(site / "ct.dcm")
    with pytest.raises(DataError, match=r"1 DICOM file\(s\) refused(.|\n)*ct.dcm: burned-in annotation"):
        _deid(site, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]  # no OUT, no staging folder
    assert not (site / ".oncofed" / MAP_FILE).exists()

    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(DataError, match="not an empty folder"):
        _deid(site, tmp_path / "full")
    with pytest.raises(DataError, match="outside"):
        _deid(site, site / "out")
    named = _site(tmp_path / "named", {"1CT1": PYDICOM / "CT_small.dcm"}, [{"image": "1CT1"}])
    with pytest.raises(DataError, match="1CT1: file path holds its PatientID"):
        _deid(named, tmp_path / "out")


def _deid(site: Path, out: Path) -> None:
    from nodes.deidentify import deidentify
    from nodes.policy import state_dir

    deidentify(site, out, state=state_dir(site))


def test_options_parse_from_the_manifest() -> None:
    options = DeidOptions.from_manifest({"deidentification": {"options": ["retain_uids", "clean_descriptors"],
                                                               "uid_roots": ["1.2.3"]}}, Path("dataset.json"))
    assert options.options == ("clean_descriptors", "retain_uids") and options.keeps == {"uids", "descriptors"}
    assert options.regenerated("1.2.3.4") and not options.regenerated("1.2.34")
    assert DeidOptions().regenerated("2.25.1234") and DeidOptions().regenerated("2." + str(10**39 + 5))
    assert not DeidOptions().regenerated("2.16.840.1.113669.632.20.1")
    with pytest.raises(DataError, match="only 'options' and 'uid_roots'"):
        DeidOptions.from_manifest({"deidentification": {"option": []}}, Path("dataset.json"))


def test_border_pixels_match_a_plain_reference() -> None:
    """The band-only, separable filter counts what a whole-frame 5x5 top-hat counts (oracle)."""
    from numpy.lib.stride_tricks import sliding_window_view

    from nodes.deid import BORDER, CONTRAST, LEVEL, text_like_border_pixels

    def reference(frame: np.ndarray) -> tuple[int, int]:
        frame = frame.astype(np.float32)
        low, high = frame.min(), frame.max()
        eroded = sliding_window_view(np.pad(frame, 2, mode="edge"), (5, 5)).min(axis=(-2, -1))
        opening = sliding_window_view(np.pad(eroded, 2, mode="edge"), (5, 5)).max(axis=(-2, -1))
        rows, cols = frame.shape
        br, bc = max(1, int(np.ceil(BORDER * rows))), max(1, int(np.ceil(BORDER * cols)))
        band = np.ones(frame.shape, bool)
        band[br:rows - br, bc:cols - bc] = False
        if not high > low:
            return 0, int(band.sum())
        text = (frame - opening >= CONTRAST * (high - low)) & (frame >= low + LEVEL * (high - low))
        return int((text & band).sum()), int(band.sum())

    rng = np.random.default_rng(7)
    frames = [pydicom.dcmread(PYDICOM / "CT_small.dcm").pixel_array, np.zeros((9, 9)),
              *(np.where(rng.random(tuple(rng.integers(6, 120, 2))) < 0.03, 4000, rng.integers(0, 900))
                for _ in range(30)), *(rng.integers(0, 4096, tuple(rng.integers(6, 90, 2))) for _ in range(10))]
    for frame in frames:
        assert text_like_border_pixels(frame) == reference(frame), frame.shape


def test_profile_table_names_real_attributes() -> None:
    from pydicom.datadict import keyword_dict

    from nodes.deid_profile import OPTIONS, PROFILE, UID_KEYWORDS

    repeating = {"CurveData", "OverlayData", "OverlayComments"}
    assert set(PROFILE) - repeating <= set(keyword_dict) and UID_KEYWORDS <= set(keyword_dict)
    assert {"PatientName", "PatientID", "InstitutionName", "StudyDate", "SeriesDescription"} <= set(PROFILE)
    assert {rule_group for rule in PROFILE.values() for rule_group in rule.kept_by} == {o.keeps for o in OPTIONS.values()}
    assert PROFILE["StudyDate"].kept_by == {"dates"} and PROFILE["InstitutionName"].action == "X"


def test_a_bare_data_set_without_preamble_or_suffix_is_checked_and_deidentified(tmp_path: Path) -> None:
    site = tmp_path / "in"
    site.mkdir()
    ct = pydicom.dcmread(PYDICOM / "CT_small.dcm")
    bare = site / "slice0001"  # no .dcm suffix, no preamble, no file meta: as some exports write them
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, True
    pydicom.filewriter.write_dataset(buffer, ct)
    bare.write_bytes(buffer.getvalue())
    assert bare.read_bytes()[128:132] != b"DICM"
    (site / "dataset.json").write_text(json.dumps({"training": [{"image": "slice0001"}]}))
    flagged = _by_name(scan(site))
    assert "PatientName" in _attributes(flagged["slice0001"])  # read and checked, not passed over
    _deid(site, tmp_path / "out")
    out = tmp_path / "out" / "slice0001"
    again = pydicom.dcmread(out)
    assert str(again.PatientID) != str(ct.PatientID) and not scan(tmp_path / "out").flagged
    assert again.pixel_array.tolist() == ct.pixel_array.tolist()
