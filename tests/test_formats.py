"""Persistent formats: files written before schema versions still load, new ones carry a version,
and a file from a newer OncoFed is refused with an error naming it (``docs/reference/formats.md``).

``tests/data/formats/v0/`` holds one small real file of each kind, made by
``tests/formats/make_fixtures.py`` with the code before versions existed.
"""

from __future__ import annotations

import json
import shutil
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from fl import schema
from fl.errors import ConfigError, DataError, RegistryError
from fl.privacy import hashchain
from fl.privacy.accounting import GaussianEvent
from fl.privacy.journal import JournalError, ReleaseJournal
from fl.registry import Registry
from fl.registry import records as registry_records
from fl.server.run_folder import RunFolder
from fl.server.witness import LedgerWitness
from nodes import descriptors, fedbn, policy, roster, witness
from nodes.ledger import Ledger, LedgerError

V0 = Path(__file__).parent / "data" / "formats" / "v0"
FUTURE = 99


@pytest.fixture
def v0(tmp_path: Path) -> Path:
    """A writable copy of the v0 files (readers take locks beside them)."""
    shutil.copytree(V0, tmp_path / "v0")
    return tmp_path / "v0"


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ----- the v0 files: no version, and every reader takes them as before -------------------------

def test_v0_fixtures_carry_no_version() -> None:
    for path in V0.rglob("*.json*"):
        for record in _lines(path) if path.suffix == ".jsonl" else [json.loads(path.read_text())]:
            assert schema.KEY not in record, path


def test_v0_node_ledgers_verify_and_count(v0: Path) -> None:
    node = v0 / "node"
    ledger, contributions = Ledger.in_dir(node), Ledger.contributions_in(node)
    assert [e["kind"] for e in ledger.entries()] == ["train", "metrics"]
    assert len(ledger.events()) == 2
    assert [e["kind"] for e in contributions.entries()] == ["train", "evaluate"]
    assert len(contributions.events()) == 1
    # the witness heads: the coordinator's v0 file still matches what the node computes from its v0 ledgers
    heads = LedgerWitness.of(v0 / "registry")
    site, = heads.heads
    assert json.loads(witness.head(node)) == {"site": site, **heads.heads[site]}
    from flwr.app import ConfigRecord

    from fl import wire
    witness.check_acknowledged(node, ConfigRecord({wire.LEDGER_ACKS: heads.acks_for("1234")}))
    assert witness.last_match(node)["record"] == 2


def test_v0_ledger_takes_new_entries_and_still_verifies(v0: Path) -> None:
    ledger = Ledger.in_dir(v0 / "node")
    before = (v0 / "node" / "privacy-ledger.jsonl").read_text().splitlines()
    with ledger.locked():
        ledger.append(GaussianEvent(2.0, 1.0, 1), kind="metrics", run=8, server_round=1)
    entries = ledger.entries()
    assert [e.get(schema.KEY, 0) for e in entries] == [0, 0, 1]
    assert (v0 / "node" / "privacy-ledger.jsonl").read_text().splitlines()[:2] == before  # old lines untouched


def test_v0_node_policy_roster_cache_fedbn(v0: Path) -> None:
    node = v0 / "node"
    pol = policy.load_policy(node)
    assert pol.epsilon == 8.0 and pol.client_epsilon == 8.0 and pol.release_metrics == "noisy"
    pinned = roster.load_roster(node)
    assert pinned.consortium == "fixture consortium" and len(pinned.sites) == 3
    assert descriptors.cached(node, "0" * 32)["noise_std"] == 5.0
    path, = (node / "fedbn").glob("*.safetensors")
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    fedbn.swap_in(net, path)
    with safe_open(str(path), framework="pt") as handle:
        assert torch.equal(net.state_dict()["1.running_var"], handle.get_tensor("1.running_var"))


def test_v0_registry_verifies_with_validations_tags_and_state(v0: Path) -> None:
    from flwr.serverapp.strategy import FedAdam

    from strategies.state import restore_state

    registry = Registry(v0 / "registry")
    versions = registry.verify("fixture")  # hashes, parent chain, validations and tags (fl models verify)
    assert [v.number for v in versions] == [1, 2]
    assert registry.validations(versions[1])[0]["score"] == 0.71
    assert registry.current_tags("fixture") == {"production": 2}
    strategy = FedAdam()
    restore_state(strategy, versions[1].state.read_bytes())
    assert np.array_equal(strategy.m_t["0.weight"], np.zeros((2, 4), dtype=np.float32))


def test_v0_journal_verifies(v0: Path) -> None:
    journal = ReleaseJournal.of(v0 / "registry", "fixture")
    assert journal.events("lineage-0") == [GaussianEvent(1.0, 0.5, 1)]
    assert journal.outcomes("lineage-0") == {"released": 1}
    journal.record("lineage-0", None, round=2, run_id="r", outcome="released")
    assert [e.get(schema.KEY, 0) for e in journal.entries("lineage-0")] == [0, 0, 1]


def test_v0_run_folder_reads(v0: Path) -> None:
    from fl.bench.report import read_rounds

    run = RunFolder(v0 / "run")
    assert run.read_metrics()[0]["round"] == 2
    assert run.read_summary()["rounds"] == 2
    assert read_rounds(v0 / "run")[0]["round"] == 2


# ----- every writer writes the current version ----------------------------------------------------

def test_node_writers_write_the_version(tmp_path: Path) -> None:
    node = tmp_path / "node"
    for factory, kind in ((Ledger.in_dir, "privacy-ledger"), (Ledger.contributions_in, "contributions")):
        ledger = factory(node)
        with ledger.locked():
            entry = ledger.append(None, kind="evaluate", run=1, server_round=1)
        assert entry[schema.KEY] == schema.version(kind) == _lines(ledger.path)[0][schema.KEY]
    policy.save_policy(node, policy.Policy(epsilon=3.0))
    assert tomllib.loads((node / policy.POLICY_FILE).read_text())[schema.KEY] == schema.version("policy")
    assert policy.load_policy(node).epsilon == 3.0
    text = roster.roster_text("c", {f"s{i}": bytes([i + 1]) * 32 for i in range(3)})
    assert json.loads(text)[schema.KEY] == schema.version("roster")
    assert roster.parse_roster(text, "r").digest == roster.parse_roster(
        json.dumps({k: v for k, v in json.loads(text).items() if k != schema.KEY}), "r").digest
    descriptors.keep(node, "k" * 32, {"release": "none"})
    assert json.loads((node / descriptors.CACHE_FILE).read_text())[schema.KEY] == schema.version("descriptors-cache")
    assert descriptors.cached(node, "k" * 32) == {"release": "none"}
    witness._record_match(node, {"record": 1, "contributions": 1})
    assert json.loads((node / witness.WITNESS_FILE).read_text())[schema.KEY] == schema.version("node-witness")
    assert schema.KEY not in witness.last_match(node)
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    path = fedbn.local_path(node, "run")
    fedbn.keep_and_hide(net, {k: v.clone() for k, v in net.state_dict().items()}, path)
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata()[schema.METADATA_KEY] == str(schema.version("fedbn"))


def test_coordinator_writers_write_the_version(tmp_path: Path) -> None:
    from flwr.serverapp.strategy import FedAdam

    from strategies.state import encode_state

    registry = Registry(tmp_path / "registry")
    state = encode_state(FedAdam())
    version = registry.commit("m", weights=b"w", state=state, fields={"task": "t"}, expected_parent=None)
    assert version.manifest[schema.KEY] == schema.version("manifest")
    assert json.loads((version.path / "manifest.json").read_text())[schema.KEY] == schema.version("manifest")
    header = json.loads(state[8: 8 + int.from_bytes(state[:8], "little")])["__metadata__"]
    assert header[schema.METADATA_KEY] == str(schema.version("strategy-state"))
    assert registry.add_validation(version, {"site": "s", "metric": "auc", "score": 0.5})[schema.KEY] == 1
    assert registry.add_tag(version, "prod", {})[schema.KEY] == schema.version("tags")
    assert [v.number for v in registry.verify("m")] == [1]
    journal = ReleaseJournal.of(tmp_path / "registry", "m")
    journal.record("l", GaussianEvent(1.0, 1.0, 1), round=1, run_id="r")
    assert journal.entries("l")[0][schema.KEY] == schema.version("privacy-journal")
    heads = LedgerWitness.of(tmp_path / "registry")
    heads.update([("7", json.dumps({"site": "abc", "record": [1, "x"], "contributions": [0, ""]}))])
    assert json.loads(heads.path.read_text())[schema.KEY] == schema.version("ledger-heads")
    assert LedgerWitness.of(tmp_path / "registry").heads == {"abc": {"record": [1, "x"], "contributions": [0, ""]}}
    run = RunFolder(tmp_path / "run")
    run.path.mkdir()
    run.append_round({"round": 1, "seconds": 1.0})
    run.close()
    run.write_summary({"rounds": 1})
    assert run.read_metrics()[0][schema.KEY] == schema.version("run-metrics")
    assert run.read_summary()[schema.KEY] == schema.version("run-summary")


def test_the_version_is_inside_the_hash(tmp_path: Path) -> None:
    ledger = Ledger.in_dir(tmp_path)
    with ledger.locked():
        ledger.append(None, kind="evaluate", run=1, server_round=1)
    # passed off as an older format (which a reader accepts): the line's hash no longer matches
    line = ledger.path.read_text().replace(f'"{schema.KEY}": 1', f'"{schema.KEY}": 0')
    ledger.path.write_text(line)
    with pytest.raises(LedgerError, match="checksum chain"):
        ledger.entries()


# ----- a newer version is refused, naming the file --------------------------------------------------

def _chained(path: Path, **fields: object) -> None:
    with hashchain.locked(path):
        hashchain.append_entry(path, hashchain.read_chain(path, "x"), {**fields, schema.KEY: FUTURE})


def _refused(error: type[Exception], path: Path, call) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(error) as info:
        call()
    assert str(path) in str(info.value) and f"version {FUTURE}" in str(info.value) and "newer" in str(info.value)
    assert isinstance(info.value, schema.NewerFormatError)


def test_newer_ledgers_and_journal_are_refused(v0: Path) -> None:
    node = v0 / "node"
    for ledger in (Ledger.in_dir(node), Ledger.contributions_in(node)):
        _chained(ledger.path, kind="train", run=9, server_round=1, event=None)
        _refused(LedgerError, ledger.path, ledger.entries)
        with pytest.raises(LedgerError), ledger.locked():
            ledger.append(None, kind="evaluate", run=9, server_round=2)
    journal = ReleaseJournal.of(v0 / "registry", "fixture")
    _chained(journal.path, lineage="lineage-0", event=None, outcome="released")
    _refused(JournalError, journal.path, lambda: journal.entries("lineage-0"))
    _refused(JournalError, journal.path, lambda: journal.record("lineage-0", None, outcome="x"))


def test_newer_registry_files_are_refused(v0: Path) -> None:
    registry = Registry(v0 / "registry")
    version = registry.get("fixture:v2")
    validations = version.path / registry_records.VALIDATIONS_FILE
    registry_records.append(validations, {"site": "s", "metric": "auc", "score": 0.9, "version_hash": version.hash,
                                          schema.KEY: FUTURE}, version.hash)
    _refused(RegistryError, validations, lambda: registry.verify("fixture"))
    shutil.copy(V0 / "registry" / "fixture" / "v2" / registry_records.VALIDATIONS_FILE, validations)
    tags = v0 / "registry" / "fixture" / registry_records.TAGS_FILE
    registry_records.append(tags, {"tag": "x", "version_number": 2, "version_hash": version.hash,
                                   schema.KEY: FUTURE}, None)
    _refused(RegistryError, tags, lambda: registry.current_tags("fixture"))
    manifest = version.path / "manifest.json"
    manifest.write_text(json.dumps({**version.manifest, schema.KEY: FUTURE}))
    _refused(RegistryError, manifest, lambda: registry.verify("fixture"))


def test_newer_node_files_are_refused(v0: Path) -> None:
    node = v0 / "node"
    path = node / policy.POLICY_FILE
    path.write_text(f"{schema.KEY} = {FUTURE}\n" + path.read_text())
    _refused(ConfigError, path, lambda: policy.load_policy(node))
    path = node / roster.ROSTER_FILE
    path.write_text(json.dumps({**json.loads(path.read_text()), schema.KEY: FUTURE}))
    _refused(ConfigError, path, lambda: roster.load_roster(node))
    path = node / descriptors.CACHE_FILE
    path.write_text(json.dumps({**json.loads(path.read_text()), schema.KEY: FUTURE}))
    _refused(DataError, path, lambda: descriptors.cached(node, "0" * 32))
    _refused(DataError, path, lambda: descriptors.keep(node, "1" * 32, {}))
    path = node / witness.WITNESS_FILE
    path.write_text(json.dumps({**json.loads(path.read_text()), schema.KEY: FUTURE}))
    _refused(DataError, path, lambda: witness.last_match(node))
    from safetensors.torch import save_file

    path = node / "fedbn" / "future.safetensors"
    save_file({"1.weight": torch.ones(3)}, str(path), metadata={schema.METADATA_KEY: str(FUTURE)})
    _refused(DataError, path, lambda: fedbn.swap_in(torch.nn.Sequential(torch.nn.Linear(4, 3),
                                                                        torch.nn.BatchNorm1d(3)), path))


def test_newer_coordinator_files_are_refused(v0: Path) -> None:
    from flwr.serverapp.strategy import FedAdam
    from safetensors.numpy import save

    from strategies.state import restore_state

    path = v0 / "registry" / "ledger-heads.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), schema.KEY: FUTURE}))
    _refused(DataError, path, lambda: LedgerWitness.of(v0 / "registry"))
    data = save({"m_t/x": np.zeros(1)}, metadata={schema.METADATA_KEY: str(FUTURE)})
    _refused(DataError, Path("fixture:v2 state"), lambda: restore_state(FedAdam(), data, "fixture:v2 state"))
    run = RunFolder(v0 / "run")
    metrics = run.path / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + json.dumps({"round": 3, schema.KEY: FUTURE}) + "\n")
    _refused(DataError, metrics, run.read_metrics)
    summary = run.path / "summary.json"
    summary.write_text(json.dumps({"rounds": 2, schema.KEY: FUTURE}))
    _refused(DataError, summary, run.read_summary)


def test_check() -> None:
    assert schema.check("manifest", {}, "f") == 0
    assert schema.check("manifest", {schema.KEY: 1}, "f") == 1
    assert schema.check_metadata("fedbn", None, "f") == 0
    for bad in ("1.0", -1, True, 1.5, None):
        with pytest.raises(RegistryError, match="not a version number"):
            schema.check("manifest", {schema.KEY: bad}, "f", error=RegistryError)
    assert set(schema.CURRENT) >= {"privacy-ledger", "contributions", "privacy-journal", "manifest", "validations",
                                   "tags", "ledger-heads", "node-witness", "policy", "roster", "strategy-state",
                                   "fedbn", "run-metrics", "run-summary", "descriptors-cache"}


def test_a_writer_never_replaces_a_newer_file(tmp_path: Path) -> None:
    """A file a newer OncoFed wrote is refused by the writer too: an older one would drop what it
    cannot read (a policy's new limits, say)."""
    path = policy.save_policy(tmp_path, policy.Policy(epsilon=4.0))
    path.write_text(path.read_text().replace(f"{schema.KEY} = 1", f"{schema.KEY} = {FUTURE}"))
    _refused(ConfigError, path, lambda: policy.save_policy(tmp_path, policy.Policy(epsilon=8.0)))
    assert f"{schema.KEY} = {FUTURE}" in path.read_text()  # untouched
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / policy.POLICY_FILE).write_text("not toml [")
    policy.save_policy(tmp_path / "broken", policy.Policy())  # an unreadable file is the writer's to replace
    assert policy.load_policy(tmp_path / "broken") == policy.Policy()


def test_a_json_record_holds_its_version_as_a_number() -> None:
    with pytest.raises(DataError, match="not a version number"):
        schema.check("manifest", {schema.KEY: "1"}, "manifest.json")
    assert schema.check_metadata("fedbn", {schema.METADATA_KEY: "1"}, "x.safetensors") == 1
