"""The Simulation Engine's entry point behind Flower's public ``run_simulation``.

Flower 1.41's ``flwr.simulation.run_simulation`` (public) hands the ServerApp an empty run
config; its private ``_run_simulation`` (same module) accepts the ServerApp's context and an app
folder, which :mod:`fl.server.simulation` needs to give the run config to both sides. It also
needs the telemetry event to report on exit (``EventType.PYTHON_API_RUN_SIMULATION_LEAVE``, the
one ``run_simulation`` passes). If Flower renames or re-signs ``_run_simulation`` the simulation
fails at start: the canary checks every keyword used here.
"""

from __future__ import annotations

from typing import Any

from flwr.app import Context
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

RUN_SIMULATION_KEYWORDS = ("num_supernodes", "exit_event", "client_app", "server_app", "backend_name",
                           "backend_config", "server_app_context", "app_dir", "is_app")


def run_simulation_with_context(*, num_supernodes: int, client_app: ClientApp, server_app: ServerApp,
                                backend_config: dict[str, Any], server_app_context: Context, app_dir: str) -> None:
    """Run ``server_app`` against ``num_supernodes`` virtual nodes on Ray, the ServerApp with
    ``server_app_context`` and the ClientApps with the app folder ``app_dir``'s config; blocks."""
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.telemetry import EventType

    _run_simulation(
        num_supernodes=num_supernodes,
        exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
        client_app=client_app,
        server_app=server_app,
        backend_name="ray",
        backend_config=backend_config,
        server_app_context=server_app_context,
        app_dir=app_dir,
        is_app=True,
    )
