"""Run a federation on Flower's Simulation Engine (Ray) in this process.

The ServerApp runs in a thread of this process so the CLI can draw its progress; each
virtual node runs the ClientApp in a Ray actor that lives for the whole run (so a node's
dataset cache survives across rounds). Flower's public ``run_simulation`` hands the
ServerApp an empty run config, so this module calls the engine's entry point behind it,
``flwr.simulation.run_simulation._run_simulation`` (through
:func:`fl.flower_compat.simulation.run_simulation_with_context`; Flower pinned exactly, checked by
``tests/test_flower_compat.py`` and covered by the end-to-end test), with the run config given to both sides: the ServerApp through its
context, the ClientApps through a generated app folder whose ``[tool.flwr.app.config]``
holds the resolved config.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tomli_w  # noqa: E402

import fl.engine_env  # noqa: F401,E402  (before Flower is imported)
from fl.config import Config  # noqa: E402
from fl.server.observer import Observer  # noqa: E402

if TYPE_CHECKING:
    from fl.flower_compat.warm_start import StartedNodes


def backend_config(cfg: Config) -> dict[str, Any]:
    """Ray settings: no dashboard, CPUs of this machine, resources per virtual node."""
    return {
        "client_resources": {"num_cpus": cfg.simulation.cpus_per_node, "num_gpus": 0.0},
        "init_args": {
            "num_cpus": os.cpu_count() or 1,
            "num_gpus": 0,
            "include_dashboard": False,
            "logging_level": "ERROR",
            "log_to_driver": True,
        },
        "actor": {"tensorflow": 0},
    }


def _app_dir(cfg: Config, where: Path) -> Path:
    pyproject = {
        "project": {"name": "oncofed-simulation", "version": "0.0.0"},
        "tool": {
            "flwr": {
                "app": {
                    "publisher": "oncofed",
                    "components": {"serverapp": "fl.server.app:app", "clientapp": "nodes.client_app:app"},
                    "config": cfg.to_flat(),
                }
            }
        },
    }
    (where / "pyproject.toml").write_text(tomli_w.dumps(pyproject), encoding="utf-8")
    return where


def node_modules(cfg: Config) -> tuple[str, ...]:
    """What a virtual node's first message imports: its ClientApp, the task's training code (a
    bundle's: MONAI) and what the first optimizer's construction imports (``torch._dynamo``)."""
    client_app = "nodes.adversary" if cfg.simulation.adversaries else "nodes.client_app"
    image = bool(cfg.bundle) or cfg.task != "tabular"
    return (client_app, *(("fl.learn.bundle", "fl.learn.bundle_train") if image else ("fl.learn.train",)),
            "torch._dynamo")


def start_nodes(cfg: Config) -> StartedNodes:
    """Start Ray and the virtual nodes' processes for ``cfg`` in the background, each importing
    :func:`node_modules` while this process goes on (:mod:`fl.flower_compat.warm_start`); hand
    them to :func:`simulate`, which adopts them, or :meth:`~StartedNodes.discard` them."""
    from fl.flower_compat.warm_start import StartedNodes

    return StartedNodes(backend_config(cfg), node_modules(cfg), cfg.data.nodes)


def simulate(cfg: Config, observer: Observer | None = None, started: StartedNodes | None = None) -> None:
    """Run ``cfg`` with ``cfg.data.nodes`` virtual nodes; blocks until the last round. ``started``: the
    run's nodes from :func:`start_nodes` (started here otherwise). What the config names outside itself
    is checked here, in the caller's thread, before the engine starts."""
    from flwr.app import Context, RecordDict

    cfg.check_resources()
    started = started if started is not None else start_nodes(cfg)
    try:
        from fl.flower_compat.simulation import run_simulation_with_context
        from fl.flower_compat.warm_start import adopting
        from fl.server.app import make_server_app
        if cfg.simulation.adversaries:
            from nodes.adversary import app as client_app
        else:
            from nodes.client_app import app as client_app

        with tempfile.TemporaryDirectory(prefix="oncofed-app-") as tmp, adopting(started):
            server_context = Context(
                run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config=cfg.to_flat()
            )
            run_simulation_with_context(
                num_supernodes=cfg.data.nodes,
                client_app=client_app,
                server_app=make_server_app(observer),
                backend_config=backend_config(cfg),
                server_app_context=server_context,
                app_dir=str(_app_dir(cfg, Path(tmp))),
            )
    finally:
        started.discard()  # those no run took: the engine failed before its pool was built
