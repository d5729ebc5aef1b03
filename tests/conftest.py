"""Shared fixtures: a tiny synthetic federation written once per session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

import fl.engine_env  # noqa: F401,E402  (before Flower is imported)

if os.environ.get("PYTEST_XDIST_WORKER"):
    # one thread per test process, and per process it starts (deployed nodes, `fl` subprocesses):
    # the test workers already use every core, and torch's default of one thread per core in each
    # of them made the in-process training of one worker compete with the other's for the same cores
    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

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
DEPLOYMENT_MODULES = {"test_deploy", "test_deploy_hosts", "test_warm_nodes"}  # real SuperLink, SuperNodes and workers
FEDERATION_MODULES = {"test_simulation", "test_simulation_dp", "test_simulation_faults", "test_secagg",
                      "test_crash_resume", "test_validation", "test_distributed_noise"}  # federations on Flower's Simulation Engine


# The longest modules (by one CI run, 2026-12-07), first: run with --no-loadscope-reorder (as the
# Makefile does), pytest-xdist hands whole modules to the workers in collection order, so the long
# ones start at once and the short ones fill the workers' ends; the others keep their order after.
LONGEST_FIRST = ("test_bundle", "test_crash_resume", "test_deploy", "test_deploy_hosts", "test_secagg",
                 "test_simulation_faults", "test_console", "test_simulation", "test_hostile_coordinator",
                 "test_bench", "test_simulation_dp", "test_distributed_noise", "test_malicious_secagg",
                 "test_validation", "test_dp_utility", "test_local_dp")


def _module(item: pytest.Item) -> str:
    return item.module.__name__.rsplit(".", 1)[-1] if item.module else ""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        module = _module(item)
        if module in DEPLOYMENT_MODULES:
            item.add_marker(pytest.mark.deployment)
        elif module in FEDERATION_MODULES:
            item.add_marker(pytest.mark.federation)
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(_module(item), len(rank)))  # stable: a module's own order stays


@pytest.fixture(scope="session", autouse=True)
def one_ray_cluster_per_test_process() -> Iterator[None]:
    """The in-process simulations of one test process share one Ray cluster of one CPU, started by
    the first and shut down when the session ends. Flower's ``RayBackend.terminate`` shuts Ray down after
    every run, and starting it again costs about 5 s on CI's two cores, paid by some thirty runs.
    The virtual nodes (actors, each in its own worker process) are still created and killed per
    run, so no node state crosses runs; the launch that ships (``fl run`` in its own process, as
    the subprocess tests and ``make run`` run it) keeps Flower's own terminate."""
    from flwr.server.superlink.fleet.vce.backend import raybackend

    original, original_init = raybackend.RayBackend.terminate, raybackend.RayBackend.init_ray

    def terminate_actors_only(self: raybackend.RayBackend) -> None:
        for actor in self.pool.pool if self.pool else []:  # at once, not after their queued calls
            raybackend.ray.kill(actor, no_restart=True)

    def one_cpu(self: raybackend.RayBackend, backend_config: dict) -> None:  # type: ignore[type-arg]
        # one virtual node process per run (the nodes take turns on it): each such process imports
        # torch and MONAI (about 8 CPU s), and the test workers already keep every core busy
        init_args = {**backend_config.get("init_args", {}), "num_cpus": 1}
        original_init(self, {**backend_config, "init_args": init_args})

    raybackend.RayBackend.terminate = terminate_actors_only  # type: ignore[method-assign]
    raybackend.RayBackend.init_ray = one_cpu  # type: ignore[method-assign]
    yield
    raybackend.RayBackend.terminate = original  # type: ignore[method-assign]
    raybackend.RayBackend.init_ray = original_init  # type: ignore[method-assign]
    if raybackend.ray.is_initialized():
        raybackend.ray.shutdown()
