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
    every hop, every message. Flower takes the wait from the keyword defaults of
    ``pull_objects`` and ``pull_and_inflate_object_from_tree``
    (``flwr/supercore/inflatable/inflatable_utils.py``); this sets them. False, and nothing
    changed, if Flower no longer has them (tests check that it does)."""
    from flwr.supercore.inflatable import inflatable_utils

    functions = (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree)
    if not all("initial_backoff" in (f.__kwdefaults__ or {}) for f in functions):
        return False
    for function in functions:
        function.__kwdefaults__["initial_backoff"] = first_retry  # type: ignore[index]
    return True
