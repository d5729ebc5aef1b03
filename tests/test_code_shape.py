"""The code's shape: no function or method in the product packages runs over 60 lines."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("fl", "nodes", "strategies")
MAX_LINES = 60


def function_lengths(path: Path) -> list[tuple[str, int]]:
    """Every function in ``path`` (methods and nested ones included) with its length in lines, from
    its ``def`` line to its last line (decorators excluded)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return [(node.name, node.end_lineno - node.lineno + 1)  # type: ignore[operator]
            for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]


def test_no_function_is_longer_than_60_lines() -> None:
    too_long = [
        f"{path.relative_to(REPO)}: {name} has {length} lines"
        for package in PACKAGES
        for path in sorted((REPO / package).rglob("*.py"))
        for name, length in function_lengths(path)
        if length > MAX_LINES
    ]
    assert not too_long, f"functions over {MAX_LINES} lines (split them into named steps):\n" + "\n".join(too_long)


def test_a_long_function_is_named(tmp_path: Path) -> None:
    planted = tmp_path / "planted.py"
    body = "".join(f"    x{i} = {i}\n" for i in range(60))
    planted.write_text(f"@decorated\ndef long_one():\n{body}\n\ndef short_one():\n    return 1\n")
    assert function_lengths(planted) == [("long_one", 61), ("short_one", 2)]
