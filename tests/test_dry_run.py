"""A bundle's dry run on the node (``fl node check --bundle``) and the failure classifier it
shares with the node's error replies."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from bundles import brats_boolean_label, broken_flip, small_brats

from fl.cli import main
from fl.learn.synth_anatomy import synthesize_anatomy
from nodes.dry_run import dry_run
from nodes.failure import STAGES, classify


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("dry_run")


@pytest.fixture(scope="module")
def site(work: Path) -> Path:
    (node,) = synthesize_anatomy(work / "brain", nodes=1, kind="brain-mri", seed=2, scale=0.25)
    return node


@pytest.fixture(scope="module")
def working(work: Path) -> Path:
    return small_brats(work / "working", patch=16)


@pytest.fixture(scope="module")
def boolean_label(work: Path) -> Path:
    return brats_boolean_label(small_brats(work / "boolean", patch=16))


def test_a_working_bundle_passes_every_stage_in_order(site: Path, working: Path) -> None:
    run = dry_run(site, working)
    assert run.passed, run.lines(verbose=True)
    assert [s.stage for s in run.stages] == list(STAGES)
    assert all(s.seconds >= 0 for s in run.stages)
    lines = run.lines()
    assert len(lines) == len(STAGES) + 1 and lines[-1].startswith("dry run passed: bundle brats_mri_segmentation")
    assert [line.split()[0] for line in lines[:-1]] == [s.split()[0] for s in STAGES]


def test_a_boolean_label_fails_at_the_loss_naming_dice_loss(site: Path, boolean_label: Path) -> None:
    """Model Zoo's BraTS preprocessing (no resampling) leaves the label boolean; MONAI 1.6's DiceLoss
    (squared_pred) refuses it. The stages before the loss pass."""
    run = dry_run(site, boolean_label)
    assert not run.passed and run.failure is not None
    assert (run.failure.stage, run.failure.component, run.failure.module) == ("loss", "DiceLoss", "monai.losses.dice")
    assert [s.stage for s in run.stages] == ["parse", "preprocessing", "forward"]
    (line,) = run.lines()
    assert line.startswith("dry run failed at loss: DiceLoss (monai.losses.dice) raised RuntimeError: ")
    assert "Bool" in line  # the message's last line, for the node's operator
    verbose = "\n".join(run.lines(verbose=True))
    assert "Traceback" in verbose and "monai/losses" in verbose


def test_a_broken_preprocessing_transform_is_named(site: Path, work: Path) -> None:
    run = dry_run(site, broken_flip(small_brats(work / "flip", patch=16)))
    assert run.failure is not None and run.failure.stage == "preprocessing"
    assert (run.failure.component, run.failure.module) == ("RandFlipd", "monai.transforms.spatial.dictionary")
    assert run.failure.inner == "Flip" and run.failure.error == "IndexError"
    assert run.lines()[0].startswith("dry run failed at preprocessing: RandFlipd (monai.transforms.spatial.dictionary)")


def test_a_bundle_that_cannot_be_found_fails_at_parse(site: Path, work: Path) -> None:
    run = dry_run(site, str(work / "no-such-bundle"))
    assert run.failure is not None and (run.failure.stage, run.failure.error) == ("parse", "ConfigError")
    assert run.stages == []


def test_the_command_line_exits_nonzero_when_the_dry_run_fails(site: Path, working: Path, boolean_label: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["node", "check", "--data", str(site), "--bundle", str(working)]) == 0
    out = capsys.readouterr().out
    assert "dry run passed" in out and out.index("valid for task") < out.index("dry run passed")
    assert main(["node", "check", "--data", str(site), "--bundle", str(boolean_label)]) == 1
    failed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("dry run")]
    assert len(failed) == 1 and failed[0].startswith("dry run failed at loss: DiceLoss")
    assert main(["node", "check", "--data", str(site), "--bundle", str(boolean_label), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["dry_run"]["failure"]["component"] == "DiceLoss" and report["splits"]["training"]["cases"] > 0
    assert main(["node", "check", "--data", str(site), "--bundle", str(working), "--task", "seg3d"]) == 2


def test_the_data_check_runs_first(work: Path, working: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["node", "check", "--data", str(work / "no-such-site"), "--bundle", str(working)]) == 2
    assert "dry run" not in capsys.readouterr().out


# ----- the classifier, without data ---------------------------------------------------------------
def test_a_worker_process_error_names_its_transform_from_monai_text() -> None:
    """A DataLoader worker re-raises its error as text: the transform is read from MONAI's wording,
    the containers (Compose) passed over."""
    text = ("Caught RuntimeError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
            "RuntimeError: applying transform <monai.transforms.compose.Compose object at 0x7f00>\n"
            "RuntimeError: applying transform <monai.transforms.spatial.dictionary.Spacingd object at 0x7f01>")
    failure = classify(RuntimeError(text))
    assert (failure.stage, failure.component, failure.module) == ("preprocessing", "Spacingd",
                                                                  "monai.transforms.spatial.dictionary")


def test_what_leaves_the_node_is_code_names_never_the_message() -> None:
    import torch
    from monai.losses import DiceLoss

    with pytest.raises(RuntimeError) as caught:
        DiceLoss(squared_pred=True)(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2, dtype=torch.bool))
    failure = classify(caught.value)
    assert (failure.stage, failure.component) == ("loss", "DiceLoss")
    assert "Bool" in failure.message and failure.message not in failure.reason()
    assert failure.reason() == "loss: DiceLoss (monai.losses.dice) raised RuntimeError"


def test_an_error_outside_any_component_names_its_type_only() -> None:
    failure = classify(KeyError("/data/site/case_000.nii.gz"))
    assert (failure.stage, failure.component, failure.reason()) == ("", "", "KeyError")
