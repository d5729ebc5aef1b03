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
from typing import Any

import tomli_w  # noqa: E402

import fl.engine_env  # noqa: F401,E402  (before Flower is imported)
from fl.config import Config  # noqa: E402
from fl.server.observer import Observer  # noqa: E402


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


def simulate(cfg: Config, observer: Observer | None = None) -> None:
    """Run ``cfg`` with ``cfg.data.nodes`` virtual nodes; blocks until the last round. What the
    config names outside itself is checked here, in the caller's thread, before the engine starts."""
    from flwr.app import Context, RecordDict

    cfg.check_resources()

    from fl.flower_compat.simulation import run_simulation_with_context
    from fl.server.app import make_server_app
    if cfg.simulation.adversaries:
        from nodes.adversary import app as client_app
    else:
        from nodes.client_app import app as client_app

    with tempfile.TemporaryDirectory(prefix="oncofed-app-") as tmp:
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
