"""`fl demo deploy` end to end: certificates, SuperLink, the Fleet-only front, three SuperNodes with
warm workers, two local-DP rounds, everything stopped afterwards; across separate hosts (network
namespaces) behind nginx where this machine allows it (its own file: it runs beside test_deploy.py's
deployment on the other test worker)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from test_deploy import _flower_processes, served

from fl.deploy import hosts
from fl.deploy.demo import node_names
from fl.learn.synth import node_dir
from fl.registry import Registry
from nodes.ledger import Ledger
from nodes.policy import state_dir

# separate hosts (network namespaces) and nginx in front where this machine allows (CI: root, and
# .ci/run installs nginx); the same demo on localhost with OncoFed's gateway otherwise
SEPARATE_HOSTS = hosts.available() is None and shutil.which("nginx") is not None


def test_demo_deploy_runs_two_dp_rounds_and_stops_everything(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "fl.cli", "demo", "deploy", "--out", str(out),
                           *(["--hosts", "--front", "nginx"] if SEPARATE_HOSTS else [])],
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    if SEPARATE_HOSTS:
        coordinator = next(h for h in summary["hosts"] if h["host"] == "coordinator")
        published = f"{coordinator['address']}:9443"
        for name in node_names(3):
            seen = summary["exposure"][name]
            # every listening socket of the other hosts was dialled (the SuperLink's, the other nodes'
            # runtime APIs and workers): only the published port answered, and it refuses the Control API
            assert published in seen["dialled"] and len(seen["dialled"]) >= 4, seen
            assert seen["reachable"] == [published] and set(seen["control_api"].values()) == {403}, seen
        peers = {line.split()[0] for line in (out / "coordinator" / "nginx" / "logs" / "access.log").read_text()
                 .splitlines()}
        assert peers == {h["address"] for h in summary["hosts"] if h["host"] != "coordinator"}  # each from its own host
        left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert not [h["netns"] for h in summary["hosts"] if h["netns"] in left]  # every namespace removed
    assert summary["status"] == "finished:completed"
    assert summary["versions"] == ["deploy-demo:v1", "deploy-demo:v2"]
    assert summary["ledger_entries"] == {name: 2 for name in node_names(3)}  # each node spent twice
    versions = Registry(out / "registry").verify("deploy-demo")
    manifest = versions[-1].manifest
    assert manifest["round"] == 2 and versions[-1].manifest["parent"] == versions[0].hash
    record = manifest["privacy"]["record_level"]
    assert len(record) == 3
    for i in range(3):  # what the server recorded is what each node's own ledger says
        entries = Ledger.in_dir(state_dir(node_dir(out / "data", i))).entries()
        assert any(abs(e["epsilon"] - entries[-1]["epsilon_after"]) < 1e-9 for e in record.values())
    assert summary["final_dice"] > 0.3  # two DP rounds from 0.1
    for name in node_names(3):  # a warm worker served the run; after round 1 it read no case from disk
        lines = served(out / "logs" / f"{name}.log", summary["run_id"])
        assert [kind for kind, *_ in lines] == ["evaluate", "train", "evaluate", "train", "evaluate"], lines
        assert len({pid for _, pid, _, _ in lines}) == 1 and all(outcome == "ok" for *_, outcome in lines)
        assert lines[0][2] > 0 and [reads for _, _, reads, _ in lines[2:]] == [0, 0, 0], lines
    for name in ("superlink.log", "hospital-0.log", "run.log"):
        assert (out / "logs" / name).stat().st_size > 0
    assert not _flower_processes(str(out)), "the demo left processes running"
