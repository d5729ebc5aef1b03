"""Environment for Flower and Ray in every OncoFed launcher; import before Flower.

A privacy framework does not phone home: Flower's telemetry and update check and Ray's usage
statistics are off unless the user set them explicitly.
"""

import os
import sys
from collections.abc import MutableMapping
from pathlib import Path
from typing import TypeVar

M = TypeVar("M", bound=MutableMapping[str, str])

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # CPU nodes: keep Ray quiet


def with_own_scripts(env: M) -> M:
    """``env`` with this environment's console scripts first on PATH: Flower's SuperLink and
    SuperNode start ``flower-superexec`` by name, which a venv used without activation lacks."""
    scripts = str(Path(sys.executable).parent)
    path = env.get("PATH", "")
    if path.split(os.pathsep)[0] != scripts:
        env["PATH"] = scripts + (os.pathsep + path if path else "")
    return env
