"""Faults injected while a deployed DP run with SecAgg+ trains across separate hosts: one table.

    python bench/deploy_faults.py [--out DIR] [--only NAME ...] [--rounds 3] [--front nginx]

Each row is a fresh deployment (`fl demo deploy --hosts`: the coordinator and three hospitals in
network namespaces, nginx in front of the SuperLink, the SuperLink on its SQLite state database
under ``--isolation process`` with the coordinator's own SuperExec), running ``--rounds`` rounds of
local DP + central DP (clipped on the nodes, noised by the server) + SecAgg+, with one fault
injected mid-run. Then, from the files alone:

- outcome: the run's status on the SuperLink (and the resumed run's, where one was needed);
- versions: committed versions, each checked with ``Registry.verify`` (the hash chain);
- releases: client-level releases in the server's journal against the releases the coordinator
  made (a round aggregated, or a model sent out before the fault);
- ledgers: per node, record-level ledger entries against the trainings the node itself served
  (its requests log) and the updates the coordinator received (metrics.jsonl): no spend lost (every
  training it served is in its ledger), none counted twice (one entry per run and round), chain intact;
- error: what an operator reads (the first line naming the fault in the logs).

Needs root, iproute2 and nginx (as `fl demo deploy --hosts`). Writes ``faults.json`` and prints a
Markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fl.deploy import processes as deploy  # noqa: E402
from fl.deploy.demo import Cluster, NodeOptions, run_config  # noqa: E402
from fl.learn.synth import node_dir  # noqa: E402
from fl.privacy.journal import ReleaseJournal  # noqa: E402
from fl.registry import Registry  # noqa: E402
from nodes.ledger import Ledger  # noqa: E402
from nodes.policy import state_dir  # noqa: E402
from nodes.requests_log import read as read_requests  # noqa: E402
from nodes.worker import STATUS_FILE  # noqa: E402

MODEL = "faults"


def status(cluster: Cluster, name: str) -> dict[str, Any]:
    with contextlib.suppress(OSError, ValueError):
        return dict(json.loads((cluster.out / "runs" / name / "status.json").read_text()))
    return {}


def wait_for(what: Callable[[], bool], timeout: float, label: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if what():
            return

        time.sleep(0.05)
    raise TimeoutError(f"waited {timeout:.0f} s for {label}")


def in_phase(cluster: Cluster, name: str, server_round: int, phase: str) -> Callable[[], bool]:
    """The run is at ``server_round`` (or later) in ``phase`` ("train" includes "train (secure
    aggregation)"); a RuntimeError if it finished first: the fault would come too late."""
    def check() -> bool:
        s = status(cluster, name)
        if s.get("state") in ("finished", "failed"):
            raise RuntimeError(f"the run ended before round {server_round}'s {phase}")
        return bool(s.get("round", 0) >= server_round and str(s.get("phase", "")).startswith(phase))
    return check


def finished(cluster: Cluster, name: str) -> bool:
    return status(cluster, name).get("state") in ("finished", "failed")


def worker_busy(cluster: Cluster, node: int, kind: str) -> Callable[[], bool]:
    path = state_dir(node_dir(cluster.out / "data", node)) / "worker" / STATUS_FILE

    def check() -> bool:
        with contextlib.suppress(OSError, ValueError):
            return json.loads(path.read_text()).get("busy") == kind
        return False
    return check


ANSI = re.compile(r"\x1b\[[0-9;]*m")  # the colour codes of Flower's log lines


def error_line(logs: Path, fault: str) -> str:
    """What an operator reads for ``fault`` in a row's logs: the run's own log first (the node's
    own for a certificate fault, where the run never hears of it), then every other log."""
    first = logs / ("hospital-3.log" if fault.startswith("cert-") else "first.log")
    return grep_first([first, *sorted(logs.glob("*.log"))], ERRORS[fault])


def grep_first(paths: list[Path], patterns: list[str]) -> str:
    """The first line of ``paths`` (in order) that matches the first pattern matching anywhere."""
    texts = []
    for path in paths:
        with contextlib.suppress(OSError):
            texts.append((path, path.read_text(encoding="utf-8", errors="replace").splitlines()))
    for pattern in patterns:
        for path, lines in texts:
            for line in lines:
                if re.search(pattern, line):
                    plain = ANSI.sub("", line).strip()
                    return f"{path.name}: {plain[:220]}"
    return ""


# -- the faults: each gets the cluster and the run's name, injects while the run goes on, and
#    returns what happened (and, where the run must be resumed, what it released before) ---------


def superlink_restart(cluster: Cluster, run: str) -> dict[str, Any]:
    wait_for(in_phase(cluster, run, 2, "train"), 600, "round 2's training")
    time.sleep(1.0)
    cluster.kill("superlink")
    down = time.monotonic()
    time.sleep(5.0)
    cluster.start_superlink()
    return {"injected": f"SuperLink SIGKILL in round 2's training, restarted on its database after "
                        f"{time.monotonic() - down:.0f} s"}


def link_down(cluster: Cluster, run: str) -> dict[str, Any]:
    wait_for(in_phase(cluster, run, 2, "train"), 600, "round 2's training")
    assert cluster.network is not None
    cluster.network.set_link("hospital-1", False)
    wait_for(lambda: finished(cluster, run) or in_phase(cluster, run, 3, "train")(), 900, "round 3")
    cluster.network.set_link("hospital-1", True)
    return {"injected": "hospital-1's link down from round 2's training until round 3 started"}


def supervise(cluster: Cluster, name: str) -> int:
    """Start node ``name`` again every 10 s until it stays up (what systemd's Restart=on-failure does);
    how many starts it took."""
    starts = 0
    while starts < 20:
        proc = cluster.start_node(name)
        starts += 1
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=45)
        if proc.poll() is None:
            return starts
        cluster.forget(proc)
        time.sleep(10.0)
    raise RuntimeError(f"{name} did not stay up after {starts} starts")


def node_killed(cluster: Cluster, run: str) -> dict[str, Any]:
    wait_for(in_phase(cluster, run, 2, "train"), 600, "round 2's training")
    wait_for(worker_busy(cluster, 0, "train"), 600, "hospital-0 training")
    time.sleep(0.3)
    cluster.kill("hospital-0")  # fl node start, its SuperNode, SuperExec and warm worker
    killed = time.monotonic()
    time.sleep(3.0)
    # the operator's supervisor (systemd Restart=on-failure, RestartSec=10): the SuperLink refuses to
    # activate the node's key again until its old session expires, and the SuperNode then exits
    starts = supervise(cluster, "hospital-0")
    return {"injected": f"hospital-0's SuperNode and worker SIGKILLed while training round 2; restarted by a "
                        f"supervisor every 10 s, online after {starts} start(s), "
                        f"{time.monotonic() - killed:.0f} s after the kill"}


def serverapp_killed(cluster: Cluster, run: str) -> dict[str, Any]:
    wait_for(in_phase(cluster, run, 2, "evaluate"), 600, "round 2's evaluation")
    import psutil

    killed = []
    for proc in psutil.Process(cluster.started["superexec"].pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "flwr-serverapp" in " ".join(proc.cmdline()):
                proc.kill()
                killed.append(proc.pid)
    if not killed:
        raise RuntimeError("no ServerApp process found under the coordinator's SuperExec")
    seen = status(cluster, run)
    return {"injected": f"ServerApp SIGKILLed after round {seen.get('round')}'s model went out for evaluation, "
                        f"before its commit; resumed with registry.resume", "resume": True,
            "released_before_kill": 1}


def disk_full(cluster: Cluster, run: str) -> dict[str, Any]:
    state = state_dir(node_dir(cluster.out / "data", 2))
    wait_for(in_phase(cluster, run, 2, "train"), 600, "round 2's training")
    filler = state / "filler"
    with contextlib.suppress(OSError), filler.open("wb", buffering=0) as fh:  # ENOSPC on a write or the close
        while True:
            fh.write(b"\0" * 65536)
    wait_for(lambda: finished(cluster, run) or in_phase(cluster, run, 3, "train")(), 900, "round 3")
    filler.unlink()
    return {"injected": "hospital-2's state folder (a 16 MB tmpfs) filled during round 2, freed at round 3"}


def _ca_copy(cluster: Cluster, kind: str) -> Path:
    """A CA certificate for a node to trust: the consortium's CA re-issued with a validity that
    ended yesterday ("expired"), or another CA altogether ("other-ca")."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    real = x509.load_pem_x509_certificate(cluster.files.ca_cert.read_bytes())
    if kind == "expired":
        key = serialization.load_pem_private_key(cluster.files.ca_key.read_bytes(), password=None)
        subject, end = real.subject, datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=1)
    else:
        key = ec.generate_private_key(ec.SECP384R1())
        subject, end = real.subject, datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=30)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(end - datetime.timedelta(days=30))
            .not_valid_after(end).add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA384()))  # type: ignore[arg-type]
    path = cluster.out / f"ca-{kind}.crt"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def bad_certificate(kind: str) -> Callable[[Cluster, str], dict[str, Any]]:
    """Hospital-3 (of 4 registered) restarted, before the run, trusting a bad CA; the run asks for 3
    nodes, so it goes on with the others while hospital-3 cannot connect."""
    def inject(cluster: Cluster, run: str) -> dict[str, Any]:
        what = "the consortium CA re-issued expired yesterday" if kind == "expired" else "another CA"
        return {"injected": f"hospital-3 (of 4 registered) restarted before the run trusting {what}"}
    return inject


ERRORS: dict[str, list[str]] = {  # what an operator reads for each fault: patterns, the most telling first
    "superlink-restart": [r"(?i)connection to the superlink", r"(?i)unavailable"],
    "superlink-restart-no-secagg": [r"(?i)connection to the superlink", r"(?i)unavailable"],
    "link-down": [r"did not train", r"no reply within", r"Node Unavailable"],
    "node-killed": [r"did not train", r"error 40\d\d", r"worker died"],
    "serverapp-killed": [r"(?i)no heartbeat received"],  # else the SuperLink's verdict, as `flwr ls` shows it
    "disk-full": [r"did not train", r"(?i)no space left"],
    "cert-expired": [r"(?i)certificate verify failed", r"(?i)SSL|TLS"],
    "cert-other-ca": [r"(?i)certificate verify failed", r"(?i)SSL|TLS"],
}

FAULTS: dict[str, tuple[Callable[[Cluster, str], dict[str, Any]], bool]] = {
    "superlink-restart": (superlink_restart, True),
    "superlink-restart-no-secagg": (superlink_restart, False),
    "link-down": (link_down, True),
    "node-killed": (node_killed, True),
    "serverapp-killed": (serverapp_killed, True),
    "disk-full": (disk_full, True),
    "cert-expired": (bad_certificate("expired"), True),
    "cert-other-ca": (bad_certificate("other-ca"), True),
}


def limited_state(cluster: Cluster, node: int, size: str = "16m") -> Path:
    """Mount a size-limited tmpfs over a node's state folder, its files copied in."""
    state = state_dir(node_dir(cluster.out / "data", node))
    keep = state.with_name(".oncofed-copy")
    shutil.copytree(state, keep)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(state)], check=True)
    shutil.copytree(keep, state, dirs_exist_ok=True)
    shutil.rmtree(keep)
    return state


def node_ids(cluster: Cluster) -> dict[str, str]:
    ids = {}
    for name in cluster.names:
        found = re.findall(r"SuperNode ID: (\d+)", (cluster.out / "logs" / f"{name}.log").read_text())
        if found:
            ids[found[-1]] = name
    return ids


def account(cluster: Cluster, runs: list[str], released_extra: int) -> dict[str, Any]:
    registry = Registry(cluster.out / "registry")
    try:
        versions = registry.verify(MODEL)
        chain = "ok"
    except Exception as exc:  # noqa: BLE001 - reported in the table
        versions, chain = registry.versions(MODEL), f"broken: {exc}"
    rounds = []
    for run in runs:
        path = cluster.out / "runs" / run / "metrics.jsonl"
        if path.exists():
            rounds += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    aggregated = [r for r in rounds if r.get("train", {}).get("nodes")]
    journal = ReleaseJournal.of(cluster.out / "registry", MODEL)
    lineage = versions[-1].manifest["privacy"]["client_level"].get("lineage") if versions else None
    # a charge is journaled before each release leaves the server (under SecAgg+, before the masked sum)
    journaled = len(journal.events(lineage)) if lineage else 0
    ids = node_ids(cluster)
    received: dict[str, int] = {name: 0 for name in cluster.names}
    for r in aggregated:
        for node_id in r["train"]["nodes"]:
            received[ids.get(str(node_id), str(node_id))] = received.get(ids.get(str(node_id), str(node_id)), 0) + 1
    nodes = {}
    for i, name in enumerate(cluster.names):
        state = state_dir(node_dir(cluster.out / "data", i))
        try:
            entries = Ledger.in_dir(state).entries()
            ledger_chain = "ok"
        except Exception as exc:  # noqa: BLE001
            entries, ledger_chain = [], f"broken: {exc}"
        served, _ = read_requests(state)
        trained = [e for e in served if e["kind"] == "train" and e["outcome"] == "served"]
        keys = [(e.get("run"), e.get("server_round")) for e in entries]
        # every training the node served is in its ledger (a spend is appended before training starts)
        nodes[name] = {"ledger": len(entries), "served_train": len(trained), "received": received.get(name, 0),
                       "duplicates": len(keys) - len(set(keys)), "chain": ledger_chain,
                       "lost": max(len(trained) - len(entries), 0)}
    return {"versions": [v.manifest["round"] for v in versions], "registry_chain": chain,
            "journaled": journaled, "released": len(aggregated) + released_extra, "nodes": nodes}


def task_details(cluster: Cluster) -> list[str]:
    """The SuperLink's own reasons for each ServerApp task it marked failed (its SQLite database)."""
    import sqlite3

    with contextlib.suppress(sqlite3.Error), contextlib.closing(
            sqlite3.connect(cluster.out / "coordinator" / "superlink.db")) as db:
        return [f"{status}: {details}" for status, details in
                db.execute("select sub_status, details from task where type = 'flwr-serverapp' order by pending_at")
                if details]
    return []


def final_status(cluster: Cluster, timeout: float = 900) -> str:
    """The last run's status once the SuperLink says it finished (``flwr run --stream`` returns early
    when it loses the SuperLink; the run itself may go on)."""
    deadline, seen = time.monotonic() + timeout, "?"
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            seen = str(deploy.last_run(cluster.home).get("status"))
            if seen.startswith("finished"):
                return seen
        time.sleep(2.0)
    return seen


def run_fault(name: str, out: Path, rounds: int, front: str) -> dict[str, Any]:
    inject, secagg = FAULTS[name]
    nodes = 4 if name.startswith("cert-") else 3  # SecAgg+ goes on with 3 when one node cannot connect
    cluster = Cluster(out, nodes=nodes, hosts=True, front=front, budget=50.0, isolation="process",
                      options=NodeOptions(), say=lambda _: None)
    row: dict[str, Any] = {"fault": name, "secagg": secagg}
    # a lost message times out in 90 s instead of 600, so a round that cannot complete ends within the bench
    overrides = [f"model_name='{MODEL}'", "output.run_name='first'", "strategy.timeout=90", "central_dp.enabled=true",
                 "central_dp.clip_on='client'", "central_dp.noise_multiplier=1.0", f"secagg.enabled={str(secagg).lower()}"]
    mounted = None
    started = time.monotonic()
    try:
        with deploy.stopped_on_exit(cluster.procs):
            try:
                cluster.start()
                if name == "disk-full":
                    cluster.kill("hospital-2")
                    mounted = limited_state(cluster, 2)
                    supervise(cluster, "hospital-2")
                    time.sleep(30.0)  # its heartbeat is seen again before the run samples it
                if name.startswith("cert-"):
                    cluster.kill("hospital-3")
                    cluster.start_node("hospital-3", root_cert=_ca_copy(cluster, name.removeprefix("cert-")))
                    time.sleep(20.0)  # its connection attempts fail meanwhile
                    nodes = 3
                flat = run_config(cluster.out, rounds, nodes, overrides)
                result: dict[str, Any] = {}

                def follow() -> None:
                    with contextlib.suppress(Exception):  # the SuperLink may be down when `flwr run` returns
                        result.update(cluster.submit(flat, "first", 1800))
                submitter = threading.Thread(target=follow)
                submitter.start()
                info = inject(cluster, "first")
                submitter.join(timeout=1800)
                row["injected"] = info["injected"]
                row["outcome"] = final_status(cluster)
                runs = ["first"]
                if info.get("resume") or not str(row["outcome"]).endswith("completed"):
                    # what an operator does after a failed or stopped run: resume it from its last version
                    if not str(row["outcome"]).startswith("finished"):
                        with contextlib.suppress(Exception):
                            deploy._flwr(cluster.home, "stop", str(deploy.last_run(cluster.home)["run-id"]),
                                         deploy.CONNECTION)
                        row["outcome"] += " (stopped by the operator)"
                    done = Registry(cluster.out / "registry").versions(MODEL)
                    remaining = rounds - (done[-1].manifest["round"] if done else 0)
                    if remaining > 0:  # from the last version; with none, from the start
                        again = run_config(cluster.out, remaining, nodes, overrides[:1] + [
                            "output.run_name='resumed'", f"registry.resume={'true' if done else 'false'}"]
                            + overrides[2:])
                        cluster.submit(again, "resumed", 1800)
                        row["outcome"] += f"; resumed for {remaining} round(s): {final_status(cluster)}"
                        runs.append("resumed")
                row.update(account(cluster, runs, info.get("released_before_kill", 0)))
                row["run_folders"] = {run: f"{status(cluster, run).get('state')} at round {status(cluster, run).get('round')}"
                                      for run in runs}
                row["error"] = error_line(cluster.out / "logs", name)
            finally:
                cluster.stop()
                row["superlink_says"] = task_details(cluster)
    finally:
        if mounted is not None:
            subprocess.run(["umount", "-l", str(mounted)], check=False)
    row["seconds"] = round(time.monotonic() - started, 1)
    return row


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| fault | SecAgg+ | outcome | versions (rounds) | releases journaled / made | "
             "ledger entries / trainings served / updates received (lost, twice, chain) | error an operator reads |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error_running" in r:
            lines.append(f"| {r['fault']} | {r['secagg']} | bench failed: {r['error_running']} | | | | |")
            continue
        nodes = "; ".join(f"{n}: {v['ledger']}/{v['served_train']}/{v['received']} ({v['lost']}, {v['duplicates']}, "
                          f"{v['chain']})" for n, v in r["nodes"].items())
        outcome = f"{r['outcome']} ({'; '.join(r.get('superlink_says', []))}); run folder: " + \
            ", ".join(r.get("run_folders", {}).values())
        lines.append(f"| {r['fault']}: {r['injected']} | {'yes' if r['secagg'] else 'no'} | {outcome} | "
                     f"{r['versions']} ({r['registry_chain']}) | {r['journaled']} / {r['released']} | {nodes} | "
                     f"{r['error'] or ('flwr ls: ' + r['superlink_says'][0] if r.get('superlink_says') else '(none)')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench-results/faults")
    parser.add_argument("--only", nargs="*", choices=sorted(FAULTS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--front", choices=["gateway", "nginx"], default="nginx")
    parser.add_argument("--report", action="store_true", help="only print the table of an earlier --out")
    args = parser.parse_args()
    root = Path(args.out).resolve()
    if args.report:  # the error column read again from the logs kept under --out, with today's patterns
        rows = json.loads((root / "faults.json").read_text())
        for row in rows:
            logs = root / row["fault"] / "logs"
            if "error_running" not in row and logs.is_dir():
                row["error"] = error_line(logs, row["fault"])
        print(table(rows))
        return
    if root.exists():
        shutil.rmtree(root)
    rows = []
    for name in args.only or list(FAULTS):
        try:
            rows.append(run_fault(name, root / name, args.rounds, args.front))
        except Exception as exc:  # noqa: BLE001 - one failed row does not hide the others
            rows.append({"fault": name, "secagg": FAULTS[name][1], "error_running": f"{type(exc).__name__}: {exc}"})
        print(json.dumps(rows[-1]), flush=True)
        (root / "faults.json").write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    print(table(rows))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    main()
