"""``fl demo deploy``: a real deployment on localhost, end to end.

Certificates (CA, SuperLink, one key pair per hospital) -> synthetic data per hospital -> each
hospital's budget and approved app -> SuperLink with TLS and node authentication -> node
registration -> three ``fl node start`` SuperNodes -> ``flwr run`` of the quickstart with local
DP -> a summary. Certificates, logs, ledgers, the registry and the run folder stay under
``--out``; every process started is stopped on the way out, also on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fl.config import load
from fl.deploy import certs as certs_mod
from fl.deploy import processes as deploy
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
               key: Path | None, budget: float | None, options: NodeOptions = NodeOptions(), nodes: int = 3) -> Any:
    """One ``fl node start`` process for ``name`` (its own FLWR_HOME and log)."""
    argv = [sys.executable, "-m", "fl.cli", "node", "start", "--superlink", f"127.0.0.1:{link_port}",
            "--data", str(data), "--root-cert", str(out / "certs" / "ca.crt"), "--port", str(deploy.free_port()),
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
    return procs.start(name, argv, env=env, cwd=home, log=out / "logs" / f"{name}.log")


def start_gateway(procs: deploy.Processes, out: Path, link_port: int) -> int:
    """``fl server gateway`` in front of the SuperLink; the port the nodes dial."""
    port = deploy.free_port()
    argv = [sys.executable, "-m", "fl.cli", "server", "gateway", "--certs", str(out / "certs"),
            "--upstream", f"127.0.0.1:{link_port}", "--host", "127.0.0.1", "--port", str(port)]
    proc = procs.start("gateway", argv, env=deploy.flower_env(out / "coordinator" / "flwr-home"),
                       cwd=out / "coordinator", log=out / "logs" / "gateway.log")
    deploy.wait_for_port("127.0.0.1", port, 60, proc, out / "logs" / "gateway.log")
    return port


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


def prepare(out: Path, nodes: int) -> tuple[certs_mod.CertFiles, str]:
    """Certificates, data, each node's approval of this checkout's app (its FAB hash), and each
    node's site key with one consortium roster pinned on all (``secagg.protocol = "malicious"``;
    3 nodes or more)."""
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out}: exists and is not empty; the demo writes a fresh folder")
    names = node_names(nodes)
    files = certs_mod.create(out / "certs", ["localhost", "127.0.0.1"], names)
    synthesize(out / "data", nodes=nodes, task=get_task("seg2d"))
    fab = fab_hash_of(app_dir())
    for i in range(nodes):
        approve(state_dir(node_dir(out / "data", i)), fab, note="fl demo deploy")
    pin_local_federation(out / "data", nodes, consortium="fl demo deploy")
    return files, fab


def run_demo(out: Path, *, rounds: int = 2, nodes: int = 3, budget: float | None = 20.0, timeout: float = 1200,
             overrides: list[str] | None = None, say: Callable[[str], None] = print,
             options: NodeOptions = NodeOptions()) -> dict[str, Any]:
    """Run the localhost deployment; a summary of what it produced."""
    out = out.resolve()
    files, fab = prepare(out, nodes)
    say(f"certificates in {files.root}; app hash {fab[:16]}... approved by {nodes} nodes")
    home = out / "coordinator" / "flwr-home"
    link_port = deploy.free_port()
    deploy.write_connection(home, f"127.0.0.1:{link_port}", files.ca_cert)
    flat = run_config(out, rounds, nodes, overrides or [])
    config_path = deploy.write_run_config(flat, out / "run-config.toml")
    started = time.monotonic()
    with deploy.stopped_on_exit(deploy.Processes()) as procs:
        link = procs.start("superlink", deploy.superlink_argv(files, out / "coordinator", "127.0.0.1", link_port),
                           env=deploy.flower_env(home, options.coordinator_poll), cwd=out / "coordinator",
                           log=out / "logs" / "superlink.log")
        deploy.wait_for_port("127.0.0.1", link_port, 60, link, out / "logs" / "superlink.log")
        fleet_port = start_gateway(procs, out, link_port)
        say(f"SuperLink on 127.0.0.1:{link_port} (TLS, node authentication); nodes dial the Fleet-only "
            f"gateway on 127.0.0.1:{fleet_port}")
        for name in node_names(nodes):
            deploy.register_node(home, files.node_pub(name), name)
        for i, name in enumerate(node_names(nodes)):
            start_node(procs, out, name, node_dir(out / "data", i), fleet_port, key=files.node_key(name), budget=budget,
                       options=options, nodes=nodes)
        wait_online(home, nodes, 180, procs)
        modes = [name for name, key in (("local DP", "local_dp.enabled"), ("central DP", "central_dp.enabled"),
                                         ("SecAgg+", "secagg.enabled")) if flat[key]]
        say(f"{nodes} SuperNodes online ({'warm workers' if options.warm else 'a ClientApp process per message'}); "
            f"submitting {rounds} rounds ({', '.join(modes) or 'no DP'}; node budget "
            f"{'none' if budget is None else f'{budget:g}'})")
        with (out / "logs" / "run.log").open("w", encoding="utf-8") as log:
            deploy.submit(home, app_dir(), config_path, log, timeout)
        run = deploy.last_run(home)
    summary = summarise(out, run, nodes, time.monotonic() - started)
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
