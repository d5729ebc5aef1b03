"""The Simulation Engine's virtual-node processes, started while the coordinator starts.

What Flower 1.41 does: ``_run_simulation`` starts the ServerApp's thread first, then the
Simulation Engine, whose ``RayBackend`` starts Ray (``init_ray``, skipped when Ray is already
up) and, in ``build``, a ``BasicActorPool`` of ``ClientAppActor`` actors, one Ray worker process
per slot. Each such process imports the ClientApp's modules (torch, MONAI, the node's code) at its
first message: 6 to 7 CPU seconds each on the project's 2-core machine, on the clock of the run's
first round, after the coordinator has already spent as long importing the same libraries.

What this module does: :class:`StartedNodes` starts Ray through ``RayBackend``'s own constructor
(so ``init_ray``'s arguments, its ``PYTHONPATH`` runtime environment and any test patch of it
apply) and creates actors, as many as the run has nodes and the machine has slots, in a
background thread, each importing the given modules as it is created (Flower's
``on_actor_init_fn``), while the coordinator imports its own libraries, prepares the data and
builds its first model. Ray starts its own processes with ``PR_SET_PDEATHSIG``, which fires when the *thread* that
started them ends, so that thread lives as long as Ray does. :func:`adopting` wraps, for one run,
``RayBackend.init_ray`` (the engine waits for the early start rather than starting a second Ray
beside it) and ``RayBackend.build`` (the pool takes the started actors, last in its list, which
is where it hands actors out from, and creates only the rest of its capacity); the pool's own
``terminate`` stops them as it stops its own. The actors belong to the run that started them:
created for it, adopted by it, killed when it ends or (:meth:`StartedNodes.discard`) when it fails
before its engine starts; no state crosses runs.

If Flower changes: the canary in ``tests/test_flower_compat.py`` checks ``build``'s and the pool's
signatures, that ``init_ray`` skips a running Ray, the pool's ``pool``, ``num_actors``,
``actors_capacity``, ``add_actors_to_pool`` and that it hands out actors with ``pool.pop()``, and
``ClientAppActor``'s ``on_actor_init_fn``. If starting early fails (Ray, an actor), nothing is
adopted and Flower starts its nodes as it always does.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

log = logging.getLogger("flwr.oncofed.simulation")
_OWNER_POLL_S = 1.0


def import_modules(names: tuple[str, ...]) -> None:
    """Import ``names`` in this (actor) process; a failure is logged, not raised: the first message
    imports them again and fails there, through the ClientApp's own error path."""
    for name in names:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - the actor must come up; its first message reports the failure
            log.exception("virtual node: importing %s ahead of the first message failed", name)
            return


def _names_ray_writes_exist() -> None:
    """Flower's ``init_ray`` and ``ray.init`` write ``PYTHONPATH`` and ``PYTHONBREAKPOINT``. Writing a
    variable the environment lacks reallocates it, which is unsafe while another thread reads it
    (torch's and MONAI's imports do, in this one), so both exist before the starting thread writes
    them. (``ray.init`` on the main thread would also install a SIGTERM handler; Ray's own native
    handler aborts the process on SIGTERM either way, measured before and after this module.)"""
    for name in ("PYTHONPATH", "PYTHONBREAKPOINT"):
        os.environ.setdefault(name, "")  # empty: as if unset, for Python and for Flower's PYTHONPATH


class StartedNodes:
    """Ray and the run's virtual-node actors (one per node, at most one per slot of the machine),
    starting in a background thread from creation."""

    def __init__(self, backend_config: dict[str, Any], modules: tuple[str, ...], nodes: int) -> None:
        # imported here, in the caller's thread: two threads importing one package's modules at
        # once can meet Python's import-deadlock check
        from flwr.server.superlink.fleet.vce.backend import raybackend
        from flwr.simulation.ray_transport import ray_actor

        self._raybackend, self._ray_actor = raybackend, ray_actor
        if not raybackend.ray.is_initialized():
            _names_ray_writes_exist()
        self._config, self._modules, self._nodes = backend_config, modules, nodes
        self._actors: list[Any] = []
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._start, name="oncofed-start-nodes", daemon=True)
        self._thread.start()

    def _start(self) -> None:
        ray = self._raybackend.ray
        owner = not ray.is_initialized()
        actors: list[Any] = []
        try:
            backend = self._raybackend.RayBackend(self._config)  # starts Ray unless it is up
            # no more than the nodes: Flower fills the machine with actors, and one that never
            # serves a message should not import torch and MONAI
            capacity = min(self._nodes, self._ray_actor.pool_size_from_resources(backend.client_resources))
            init = functools.partial(import_modules, self._modules)
            actors = [self._ray_actor.ClientAppActor.options(**backend.client_resources).remote(  # type: ignore[attr-defined]
                on_actor_init_fn=init) for _ in range(capacity)]
        except Exception:  # noqa: BLE001 - Flower's own start follows and reports what is wrong
            log.debug("virtual nodes could not be started early", exc_info=True)
        finally:  # whatever happened, nobody waits for ever
            with self._lock:
                self._actors = actors
            self._ready.set()
        del actors  # the run holds the handles now: an actor dies when its last handle goes
        # Ray's own processes die with the thread that started them (PR_SET_PDEATHSIG)
        while owner and ray.is_initialized():
            time.sleep(_OWNER_POLL_S)

    @property
    def thread(self) -> threading.Thread:
        """The thread that starts Ray and the actors (and, if it started Ray, lives as long as Ray)."""
        return self._thread

    def wait(self) -> None:
        """Until Ray is up (or failed to start) and the actors are created."""
        self._ready.wait()

    def take(self) -> list[Any]:
        """The started actors (none if starting failed), once; waits for the start to finish."""
        self.wait()
        with self._lock:
            actors, self._actors = self._actors, []
        return actors

    def discard(self) -> None:
        """Kill the actors no run took (a run that failed before its engine started)."""
        for actor in self.take():
            with contextlib.suppress(Exception):
                self._raybackend.ray.kill(actor, no_restart=True)


@contextlib.contextmanager
def adopting(started: StartedNodes) -> Iterator[None]:
    """While inside, the Simulation Engine waits for ``started`` before it starts Ray (so it finds Ray
    up instead of starting a second one beside it), and its actor pool starts with ``started``'s
    actors, creating only the rest of its capacity (``RayBackend.init_ray`` and ``build`` wrapped,
    restored on exit)."""
    from flwr.server.superlink.fleet.vce.backend import raybackend
    from flwr.simulation.ray_transport import ray_actor

    original_init, original_build = raybackend.RayBackend.init_ray, raybackend.RayBackend.build

    def init_ray(self: Any, backend_config: Any) -> None:
        if threading.current_thread() is not started.thread:  # the starting thread itself goes on
            started.wait()
        original_init(self, backend_config)

    def build(self: Any, app_fn: Any) -> None:
        pool = ray_actor.BasicActorPool(actor_type=ray_actor.ClientAppActor, client_resources=self.client_resources,
                                        actor_kwargs=self.actor_kwargs)
        actors = started.take()
        for extra in actors[pool.actors_capacity:]:  # none unless the cluster shrank meanwhile
            raybackend.ray.kill(extra, no_restart=True)
        actors = actors[:pool.actors_capacity]
        pool.add_actors_to_pool(pool.actors_capacity - len(actors))
        pool.pool.extend(actors)  # last: the pool hands out its actors from the end of its list
        pool.num_actors += len(actors)
        self.pool, self.app_fn = pool, app_fn

    raybackend.RayBackend.init_ray = init_ray  # type: ignore[method-assign]
    raybackend.RayBackend.build = build  # type: ignore[method-assign]
    try:
        yield
    finally:
        raybackend.RayBackend.init_ray = original_init  # type: ignore[method-assign]
        raybackend.RayBackend.build = original_build  # type: ignore[method-assign]
