from __future__ import annotations

from pathlib import Path

import pytest

from fl.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_config_mistake_is_one_line_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["run", str(REPO / "configs" / "quickstart.toml"), "--out", str(tmp_path / "runs"),
                 "--set", "rouns=2"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert "unknown key 'rouns' (did you mean 'rounds'?)" in err
    assert not (tmp_path / "runs").exists()


def test_missing_data_without_synthesis_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["run", str(REPO / "configs" / "quickstart.toml"), "--out", str(tmp_path / "runs"),
                 "--set", f'data.root="{tmp_path / "none"}"', "--set", "data.synthesize=false"])
    assert code == 2
    assert "data.root:" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_broken_node_data_is_named_before_anything_starts(tiny_federation: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    root = tmp_path / "fed"
    shutil.copytree(tiny_federation, root)
    (root / "node-1" / "labelsTr" / "case_002.nii.gz").write_bytes(b"garbage")
    code = main(["run", str(REPO / "configs" / "quickstart.toml"), "--out", str(tmp_path / "runs"),
                 "--set", f'data.root="{root}"', "--set", "data.nodes=2"])
    err = capsys.readouterr().err
    assert code == 2
    assert "node-1/labelsTr/case_002.nii.gz: unreadable image" in err
    assert not (tmp_path / "runs").exists()


def test_data_synth_writes_one_folder_per_node(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "synth", "--out", str(tmp_path / "d"), "--nodes", "3", "--image-size", "32"]) == 0
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["node-0", "node-1", "node-2"]
    assert main(["data", "synth", "--out", str(tmp_path / "d"), "--nodes", "1"]) == 2
    assert "already exists" in capsys.readouterr().err


def test_config_keys_prints_the_reference(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "keys"]) == 0
    out = capsys.readouterr().out
    assert "`registry.root`" in out and "`train.lr`" in out and "`rounds`" in out


def test_unwritable_registry_is_refused_before_anything_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "registry-is-a-file"
    blocker.write_text("not a folder")
    code = main(["run", str(REPO / "configs" / "quickstart.toml"), "--out", str(tmp_path / "runs"),
                 "--set", f'registry.root="{blocker}"', "--set", f'data.root="{tmp_path / "data"}"'])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert f"registry.root: cannot write to {blocker}/quickstart" in err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "data").exists()
