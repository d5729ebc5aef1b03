"""What a node decides for itself, whatever the coordinator asks: seeds under DP, what leaves beside
a masked update, how often it answers, and a ledger that cannot go back in time."""

from __future__ import annotations

import json
import secrets
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fl import wire
from fl.config import Config
from fl.packing import unpack_message
from fl.server.rounds import initial_arrays
from fl.server.witness import LedgerWitness
from nodes import client_app
from nodes.client_app import app
from nodes.ledger import Ledger
from nodes.policy import EXACT, NONE, Policy, save_policy, state_dir


@pytest.fixture(autouse=True)
def _fresh_run() -> None:
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = secrets.randbits(48), 1, 0


def _site(tiny_federation: Path, tmp_path: Path, **policy: Any) -> Path:
    site = tmp_path / "site"
    shutil.copytree(tiny_federation / "node-0", site, ignore=shutil.ignore_patterns(".oncofed"))
    if policy:
        save_policy(state_dir(site), Policy(**policy))
    return site


def _ask(site: Path, kind: str, server_round: int = 1, context: Context | None = None, **extra: Any) -> Message:
    config = ConfigRecord({wire.TASK: "seg2d", wire.EPOCHS: 1, wire.LR: 0.01, wire.BATCH_SIZE: 8,
                           wire.PROXIMAL_MU: 0.0, wire.SEED: 0, wire.SERVER_ROUND: server_round, **extra})
    msg = Message(RecordDict({wire.ARRAYS: initial_arrays(Config().replace(task="seg2d")), wire.CONFIG: config}),
                  dst_node_id=7, message_type=kind)
    context = context or Context(run_id=1, node_id=7, node_config={wire.NODE_DATA_DIR: str(site)},
                                 state=RecordDict(), run_config={})
    return unpack_message(app(msg, context))


DP = {wire.LOCAL_NOISE_MULTIPLIER: 1.0, wire.LOCAL_MAX_GRAD_NORM: 1.0, wire.LOCAL_VIEWS: 2}


def test_point8_views_and_crops_under_dp_are_not_seeded_from_the_data(tiny_federation: Path, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Seeded from the data's digest, one added or removed case re-draws every other case's views
    (neighbouring datasets then differ by more than C in the clipped sum)."""
    import fl.learn.bundle_train as bundle_train

    seeds: list[int] = []

    def capture(*args: Any, generator: torch.Generator, **kwargs: Any) -> Any:
        seeds.append(generator.initial_seed())
        raise RuntimeError("captured")

    monkeypatch.setattr(bundle_train, "train_bundle_dp", capture)
    site = _site(tiny_federation, tmp_path)
    from fl.learn import get_task
    from fl.learn.data import load_local_data

    digest = load_local_data(site, get_task("seg2d")).digest
    for r in (1, 2):
        assert _ask(site, MessageType.TRAIN, r, **DP).has_error()  # the captured call ends the request
    data_seeded = [client_app._local_generator(0, r, digest).initial_seed() for r in (1, 2)]
    assert len(seeds) == 2 and not set(seeds) & set(data_seeded)
    assert seeds[0] != seeds[1]


@pytest.mark.parametrize("requirement", ["require_secagg", "require_distributed_noise", "client_epsilon"])
def test_point9_a_node_that_distrusts_the_coordinator_releases_no_exact_scalars(
        tiny_federation: Path, tmp_path: Path, requirement: str) -> None:
    value = 1.0 if requirement == "client_epsilon" else True
    policy = Policy(**{requirement: value})
    assert policy.metrics_mode(dp_requested=False) == NONE and policy.descriptors_mode(False) == NONE
    assert Policy().metrics_mode(dp_requested=False) == EXACT
    site = _site(tiny_federation, tmp_path, **{requirement: value})
    evaluation = _ask(site, MessageType.EVALUATE)
    assert set(dict(evaluation.content[wire.METRICS])) == {wire.NUM_EXAMPLES}  # no exact Dice, no loss


def test_point10_a_repeated_evaluation_is_refused_not_charged_again(tiny_federation: Path, tmp_path: Path) -> None:
    site = _site(tiny_federation, tmp_path, epsilon=50.0, release_metrics="noisy")
    context = Context(run_id=1, node_id=7, node_config={wire.NODE_DATA_DIR: str(site)}, state=RecordDict(),
                      run_config={})
    assert not _ask(site, MessageType.EVALUATE, 3, context).has_error()
    for _ in range(3):  # a coordinator draining the budget with the same request
        again = _ask(site, MessageType.EVALUATE, 3, context)
        assert again.has_error() and again.error.code == wire.ERROR_POLICY
        assert "already served 1 time(s)" in again.error.reason
    assert len(Ledger.in_dir(state_dir(site)).entries()) == 1  # charged once
    earlier = _ask(site, MessageType.EVALUATE, 2, context)  # nor an earlier round: a run's rounds move forward
    assert earlier.has_error() and "rounds only move forward" in earlier.error.reason
    assert len(Ledger.in_dir(state_dir(site)).entries()) == 1


def test_point10_descriptors_follow_their_own_policy_when_metrics_are_none(tiny_federation: Path,
                                                                            tmp_path: Path) -> None:
    site = _site(tiny_federation, tmp_path, epsilon=50.0, release_metrics="none", release_descriptors="noisy")
    reply = _ask(site, MessageType.EVALUATE, 0, **{wire.VALIDATE: 50, wire.CONFIDENCE: 0.95, wire.DESCRIBE: 1})
    assert set(dict(reply.content[wire.METRICS])) == {wire.NUM_EXAMPLES}  # no score
    assert wire.DESCRIPTORS in reply.content.config_records  # but the descriptors, noisy and charged
    (entry,) = Ledger.in_dir(state_dir(site)).entries()
    assert entry["release"] == "descriptors"


def _head(reply: Message) -> dict[str, Any]:
    return json.loads(str(reply.content[wire.NODE_INFO][wire.LEDGER_HEAD]))


def test_point11_a_ledger_restored_from_an_older_copy_is_refused(tiny_federation: Path, tmp_path: Path) -> None:
    site = _site(tiny_federation, tmp_path, epsilon=50.0)
    first = _ask(site, MessageType.TRAIN, 1, **DP)
    assert not first.has_error()
    backup = tmp_path / "backup"
    shutil.copytree(state_dir(site), backup)  # last week's backup of the state folder
    witness = LedgerWitness.of(tmp_path / "reg")
    second = _ask(site, MessageType.TRAIN, 2, **{**DP, wire.LEDGER_ACKS: witness.acks_for(7)})
    witness.update([("7", str(second.content[wire.NODE_INFO][wire.LEDGER_HEAD]))])  # the coordinator keeps it
    assert _head(second)["record"][0] == 2
    shutil.rmtree(state_dir(site))
    shutil.copytree(backup, state_dir(site))  # the node restored: a shorter chain that still verifies
    assert len(Ledger.in_dir(state_dir(site)).entries()) == 1
    refused = _ask(site, MessageType.TRAIN, 3, **{**DP, wire.LEDGER_ACKS: witness.acks_for(7)})
    assert refused.has_error() and refused.error.code == wire.ERROR_LEDGER
    assert "holds 1 entries, fewer than the 2 the coordinator acknowledged" in refused.error.reason
    assert len(Ledger.in_dir(state_dir(site)).entries()) == 1  # nothing spent
    evaluation = _ask(site, MessageType.EVALUATE, 3, **{wire.LEDGER_ACKS: witness.acks_for(7)})
    assert evaluation.has_error() and evaluation.error.code == wire.ERROR_LEDGER


def test_point11_a_lying_coordinator_can_only_make_a_node_stricter(tiny_federation: Path, tmp_path: Path) -> None:
    from nodes.site_scores import site_id
    from nodes.witness import last_match

    site = _site(tiny_federation, tmp_path)
    served = _ask(site, MessageType.TRAIN, 1)
    head = _head(served)
    assert not served.has_error() and head["contributions"][0] == 1
    assert last_match(state_dir(site)) is None
    honest = {head["site"]: {"record": head["record"], "contributions": head["contributions"]}}
    assert not _ask(site, MessageType.TRAIN, 2, **{wire.LEDGER_ACKS: json.dumps(honest)}).has_error()
    assert last_match(state_dir(site))["contributions"] == 1
    inflated = {site_id(state_dir(site)): {"record": [0, ""], "contributions": [9, "00"]}}
    forged = {site_id(state_dir(site)): {"record": [0, ""], "contributions": [1, "00" * 32]}}
    for acks in (inflated, forged, "not json"):
        reply = _ask(site, MessageType.TRAIN, 3, **{wire.LEDGER_ACKS: acks if isinstance(acks, str)
                                                     else json.dumps(acks)})
        assert reply.has_error() and reply.error.code == wire.ERROR_LEDGER
    assert not _ask(site, MessageType.TRAIN, 3).has_error()  # no acknowledgement: the node as it would be alone


def test_the_coordinator_keeps_only_newer_heads_and_tells_each_node_its_own(tmp_path: Path) -> None:
    witness = LedgerWitness.of(tmp_path)
    witness.update([("1", json.dumps({"site": "a", "record": [2, "x"], "contributions": [3, "y"]})),
                    ("2", json.dumps({"site": "b", "record": [1, "v"], "contributions": [1, "u"]})),
                    ("3", "garbage"), ("3", json.dumps({"site": "c", "record": [-1, ""], "contributions": [0, ""]}))])
    witness.update([("1", json.dumps({"site": "a", "record": [1, "w"], "contributions": [3, "y"]}))])  # restored
    again = LedgerWitness.of(tmp_path)
    assert json.loads(again.acks_for(1)) == {"a": {"record": [2, "x"], "contributions": [3, "y"]}}
    assert json.loads(again.acks_for(2)) == {"b": {"record": [1, "v"], "contributions": [1, "u"]}}  # not a's
    assert json.loads(again.acks_for(3)) == {} and json.loads(again.acks_for(9)) == {}


def test_a_full_disk_leaves_no_torn_ledger_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A ledger append that hits a full disk half-way fails, and the ledger is exactly as before:
    the chain still verifies, and the next append (space freed) continues it."""
    import errno
    import os

    from fl.privacy import hashchain
    from fl.privacy.accounting import GaussianEvent

    ledger = Ledger.in_dir(tmp_path)
    event = GaussianEvent(1.0, 0.25, 8)
    with ledger.locked():
        ledger.append(event, server_round=1, run=7)
    before = ledger.path.read_bytes()
    real_write = os.write

    def full(fd: int, data: bytes) -> int:
        real_write(fd, data[: len(data) // 2])  # the disk fills half-way through the line
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(hashchain.os, "write", full)
    with pytest.raises(OSError, match="No space"), ledger.locked():
        ledger.append(event, server_round=2, run=7)
    assert ledger.path.read_bytes() == before  # nothing half-written
    monkeypatch.setattr(hashchain.os, "write", real_write)
    with ledger.locked():
        ledger.append(event, server_round=2, run=7)
    assert [e["server_round"] for e in ledger.entries()] == [1, 2]  # the chain verifies
