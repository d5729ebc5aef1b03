"""The documentation: generated reference pages are current, links resolve, the site builds.

README.md is the entry page; the rest lives in docs/ and is built with MkDocs Material
(mkdocs.yml). ``mkdocs build --strict`` turns a missing page, an unknown link or a missing anchor
into an error; the link test below also covers README.md, BENCHMARKS.md and SECURITY.md, which
GitHub renders from the repository root.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fl.cli import reference

REPO = Path(__file__).resolve().parents[1]
TOP_LEVEL = ["README.md", "BENCHMARKS.md", "SECURITY.md"]

_FENCE = re.compile(r"^( {0,4})(```|~~~).*?^\1\2[ \t]*$", re.MULTILINE | re.DOTALL)
_INLINE_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def _markdown_files() -> list[Path]:
    return [REPO / name for name in TOP_LEVEL] + sorted((REPO / "docs").rglob("*.md"))


def _links(path: Path) -> list[str]:
    """Every link target in a Markdown file, code blocks and code spans left out."""
    text = _INLINE_CODE.sub("", _FENCE.sub("", path.read_text(encoding="utf-8")))
    return _LINK.findall(text)


def _relative(target: str) -> bool:
    return not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) and not target.startswith("#")


def test_generated_reference_pages_are_current() -> None:
    for path, text in reference.pages().items():
        name = path.relative_to(REPO)
        assert path.is_file(), f"{name} is missing: run {reference.REGENERATE}"
        assert path.read_text(encoding="utf-8") == text, f"{name} is stale: run {reference.REGENERATE}"


def test_cli_reference_covers_every_command() -> None:
    from fl.cli import _parser

    page = reference.cli_markdown()
    for command, _summary in reference._walk(_parser()):
        if command.prog != "fl":
            assert f"\n## {command.prog}\n" in page
    assert "## fl node policy" in page and "`--epsilon EPSILON`" in page


@pytest.mark.parametrize("path", _markdown_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_point_at_files_in_the_repository(path: Path) -> None:
    broken = []
    for target in _links(path):
        if not _relative(target):
            continue
        file_part = target.split("#", 1)[0]
        if not file_part:
            continue
        resolved = (path.parent / file_part).resolve()
        if not resolved.is_relative_to(REPO):
            broken.append(f"{target} (outside the repository)")
        elif not resolved.exists():
            broken.append(f"{target} (no such file)")
    assert not broken, f"{path.relative_to(REPO)}: broken links: {broken}"


def _github_anchors(path: Path) -> set[str]:
    """The anchors GitHub gives a Markdown file's headings (lower case, punctuation dropped)."""
    text = _FENCE.sub("", path.read_text(encoding="utf-8"))
    anchors = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*$", text, re.MULTILINE):
        anchors.add(re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-"))
    return anchors


@pytest.mark.parametrize("name", TOP_LEVEL)
def test_top_level_anchors_exist(name: str) -> None:
    """GitHub renders these files from the repository root; mkdocs checks only docs/'s anchors."""
    path = REPO / name
    missing = []
    for target in _links(path):
        if not _relative(target) and not target.startswith("#"):
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if anchor and anchor not in _github_anchors(linked):
            missing.append(target)
    assert not missing, f"{name}: links to missing anchors: {missing}"


def test_readme_links_stay_in_the_repository() -> None:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert "../shared" not in text
    targets = [target for target in _links(REPO / "README.md") if _relative(target)]
    assert any(target.startswith("docs/") for target in targets)
    assert all(not target.startswith(("/", "..")) for target in targets), targets


def test_readme_keeps_the_two_commands() -> None:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert "make run     # set up .venv, then the quickstart" in text
    assert "make test    # set up .venv, then the whole test suite (what CI runs: .ci/run)" in text
    assert "make test" in (REPO / ".ci" / "run").read_text(encoding="utf-8")


def test_link_finder_sees_links_and_skips_code() -> None:
    sample = REPO / "docs" / "index.md"
    assert "tutorial/quickstart.md" in _links(sample)
    assert _LINK.findall('[a](b.md#c) ![i](x.png) [t](y.md "title")') == ["b.md#c", "x.png", "y.md"]



def test_site_builds_strict(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
    assert (tmp_path / "site" / "benchmarks" / "index.html").is_file()
    security = (tmp_path / "site" / "security" / "index.html").read_text(encoding="utf-8")
    assert "Who sees what" in security
