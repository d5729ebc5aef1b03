"""A coordinator that lies, against the nodes' real code (fl.bench.inprocess: OncoFed's round loop,
Flower's SecAgg+ workflow and the real ClientApp, only the transport replaced). Each attack is
refused with a named reason and releases nothing, or its release is accounted."""

from __future__ import annotations

import json
import math
import secrets
import shutil
from pathlib import Path
from typing import Any

import pytest
from flwr.app import ConfigRecord, Context, Error, Message, MessageType, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from fl import config, wire
from fl.bench.inprocess import InProcessGrid, error_reasons, unmasked_sums
from fl.errors import ConfigError, FederationError
from fl.learn import get_task
from fl.learn.synth import node_dir, synthesize
from fl.privacy import accounting
from fl.privacy.journal import ReleaseJournal
from fl.server.observer import LogObserver
from fl.server.rounds import run_federation
from nodes.client_app import app
from nodes.ledger import Ledger
from nodes.policy import Policy, save_policy, state_dir

Z = 2.0


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five seg2d sites of 32x32 images, preprocessed once (copy before use)."""
    root = tmp_path_factory.mktemp("hostile") / "data"
    synthesize(root, nodes=5, task=get_task("seg2d"), seed=3, image_size=32)
    return root


def _federation(sites: Path, tmp: Path, nodes: int, **policy: Any) -> dict[int, Path]:
    """``nodes`` sites in a fresh folder, each with ``policy``; node id i + 1 serves site i."""
    out = {}
    for i in range(nodes):
        folder = node_dir(tmp / "data", i)
        shutil.copytree(node_dir(sites, i), folder, ignore=shutil.ignore_patterns(".oncofed"))
        if policy:
            save_policy(state_dir(folder), Policy(**policy))
        out[i + 1] = folder
    return out


def _cfg(tmp: Path, nodes: int, **extra: Any) -> config.Config:
    return config.from_flat({
        "data.root": str(tmp / "data"), "data.nodes": nodes, "data.image_size": 32, "rounds": 1,
        "train.lr": 1e-12, "strategy.evaluate_initial": False, "registry.root": str(tmp / "reg"),
        "model_name": "m", "secagg.enabled": True, "central_dp.enabled": True, "central_dp.clip_on": "client",
        "central_dp.noise_multiplier": Z, "secagg.noise": "distributed", **extra})


def _run(grid: InProcessGrid, cfg: config.Config, tmp: Path, name: str = "run") -> dict[str, Any]:
    return run_federation(grid, cfg, tmp / "runs" / name, LogObserver())


def _stage(msg: Message) -> str | None:
    records = msg.content.config_records
    return records[RECORD_KEY_CONFIGS].get(Key.STAGE) if RECORD_KEY_CONFIGS in records else None


def _journal(tmp: Path) -> list[dict[str, Any]]:
    journal = ReleaseJournal.of(tmp / "reg", "m")
    from fl.privacy import hashchain

    return hashchain.read_chain(journal.path, "journal") if journal.path.exists() else []


def _contributions(folder: Path) -> list[dict[str, Any]]:
    return [e for e in Ledger.contributions_in(state_dir(folder)).entries() if e.get("kind") == "train"]


def test_honest_round_accounts_each_nodes_own_share(sites: Path, tmp_path: Path) -> None:
    folders = _federation(sites, tmp_path, 3)
    grid = InProcessGrid(folders)
    summary = _run(grid, _cfg(tmp_path, 3), tmp_path)
    assert unmasked_sums(grid, 3) == 1
    client = summary["privacy"]["client_level"]
    assert client["rounds"] == 1 and client["outcomes"] == {"released": 1}
    for folder in folders.values():  # t = 3: each share is z / sqrt(3) of the sensitivity, and so accounted
        (entry,) = _contributions(folder)
        assert entry["noise_multiplier"] == pytest.approx(Z / math.sqrt(3))
        assert entry["event"] == {"noise_multiplier": pytest.approx(Z / math.sqrt(3)), "sample_rate": 1.0, "steps": 1}
    from nodes.budget import budget_report

    client = budget_report(folders[1])["client_level"]  # what `fl node budget` shows the operator
    own = accounting.epsilon([accounting.GaussianEvent(Z / math.sqrt(3), 1.0, 1)], 1e-5)
    peers = accounting.epsilon([accounting.GaussianEvent(Z, 1.0, 1)], 1e-5)
    assert client["contributions"] == 1 and client["unnoised"] == 0 and client["evaluations"] == 1
    assert client["epsilon_own_share"] == pytest.approx(own) and client["epsilon_honest_peers"] == pytest.approx(peers)
    assert budget_report(folders[1])["witness"]["contributions"] == 1  # the evaluation carried round 1's head


def test_point1_a_node_refuses_noise_below_its_floor(sites: Path, tmp_path: Path) -> None:
    folders = _federation(sites, tmp_path, 3, min_distributed_noise=2.0)

    def weaken(msg: Message) -> Message:
        if "fitins.config" in msg.content.config_records:  # the masking stage: the training instruction
            msg.content.config_records["fitins.config"][wire.DDP_NOISE_MULTIPLIER] = 1e-4
        return msg

    grid = InProcessGrid(folders, tamper=weaken)
    with pytest.raises(FederationError):
        _run(grid, _cfg(tmp_path, 3), tmp_path)
    assert unmasked_sums(grid, 3) == 0  # nothing unmasked, nothing released
    assert sum("noise multiplier 0.0001 is below this node's minimum 2" in r for r in error_reasons(grid)) == 3
    for folder in folders.values():
        assert _contributions(folder) == []  # and nothing charged


def _setup(n: int, s: int, t: int, **over: Any) -> dict[str, Any]:
    return {Key.STAGE: Stage.SETUP, Key.SAMPLE_NUMBER: n, Key.SHARE_NUMBER: s, Key.THRESHOLD: t,
            Key.CLIPPING_RANGE: 8.0, Key.TARGET_RANGE: wire.SECAGG_TARGET_RANGE, Key.MOD_RANGE: wire.SECAGG_MOD_RANGE,
            Key.MAX_WEIGHT: wire.SECAGG_MAX_WEIGHT, **over}


def _stage_reply(folder: Path, stage: dict[str, Any], context: Context | None = None, group: str = "1") -> Message:
    context = context or Context(run_id=1, node_id=1, node_config={wire.NODE_DATA_DIR: str(folder)},
                                 state=RecordDict(), run_config={})
    msg = Message(RecordDict({RECORD_KEY_CONFIGS: ConfigRecord(stage)}), dst_node_id=1,
                  message_type=MessageType.TRAIN, group_id=group)
    return app(msg, context)


@pytest.mark.parametrize("policy, stage, reason", [
    ({}, _setup(3, 3, 1), "threshold 1 is below this node's minimum of 3"),  # Flower's mod takes it
    ({"max_contributors": 5}, _setup(10, 10, 10), "above this node's maximum of 5"),  # Sybils: t = 10
    ({}, _setup(10, 10, 5), "not above half of the 10 shares"),
    ({}, _setup(5, 4, 3), "an even share count 4 below the sample 5"),
    ({}, _setup(3, 3, 3, **{Key.MOD_RANGE: 2}), "mod_range 2, OncoFed pins"),
    ({}, _setup(3, 3, 3, **{Key.TARGET_RANGE: 2**10}), "target_range 1024, OncoFed pins"),
    ({}, _setup(1024, 1024, 700), "overflow the 2^32 field"),  # point 10: the field wraps at 1,024
    ({}, _setup(3, 3, 3, **{Key.TARGET_RANGE: float(2**22)}), "OncoFed pins"),  # the right value, wrong type
])
def test_point2_3_10_the_guard_refuses_a_setup_it_cannot_trust(sites: Path, tmp_path: Path, policy: dict[str, Any],
                                                               stage: dict[str, Any], reason: str) -> None:
    folders = _federation(sites, tmp_path, 1, **policy)
    reply = _stage_reply(folders[1], stage)
    assert reply.has_error() and reply.error.code == wire.ERROR_POLICY
    assert reason in reply.error.reason


def test_guard_refuses_a_second_setup_in_a_round(sites: Path, tmp_path: Path) -> None:
    folders = _federation(sites, tmp_path, 1)
    context = Context(run_id=1, node_id=1, node_config={wire.NODE_DATA_DIR: str(folders[1])}, state=RecordDict(),
                      run_config={})
    assert not _stage_reply(folders[1], _setup(3, 3, 3), context).has_error()
    again = _stage_reply(folders[1], _setup(3, 3, 3), context)
    assert again.has_error() and "a second set-up" in again.error.reason


def test_point3_unmasking_a_node_as_both_active_and_dead_is_refused(sites: Path, tmp_path: Path) -> None:
    folders = _federation(sites, tmp_path, 3)
    asked: dict[int, Message] = {}

    def both(msg: Message) -> Message:
        if _stage(msg) == Stage.UNMASK and msg.metadata.dst_node_id == 1:
            configs = msg.content.config_records[RECORD_KEY_CONFIGS]
            configs[Key.DEAD_NODE_ID_LIST] = [*configs[Key.DEAD_NODE_ID_LIST], 1]  # its self mask and its key
            asked[1] = msg
        return msg

    grid = InProcessGrid(folders, tamper=both)
    with pytest.raises(FederationError):
        _run(grid, _cfg(tmp_path, 3), tmp_path)
    assert 1 in asked and unmasked_sums(grid, 3) == 0  # node 1 gave neither share: no sum, no node's update
    assert any("listed both active and dead" in r for r in error_reasons(grid))
    journal = _journal(tmp_path)  # the round was journaled before the workflow began, and how it ended
    assert sum(1 for e in journal if e.get("event")) == 1 and journal[-1]["outcome"] == "halted"


def test_point4_a_replayed_round_is_refused_and_the_ledger_holds_one_contribution(sites: Path,
                                                                                  tmp_path: Path) -> None:
    folders = _federation(sites, tmp_path, 3)
    run_id = secrets.randbits(48)
    _run(InProcessGrid(folders, run_id=run_id), _cfg(tmp_path, 3), tmp_path, "first")
    # the same run and round again, as a coordinator replaying the request would send it (weights, seed,
    # round all its choice): every node refuses, nothing is unmasked
    replay = InProcessGrid(folders, run_id=run_id)
    with pytest.raises(FederationError, match="already contributed to round 1"):
        _run(replay, _cfg(tmp_path, 3, model_name="m2"), tmp_path, "replay")
    assert unmasked_sums(replay, 3) == 0
    for folder in folders.values():
        assert len(_contributions(folder)) == 1


@pytest.mark.parametrize("fault, outcome, unmasked", [
    ("drop-one-before-masking", "released", 1),  # 4 contributors = t: noise z C
    ("drop-two-before-masking", "halted", 0),  # 3 < t: Flower unmasks nothing
    ("crash-while-masking", "released", 1),
    ("budget-refusal", "released", 1),
    ("silent-at-unmask", "released", 1),
])
def test_point5_dropouts_never_unmask_an_under_noised_sum_and_every_release_is_journaled(
        sites: Path, tmp_path: Path, fault: str, outcome: str, unmasked: int) -> None:
    """Five nodes, t = 4 (threshold 0.7): each share sized z / sqrt(4). A node that drops before
    masking leaves 4 contributors (noise z C); two leave 3, below t, and Flower halts before unmasking.
    A node that drops after masking still contributed (its self mask is rebuilt)."""
    folders = _federation(sites, tmp_path, 5)
    if fault == "budget-refusal":  # one node cannot pay for its share: it refuses while masking
        save_policy(state_dir(folders[5]), Policy(client_epsilon=1e-3))

    def inject(msg: Message) -> Message | Error | None:
        node, stage = msg.metadata.dst_node_id, _stage(msg)
        masking = "fitins.config" in msg.content.config_records
        if fault.startswith("drop-") and masking and node in ((5,) if fault.startswith("drop-one") else (4, 5)):
            return None
        if fault == "crash-while-masking" and masking and node == 5:
            return Error(code=wire.ERROR_TRAINING_FAILED, reason="killed while masking")
        if fault == "silent-at-unmask" and stage == Stage.UNMASK and node == 5:
            return None
        return msg

    grid = InProcessGrid(folders, tamper=inject)
    cfg = _cfg(tmp_path, 5, **{"strategy.timeout": 5.0})
    if outcome == "halted":
        with pytest.raises(FederationError):
            _run(grid, cfg, tmp_path)
    else:
        _run(grid, cfg, tmp_path)
    assert unmasked_sums(grid, 4) == unmasked
    journal = _journal(tmp_path)
    assert sum(1 for e in journal if e.get("event")) == 1 >= unmasked  # every sum seen is journaled
    assert journal[-1]["outcome"] == outcome


def test_point6_epsilon_against_the_coordinator_has_no_amplification(tmp_path: Path) -> None:
    from strategies.central_account import CentralAccount

    cfg = config.from_flat({"data.nodes": 20, "secagg.enabled": True, "central_dp.enabled": True,
                            "central_dp.clip_on": "client", "secagg.noise": "distributed", "central_dp.noise_multiplier": 1.0,
                            "central_dp.sampling": "poisson", "central_dp.sample_rate": 0.1,
                            "registry.root": str(tmp_path)})
    account = CentralAccount.start(cfg)
    for r in range(100):
        account.spend(r + 1, "run")
    report = account.report()
    assert report["epsilon"] == pytest.approx(7.899, abs=1e-3)  # for model consumers: amplified by sampling
    unamplified = accounting.epsilon([accounting.GaussianEvent(1.0, 1.0, 1)] * 100, 1e-5)
    assert report["against_coordinator"]["epsilon"] == pytest.approx(unamplified) and unamplified > 90
    # a node that joined 10 of the 100 rounds: its own ledger, with honest peers, says 19.05
    ten = accounting.epsilon([accounting.GaussianEvent(1.0, 1.0, 1)] * 10, 1e-5)
    assert ten == pytest.approx(19.05, abs=0.01)
    server = config.from_flat({"data.nodes": 20, "secagg.enabled": True, "central_dp.enabled": True,
                               "central_dp.clip_on": "client", "registry.root": str(tmp_path)})
    assert CentralAccount.start(server).against_coordinator()["epsilon"] is None  # the coordinator adds the noise


def test_point7_manifests_under_poisson_do_not_depend_on_who_took_part() -> None:
    from fl.registry.checkpoint import manifest_fields

    cfg = config.from_flat({"data.nodes": 20, "central_dp.enabled": True, "central_dp.sampling": "poisson",
                            "central_dp.sample_rate": 0.3, "local_dp.enabled": True})
    small, large = {"epsilon": 3.0, "delta": 1e-5}, {"epsilon": 0.5, "delta": 1e-5}
    views = []
    for trained in ({"1": small, "2": large}, {"2": large}):  # the small site took part, then did not
        record = {"round": 4, "train": {"nodes": {n: {} for n in trained}},
                  "privacy": {"client_level": None, "record_level": trained}}
        fields = manifest_fields(cfg, run_id="r", record=record, node_info={}, resumed_from=None, lineage={})
        views.append(json.dumps(fields["privacy"], sort_keys=True))
    assert views[0] == views[1] and "3.0" not in views[0]


def test_point10_settings_that_cannot_be_honoured_are_refused() -> None:
    with pytest.raises(ConfigError, match="central_dp.delta: 0.5 is not below 1/3"):
        config.from_flat({"data.nodes": 3, "central_dp.enabled": True, "central_dp.delta": 0.5})
    with pytest.raises(ConfigError, match="wraps its 2\\^32 field"):
        config.from_flat({"data.nodes": 1024, "secagg.enabled": True})


def test_point10_the_manifest_counts_the_rounds_noisy_evaluation() -> None:
    from strategies.central_account import privacy_record

    class _NoCentral:
        def report(self) -> None:
            return None

    trained = {"1": {wire.EPSILON_RECORD: 1.0, wire.DELTA_RECORD: 1e-5}}
    evaluated = {"1": {wire.EPSILON_RECORD: 1.2}}
    record = privacy_record(_NoCentral(), trained, evaluated)  # type: ignore[arg-type]
    assert record["record_level"]["1"] == {"epsilon": 1.2, "delta": 1e-5}


def test_point5_three_nodes_one_dropout_unmasks_nothing(sites: Path, tmp_path: Path) -> None:
    """The default set-up, an honest coordinator: threshold 0.7 of 3 nodes. Flower used to get the raw
    fraction (t = 2) and unmasked the 2-node sum, its noise sized for 3, before OncoFed discarded it;
    now Flower itself is told t = 3 and unmasks nothing, and the journal says the round halted."""
    folders = _federation(sites, tmp_path, 3)
    grid = InProcessGrid(folders, tamper=lambda m: None if "fitins.config" in m.content.config_records
                         and m.metadata.dst_node_id == 3 else m)
    with pytest.raises(FederationError):
        _run(grid, _cfg(tmp_path, 3, **{"strategy.timeout": 5.0}), tmp_path)
    assert unmasked_sums(grid, 2) == 0
    journal = _journal(tmp_path)
    assert sum(1 for e in journal if e.get("event")) == 1 and journal[-1]["outcome"] == "halted"


def test_point5_a_resumed_round_is_charged_again(sites: Path, tmp_path: Path) -> None:
    """The coordinator dies after round 2's sum was unmasked, before its commit; --resume re-runs round 2
    with identical updates. Both releases are journaled, and each node charged both contributions."""
    folders = _federation(sites, tmp_path, 3)
    grids = [InProcessGrid(folders)]
    _run(grids[0], _cfg(tmp_path, 3), tmp_path, "first")

    def die_at_evaluation(msg: Message) -> Message:
        if msg.metadata.message_type == MessageType.EVALUATE:
            raise KeyboardInterrupt("coordinator killed between release and commit")
        return msg

    grids.append(InProcessGrid(folders, tamper=die_at_evaluation))
    with pytest.raises(KeyboardInterrupt):
        _run(grids[1], _cfg(tmp_path, 3, **{"registry.resume": True}), tmp_path, "crashed")
    grids.append(InProcessGrid(folders))
    summary = _run(grids[2], _cfg(tmp_path, 3, **{"registry.resume": True}), tmp_path, "resumed")
    assert summary["last_round"] == 2
    seen = sum(unmasked_sums(g, 3) for g in grids)
    assert seen == 3 and summary["privacy"]["client_level"]["rounds"] == 3  # every sum seen is accounted
    for folder in folders.values():
        assert len(_contributions(folder)) == 3


def test_a_setting_the_node_cannot_honour_is_refused_before_anything_is_charged(sites: Path, tmp_path: Path) -> None:
    """A SecAgg+ range too narrow for the noise: every node refuses at masking, before its write-ahead
    entries, so the round's slot is not burned and no budget is spent on nothing."""
    folders = _federation(sites, tmp_path, 3, epsilon=50.0)

    def narrow(msg: Message) -> Message:
        if _stage(msg) == Stage.SETUP:
            msg.content.config_records[RECORD_KEY_CONFIGS][Key.CLIPPING_RANGE] = 2.0**-10
        return msg

    grid = InProcessGrid(folders, tamper=narrow)
    with pytest.raises(FederationError):
        _run(grid, _cfg(tmp_path, 3, **{"local_dp.enabled": True}), tmp_path)
    assert sum("cannot hold a clipped coordinate" in r for r in error_reasons(grid)) == 3
    for folder in folders.values():
        assert _contributions(folder) == [] and Ledger.in_dir(state_dir(folder)).entries() == []


def test_a_share_keys_stage_naming_no_node_is_refused(sites: Path, tmp_path: Path) -> None:
    folders = _federation(sites, tmp_path, 1)
    context = Context(run_id=1, node_id=1, node_config={wire.NODE_DATA_DIR: str(folders[1])}, state=RecordDict(),
                      run_config={})
    assert not _stage_reply(folders[1], _setup(3, 3, 3), context).has_error()
    reply = _stage_reply(folders[1], {Key.STAGE: Stage.SHARE_KEYS, "abc": [b"k", b"k"], "1": [b"a", b"b"],
                                      "2": [b"c", b"d"]}, context)
    assert reply.has_error() and "malformed stage message" in reply.error.reason
