"""The virtual nodes started while the coordinator starts (:mod:`fl.flower_compat.warm_start`).

Flower's actor pool, built inside :func:`adopting`, holds the started actors last, where it hands
actors out from, and they imported what they were told before any message (an actor Flower starts
itself has not); the actors no run took are killed; a module that fails to import leaves the actor
up for the ClientApp's own error path. The tests' Ray cluster has one CPU (``tests/conftest.py``).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest

from fl import config as config_mod
from fl.flower_compat.warm_start import StartedNodes, adopting
from fl.server.simulation import backend_config, node_modules

REPO = Path(__file__).resolve().parents[1]
MARK = "poplib"  # a standard-library module nothing here imports: an actor holding it imported ahead
BROKEN = "oncofed_no_such_module"


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    return backend_config(config_mod.load(str(REPO / "configs" / "quickstart.toml"), []))


def _holds(actor: Any, module: str) -> bool:
    import ray

    return bool(ray.get(actor.__ray_call__.remote(lambda _actor: module in sys.modules), timeout=120))


def _built(config: dict[str, Any]) -> Any:
    from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend

    backend = RayBackend(config)
    backend.build(lambda: None)
    return backend


def _kill(backend: Any) -> None:
    import ray

    for actor in backend.pool.pool:
        ray.kill(actor, no_restart=True)


def test_the_pool_takes_the_started_nodes_which_imported_ahead_of_any_message(config: dict[str, Any]) -> None:
    cold = _built(config)  # Flower's own start, for contrast
    try:
        assert not _holds(cold.pool.pool[-1], MARK)
    finally:
        _kill(cold)

    half = {**config, "client_resources": {**config["client_resources"], "num_cpus": 0.5}}  # two slots
    started = StartedNodes(half, (MARK,), nodes=1)  # one node: one actor started ahead, the other slot cold
    with adopting(started):
        backend = _built(half)
    try:
        pool = backend.pool
        assert pool.num_actors == len(pool.pool) == pool.actors_capacity == 2
        assert _holds(pool.pool[-1], MARK)  # the actor the pool hands out first
        assert not _holds(pool.pool[0], MARK)  # Flower's own, for a second message at once
        assert started.take() == []  # adopted once
    finally:
        _kill(backend)


def test_unadopted_nodes_are_killed_and_a_failed_import_leaves_the_node_up(config: dict[str, Any]) -> None:
    import ray
    from ray.exceptions import RayActorError

    started = StartedNodes(config, (MARK,), nodes=3)
    started.wait()
    handles = list(started._actors)  # the test keeps its own handles: an actor outlives them otherwise
    assert len(handles) == 1
    started.discard()
    with pytest.raises(RayActorError):
        ray.get(handles[0].__ray_ready__.remote(), timeout=120)

    started = StartedNodes(config, (BROKEN, MARK), nodes=1)
    actors = started.take()
    try:
        assert len(actors) == 1
        assert ray.get(actors[0].__ray_ready__.remote(), timeout=120)
        assert not _holds(actors[0], MARK)  # stopped at the failure; the first message meets it again
    finally:
        for actor in actors:
            ray.kill(actor, no_restart=True)


def test_the_nodes_import_their_task_code_not_another_tasks() -> None:
    image = config_mod.load(str(REPO / "configs" / "quickstart.toml"), [])
    tabular = image.replace(task="tabular")
    assert node_modules(image) == ("nodes.client_app", "fl.learn.bundle", "fl.learn.bundle_train", "torch._dynamo")
    assert node_modules(tabular) == ("nodes.client_app", "fl.learn.train", "torch._dynamo")
    for name in node_modules(image) + node_modules(tabular):  # each is a module that exists
        assert importlib.util.find_spec(name) is not None
