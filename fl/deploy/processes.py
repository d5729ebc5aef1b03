"""Flower's Deployment Engine for OncoFed: the coordinator's SuperLink, node registration,
run submission, and the localhost demo.

Nothing here is a transport: the SuperLink and SuperNodes are Flower's own processes,
started with TLS, SuperNode authentication, runtime dependency installation off (hospitals
are offline) and telemetry off. The coordinator's Flower CLI state (connection, FAB cache)
lives in ``<state>/flwr-home``, never in the user's ``~/.flwr``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import tomli_w

from fl.deploy.certs import CertFiles
from fl.engine_env import with_own_scripts
from fl.errors import ConfigError, FederationError

CONNECTION = "oncofed"


SUPEREXEC_POLL_S = 0.05  # a cold node's SuperExec: it starts a ClientApp process for every message
# The coordinator's SuperExec only starts a run's ServerApp; it polls the SuperLink all run long, so a
# short interval costs every round (0.05 s: 20 requests a second) to save a fraction of a second once.
COORDINATOR_SUPEREXEC_POLL_S = 0.5


def flower_env(home: Path, superexec_poll: float = SUPEREXEC_POLL_S) -> dict[str, str]:
    """Environment for a Flower process: its own FLWR_HOME, no phoning home, no installs, and
    Flower's SuperExec (it starts the ServerApp, and a cold node's ClientApp processes) looking for
    tasks every ``superexec_poll`` s (Flower: 1 s; a local call, no network)."""
    env = with_own_scripts(dict(os.environ))
    env.update({
        "FLWR_HOME": str(home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": f"{superexec_poll:g}",
    })
    return env


def _tool(name: str) -> str:
    """A console script of this environment (beside the running interpreter)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def superlink_argv(certs: CertFiles, state: Path, host: str, port: int, *, isolation: str = "subprocess") -> list[str]:
    """``flower-superlink`` with TLS, node authentication, a persistent database, no installs.
    ``isolation="process"``: the ServerApp runs under a separate SuperExec (:func:`superexec_argv`),
    so it outlives a SuperLink restart instead of dying with it."""
    certs.require_server()
    return [
        _tool("flower-superlink"),
        "--ssl-ca-certfile", str(certs.ca_cert), "--ssl-certfile", str(certs.server_cert),
        "--ssl-keyfile", str(certs.server_key), "--enable-supernode-auth",
        "--disable-runtime-dependency-installation", "--database", str(state / "superlink.db"),
        "--host", host, "--port", str(port), "--isolation", isolation,
    ]


def superexec_argv(certs: CertFiles, host: str, port: int) -> list[str]:
    """The coordinator's own SuperExec for a SuperLink under ``--isolation process``: it starts each
    run's ServerApp against the SuperLink's runtime API (TLS, the coordinator's CA)."""
    return [_tool("flower-superexec"), "--runtime-api-address", f"{host}:{port}", "--root-certificates",
            str(certs.ca_cert)]


NETNS_FILE = "netns"  # in a coordinator's FLWR_HOME: the network namespace its SuperLink lives in


def write_connection(home: Path, address: str, ca_cert: Path, netns: str | None = None) -> Path:
    """The coordinator's Flower CLI connection to its SuperLink, over TLS; ``netns``: the
    coordinator's network namespace (``fl demo deploy --hosts``), where every ``flwr`` call runs."""
    home.mkdir(parents=True, exist_ok=True)
    if netns is not None:
        (home / NETNS_FILE).write_text(netns, encoding="utf-8")
    path = home / "config.toml"
    path.write_text(tomli_w.dumps({"superlink": {
        "default": CONNECTION, CONNECTION: {"address": address, "root-certificates": str(ca_cert.resolve())},
    }}), encoding="utf-8")
    return path


def _in_netns(home: Path, argv: list[str]) -> list[str]:
    """``argv`` inside the coordinator's network namespace, where its home names one."""
    netns = home / NETNS_FILE
    return ["ip", "netns", "exec", netns.read_text(encoding="utf-8").strip(), *argv] if netns.is_file() else argv


def _flwr(home: Path, *args: str, timeout: float = 120) -> dict[str, Any]:
    """Run a ``flwr`` CLI command with ``--format json``; its JSON answer, or an error."""
    proc = subprocess.run(_in_netns(home, [_tool("flwr"), *args, "--format", "json"]), env=flower_env(home),
                          capture_output=True, text=True, timeout=timeout, cwd=home)
    try:
        answer = json.loads(proc.stdout[proc.stdout.index("{"):])
    except ValueError:
        answer = {}
    if proc.returncode != 0 or not answer.get("success", False):
        detail = answer.get("error-message") or (proc.stderr or proc.stdout).strip().splitlines()[-1:]
        raise FederationError(f"flwr {args[0]} {args[1] if len(args) > 1 else ''}: {detail}")
    return answer


def register_node(home: Path, public_key: Path, name: str) -> str:
    """Register a node's public key with the SuperLink; its node id."""
    if not public_key.is_file():
        raise ConfigError(f"{public_key}: public key not found")
    answer = _flwr(home, "supernode", "register", str(public_key.resolve()), CONNECTION, "--name", name)
    return str(answer.get("node-id", ""))


def online_nodes(home: Path) -> int:
    answer = _flwr(home, "supernode", "ls", CONNECTION)
    return sum(1 for n in answer.get("nodes", []) if n.get("status") == "online")


def write_run_config(flat: dict[str, Any], path: Path) -> Path:
    """A Flower ``--run-config`` TOML file for a flat OncoFed config."""
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        table = nested
        for parent in parents:
            table = table.setdefault(parent, {})
        table[leaf] = value
    path.write_text(tomli_w.dumps(nested), encoding="utf-8")
    return path


def submit(home: Path, app_dir: Path, run_config: Path, log: IO[str], timeout: float) -> None:
    """``flwr run APP oncofed --stream``: submit the run and follow its log until it ends."""
    if not (app_dir / "pyproject.toml").is_file():
        raise ConfigError(f"{app_dir}: not a Flower app folder (no pyproject.toml)")
    proc = subprocess.run(_in_netns(home, [_tool("flwr"), "run", str(app_dir), CONNECTION, "--run-config",
                                           str(run_config), "--stream"]),
                          env=flower_env(home), stdout=log, stderr=subprocess.STDOUT, timeout=timeout, cwd=home)
    if proc.returncode != 0:
        raise FederationError(f"flwr run exited with status {proc.returncode}; see {log.name}")


def last_run(home: Path) -> dict[str, Any]:
    runs = _flwr(home, "ls", CONNECTION).get("runs", [])
    if not runs:
        raise FederationError("the SuperLink lists no run")
    return max(runs, key=lambda r: r.get("pending-at", ""))


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def log_tail(path: Path, lines: int = 12) -> str:
    """The last lines of a process log, for an error message."""
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"({path}: {exc.strerror})"


def wait_for_port(host: str, port: int, timeout: float, proc: subprocess.Popen[Any] | None = None,
                  log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise FederationError(f"process {proc.args[0]} exited with status {proc.returncode} before listening"
                                  + (f"; its log ends:\n{log_tail(log)}" if log is not None else ""))
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.2)
    raise FederationError(f"{host}:{port}: nothing listening after {timeout:.0f} s")


@dataclass
class Processes:
    """Child processes, each leading its own process group (Flower's SuperExec and app
    processes are its descendants); :meth:`stop_all` ends every group, also on interrupt."""

    procs: list[tuple[str, subprocess.Popen[Any]]] = field(default_factory=list)

    def start(self, name: str, argv: list[str], *, env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen[Any]:
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs.append((name, proc))
        return proc

    def stop_all(self, grace: float = 5.0) -> None:
        for _, proc in reversed(self.procs):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for _, proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
        for _, proc in self.procs:  # the group too: SuperExec children may outlive their parent
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        self.procs.clear()


@contextlib.contextmanager
def stopped_on_exit(processes: Processes) -> Iterator[Processes]:
    """Stop every started process on return, error, Ctrl-C or SIGTERM."""

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield processes
    finally:
        processes.stop_all()
        signal.signal(signal.SIGTERM, previous)
