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


OBJECT_FIRST_RETRY_S = 0.05


def prompt_object_pulls(first_retry: float = OBJECT_FIRST_RETRY_S) -> bool:
    """Make this process retry a message's not-yet-arrived content after ``first_retry`` s
    (doubling from there) instead of Flower 1.41's 1 s (then 2, 4, ... up to 10 s).

    In a deployment a message becomes visible before its content: the ServerApp pushes the
    message, then its arrays; a SuperNode stores the message, then pulls the arrays; so the
    first pull of the content often finds nothing and Flower waits a whole second (then two) on
    every hop, every message. The patch (Flower's keyword defaults, rewritten process-wide) is
    :func:`fl.flower_compat.engine.prompt_object_pulls`; False, and nothing changed, if Flower
    no longer has them (``tests/test_flower_compat.py`` checks that it does)."""
    from fl.flower_compat.engine import prompt_object_pulls as patch_object_pulls

    return patch_object_pulls(first_retry)
