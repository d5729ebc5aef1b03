"""The ClientApp's replies: what leaves a node, and what a broken node says."""

from __future__ import annotations

import secrets
import shutil
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fl import wire
from fl.config import Config
from fl.packing import PACKED_CONTENT, unpack_content, unpack_message
from fl.server.rounds import initial_arrays
from nodes.client_app import app, resolve_data_dir


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    # a fresh run for every test: a node serves one contribution per (run, round)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = secrets.randbits(48), 1, 0


def _message(kind: str) -> Message:
    cfg = Config().replace(task="seg2d")
    config = ConfigRecord({wire.TASK: "seg2d", wire.EPOCHS: 1, wire.LR: 0.01, wire.BATCH_SIZE: 8,
                           wire.PROXIMAL_MU: 0.0, wire.SEED: 0, wire.SERVER_ROUND: 1})
    content = RecordDict({wire.ARRAYS: initial_arrays(cfg), wire.CONFIG: config})
    return Message(content=content, dst_node_id=7, message_type=kind)


def _context(node_config: dict, run_config: dict | None = None) -> Context:
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config=run_config or {})


def test_train_reply_carries_only_weights_count_and_aggregate_metrics(tiny_federation: Path) -> None:
    msg = _message(MessageType.TRAIN)
    reply = app(msg, _context({wire.NODE_DATA_DIR: str(tiny_federation / "node-0")}))
    assert not reply.has_error() and list(reply.content) == [PACKED_CONTENT]  # one array on the wire
    reply.content = unpack_content(reply.content)
    assert set(reply.content.keys()) == {wire.ARRAYS, wire.METRICS, wire.NODE_INFO}
    assert set(reply.content[wire.NODE_INFO].keys()) == {wire.DATASET_FINGERPRINT, wire.DEVICE_NAME, wire.LEDGER_HEAD}
    assert reply.content[wire.NODE_INFO][wire.DEVICE_NAME] == ("cpu" if not torch.cuda.is_available()
                                                               else f"cuda:0 ({torch.cuda.get_device_name(0)})")
    assert len(reply.content[wire.NODE_INFO][wire.DATASET_FINGERPRINT]) == 64
    assert set(reply.content[wire.ARRAYS].keys()) == set(msg.content[wire.ARRAYS].keys())
    metrics = dict(reply.content[wire.METRICS])
    assert set(metrics) == {wire.NUM_EXAMPLES, wire.TRAIN_LOSS, wire.TRAIN_SECONDS}
    assert all(isinstance(v, (int, float)) for v in metrics.values())


def test_evaluate_reply_carries_only_aggregate_metrics(tiny_federation: Path) -> None:
    reply = unpack_message(app(_message(MessageType.EVALUATE), _context({wire.NODE_DATA_DIR: str(tiny_federation / "node-0")})))
    assert set(reply.content.keys()) == {wire.METRICS, wire.NODE_INFO}
    assert set(reply.content[wire.NODE_INFO].keys()) == {wire.LEDGER_HEAD}  # counts and keyed MACs, no data
    metrics = dict(reply.content[wire.METRICS])
    assert set(metrics) == {wire.NUM_EXAMPLES, wire.VAL_LOSS, wire.DICE}
    assert 0.0 <= metrics[wire.DICE] <= 1.0


def test_broken_dataset_is_refused_without_sending_its_paths(tiny_federation: Path, tmp_path: Path) -> None:
    node = tmp_path / "site"
    shutil.copytree(tiny_federation / "node-0", node)
    (node / "imagesTr" / "case_000.nii.gz").unlink()
    reply = app(_message(MessageType.TRAIN), _context({wire.NODE_DATA_DIR: str(node)}))
    assert reply.has_error()
    assert reply.error.code == wire.ERROR_DATASET_INVALID
    assert "/" not in reply.error.reason and "case_000" not in reply.error.reason


def test_virtual_node_reads_its_partition_folder(tiny_federation: Path) -> None:
    context = _context({wire.NODE_PARTITION_ID: 1}, {"data.root": str(tiny_federation)})
    assert resolve_data_dir(context) == tiny_federation / "node-1"
    deployed = _context({wire.NODE_DATA_DIR: "/srv/site", wire.NODE_PARTITION_ID: 1})
    assert resolve_data_dir(deployed) == Path("/srv/site")


def _site_with_policy(tiny_federation: Path, tmp_path: Path, **policy: object) -> Path:
    from nodes.policy import Policy, save_policy, state_dir

    site = tmp_path / "site"
    shutil.copytree(tiny_federation / "node-0", site, ignore=shutil.ignore_patterns(".oncofed"))
    save_policy(state_dir(site), Policy(**policy))  # type: ignore[arg-type]
    return site


def _dp_message(kind: str) -> Message:
    msg = _message(kind)
    msg.content[wire.CONFIG][wire.LOCAL_NOISE_MULTIPLIER] = 1.0
    msg.content[wire.CONFIG][wire.LOCAL_MAX_GRAD_NORM] = 1.0
    return msg


def test_a_node_with_a_budget_releases_no_metrics_by_default(tiny_federation: Path, tmp_path: Path) -> None:
    """Under DP the exact loss, timing and validation score would be exact queries over the
    records: a node with a budget sends none of them, and its evaluation spends nothing."""
    from nodes.ledger import Ledger
    from nodes.policy import state_dir

    site = _site_with_policy(tiny_federation, tmp_path, epsilon=50.0)
    context = _context({wire.NODE_DATA_DIR: str(site)})
    train = unpack_message(app(_dp_message(MessageType.TRAIN), context))
    assert not train.has_error(), train.error
    assert set(dict(train.content[wire.METRICS])) == {wire.NUM_EXAMPLES, wire.EPSILON_RECORD, wire.DELTA_RECORD}
    spent = len(Ledger.in_dir(state_dir(site)).entries())
    evaluation = unpack_message(app(_dp_message(MessageType.EVALUATE), context))
    assert set(dict(evaluation.content[wire.METRICS])) == {wire.NUM_EXAMPLES}
    assert len(Ledger.in_dir(state_dir(site)).entries()) == spent


def test_noisy_metrics_are_charged_before_they_leave(tiny_federation: Path, tmp_path: Path) -> None:
    from fl.privacy import accounting
    from nodes.ledger import Ledger
    from nodes.policy import state_dir

    site = _site_with_policy(tiny_federation, tmp_path, epsilon=50.0, release_metrics="noisy",
                             metrics_noise_multiplier=4.0)
    context = _context({wire.NODE_DATA_DIR: str(site)})
    reply = unpack_message(app(_dp_message(MessageType.EVALUATE), context))
    metrics = dict(reply.content[wire.METRICS])
    assert set(metrics) == {wire.NUM_EXAMPLES, wire.DICE, wire.EPSILON_RECORD, wire.METRICS_DP}  # no exact loss
    assert 0.0 <= metrics[wire.DICE] <= 1.0
    entries = Ledger.in_dir(state_dir(site)).entries()
    assert len(entries) == 1 and entries[0]["release"] == "metrics"
    assert entries[0]["event"] == {"noise_multiplier": 4.0, "sample_rate": 1.0, "steps": 1}
    expected = accounting.epsilon([accounting.GaussianEvent(4.0, 1.0, 1)], 1e-5)
    assert metrics[wire.EPSILON_RECORD] == pytest.approx(expected)

    # once the budget cannot pay for another release, evaluation is refused like training
    from nodes.policy import Policy, save_policy

    save_policy(state_dir(site), Policy(epsilon=expected * 1.01, release_metrics="noisy", metrics_noise_multiplier=4.0))
    later = _dp_message(MessageType.EVALUATE)
    later.content[wire.CONFIG][wire.SERVER_ROUND] = 2  # round 1's evaluation was served: a repeat is refused
    refused = app(later, context)
    assert refused.has_error() and refused.error.code == wire.ERROR_BUDGET
    assert len(Ledger.in_dir(state_dir(site)).entries()) == 1
    # the operator's request log (the node console) names both, the refusal with its code and reason
    from nodes import requests_log

    logged, counts = requests_log.read(state_dir(site))
    assert [(r["kind"], r["outcome"], r["code"], r["server_round"]) for r in logged] == [
        ("evaluate", "served", None, 1), ("evaluate", "refused", wire.ERROR_BUDGET, 2)]
    assert "budget" in logged[-1]["reason"] and counts == {"served": 1, "refused": 1}


def test_a_tampered_ledger_stops_evaluation_too(tiny_federation: Path, tmp_path: Path) -> None:
    from nodes.ledger import Ledger
    from nodes.policy import state_dir

    site = _site_with_policy(tiny_federation, tmp_path, epsilon=50.0)
    context = _context({wire.NODE_DATA_DIR: str(site)})
    assert not app(_dp_message(MessageType.TRAIN), context).has_error()
    path = Ledger.in_dir(state_dir(site)).path
    path.write_text(path.read_text().replace('"epsilon_after": ', '"epsilon_after": 0.0001 + '))
    reply = app(_dp_message(MessageType.EVALUATE), context)
    assert reply.has_error() and reply.error.code == wire.ERROR_LEDGER


def test_a_ledger_from_a_newer_oncofed_is_refused_as_such_not_as_tampered(tiny_federation: Path,
                                                                          tmp_path: Path) -> None:
    import json

    from nodes.ledger import Ledger
    from nodes.policy import state_dir

    site = _site_with_policy(tiny_federation, tmp_path, epsilon=50.0)
    context = _context({wire.NODE_DATA_DIR: str(site)})
    assert not app(_dp_message(MessageType.TRAIN), context).has_error()
    path = Ledger.in_dir(state_dir(site)).path
    entry = json.loads(path.read_text().splitlines()[0])
    path.write_text(json.dumps({**entry, "schema": 99}) + "\n")  # as a later release would write it
    reply = app(_dp_message(MessageType.EVALUATE), context)
    assert reply.has_error() and reply.error.code == wire.ERROR_TRAINING_FAILED
    assert "newer OncoFed" in reply.error.reason and str(site) not in reply.error.reason  # no path leaves


def test_a_deployed_node_trains_no_bundle_from_outside_its_approved_app(tiny_federation: Path, tmp_path: Path,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    from fl.learn.bundle import bundle_digest

    elsewhere = tmp_path / "seg2d"
    shutil.copytree(Path(__file__).resolve().parents[1] / "configs" / "bundles" / "seg2d", elsewhere)
    msg = _message(MessageType.TRAIN)
    msg.content[wire.CONFIG][wire.BUNDLE] = str(elsewhere)  # the server names a bundle by absolute path
    msg.content[wire.CONFIG][wire.BUNDLE_DIGEST] = bundle_digest(elsewhere)
    reply = app(msg, _context({wire.NODE_DATA_DIR: str(tiny_federation / "node-0")}))
    assert reply.has_error() and reply.error.code == wire.ERROR_TRAINING_FAILED
    assert str(elsewhere) not in reply.error.reason
    assert "is not a bundle inside the approved app" in caplog.text
    # the same bundle as shipped in the app is trained
    msg = _message(MessageType.TRAIN)
    msg.content[wire.CONFIG][wire.BUNDLE] = "configs/bundles/seg2d"
    msg.content[wire.CONFIG][wire.BUNDLE_DIGEST] = bundle_digest(elsewhere)
    assert not app(msg, _context({wire.NODE_DATA_DIR: str(tiny_federation / "node-0")})).has_error()


# ----- a failing bundle: the reply names where, never the data ------------------------------------
@pytest.fixture(scope="module")
def brain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fl.learn.synth_anatomy import synthesize_anatomy

    return synthesize_anatomy(tmp_path_factory.mktemp("brain"), nodes=1, kind="brain-mri", seed=2, scale=0.25)[0]


def _bundle_message(bundle: Path) -> Message:
    from flwr.app import ArrayRecord

    from fl.learn.bundle import BundleTask

    task = BundleTask.load(str(bundle))
    config = ConfigRecord({wire.TASK: "seg3d", wire.BUNDLE: str(bundle), wire.BUNDLE_DIGEST: task.digest,
                           wire.EPOCHS: 1, wire.SEED: 0, wire.SERVER_ROUND: 1})
    content = RecordDict({wire.ARRAYS: ArrayRecord(task.build_network().state_dict()), wire.CONFIG: config})
    return Message(content=content, dst_node_id=7, message_type=MessageType.TRAIN)


def _virtual(site: Path) -> Context:  # a virtual node may train a bundle outside the app
    return _context({wire.NODE_PARTITION_ID: int(site.name.split("-")[-1])}, {"data.root": str(site.parent)})


@pytest.mark.parametrize("variant, component, data_error", [
    ("boolean-label", "at loss: DiceLoss (monai.losses.dice) raised RuntimeError", False),
    ("broken-flip", "at preprocessing: RandFlipd (monai.transforms.spatial.dictionary) in Flip raised IndexError", True),
], ids=["boolean-label", "broken-flip"])
def test_a_failing_bundle_is_named_in_the_reply_without_the_data(brain: Path, tmp_path: Path, variant: str,
                                                                 component: str, data_error: bool,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """The reply names the stage, the bundle's component and the exception's type; MONAI's message
    (the case's file, its shapes and values) stays in the node's log with the traceback."""
    from bundles import brats_boolean_label, broken_flip, small_brats

    make = {"boolean-label": brats_boolean_label, "broken-flip": broken_flip}[variant]
    reply = app(_bundle_message(make(small_brats(tmp_path / variant, patch=16))), _virtual(brain))
    assert reply.has_error()
    assert reply.error.code == (wire.ERROR_DATASET_INVALID if data_error else wire.ERROR_TRAINING_FAILED)
    assert component in reply.error.reason and reply.error.reason.endswith("details are in the node's log")
    assert str(brain) not in reply.error.reason and "case_" not in reply.error.reason and "/" not in reply.error.reason
    assert "Traceback" in caplog.text and ("Got Bool" in caplog.text or "index 5 is out of bounds" in caplog.text)
