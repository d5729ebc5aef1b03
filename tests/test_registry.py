"""The registry: chain, hashes, tampering, crashes and concurrent servers."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fl.registry import Registry, RegistryError, manifest_hash


def _commit(registry: Registry, name: str = "m", round_: int = 1, payload: bytes = b"w", parent: str | None = None):
    return registry.commit(name, weights=payload, state=b"s", fields={"round": round_, "metrics": {"dice": 0.5}},
                           expected_parent=parent)


def _chain(tmp_path: Path, n: int = 3) -> Registry:
    registry = Registry(tmp_path / "reg")
    parent = None
    for i in range(1, n + 1):
        parent = _commit(registry, round_=i, payload=f"weights-{i}".encode(), parent=parent).hash
    return registry


def test_versions_form_a_verified_chain(tmp_path: Path) -> None:
    registry = _chain(tmp_path)
    versions = registry.verify("m")
    assert [v.number for v in versions] == [1, 2, 3]
    assert versions[0].manifest["parent"] is None
    assert [v.manifest["parent"] for v in versions[1:]] == [v.hash for v in versions[:-1]]
    assert all(manifest_hash(v.manifest) == v.hash for v in versions)
    assert registry.get("m").number == 3 and registry.get("m:v2").number == 2 and registry.get("m:1").number == 1


def test_one_flipped_weights_byte_fails_verify_naming_the_version(tmp_path: Path) -> None:
    registry = _chain(tmp_path)
    path = registry.get("m:v2").weights
    data = bytearray(path.read_bytes())
    data[0] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(RegistryError, match=r"^m:v2: model.safetensors does not match its recorded SHA-256"):
        registry.verify("m")


def test_one_changed_manifest_field_fails_verify(tmp_path: Path) -> None:
    registry = _chain(tmp_path)
    path = registry.get("m:v3").path / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["metrics"]["dice"] = 0.99
    path.write_text(json.dumps(manifest))
    with pytest.raises(RegistryError, match=r"^m:v3: manifest fields were changed"):
        registry.verify("m")


def test_a_removed_version_breaks_the_chain(tmp_path: Path) -> None:
    import shutil

    registry = _chain(tmp_path)
    shutil.rmtree(registry.get("m:v2").path)
    with pytest.raises(RegistryError, match=r"^m:v2: manifest says m:v3"):
        registry.verify("m")


def test_lineage_follows_the_run_and_its_resume_not_every_earlier_version(tmp_path: Path) -> None:
    registry, parent = Registry(tmp_path / "reg"), None
    runs = [("a", 1, None), ("a", 2, None), ("b", 1, None), ("b", 2, None), ("c", 3, "m:v4"), ("d", 3, "m:v2")]
    for run, round_, resumed in runs:  # a fresh run b after a, c resumes b at v4, d resumes a at v2
        parent = registry.commit("m", weights=f"{run}{round_}".encode(), state=b"s", expected_parent=parent,
                                 fields={"round": round_, "run_id": run, "resumed_from": resumed}).hash
    def refs(number: int) -> list[str]:
        return [v.ref() for v in registry.lineage(registry.get(f"m:v{number}"))]
    assert refs(2) == ["m:v1", "m:v2"]
    assert refs(4) == ["m:v3", "m:v4"]  # run a is before it in the hash chain, not in its weights
    assert refs(5) == ["m:v3", "m:v4", "m:v5"]
    assert refs(6) == ["m:v1", "m:v2", "m:v6"]
    registry.verify("m")


def test_commit_from_a_stale_parent_is_refused(tmp_path: Path) -> None:
    registry = _chain(tmp_path, n=2)
    stale = registry.get("m:v1").hash
    with pytest.raises(RegistryError, match="another run committed to the same model"):
        _commit(registry, parent=stale)
    assert len(registry.verify("m")) == 2


def test_failure_before_rename_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    registry = _chain(tmp_path, n=1)

    def boom(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "rename", boom)
    with pytest.raises(RegistryError, match="commit of v2 failed .*nothing was committed"):
        _commit(registry, parent=registry.get("m").hash)
    monkeypatch.undo()
    assert len(registry.verify("m")) == 1
    assert not [p for p in (registry.root / "m").iterdir() if p.name.startswith(".staging")]


CRASHER = textwrap.dedent(
    """
    import os, signal, sys
    from fl.registry import Registry
    registry = Registry(sys.argv[1])
    stage = sys.argv[2]
    real_rename, real_write = os.rename, None
    import fl.registry.store as reg
    if stage == "before-rename":
        os.rename = lambda *a: os.kill(os.getpid(), signal.SIGKILL)
    else:  # mid-write: die after the weights file, before the manifest
        real = reg._write
        def dying_write(path, data):
            if path.name == "manifest.json":
                os.kill(os.getpid(), signal.SIGKILL)
            real(path, data)
        reg._write = dying_write
    parent = registry.latest("m").hash
    registry.commit("m", weights=b"new", state=b"s", fields={"round": 9}, expected_parent=parent)
    """
)


@pytest.mark.parametrize("stage", ["mid-write", "before-rename"])
def test_kill_9_during_commit_leaves_a_registry_that_verifies(tmp_path: Path, stage: str) -> None:
    registry = _chain(tmp_path, n=2)
    proc = subprocess.run([sys.executable, "-c", CRASHER, str(registry.root), stage], capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()
    assert [v.number for v in registry.verify("m")] == [1, 2]
    # a later commit goes on from v2 as if nothing happened
    assert _commit(registry, parent=registry.get("m").hash).number == 3
    assert len(registry.verify("m")) == 3


def _race(root: str, worker: int, n: int) -> int:
    registry, done = Registry(root), 0
    while done < n:
        latest = registry.latest("m")
        try:
            _commit(registry, payload=f"{worker}-{done}".encode(), parent=latest.hash if latest else None)
            done += 1
        except RegistryError:
            pass  # the other server won this version; read again
    return done


def test_two_servers_committing_at_once_keep_one_valid_chain(tmp_path: Path) -> None:
    root = str(tmp_path / "reg")
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        counts = pool.starmap(_race, [(root, 0, 15), (root, 1, 15)])
    assert counts == [15, 15]
    versions = Registry(root).verify("m")
    assert [v.number for v in versions] == list(range(1, 31))


def test_bad_names_and_unwritable_roots_are_clear(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="model_name '../x'"):
        Registry(tmp_path).versions("../x")
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    with pytest.raises(RegistryError, match="registry.root: cannot write to .*file/m"):
        _commit(Registry(not_a_folder))


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                           max_leaves=6)


@settings(max_examples=60, deadline=None)
@given(field=st.sampled_from(["round", "metrics", "parent", "version", "name", "weights_sha256", "run_id", "new"]),
       value=JSON_VALUES)
def test_any_manifest_edit_fails_verify_naming_the_version_never_a_traceback(tmp_path_factory, field, value) -> None:  # noqa: ANN001
    registry = _chain(tmp_path_factory.mktemp("h"), n=2)
    path = registry.get("m:v2").path / "manifest.json"
    manifest = json.loads(path.read_text())
    if manifest.get(field, object()) == value:
        return
    manifest[field] = value
    path.write_text(json.dumps(manifest))
    with pytest.raises(RegistryError, match=r"^m:v2: |manifest says"):
        registry.verify("m")


@settings(max_examples=30, deadline=None)
@given(garbage=st.binary(max_size=64))
def test_a_garbage_manifest_is_a_registry_error(tmp_path_factory, garbage: bytes) -> None:  # noqa: ANN001
    registry = _chain(tmp_path_factory.mktemp("g"), n=1)
    (registry.get("m:v1").path / "manifest.json").write_bytes(garbage)
    with pytest.raises(RegistryError):
        registry.verify("m")


def test_verify_on_a_mistyped_registry_path_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fl.cli import main

    assert main(["models", "verify", "--registry", str(tmp_path / "no-such-registry")]) == 2
    err = capsys.readouterr().err
    assert "no-such-registry" in err and "no registry folder" in err
