"""Shared fixtures: a tiny synthetic federation written once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

import fl.engine_env  # noqa: F401,E402  (before Flower is imported)
from fl.learn import get_task  # noqa: E402
from fl.learn.synth import synthesize  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_federation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two seg2d sites of 32x32 images (read-only: copy before changing files)."""
    root = tmp_path_factory.mktemp("fed") / "data"
    synthesize(root, nodes=2, task=get_task("seg2d"), seed=1, image_size=32)
    return root


# The slow classes of test, by module: `pytest -m "not federation and not deployment"` is the quick
# loop (a few minutes); CI runs everything and prints the 15 slowest tests (--durations=15).
DEPLOYMENT_MODULES = {"test_deploy", "test_warm_nodes"}  # real SuperLink, SuperNodes and workers
FEDERATION_MODULES = {"test_simulation", "test_simulation_dp", "test_simulation_faults", "test_secagg",
                      "test_crash_resume", "test_validation", "test_distributed_noise"}  # federations on Flower's Simulation Engine


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1] if item.module else ""
        if module in DEPLOYMENT_MODULES:
            item.add_marker(pytest.mark.deployment)
        elif module in FEDERATION_MODULES:
            item.add_marker(pytest.mark.federation)
