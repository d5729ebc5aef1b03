"""Shared fixtures: a tiny synthetic federation written once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

import fl.engine_env  # noqa: F401,E402  (before Flower is imported)
from fl.tasks import get_task  # noqa: E402
from nodes.synth import synthesize  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_federation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two seg2d sites of 32x32 images (read-only: copy before changing files)."""
    root = tmp_path_factory.mktemp("fed") / "data"
    synthesize(root, nodes=2, task=get_task("seg2d"), seed=1, image_size=32)
    return root
