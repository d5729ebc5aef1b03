"""Deployment commands: ``fl certs``, ``fl server``, ``fl node check|deid|start|approve``,
``fl app hash`` and ``fl demo deploy``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

from fl.errors import ConfigError, DataError


def add_parsers(sub: Any, node: Any) -> None:
    _add_certs(sub)
    _add_server(sub)
    _add_node(node)
    _add_app(sub)
    _add_demo(sub)


def _add_certs(sub: Any) -> None:
    certs = sub.add_parser("certs", help="TLS certificates and node keys").add_subparsers(dest="certs_command",
                                                                                           required=True)
    create = certs.add_parser("create", help="a CA, the SuperLink's certificate and a key pair per node")
    create.add_argument("--out", required=True, help="folder for the files (never overwritten)")
    create.add_argument("--hosts", required=True, help="comma-separated names/addresses nodes dial, e.g. "
                                                      "link.example.org,10.0.0.5")
    create.add_argument("--nodes", default="", help="comma-separated node names, e.g. hospital-a,hospital-b")
    create.add_argument("--days", type=int, default=365, help="validity of the certificates")
    create.set_defaults(func=cmd_certs_create)


def _add_server(sub: Any) -> None:
    server = sub.add_parser("server", help="the coordinator's SuperLink").add_subparsers(dest="server_command",
                                                                                          required=True)
    start = server.add_parser("start", help="run the SuperLink (TLS, node authentication) in the foreground")
    start.add_argument("--certs", required=True, help="folder from `fl certs create`")
    start.add_argument("--state", required=True, help="coordinator's folder: SuperLink database, Flower CLI home")
    start.add_argument("--host", default="127.0.0.1", help="address to bind; see SECURITY.md before 0.0.0.0")
    start.add_argument("--port", type=int, default=9092)
    start.add_argument("--address", help="address the coordinator's CLI dials (default HOST:PORT)")
    start.set_defaults(func=cmd_server_start)
    gateway = server.add_parser("gateway", help="publish only the Fleet API (nodes) of a SuperLink bound to "
                                                "127.0.0.1; see SECURITY.md")
    gateway.add_argument("--certs", required=True, help="folder from `fl certs create`")
    gateway.add_argument("--upstream", default="127.0.0.1:9092", help="the SuperLink's HOST:PORT")
    gateway.add_argument("--host", default="0.0.0.0", help="address the hospitals dial")
    gateway.add_argument("--port", type=int, default=9093)
    gateway.set_defaults(func=cmd_server_gateway)
    site = server.add_parser("nginx-site", help="print an nginx server block that publishes only the Fleet API "
                                                "(TLS, path allowlist, size and rate limits, access log)")
    site.add_argument("--certs", required=True, help="folder from `fl certs create`")
    site.add_argument("--upstream", default="127.0.0.1:9092", help="the SuperLink's HOST:PORT")
    site.add_argument("--listen", default="9093", help="nginx listen value: PORT or ADDRESS:PORT")
    site.add_argument("--server-name", required=True, help="the coordinator's name, as in its certificate")
    site.add_argument("--max-body", default="64m", help="largest request (a model update) nginx accepts")
    site.add_argument("--rate", default="40r/s", help="requests per second per address (limit_req)")
    site.set_defaults(func=cmd_server_nginx_site)
    register = server.add_parser("register", help="register a node's public key (SuperNode authentication)")
    register.add_argument("public_key", help="the node's .pub file")
    register.add_argument("--name", required=True, help="the node's name, e.g. hospital-a")
    register.add_argument("--state", required=True, help="the folder given to `fl server start`")
    register.set_defaults(func=cmd_server_register)
    submit = server.add_parser("submit", help="submit a federation run to the SuperLink and follow it")
    submit.add_argument("config", help="TOML config, e.g. configs/quickstart.toml")
    submit.add_argument("--state", required=True, help="the folder given to `fl server start`")
    submit.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    submit.add_argument("--app", default=".", help="the OncoFed app folder (its FAB is what nodes approve)")
    submit.add_argument("--timeout", type=float, default=24 * 3600)
    submit.set_defaults(func=cmd_server_submit)


def _add_node(node: Any) -> None:
    check = node.add_parser("check", help="validate and summarise the local dataset (nothing is sent)")
    check.add_argument("--data", required=True, help="the node's data folder (with dataset.json)")
    check.add_argument("--task", help="seg2d, seg3d (default: from dataset.json's tensorImageSize)")
    check.add_argument("--allow-identifiable-dicom", action="store_true",
                       help="accept DICOM files that still carry identifying attributes")
    check.add_argument("--json", action="store_true")
    check.add_argument("--bundle", help="also dry-run this MONAI bundle on one of the node's cases: preprocessing, "
                                        "one training step and one evaluation on the node's device")
    check.add_argument("--verbose", action="store_true", help="with --bundle: each stage's time and the "
                                                              "failure's traceback")
    check.set_defaults(func=cmd_node_check)
    _add_node_start(node)
    approve = node.add_parser("approve", help="approve an app version (FAB hash) to run on this node")
    approve.add_argument("hash", help="SHA-256 from the coordinator's `fl app hash`, after reviewing that code")
    approve.add_argument("--data", required=True, help="the node's data folder")
    approve.add_argument("--note", default="", help="free text kept beside the hash")
    approve.set_defaults(func=cmd_node_approve)
    revoke = node.add_parser("revoke", help="revoke an approved app version (FAB hash): the node refuses new runs of it")
    revoke.add_argument("hash", help="the approved SHA-256 to take off this node's list")
    revoke.add_argument("--data", required=True, help="the node's data folder")
    revoke.add_argument("--note", default="", help="why (kept in the node's approvals log)")
    revoke.set_defaults(func=cmd_node_revoke)
    console = node.add_parser("console", help="this node's web console for its operator: policy, approved apps, "
                                              "ledger curves, requests, data check, worker (this machine only)")
    console.add_argument("--data", required=True, help="the node's data folder")
    from fl.cli.console import add_tls_arguments

    add_tls_arguments(console, 8051)
    console.set_defaults(func=cmd_node_console)
    _add_roster(node)
    _add_node_deid(node)
    _add_node_provenance(node)


def _add_node_provenance(node: Any) -> None:
    prov = node.add_parser("provenance", help="which of this node's series trained a model version: matched on "
                                              "the node against its own ledger; nothing is sent")
    prov.add_argument("version", metavar="NAME:VERSION", help="the model version, e.g. oncofed:v3")
    prov.add_argument("--registry", required=True, help="a copy of the registry folder holding the version")
    prov.add_argument("--data", required=True, help="the node's data folder")
    prov.add_argument("--reveal", action="store_true",
                      help="also print this node's own Series Instance UIDs behind the tokens (on this screen only)")
    prov.set_defaults(func=cmd_node_provenance)


def _add_node_deid(node: Any) -> None:
    deid = node.add_parser("deid", help="de-identify a folder of DICOM into a new folder (DICOM PS3.15 basic "
                                        "profile, dicognito); the pseudonym map stays on this node")
    deid.add_argument("source", nargs="?", metavar="IN", help="the folder to de-identify (with its dataset.json)")
    deid.add_argument("out", nargs="?", metavar="OUT", help="a new (or empty) folder for the de-identified copy")
    deid.add_argument("--keep-descriptors", action="store_true",
                      help="keep descriptions (study, series, protocol; RTSTRUCT ROI names, which label mapping "
                           "needs) after removing the patient's own names, IDs and dates from them: the Clean "
                           "Descriptors option; review what remains")
    deid.add_argument("--state", help="the folder with this node's key and the pseudonym map "
                                      "(default: IN's state folder, IN/.oncofed)")
    deid.add_argument("--lookup", metavar="PSEUDONYM",
                      help="print the original PatientID and UIDs behind a pseudonymous PatientID or Study/Series "
                           "UID, from the map")
    deid.set_defaults(func=cmd_node_deid)


def _add_node_start(node: Any) -> None:
    nstart = node.add_parser("start", help="start this hospital's SuperNode")
    nstart.add_argument("--superlink", required=True, help="HOST:PORT of the coordinator's SuperLink")
    nstart.add_argument("--data", required=True, help="the node's data folder")
    nstart.add_argument("--root-cert", help="the coordinator's ca.crt (TLS)")
    nstart.add_argument("--auth-key", help="this node's private key from `fl certs create`")
    nstart.add_argument("--budget", type=float, help="record-level epsilon budget (written into the node's policy)")
    nstart.add_argument("--require-secagg", action="store_true",
                        help="send updates only masked by SecAgg+ (written into the node's policy)")
    nstart.add_argument("--require-distributed-noise", action="store_true",
                        help="send updates only with this node's own share of the noise (written into the policy)")
    nstart.add_argument("--release-metrics", choices=("auto", "exact", "noisy", "none"),
                        help="what the node releases besides its model (written into the node's policy)")
    nstart.add_argument("--release-descriptors", choices=("auto", "exact", "noisy", "none"),
                        help="the dataset descriptors the node releases to fl validate (written into its policy)")
    nstart.add_argument("--task", help="seg2d, seg3d (default: from dataset.json)")
    nstart.add_argument("--port", type=int, default=9094, help="local port of the SuperNode's runtime API")
    nstart.add_argument("--allow-identifiable-dicom", action="store_true")
    nstart.add_argument("--insecure", action="store_true", help="no TLS: local tests only")
    nstart.add_argument("--cold", action="store_true",
                        help="Flower's own way: a fresh ClientApp process for every message (default: a warm "
                             "worker per run that keeps torch, MONAI and the preprocessed cases loaded)")
    nstart.add_argument("--poll-interval", type=float, default=0.25,
                        help="seconds between the node's pulls when the coordinator has no message for it "
                             "(Flower's own: 3; each pull is one request to the coordinator; 0.1 to 3)")
    nstart.add_argument("--follow-up-pulls",
                        help="seconds before each of the first empty pulls after a message, comma-separated, "
                             "each between 0.02 s and the poll interval (default 0.05,0.05,0.1: a SecAgg+ stage "
                             "or the evaluation usually follows within a fraction of a second); none: always "
                             "the poll interval")
    nstart.add_argument("--threads", type=int,
                        help="torch threads for training (default: torch's, all cores); set it when several "
                             "nodes share a machine")
    nstart.set_defaults(func=cmd_node_start)


def _add_roster(node: Any) -> None:
    roster = node.add_parser("roster", help="the consortium roster (malicious-secure aggregation): this site's "
                                            "signing key and the pinned list of sites").add_subparsers(
        dest="roster_command", required=True)
    rkey = roster.add_parser("key", help="make this site's signing key (kept on the node) and print its roster line")
    rkey.add_argument("--data", required=True, help="the node's data folder")
    rkey.add_argument("--site", required=True, help="this site's name on the consortium's roster")
    rkey.set_defaults(func=cmd_roster_key)
    rpin = roster.add_parser("pin", help="check the consortium's roster file and pin it on this node")
    rpin.add_argument("file", help="the roster (JSON: consortium, sites [{site, key}]), received out of band")
    rpin.add_argument("--data", required=True, help="the node's data folder")
    rpin.set_defaults(func=cmd_roster_pin)
    rshow = roster.add_parser("show", help="the pinned roster, its digest and this site's name on it")
    rshow.add_argument("--data", required=True, help="the node's data folder")
    rshow.set_defaults(func=cmd_roster_show)


def _add_app(sub: Any) -> None:
    app = sub.add_parser("app", help="the Flower app bundle").add_subparsers(dest="app_command", required=True)
    ahash = app.add_parser("hash", help="SHA-256 of the app bundle (FAB) nodes will receive for this folder")
    ahash.add_argument("folder", nargs="?", default=".")
    ahash.set_defaults(func=cmd_app_hash)


def _add_demo(sub: Any) -> None:
    demo = sub.add_parser("demo", help="demonstrations").add_subparsers(dest="demo_command", required=True)
    ddeploy = demo.add_parser("deploy", help="SuperLink + 3 SuperNodes on localhost with TLS and node "
                                             "authentication, 2 DP rounds")
    ddeploy.add_argument("--out", default="deploy-demo", help="folder for certificates, logs, ledgers, registry")
    ddeploy.add_argument("--rounds", type=int, default=2)
    ddeploy.add_argument("--budget", type=float, default=20.0, help="each node's record-level epsilon budget")
    ddeploy.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ddeploy.add_argument("--hosts", action="store_true",
                         help="the coordinator and each hospital on a host of its own: a network namespace each "
                              "(root and iproute2 needed), names NAME.oncofed.test, only the published port reachable")
    ddeploy.add_argument("--front", choices=["gateway", "nginx"], default="gateway",
                         help="what publishes the Fleet API: OncoFed's gateway, or nginx (Debian's package)")
    ddeploy.set_defaults(func=cmd_demo_deploy)


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def cmd_certs_create(args: argparse.Namespace) -> int:
    from fl.deploy.certs import create

    files = create(Path(args.out), _names(args.hosts), _names(args.nodes), days=args.days)
    for path in sorted(files.root.iterdir()):
        if path.is_file():
            print(path)
    return 0


def cmd_server_start(args: argparse.Namespace) -> int:
    from fl.deploy import processes as deploy
    from fl.deploy.certs import CertFiles

    state = Path(args.state).resolve()
    state.mkdir(parents=True, exist_ok=True)
    files = CertFiles(Path(args.certs).resolve())
    argv = deploy.superlink_argv(files, state, args.host, args.port)
    address = args.address or f"{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{args.port}"
    deploy.write_connection(state / "flwr-home", address, files.ca_cert)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: the SuperLink's Control API (submit runs, unauthenticated) is reachable on {args.host}; "
              "bind 127.0.0.1 and publish `fl server gateway` instead (SECURITY.md)", file=sys.stderr, flush=True)
    print(f"SuperLink on {args.host}:{args.port}; register nodes with "
          f"`fl server register NODE.pub --name NAME --state {state}`", file=sys.stderr, flush=True)
    os.chdir(state)
    os.execve(argv[0], argv, deploy.flower_env(state / "flwr-home", deploy.COORDINATOR_SUPEREXEC_POLL_S))
    return 1  # not reached


def cmd_server_nginx_site(args: argparse.Namespace) -> int:
    from fl.deploy.certs import CertFiles
    from fl.deploy.nginx import site_config

    files = CertFiles(Path(args.certs).resolve())
    files.require_server()
    print(site_config(listen=args.listen, server_name=args.server_name, upstream=args.upstream,
                      cert=files.server_cert, key=files.server_key, ca_cert=files.ca_cert, max_body=args.max_body,
                      rate=args.rate, upstream_name=args.server_name))  # the SuperLink's certificate names it
    return 0


def cmd_server_gateway(args: argparse.Namespace) -> int:
    from fl.deploy.certs import CertFiles
    from fl.deploy.gateway import serve

    files = CertFiles(Path(args.certs).resolve())
    files.require_server()
    print(f"Fleet API gateway on {args.host}:{args.port} -> SuperLink {args.upstream}", file=sys.stderr, flush=True)
    serve(upstream=args.upstream, ca_cert=files.ca_cert, cert=files.server_cert, key=files.server_key,
          host=args.host, port=args.port)
    return 0


def cmd_server_register(args: argparse.Namespace) -> int:
    from fl.deploy import processes as deploy

    node_id = deploy.register_node(Path(args.state).resolve() / "flwr-home", Path(args.public_key), args.name)
    print(f"registered {args.name} (node id {node_id})")
    return 0


def cmd_server_submit(args: argparse.Namespace) -> int:
    from fl.config import load
    from fl.deploy import processes as deploy

    cfg = load(args.config, args.overrides)
    state = Path(args.state).resolve()
    path = deploy.write_run_config(cfg.to_flat(), state / "last-run-config.toml")
    deploy.submit(state / "flwr-home", Path(args.app).resolve(), path, sys.stdout, args.timeout)
    run = deploy.last_run(state / "flwr-home")
    print(f"run {run.get('run-id')}: {run.get('status')}")
    return 0 if run.get("status") == "finished:completed" else 2


def _task_for(data: Path, name: str | None) -> Any:
    from fl.learn import get_task

    if name:
        return get_task(name)
    try:
        size = json.loads((data / "dataset.json").read_text(encoding="utf-8")).get("tensorImageSize", "")
    except (OSError, ValueError):
        size = ""  # load_local_data names the problem
    return get_task({"3D": "seg3d"}.get(str(size).upper(), "seg2d"))


def cmd_node_check(args: argparse.Namespace) -> int:
    from nodes.check import check_dataset

    data = Path(args.data)
    report = check_dataset(data, _check_task(data, args), allow_identifiable=args.allow_identifiable_dicom)
    if args.json:
        dry = _dry_run(data, args)
        _keep_summary(data, report, dry, args)
        print(json.dumps({**report.to_dict(), **({"dry_run": dry.to_dict()} if dry else {})}, indent=2))
        return 1 if dry and not dry.passed else 0
    print(f"{report.data_dir}: valid for task {report.task}; fingerprint {report.fingerprint[:16]}...")
    for name, split in report.splits.items():
        shapes = ", ".join(f"{'x'.join(map(str, k))} ({v})" for k, v in split.shapes.items())
        spacing = ", ".join(f"{'x'.join(f'{s:g}' for s in k)} ({v})" for k, v in split.spacings.items()) or "-"
        print(f"  {name}: {split.cases} cases; shapes {shapes}; spacing {spacing}; "
              f"labels {sorted(split.label_values)}; foreground {split.foreground_fraction:.2%}")
    if report.deidentification is not None and report.deidentification.findings:
        print(f"  DICOM: {report.deidentification.summary()}")
    if report.identifiable and report.deidentification is not None:
        print(f"  warning: {len(report.identifiable)} DICOM file(s) carry identifying attributes or other "
              f"de-identification findings (allowed by flag):\n" + "\n".join(report.deidentification.lines()))
    dry = _dry_run(data, args)
    if dry is not None:
        print("\n".join(dry.lines(verbose=args.verbose)))
    _keep_summary(data, report, dry, args)
    print("nothing was sent")
    return 1 if dry and not dry.passed else 0


def _keep_summary(data: Path, report: Any, dry: Any, args: argparse.Namespace) -> None:
    """The check's summary in the node's state folder, for the node console (it stays on the node)."""
    import time

    from fl import schema
    from fl.files import atomic_write
    from nodes.policy import state_dir

    try:
        modality = json.loads((data / "dataset.json").read_text(encoding="utf-8")).get("modality")
    except (OSError, ValueError, AttributeError):
        modality = None
    summary = {**report.to_dict(), "modality": modality, "time": time.time(),
               "allow_identifiable_dicom": bool(args.allow_identifiable_dicom), "bundle": args.bundle,
               "dry_run": dry.to_dict() if dry else None, **schema.stamp("check-summary")}
    folder = state_dir(data.resolve())
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / "check-summary.json", (json.dumps(summary, indent=2, default=str) + "\n").encode())


def _check_task(data: Path, args: argparse.Namespace) -> Any:
    """The task the data check validates for: the bundle that will train, else ``--task``."""
    if not args.bundle:
        return _task_for(data, args.task)
    if args.task:
        raise ConfigError("--task and --bundle: give one (the bundle is the task the node will train)")
    from fl.learn.bundle import BundleTask

    return BundleTask.load(args.bundle)


def _dry_run(data: Path, args: argparse.Namespace) -> Any:
    """With ``--bundle``: its dry run on one of the node's cases (:mod:`nodes.dry_run`), else None."""
    if not args.bundle:
        return None
    from nodes.dry_run import dry_run

    return dry_run(data, args.bundle)


def cmd_node_deid(args: argparse.Namespace) -> int:
    from nodes.deidentify import deidentify, lookup_lines
    from nodes.policy import state_dir

    source = Path(args.source).resolve() if args.source else None
    state = Path(args.state).resolve() if args.state else state_dir(source) if source else None
    if args.lookup is not None:
        if state is None or args.out:
            raise ConfigError("--lookup: name the de-identified folder IN (or --state), and no OUT")
        print("\n".join(lookup_lines(state, args.lookup)))
        return 0
    if source is None or not args.out or state is None:
        raise ConfigError("fl node deid IN OUT: name the folder to de-identify and a new folder for the copy")
    export = deidentify(source, Path(args.out), state=state, keep_descriptors=args.keep_descriptors)
    print("\n".join(export.lines()))
    return 0


def cmd_node_provenance(args: argparse.Namespace) -> int:
    from fl.registry import Registry
    from nodes.policy import state_dir
    from nodes.provenance import answer, lineage_rounds

    registry = Registry(args.registry)
    version = registry.get(args.version)
    registry.verify(version.name)  # an edited manifest must not steer the answer
    rounds = lineage_rounds([v.manifest for v in registry.lineage(version)])
    data = Path(args.data)
    current = _current_cases(data) if args.reveal else None
    found = answer(state_dir(data), version.ref(), rounds, current_cases=current)
    print(f"{version.ref()}: {len(rounds)} round(s) in its lineage; this node's ledger records a contribution "
          f"to {len(found.contributed)} (recorded before training: an update dropped later counts too), "
          f"on {len(found.series)} indexed dataset(s) of its own")
    series = sorted(found.training_series())
    if found.unknown:
        print(f"  {len(found.unknown)} of those round(s) trained on a dataset this node holds no series index for "
              "(a ledger entry from before series were indexed, or an index that was removed): which series "
              "trained them is unknown")
    print(f"  {len(series)} DICOM series of this node may have trained it" if series else
          "  no indexed DICOM series of this node trained it" if found.unknown else
          "  no DICOM series of this node trained it")
    for token in series:
        print(f"  {token[:32]}  {found.revealed.get(token, '') if args.reveal else ''}".rstrip())
    if args.reveal and len(found.revealed) < len(series):
        print(f"  {len(series) - len(found.revealed)} token(s) match none of the node's current series "
              "(the dataset changed since)")
    print("nothing was sent")
    return 0


def _current_cases(data: Path) -> list[dict[str, Any]]:
    from fl.learn.data import SPLITS, read_datalist

    datalist = read_datalist(data)
    return [case for split in SPLITS for case in datalist[split]]


def cmd_node_start(args: argparse.Namespace) -> int:
    from nodes.check import check_dataset
    from nodes.policy import load_policy, save_policy, state_dir
    from nodes.supernode import (
        allowlist_path,
        check_waits,
        load_allowlist,
        parse_follow_up,
        run_supernode,
        supernode_argv,
    )
    from nodes.worker import write_secret

    data = Path(args.data).resolve()
    if "'" in str(data):
        raise ConfigError(f"--data: {data} contains a quote, which Flower's node config cannot carry")
    follow_up = parse_follow_up(args.follow_up_pulls)
    check_waits(args.poll_interval, follow_up)  # the waits first: nothing is written for a node that won't start
    check_dataset(data, _task_for(data, args.task), allow_identifiable=args.allow_identifiable_dicom)
    state = state_dir(data)
    if args.budget is not None and not args.budget > 0:
        raise ConfigError(f"--budget: must be > 0, got {args.budget}")
    changes = {**({"epsilon": args.budget} if args.budget is not None else {}),
               **({"require_secagg": True} if args.require_secagg else {}),
               **({"require_distributed_noise": True} if args.require_distributed_noise else {}),
               **({"release_metrics": args.release_metrics} if args.release_metrics else {}),
               **({"release_descriptors": args.release_descriptors} if args.release_descriptors else {})}
    if changes:
        save_policy(state, dataclasses.replace(load_policy(state), **changes))
    if not load_allowlist(state):
        raise ConfigError(f"{allowlist_path(state)}: no approved app; review the coordinator's app and run "
                          f"`fl node approve HASH --data {args.data}` (the hash comes from `fl app hash`)")
    for flag in ("root_cert", "auth_key"):
        value = getattr(args, flag)
        if value and not Path(value).is_file():
            raise ConfigError(f"--{flag.replace('_', '-')}: {value} not found")
    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads: must be >= 1, got {args.threads}")
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    # Flower's SuperExec (a cold node's ClientApp processes) looks for tasks every 1 s by default
    os.environ.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.05")
    secret = None if args.cold else write_secret(state)
    argv = supernode_argv(superlink=args.superlink, data_dir=data, state=state,
                          root_cert=Path(args.root_cert).resolve() if args.root_cert else None,
                          auth_key=Path(args.auth_key).resolve() if args.auth_key else None,
                          port=args.port, insecure=args.insecure, secret=secret)
    return run_supernode(argv, state, runtime_port=args.port, warm=not args.cold, poll_interval=args.poll_interval,
                         follow_up=follow_up)


def cmd_node_approve(args: argparse.Namespace) -> int:
    from nodes.policy import state_dir
    from nodes.supernode import approve

    data = Path(args.data)
    if not data.is_dir():
        raise DataError(f"--data: {data} is not a folder")
    print(approve(state_dir(data.resolve()), args.hash, args.note))
    return 0


def cmd_node_revoke(args: argparse.Namespace) -> int:
    from nodes.supernode import revoke

    print(revoke(_node_state(args.data), args.hash, args.note))
    return 0


def cmd_node_console(args: argparse.Namespace) -> int:
    from fl.cli.console import serve
    from nodes.console import node_app

    data = Path(args.data)
    if not data.is_dir():
        raise DataError(f"--data: {data} is not a folder")
    return serve(lambda guard: node_app(data, guard), args, f"OncoFed node console for {data.resolve()}")


def _node_state(data: str) -> Path:
    from nodes.policy import state_dir

    folder = Path(data)
    if not folder.is_dir():
        raise DataError(f"--data: {folder} is not a folder")
    return state_dir(folder.resolve())


def cmd_roster_key(args: argparse.Namespace) -> int:
    from nodes.roster import SITE_NAME, create_site_key

    if not SITE_NAME.match(args.site):
        raise ConfigError(f"--site: {args.site!r} is no site name (letters, digits, '.', '_', '-'; at most 64)")
    public = create_site_key(_node_state(args.data))
    print(json.dumps({"site": args.site, "key": public.hex()}))  # the line the consortium adds to its roster
    return 0


def cmd_roster_pin(args: argparse.Namespace) -> int:
    from nodes.roster import pin_roster

    roster = pin_roster(_node_state(args.data), Path(args.file))
    print(f"pinned {len(roster.sites)} sites of {roster.consortium}; roster digest {roster.digest} "
          "(compare it with every other site's before the first round)")
    return 0


def cmd_roster_show(args: argparse.Namespace) -> int:
    from nodes.roster import load_roster, own_site

    folder = _node_state(args.data)
    roster = load_roster(folder)
    site, _ = own_site(folder, roster)
    print(json.dumps({"consortium": roster.consortium, "digest": roster.digest, "this_site": site,
                      "sites": {k: v.hex() for k, v in sorted(roster.sites.items())}}, indent=2))
    return 0


def cmd_app_hash(args: argparse.Namespace) -> int:
    from nodes.supernode import fab_hash_of

    print(fab_hash_of(Path(args.folder).resolve()))
    return 0


def cmd_demo_deploy(args: argparse.Namespace) -> int:
    from fl.deploy.demo import run_demo

    summary = run_demo(Path(args.out), rounds=args.rounds, budget=args.budget, overrides=args.overrides,
                       say=lambda text: print(text, flush=True), hosts=args.hosts, front=args.front)
    rounds = ", ".join(f"{r}: {s:.1f} s" for r, s in summary["round_seconds"].items())
    print(f"run {summary['run_id']} {summary['status']}; versions {', '.join(summary['versions'])}")
    print(f"ledger entries per node: {summary['ledger_entries']}; final Dice {summary['final_dice']}")
    print(f"round wall: {rounds}; everything {summary['wall_seconds']:.0f} s; all processes stopped")
    print(f"certificates, logs, ledgers, registry: {Path(args.out).resolve()}")
    return 0
