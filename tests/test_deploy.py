"""Deployment: certificates, the node's app allowlist, ``fl node check`` and a real localhost
deployment (SuperLink + SuperNodes with TLS and node authentication), started and stopped by
the tests themselves."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import re
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from fl.cli import main
from fl.deploy import processes as deploy
from fl.deploy.certs import create, node_key_pair
from fl.deploy.demo import APP_DIR, node_names, prepare, run_config, start_gateway, start_node, wait_online
from fl.errors import ConfigError, DataError, FederationError
from fl.learn import get_task
from fl.learn.synth import node_dir, synthesize
from fl.registry import Registry
from nodes.check import check_dataset, identifying_attributes
from nodes.ledger import Ledger
from nodes.policy import load_policy, save_policy, state_dir
from nodes.supernode import AppRefused, approve, check_fab, fab_hash_of, load_allowlist
from nodes.worker import STATUS_FILE, served_in_log


def served(log: Path, run_id: str) -> list[tuple[str, int, int, str]]:
    """(message type, worker pid, data files read, outcome) of each message the node served in a run."""
    return served_in_log(log.read_text(), run_id)


# ----- certificates --------------------------------------------------------------------------
def test_certs_chain_names_and_key_files(tmp_path: Path) -> None:
    files = create(tmp_path / "c", ["localhost", "127.0.0.1"], ["hospital-a", "hospital-b"])
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert server.not_valid_after_utc > datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=300)
    for name in ("hospital-a", "hospital-b"):
        private = load_ssh_private_key(files.node_key(name).read_bytes(), password=None)
        public = load_ssh_public_key(files.node_pub(name).read_bytes())
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        assert private.public_key().public_numbers() == public.public_numbers()
        assert files.node_key(name).stat().st_mode & 0o777 == 0o600
    assert files.ca_key.stat().st_mode & 0o777 == 0o600


def test_certs_never_overwrite_and_reject_bad_input(tmp_path: Path) -> None:
    create(tmp_path, ["localhost"], ["n1"])
    before = (tmp_path / "ca.crt").read_bytes()
    with pytest.raises(ConfigError, match="already exists"):
        create(tmp_path, ["localhost"], ["n1"])
    assert (tmp_path / "ca.crt").read_bytes() == before
    with pytest.raises(ConfigError, match="HOST:PORT"):
        create(tmp_path / "x", ["localhost:9092"], [])
    with pytest.raises(ConfigError, match="not a valid node name"):
        create(tmp_path / "y", ["localhost"], ["../evil"])
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


# ----- the node's app allowlist --------------------------------------------------------------
def test_app_guard_accepts_only_approved_untampered_bundles(tmp_path: Path) -> None:
    import hashlib

    content = b"a FAB"
    digest = hashlib.sha256(content).hexdigest()
    assert check_fab(content, digest, {digest}) == digest
    with pytest.raises(AppRefused, match="not approved"):
        check_fab(content, digest, set())
    with pytest.raises(AppRefused, match="tampered"):
        check_fab(content + b"!", digest, {digest})  # the SuperLink announced one app, sent another


def test_allowlist_file(tmp_path: Path) -> None:
    good = "a" * 64
    approve(tmp_path, good.upper(), "reviewed 2026-11")
    approve(tmp_path, good)  # idempotent
    assert load_allowlist(tmp_path) == {good}
    assert (tmp_path / "approved-apps.txt").read_text().count(good) == 1
    with pytest.raises(ConfigError, match="not a SHA-256"):
        approve(tmp_path, "abc")
    (tmp_path / "approved-apps.txt").write_text(f"{good}\nnot-a-hash\n")
    with pytest.raises(ConfigError, match=r"approved-apps.txt:2: 'not-a-hash'"):
        load_allowlist(tmp_path)


def test_app_hash_changes_with_the_code_only(tmp_path: Path) -> None:
    app = tmp_path / "app"
    shutil.copytree(APP_DIR, app, ignore=shutil.ignore_patterns(".venv", ".git", "data", "runs", "registry",
                                                                 "bench-results", "*.egg-info", "__pycache__"))
    first = fab_hash_of(app)
    assert first == fab_hash_of(app)  # reproducible: nodes can recompute it
    (app / "README.md").write_text("edited docs\n")
    assert fab_hash_of(app) == first  # docs are not in the bundle
    with (app / "nodes" / "client_app.py").open("a") as fh:
        fh.write("\n# one more line\n")
    assert fab_hash_of(app) != first


def test_flower_processes_find_superexec_without_an_activated_venv(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # The SuperLink and SuperNode start `flower-superexec` by name; CI runs `.venv/bin/python`
    # with the venv's scripts off PATH, where the SuperLink died with status 3 before listening.
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    env = deploy.flower_env(tmp_path)
    found = shutil.which("flower-superexec", path=env["PATH"])
    assert found is not None and Path(found).parent == Path(sys.executable).parent
    assert env["PATH"].endswith("/usr/bin:/bin")  # the rest of PATH is kept
    assert deploy.flower_env(tmp_path)["PATH"] == deploy.with_own_scripts(dict(env))["PATH"]  # added once


# ----- fl node check ---------------------------------------------------------------------------
def _dicom(path: Path, **attrs: str) -> None:
    import numpy as np
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.Modality, ds.Rows, ds.Columns = "CT", 4, 4
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = np.zeros((4, 4), np.uint16).tobytes()
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.save_as(path, enforce_file_format=True)


def test_dicom_basic_profile(tmp_path: Path) -> None:
    _dicom(tmp_path / "a.dcm", PatientName="Doe^Jane", PatientID="12345", InstitutionName="General")
    assert identifying_attributes(tmp_path / "a.dcm") == ["PatientName", "PatientID", "InstitutionName"]
    # de-identified: dummy name and id are what the profile asks for; a kept institution is not
    _dicom(tmp_path / "b.dcm", PatientName="ANON", PatientID="0001", PatientIdentityRemoved="YES",
           InstitutionName="General")
    assert identifying_attributes(tmp_path / "b.dcm") == ["InstitutionName"]
    _dicom(tmp_path / "c.dcm", PatientName="", PatientIdentityRemoved="YES")
    assert identifying_attributes(tmp_path / "c.dcm") == []


def test_node_check_summarises_and_refuses_identifiable_dicom(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                              ) -> None:
    root = tmp_path / "data"
    synthesize(root, nodes=1, task=get_task("seg2d"))
    site = node_dir(root, 0)
    assert main(["node", "check", "--data", str(site), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    manifest = json.loads((site / "dataset.json").read_text())
    assert report["splits"]["training"]["cases"] == len(manifest["training"])
    assert report["splits"]["validation"]["cases"] == len(manifest["validation"])
    assert report["splits"]["training"]["label_values"] == [0, 1]
    assert list(report["splits"]["training"]["spacings"]) == ["[1.0, 1.0]"]
    assert 0 < report["splits"]["training"]["foreground_fraction"] < 0.5

    (site / "extra").mkdir()
    _dicom(site / "extra" / "scan.dcm", PatientName="Doe^Jane")
    assert main(["node", "check", "--data", str(site)]) == 2
    err = capsys.readouterr().err
    assert "scan.dcm: PatientName" in err and "PS3.15" in err
    assert main(["node", "check", "--data", str(site), "--allow-identifiable-dicom"]) == 0
    assert "identifying attributes" in capsys.readouterr().out

    (site / "labelsTr" / "case_000.nii.gz").write_bytes(b"broken")
    with pytest.raises(DataError, match="case_000.nii.gz: unreadable image"):
        check_dataset(site, get_task("seg2d"), allow_identifiable=True)


# ----- a real deployment -----------------------------------------------------------------------
def _flower_processes(marker: str) -> list[str]:
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline"]):
        line = " ".join(proc.info["cmdline"] or [])
        if marker in line and proc.pid != os.getpid():
            found.append(line)
    return found


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """SuperLink + 2 authenticated SuperNodes on localhost; stopped after the module."""
    out = tmp_path_factory.mktemp("deployment")
    files, fab = prepare(out, 2)
    home = out / "coordinator" / "flwr-home"
    port = deploy.free_port()
    deploy.write_connection(home, f"127.0.0.1:{port}", files.ca_cert)
    procs = deploy.Processes()
    try:
        link = procs.start("superlink", deploy.superlink_argv(files, out / "coordinator", "127.0.0.1", port),
                           env=deploy.flower_env(home), cwd=out / "coordinator", log=out / "logs" / "superlink.log")
        deploy.wait_for_port("127.0.0.1", port, 60, link, out / "logs" / "superlink.log")
        fleet = start_gateway(procs, out, port)
        for i, name in enumerate(node_names(2)):
            deploy.register_node(home, files.node_pub(name), name)
            start_node(procs, out, name, node_dir(out / "data", i), fleet, key=files.node_key(name), budget=20.0)
        wait_online(home, 2, 180, procs)
        yield {"out": out, "home": home, "port": port, "fleet": fleet, "procs": procs}
    finally:
        procs.stop_all()
    assert not _flower_processes(str(out))


def test_unregistered_node_is_refused(deployment: dict) -> None:  # type: ignore[type-arg]
    out, home = deployment["out"], deployment["home"]
    private, _ = node_key_pair()
    key = out / "intruder.key"
    key.write_bytes(private)
    key.chmod(0o600)
    synthesize(out / "intruder-data", nodes=1, task=get_task("seg2d"))
    approve(state_dir(node_dir(out / "intruder-data", 0)), "0" * 64)
    procs = deploy.Processes()
    try:
        start_node(procs, out, "intruder", node_dir(out / "intruder-data", 0), deployment["fleet"], key=key, budget=None)
        log, proc = out / "logs" / "intruder.log", procs.procs[0][1]
        proc.wait(timeout=120)  # the SuperLink refuses to activate it; it gives up
        text = log.read_text()
        assert proc.returncode != 0 and "Failed to activate SuperNode" in text, text[-2000:]
        assert "SuperNode ID" not in text
        assert deploy.online_nodes(home) == 2
    finally:
        procs.stop_all()


def test_unapproved_app_is_refused_before_touching_data(deployment: dict, tmp_path: Path) -> None:  # type: ignore[type-arg]
    out, home = deployment["out"], deployment["home"]
    ledgers_before = [len(Ledger.in_dir(state_dir(node_dir(out / "data", i))).entries()) for i in range(2)]
    app = tmp_path / "app"
    shutil.copytree(APP_DIR, app, ignore=shutil.ignore_patterns(".venv", ".git", "data", "runs", "registry",
                                                                 "bench-results", "*.egg-info", "__pycache__"))
    with (app / "nodes" / "client_app.py").open("a") as fh:
        fh.write("\n# a change the hospitals did not review\n")
    flat = run_config(out, 1, 2, ["model_name='tampered'"])
    path = deploy.write_run_config(flat, tmp_path / "rc.toml")
    with (tmp_path / "run.log").open("w") as log, contextlib.suppress(FederationError):
        deploy.submit(home, app, path, log, timeout=300)
    run = deploy.last_run(home)
    assert run["fab-hash"] == fab_hash_of(app) and run["status"] != "finished:completed"
    for i, name in enumerate(node_names(2)):
        text = (out / "logs" / f"{name}.log").read_text()
        assert f"app {run['fab-hash']} is not approved" in text
        assert len(Ledger.in_dir(state_dir(node_dir(out / "data", i))).entries()) == ledgers_before[i]
    assert Registry(out / "registry").versions("tampered") == []
    assert "not approved" in (tmp_path / "run.log").read_text()


def test_gateway_serves_nodes_but_not_the_control_api(deployment: dict, tmp_path: Path) -> None:  # type: ignore[type-arg]
    """Whoever reaches the published port cannot submit or list runs; the coordinator can."""
    import httpx

    out = deployment["out"]
    ca = out / "certs" / "ca.crt"
    with httpx.Client(verify=str(ca)) as client:
        for path in ("/v1/control/start-run", "/v1/control/list-runs", "/v1/runtime/pull-messages"):
            response = client.post(f"https://127.0.0.1:{deployment['fleet']}{path}", content=b"")
            assert response.status_code == 403, (path, response.status_code)
        direct = client.post(f"https://127.0.0.1:{deployment['port']}/v1/control/list-runs", content=b"")
        assert direct.status_code != 403  # the SuperLink itself (coordinator only) does answer
    outsider = tmp_path / "flwr-home"
    deploy.write_connection(outsider, f"127.0.0.1:{deployment['fleet']}", ca)
    with pytest.raises(FederationError):
        deploy.last_run(outsider)  # `flwr ls` through the gateway is refused
    assert deploy.online_nodes(deployment["home"]) == 2  # the nodes behind the gateway are online


def _node_id(log: Path) -> str:
    return re.findall(r"SuperNode ID: (\d+)", log.read_text())[-1]


def test_a_killed_worker_fails_its_message_and_the_next_round_is_served(deployment: dict,  # type: ignore[type-arg]
                                                                          tmp_path: Path) -> None:
    """Kill node 0's warm worker while it trains round 1: the round names node 0 (error 4007),
    round 2 completes with both nodes, the ledger has one entry per train message, and a second
    run (the trained version's validation through the deployment) is served by fresh workers."""
    out, home = deployment["out"], deployment["home"]
    state0 = state_dir(node_dir(out / "data", 0))
    before = [len(Ledger.in_dir(state_dir(node_dir(out / "data", i))).entries()) for i in range(2)]
    flat = run_config(out, 2, 2, ["model_name='warm'", "output.run_name='warm'"])
    path = deploy.write_run_config(flat, tmp_path / "rc.toml")
    errors: list[BaseException] = []

    def submit(log: Path) -> None:
        try:
            with log.open("w") as fh:
                deploy.submit(home, APP_DIR, path, fh, timeout=600)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    runner = threading.Thread(target=submit, args=(tmp_path / "run-a.log",))
    runner.start()
    killed = None
    deadline = time.monotonic() + 300
    while killed is None and time.monotonic() < deadline and runner.is_alive():
        with contextlib.suppress(OSError, ValueError):
            status = json.loads((state0 / "worker" / STATUS_FILE).read_text())
            if status.get("busy") == "train":
                os.kill(status["worker_pid"], signal.SIGKILL)
                killed = status
        time.sleep(0.005)
    runner.join(timeout=600)
    assert killed is not None and not errors, errors
    run_a = deploy.last_run(home)
    assert run_a["status"] == "finished:completed"
    rounds = [json.loads(line) for line in (out / "runs" / "warm" / "metrics.jsonl").read_text().splitlines()]
    node0, node1 = (_node_id(out / "logs" / f"{name}.log") for name in node_names(2))
    assert "error 4007" in rounds[1]["failures"][node0] and "node worker died" in rounds[1]["failures"][node0]
    assert set(rounds[1]["train"]["nodes"]) == {node1}
    assert set(rounds[2]["train"]["nodes"]) == {node0, node1} and not rounds[2]["failures"]  # served again
    spent = [[e["server_round"] for e in Ledger.in_dir(state_dir(node_dir(out / "data", i))).entries()[before[i]:]]
             for i in range(2)]
    # one ledger entry per train message admitted: node 0's round 1 only if the worker died after
    # the ClientApp admitted it (then the budget stays spent); never twice
    assert spent[1] == [1, 2] and spent[0] in ([2], [1, 2]), spent
    lines0 = served(out / "logs" / "hospital-0.log", run_a["run-id"])
    assert lines0[1] == ("train", killed["worker_pid"], 0, "worker died")
    assert all(pid != killed["worker_pid"] and outcome == "ok" for _, pid, _, outcome in lines0[2:])
    lines1 = served(out / "logs" / "hospital-1.log", run_a["run-id"])
    assert [reads for _, _, reads, _ in lines1[2:]] == [0, 0, 0]  # rounds after the first read no case

    # a second run, served by fresh workers: the model just trained, validated through the deployment
    _validate_through_the_deployment(out, home, tmp_path, "warm")
    run_b = deploy.last_run(home)
    assert run_b["run-id"] != run_a["run-id"]
    pids_a = {pid for _, pid, _, _ in lines1}
    pids_b = {pid for _, pid, _, _ in served(out / "logs" / "hospital-1.log", run_b["run-id"])}
    assert len(pids_b) == 1 and not pids_a & pids_b  # a new run, a fresh worker: nothing of run A in it


def _validate_through_the_deployment(out: Path, home: Path, tmp_path: Path, name: str) -> None:
    """Version ``name:v2`` (trained on the deployment) validated through it: each SuperNode scores it
    on its held-out cases under its own policy (exact metrics here), and the records name the run's FAB."""
    check = run_config(out, 1, 2, [f"model_name='{name}'", f"output.run_name='{name}-validate'",
                                   f"validation.ref='{name}:v2'"])
    # hospital 0's operator releases its dataset descriptors exactly; hospital 1 keeps auto (none under its budget)
    state = state_dir(node_dir(out / "data", 0))
    before = load_policy(state)
    save_policy(state, dataclasses.replace(before, release_descriptors="exact"))
    try:
        with (tmp_path / "validate.log").open("w") as fh:
            deploy.submit(home, APP_DIR, deploy.write_run_config(check, tmp_path / "validate.toml"), fh, timeout=600)
    finally:
        save_policy(state, before)
    run = deploy.last_run(home)
    assert run["status"] == "finished:completed"
    registry = Registry(out / "registry")
    version = registry.get(f"{name}:v2")
    records = registry.validations(version)
    assert len(records) == 2 and {r["trained_it"] for r in records} == {True}
    assert {r["app_hash"] for r in records} == {run["fab-hash"]}
    assert all(r["ci_low"] <= r["score"] <= r["ci_high"] for r in records)
    # what each SuperNode's policy allows of its dataset descriptors came back with its score
    described = [r for r in records if r["descriptors"] is not None]
    assert len(described) == 1 and described[0]["descriptors"]["release"] == "exact"
    assert described[0]["descriptors"]["cases_validation"] == described[0]["cases"]
    (declined,) = [r for r in records if r["descriptors"] is None]
    assert "releases no dataset descriptors" in declined["descriptors_declined"]
    assert [v.number for v in registry.versions(name)] == [1, 2]  # validating commits no version
    registry.verify(name)


@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx not installed (.ci/run installs nginx-light)")
def test_nginx_site_passes_nginx_own_check_and_allows_only_the_fleet_api(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from fl.deploy import nginx

    files = create(tmp_path / "certs", ["link.example.org"], ["hospital-a"])
    assert main(["server", "nginx-site", "--certs", str(files.root), "--server-name", "link.example.org",
                 "--listen", f"127.0.0.1:{deploy.free_port()}"]) == 0
    site = capsys.readouterr().out
    assert "location /v1/fleet/" in site and "limit_except POST" in site and "return 403" in site
    assert "proxy_ssl_verify on" in site and "proxy_ssl_name link.example.org" in site  # the SuperLink is checked
    conf = nginx.write_config(tmp_path / "front", listen=f"127.0.0.1:{deploy.free_port()}", server_name="localhost",
                              upstream="127.0.0.1:9", cert=files.server_cert, key=files.server_key, ca_cert=files.ca_cert)
    nginx.check(conf)  # nginx -t accepts it
    conf.write_text(conf.read_text().replace("client_max_body_size", "client_max_body_sise"))
    with pytest.raises(ConfigError, match="client_max_body_sise"):
        nginx.check(conf)  # its own reason, naming the directive
