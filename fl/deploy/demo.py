"""``fl demo deploy``: a real deployment on localhost, end to end.

Certificates (CA, SuperLink, one key pair per hospital) -> synthetic data per hospital -> each
hospital's budget and approved app -> SuperLink with TLS and node authentication -> node
registration -> three ``fl node start`` SuperNodes -> ``flwr run`` of the quickstart with local
DP -> a summary. Certificates, logs, ledgers, the registry and the run folder stay under
``--out``; every process started is stopped on the way out, also on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fl.config import load
from fl.deploy import certs as certs_mod
from fl.deploy import processes as deploy
from fl.deploy.hosts import Host, HostNetwork
from fl.errors import ConfigError, FederationError
from fl.learn import get_task
from fl.learn.synth import node_dir, synthesize
from fl.registry import Registry
from nodes.ledger import Ledger
from nodes.policy import state_dir
from nodes.roster import pin_local_federation
from nodes.supernode import approve, fab_hash_of

APP_DIR = Path(__file__).resolve().parents[2]
MODEL = "deploy-demo"


def app_dir() -> Path:
    if not (APP_DIR / "pyproject.toml").is_file():
        raise ConfigError(f"{APP_DIR}: the demo needs a source checkout of OncoFed (no pyproject.toml found)")
    return APP_DIR


def node_names(n: int) -> list[str]:
    return [f"hospital-{i}" for i in range(n)]


@dataclass(frozen=True)
class NodeOptions:
    """How the demo's nodes serve messages. The defaults are OncoFed's; ``fl bench deploy`` sets
    Flower 1.41's own behaviour (no warm worker, 3 s and 1 s polls, torch's threads) to compare."""

    warm: bool = True  # a warm worker per run (nodes.worker); False: a ClientApp process per message
    poll_interval: float = 0.25  # the node's wait after an empty pull (Flower: 3 s)
    superexec_poll: float = deploy.SUPEREXEC_POLL_S  # a cold node's SuperExec task poll (Flower: 1 s)
    coordinator_poll: float = deploy.COORDINATOR_SUPEREXEC_POLL_S  # the coordinator's SuperExec (Flower: 1 s)
    threads: int | None = None  # torch threads per node; None: one share of the cores; 0: torch's default
    follow_up: str | None = None  # the waits before the first empty pulls after a message; None: the node's

    def args(self, nodes: int) -> list[str]:
        argv = ["--poll-interval", f"{self.poll_interval:g}"] + ([] if self.warm else ["--cold"])
        argv += [] if self.follow_up is None else ["--follow-up-pulls", self.follow_up]
        threads = max(1, (os.cpu_count() or 1) // nodes) if self.threads is None else self.threads
        return argv + (["--threads", str(threads)] if threads else [])


def start_node(procs: deploy.Processes, out: Path, name: str, data: Path, link_port: int, *,
               key: Path | None, budget: float | None, options: NodeOptions = NodeOptions(), nodes: int = 3,
               host: Host | None = None, superlink: str = "127.0.0.1", root_cert: Path | None = None) -> Any:
    """One ``fl node start`` process for ``name`` (its own FLWR_HOME and log), in ``host``'s network
    namespace where one is given, dialling ``superlink:link_port``."""
    argv = [sys.executable, "-m", "fl.cli", "node", "start", "--superlink", f"{superlink}:{link_port}",
            "--data", str(data), "--root-cert", str(root_cert or out / "certs" / "ca.crt"), "--port",
            str(deploy.free_port()),
            *options.args(nodes)]
    if key is not None:
        argv += ["--auth-key", str(key)]
    if budget is not None:
        # synthetic sites: they release exact metrics so the demo can show the Dice; a hospital
        # with a budget releases none unless its operator says otherwise
        argv += ["--budget", str(budget), "--release-metrics", "exact"]
    home = out / "nodes" / name
    home.mkdir(parents=True, exist_ok=True)
    env = deploy.flower_env(home / "flwr-home", options.superexec_poll)
    return procs.start(name, host.argv(argv) if host else argv, env=env, cwd=home, log=out / "logs" / f"{name}.log")


def start_gateway(procs: deploy.Processes, out: Path, link_port: int, *, front: str = "gateway",
                  host: Host | None = None, port: int | None = None) -> int:
    """The Fleet-only front of the SuperLink (``fl server gateway``, or nginx with ``front="nginx"``),
    on the coordinator's address (``host``'s, else 127.0.0.1); the port the nodes dial."""
    port = port or deploy.free_port()
    address = host.address if host else "127.0.0.1"
    if front == "nginx":
        from fl.deploy import nginx

        conf = nginx.write_config(out / "coordinator" / "nginx", listen=f"{address}:{port}",
                                  server_name=host.fqdn if host else "localhost", upstream=f"127.0.0.1:{link_port}",
                                  cert=out / "certs" / "superlink.crt", key=out / "certs" / "superlink.key",
                                  ca_cert=out / "certs" / "ca.crt")
        nginx.check(conf, host.argv([]) if host else None)
        argv = nginx.argv(conf)
    elif front == "gateway":
        argv = [sys.executable, "-m", "fl.cli", "server", "gateway", "--certs", str(out / "certs"),
                "--upstream", f"127.0.0.1:{link_port}", "--host", address, "--port", str(port)]
    else:
        raise ConfigError(f"--front: gateway or nginx, got {front!r}")
    proc = procs.start("front", host.argv(argv) if host else argv, env=deploy.flower_env(out / "coordinator" / "flwr-home"),
                       cwd=out / "coordinator", log=out / "logs" / f"{front}.log")
    _wait_port(host, address, port, proc, out / "logs" / f"{front}.log")
    return port


def _wait_port(host: Host | None, address: str, port: int, proc: Any, log: Path, timeout: float = 60) -> None:
    """Wait until ``address:port`` listens, dialled from inside ``host``'s namespace where given."""
    if host is None:
        deploy.wait_for_port(address, port, timeout, proc, log)
        return
    import subprocess

    probe = ("import socket,sys,time\nd=time.monotonic()+float(sys.argv[3])\nwhile time.monotonic()<d:\n"
             "    try:\n        socket.create_connection((sys.argv[1],int(sys.argv[2])),timeout=0.5).close();"
             "sys.exit(0)\n    except OSError: time.sleep(0.2)\nsys.exit(1)")
    ok = subprocess.run(host.argv([sys.executable, "-c", probe, address, str(port), str(timeout)])).returncode == 0
    if not ok or proc.poll() is not None:
        raise FederationError(f"{address}:{port} in {host.name}: nothing listening; its log ends:\n"
                              f"{deploy.log_tail(log)}")


def wait_online(home: Path, count: int, timeout: float, procs: deploy.Processes) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, proc in procs.procs:
            if proc.poll() is not None:
                raise FederationError(f"{name} exited with status {proc.returncode} before coming online")
        if deploy.online_nodes(home) >= count:
            return
        time.sleep(1.0)
    raise FederationError(f"fewer than {count} nodes online after {timeout:.0f} s")


def run_config(out: Path, rounds: int, nodes: int, overrides: list[str]) -> dict[str, Any]:
    cfg = load(app_dir() / "configs" / "quickstart.toml", [
        f"rounds={rounds}", f"data.nodes={nodes}", "data.synthesize=false", f"data.root='{out / 'data'}'",
        f"model_name='{MODEL}'", f"registry.root='{out / 'registry'}'", f"output.dir='{out / 'runs'}'",
        "output.run_name='deploy'", "local_dp.enabled=true", "local_dp.noise_multiplier=1.0",
        "local_dp.max_grad_norm=1.0", *overrides,
    ])
    return cfg.to_flat()


def prepare(out: Path, nodes: int, names: list[str] | None = None) -> tuple[certs_mod.CertFiles, str]:
    """Certificates (valid for localhost and the extra ``names``), data, each node's approval of this
    checkout's app (its FAB hash), and each node's site key with one consortium roster pinned on all
    (``secagg.protocol = "malicious"``; 3 nodes or more)."""
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out}: exists and is not empty; the demo writes a fresh folder")
    files = certs_mod.create(out / "certs", ["localhost", "127.0.0.1", *(names or [])], node_names(nodes))
    synthesize(out / "data", nodes=nodes, task=get_task("seg2d"))
    fab = fab_hash_of(app_dir())
    for i in range(nodes):
        approve(state_dir(node_dir(out / "data", i)), fab, note="fl demo deploy")
    pin_local_federation(out / "data", nodes, consortium="fl demo deploy")
    return files, fab


@dataclass
class Cluster:
    """A coordinator (SuperLink, its Fleet-only front) and ``nodes`` hospitals, on localhost or, with
    ``hosts``, each in its own network namespace (:mod:`fl.deploy.hosts`). Each part can be stopped
    and started again (the fault benchmark does). ``isolation="process"`` runs the ServerApp under
    the coordinator's own SuperExec, so it outlives a SuperLink restart."""

    out: Path
    nodes: int = 3
    hosts: bool = False
    front: str = "gateway"
    budget: float | None = 20.0
    options: NodeOptions = field(default_factory=NodeOptions)
    isolation: str = "subprocess"
    say: Callable[[str], None] = print

    def __post_init__(self) -> None:
        self.out = self.out.resolve()
        self.names = node_names(self.nodes)
        self.network = HostNetwork(self.names, tag=f"{os.getpid()}-{id(self) % 10000}") if self.hosts else None
        self.home = self.out / "coordinator" / "flwr-home"
        self.procs = deploy.Processes()
        self.link_port = 9100 if self.hosts else deploy.free_port()
        self.fleet_port = 9443 if self.hosts else 0
        self.started: dict[str, Any] = {}

    @property
    def coordinator(self) -> Host | None:
        return self.network.coordinator if self.network else None

    def host(self, name: str) -> Host | None:
        return self.network.hosts[name] if self.network else None

    @property
    def dial(self) -> str:
        """The coordinator's name or address as the hospitals dial it."""
        return self.network.coordinator.fqdn if self.network else "127.0.0.1"

    def start(self) -> Cluster:
        extra = [self.network.coordinator.fqdn] if self.network else []
        self.files, self.fab = prepare(self.out, self.nodes, extra)
        self.say(f"certificates in {self.files.root}; app hash {self.fab[:16]}... approved by {self.nodes} nodes")
        if self.network:
            self.network.up()
            self.say("hosts: " + ", ".join(f"{h['fqdn']} {h['address']}" for h in self.network.describe()))
        deploy.write_connection(self.home, f"127.0.0.1:{self.link_port}", self.files.ca_cert,
                                netns=self.network.coordinator.netns if self.network else None)
        self.start_superlink()
        self.fleet_port = start_gateway(self.procs, self.out, self.link_port, front=self.front, host=self.coordinator,
                                        port=self.fleet_port or None)
        self.say(f"SuperLink on the coordinator's 127.0.0.1:{self.link_port} (TLS, node authentication); nodes "
                 f"dial the Fleet-only {self.front} on {self.dial}:{self.fleet_port}")
        for name in self.names:
            deploy.register_node(self.home, self.files.node_pub(name), name)
        for name in self.names:
            self.start_node(name)
        wait_online(self.home, self.nodes, 120 + 15 * self.nodes, self.procs)  # nodes import torch at start
        if self.network:
            self.exposed = self.exposure()
            self.say(f"from each hospital only {self.dial}:{self.fleet_port} answers; its Control API answers 403")
        return self

    def exposure(self) -> dict[str, Any]:
        """From each hospital's namespace: which listening sockets of the other hosts answer (only the
        coordinator's published port may), and what the published port answers to the Control and
        runtime APIs (403 each). A FederationError where either fails."""
        from fl.deploy.hosts import front_answers, reachable_ports

        assert self.network is not None
        published = f"{self.network.coordinator.address}:{self.fleet_port}"
        found: dict[str, Any] = {}
        for name in self.names:
            dialled = reachable_ports(self.network, name)
            reachable = sorted(target for target, ok in dialled.items() if ok)
            answers = front_answers(self.network, name, f"https://{self.dial}:{self.fleet_port}", self.files.ca_cert)
            found[name] = {"dialled": sorted(dialled), "reachable": reachable, "control_api": answers}
            if reachable != [published]:
                raise FederationError(f"{name} reaches {reachable}; only the coordinator's {published} may be")
            if set(answers.values()) != {403}:
                raise FederationError(f"the published port answered {answers} to {name}; only 403 is acceptable")
        return found

    def start_superlink(self) -> None:
        argv = deploy.superlink_argv(self.files, self.out / "coordinator", "127.0.0.1", self.link_port,
                                     isolation=self.isolation)
        host, log = self.coordinator, self.out / "logs" / "superlink.log"
        env = deploy.flower_env(self.home, self.options.coordinator_poll)
        link = self.procs.start("superlink", host.argv(argv) if host else argv, env=env, cwd=self.out / "coordinator",
                                log=log)
        self.started["superlink"] = link
        _wait_port(host, "127.0.0.1", self.link_port, link, log)
        if self.isolation == "process" and not self._alive("superexec"):
            argv = deploy.superexec_argv(self.files, "127.0.0.1", self.link_port)
            self.started["superexec"] = self.procs.start("superexec", host.argv(argv) if host else argv, env=env,
                                                         cwd=self.out / "coordinator",
                                                         log=self.out / "logs" / "superexec.log")

    def _alive(self, name: str) -> bool:
        proc = self.started.get(name)
        return proc is not None and proc.poll() is None

    def start_node(self, name: str, root_cert: Path | None = None) -> Any:
        """Start (or restart) hospital ``name``; ``root_cert``: the CA it trusts (the consortium's by default)."""
        i = self.names.index(name)
        proc = start_node(self.procs, self.out, name, node_dir(self.out / "data", i), self.fleet_port,
                          key=self.files.node_key(name), budget=self.budget, options=self.options, nodes=self.nodes,
                          host=self.host(name), superlink=self.dial, root_cert=root_cert)
        self.started[name] = proc
        return proc

    def kill(self, name: str) -> None:
        """SIGKILL a part's whole process group (a SuperNode with its worker and SuperExec)."""
        proc = self.started[name]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        self.forget(proc)

    def forget(self, proc: Any) -> None:
        """A process that ended is no longer one of the cluster's (a restart is checked on its own)."""
        self.procs.procs = [(n, p) for n, p in self.procs.procs if p is not proc]

    def submit(self, flat: dict[str, Any], name: str, timeout: float) -> dict[str, Any]:
        """Submit a run of ``flat`` and follow it to its end; the SuperLink's record of the run."""
        path = deploy.write_run_config(flat, self.out / f"{name}.toml")
        with (self.out / "logs" / f"{name}.log").open("w", encoding="utf-8") as log, \
                contextlib.suppress(FederationError):
            deploy.submit(self.home, app_dir(), path, log, timeout)
        return deploy.last_run(self.home)

    def stop(self) -> None:
        self.procs.stop_all()
        if self.network:
            self.network.down()


def run_demo(out: Path, *, rounds: int = 2, nodes: int = 3, budget: float | None = 20.0, timeout: float = 1200,
             overrides: list[str] | None = None, say: Callable[[str], None] = print,
             options: NodeOptions = NodeOptions(), hosts: bool = False, front: str = "gateway") -> dict[str, Any]:
    """Run the deployment (localhost, or separate hosts in network namespaces); a summary of it."""
    cluster = Cluster(out, nodes=nodes, hosts=hosts, front=front, budget=budget, options=options, say=say)
    flat = run_config(cluster.out, rounds, nodes, overrides or [])
    started = time.monotonic()
    with deploy.stopped_on_exit(cluster.procs):
        try:
            cluster.start()
            modes = [name for name, key in (("local DP", "local_dp.enabled"), ("central DP", "central_dp.enabled"),
                                             ("SecAgg+", "secagg.enabled")) if flat[key]]
            say(f"{nodes} SuperNodes online ({'warm workers' if options.warm else 'a ClientApp process per message'}); "
                f"submitting {rounds} rounds ({', '.join(modes) or 'no DP'}; node budget "
                f"{'none' if budget is None else f'{budget:g}'})")
            config_path = deploy.write_run_config(flat, cluster.out / "run-config.toml")
            with (cluster.out / "logs" / "run.log").open("w", encoding="utf-8") as log:
                deploy.submit(cluster.home, app_dir(), config_path, log, timeout)
            run = deploy.last_run(cluster.home)
        finally:
            cluster.stop()
    out = cluster.out
    summary = summarise(out, run, nodes, time.monotonic() - started)
    summary["hosts"] = cluster.network.describe() if cluster.network else None
    summary["exposure"] = getattr(cluster, "exposed", None)
    summary["front"] = front
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    if run.get("status") != "finished:completed":
        raise FederationError(f"run {run.get('run-id')} ended {run.get('status')}; see {out / 'logs' / 'run.log'}")
    if not summary["versions"]:
        raise FederationError(f"no model version was committed; see {out / 'logs' / 'run.log'}")
    return summary


def summarise(out: Path, run: dict[str, Any], nodes: int, wall: float) -> dict[str, Any]:
    versions = Registry(out / "registry").versions(MODEL)
    metrics_path = out / "runs" / "deploy" / "metrics.jsonl"
    rounds = [json.loads(line) for line in metrics_path.read_text().splitlines()] if metrics_path.exists() else []
    return {
        "run_id": run.get("run-id"), "status": run.get("status"), "fab_hash": run.get("fab-hash"),
        "versions": [v.ref() for v in versions],
        "ledger_entries": {f"hospital-{i}": len(Ledger.in_dir(state_dir(node_dir(out / "data", i))).entries())
                           for i in range(nodes)},
        "round_seconds": {r["round"]: r["seconds"] for r in rounds},
        "final_dice": rounds[-1]["evaluate"]["aggregate"].get("dice") if rounds else None,
        "wall_seconds": wall,
    }
