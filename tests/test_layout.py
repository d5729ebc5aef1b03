"""The import rules in pyproject.toml ([tool.importlinter]) hold, and they are not decoration:
one forbidden import in a copy of the tree breaks them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINT = str(Path(sys.executable).parent / "lint-imports")


def _lint(root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(root)}  # the copy's packages before the installed ones
    return subprocess.run([LINT, "--no-cache"], cwd=root, env=env, capture_output=True, text=True, timeout=300)


def test_import_contracts_hold() -> None:
    result = _lint(REPO)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "0 broken" in result.stdout


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tree")
    for name in ("fl", "nodes", "strategies"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", root)
    return root


@pytest.mark.parametrize(("module", "planted", "reported"), [
    # the node's side importing aggregation
    ("nodes/ledger.py", "from strategies.central_dp import CentralDP", "nodes.ledger -> strategies.central_dp"),
    # the server reaching the node's runtime outside the simulation launcher
    ("fl/server/rounds.py", "from nodes.policy import Policy", "fl.server.rounds -> nodes.policy"),
    # the task layer reaching the node's runtime
    ("fl/learn/train.py", "from nodes.ledger import Ledger", "fl.learn.train -> nodes.ledger"),
    # an import circle inside nodes/
    ("nodes/ledger.py", "from nodes.policy import Policy", "No cycles are allowed in nodes"),
])
def test_a_forbidden_import_breaks_them(tree: Path, module: str, planted: str, reported: str) -> None:
    path = tree / module
    original = path.read_text()
    path.write_text(original + f"\n{planted}  # noqa: E402,F401\n")
    try:
        result = _lint(tree)
    finally:
        path.write_text(original)
    assert result.returncode != 0
    assert reported in result.stdout, result.stdout[-3000:]
