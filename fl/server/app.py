"""The Flower ServerApp: read the run config, run the rounds, write the run folder.

``flwr run .`` loads the module-level ``app``; ``fl run`` builds one with its own observer
(the live progress display) through :func:`make_server_app`.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fl.config import from_flat
from fl.engine_env import prompt_object_pulls
from fl.errors import ConfigError
from fl.server.observer import LogObserver, Observer
from fl.server.rounds import run_federation
from fl.server.run_folder import run_dir_for


def make_server_app(observer: Observer | None = None) -> ServerApp:
    """A ServerApp reporting progress to ``observer`` (log lines by default)."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        prompt_object_pulls()  # the replies' arrays, in a deployment (fl.engine_env)
        cfg = from_flat(dict(context.run_config), source="run config")
        try:
            cfg.check_resources()  # where the config enters the coordinator: its bundle, its public cases
        except ConfigError as exc:
            raise ConfigError(f"run config: {exc}") from None
        if cfg.validation.ref:  # fl validate: one evaluation of a registered version at every site
            from fl.server.validate import run_validation

            run_validation(grid, cfg, run_dir_for(cfg), observer or LogObserver())
            return
        run_federation(grid, cfg, run_dir_for(cfg), observer or LogObserver())

    return server_app


app = make_server_app()
