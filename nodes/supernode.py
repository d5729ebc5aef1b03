"""``fl node start``: a Flower SuperNode bound to one data folder, its policy, ledger and
the operator's list of approved apps.

The open-source SuperLink accepts runs from anyone who reaches its port, and every run ships
its code (a FAB) to the nodes. A node therefore runs only app versions its operator approved:
``approved-apps.txt`` in the node's state folder lists SHA-256 hashes of FABs (the
coordinator publishes ``fl app hash``; the operator reviews that code and runs
``fl node approve``). The check sits in the SuperNode itself, where the FAB arrives, before the
FAB is stored and before any task is created, so an unapproved or tampered app never starts a
ClientApp process and never touches the data: the node answers with error
:data:`fl.wire.ERROR_APP_NOT_APPROVED` instead.

Flower 1.41's SuperNode offers no hook for this, so :func:`install_app_guard` wraps its
private ``_pull_and_store_message`` (in :mod:`fl.flower_compat.supernode`; the package pins
Flower exactly, ``tests/test_flower_compat.py`` checks what the wrap relies on, and tests
exercise it against a live SuperLink).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fl import schema, wire
from fl.errors import ConfigError
from fl.files import atomic_write
from fl.flower_compat.supernode import FLOWER_IDLE_SLEEP_S, build_fab, install_fab_guard, run_supernode_cli
from fl.flower_compat.supernode import shorten_node_waits as compat_shorten_node_waits
from fl.privacy import hashchain
from nodes.app_check import AppRefused, check_fab

log = logging.getLogger("flwr.oncofed.node")

ALLOWLIST_FILE = "approved-apps.txt"
_HASH = re.compile(r"^[0-9a-f]{64}$")


MESSAGE_STORED = threading.Event()  # set each time this process's SuperNode stores a message


def allowlist_path(state: Path) -> Path:
    return state / ALLOWLIST_FILE


def load_allowlist(state: Path) -> set[str]:
    """Approved FAB hashes; a malformed line is an error naming the file and line."""
    path = allowlist_path(state)
    if not path.exists():
        return set()
    approved = set()
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        if not _HASH.match(entry):
            raise ConfigError(f"{path}:{number}: {entry!r} is not a SHA-256 app hash (64 lowercase hex digits)")
        approved.add(entry)
    return approved


APPROVALS_LOG = "approvals.jsonl"  # every approval and revocation, with its date and note (hash-chained)


def check_hash(fab_hash: str) -> str:
    fab_hash = fab_hash.strip().lower()
    if not _HASH.match(fab_hash):
        raise ConfigError(f"app hash: {fab_hash!r} is not a SHA-256 hash (64 hex digits; see `fl app hash`)")
    return fab_hash


def _log(state: Path, action: str, fab_hash: str, note: str) -> None:
    path = state / APPROVALS_LOG
    with hashchain.locked(path):
        try:
            entries = hashchain.read_chain(path, "approvals log")
        except hashchain.ChainError as exc:
            raise ConfigError(str(exc)) from None
        hashchain.append_entry(path, entries, {"action": action, "app": fab_hash, "note": note,
                                               "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                                               **schema.stamp("approvals")})


def approve(state: Path, fab_hash: str, note: str = "") -> Path:
    """Add ``fab_hash`` to the node's allowlist (idempotent) and log the approval with its date."""
    fab_hash = check_hash(fab_hash)
    path = allowlist_path(state)
    if fab_hash in load_allowlist(state):
        return path
    state.mkdir(parents=True, exist_ok=True)
    _log(state, "approve", fab_hash, note)
    with path.open("a", encoding="utf-8") as fh:
        fh.write(f"{fab_hash}  # {note}\n" if note else f"{fab_hash}\n")
        fh.flush()
        os.fsync(fh.fileno())
    return path


def revoke(state: Path, fab_hash: str, note: str = "") -> Path:
    """Take ``fab_hash`` off the allowlist (the file is replaced whole) and log it: the node refuses
    any new run of that app from now on."""
    fab_hash = check_hash(fab_hash)
    if fab_hash not in load_allowlist(state):
        raise ConfigError(f"app hash: {fab_hash[:16]}... is not approved on this node; nothing to revoke")
    path = allowlist_path(state)
    kept = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.split("#", 1)[0].strip() != fab_hash]
    _log(state, "revoke", fab_hash, note)
    atomic_write(path, ("\n".join(kept) + "\n" if kept else "").encode())
    return path


def approved_apps(state: Path) -> list[dict[str, Any]]:
    """Each approved hash with its note and the date of its newest approval (None for one approved
    before the log existed), oldest first; and each revoked one, with the date it was revoked."""
    approved = load_allowlist(state)
    try:
        log = hashchain.read_chain(state / APPROVALS_LOG, "approvals log")
    except hashchain.ChainError as exc:
        raise ConfigError(str(exc)) from None
    newest: dict[str, dict[str, Any]] = {}
    for entry in log:
        newest[entry["app"]] = entry
    notes = {}
    path = allowlist_path(state)
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            entry, _, note = line.partition("#")
            if entry.strip():
                notes[entry.strip()] = note.strip()
    out = [{"app": h, "approved": True, "note": (newest.get(h) or {}).get("note") or notes.get(h, ""),
            "time": (newest.get(h) or {}).get("time") if (newest.get(h) or {}).get("action") == "approve" else None}
           for h in sorted(approved, key=lambda h: (newest.get(h) or {}).get("seq", 0))]
    out += [{"app": h, "approved": False, "note": e["note"], "time": e["time"]} for h, e in newest.items()
            if e["action"] == "revoke" and h not in approved]
    return out


def fab_hash_of(app_dir: Path) -> str:
    """SHA-256 of the FAB Flower builds from ``app_dir``: the hash a node sees for a run of it."""
    try:
        return hashlib.sha256(build_fab(app_dir)).hexdigest()
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{app_dir}: cannot build a Flower app bundle ({exc})") from None


def install_app_guard(approved: Callable[[], set[str]]) -> None:
    """Make this process's SuperNode refuse runs whose FAB is not in ``approved()`` (read
    afresh for every new run, so approving needs no restart); see
    :func:`fl.flower_compat.supernode.install_fab_guard`."""
    install_fab_guard(lambda content, fab_hash: check_fab(content, fab_hash, approved()), AppRefused,
                      wire.ERROR_APP_NOT_APPROVED, MESSAGE_STORED.set)


REPLY_POLL_S = 0.05
MIN_IDLE_S, MAX_IDLE_S = 0.1, 3.0
MIN_FOLLOW_UP_S = 0.02


FOLLOW_UP_S = (0.05, 0.05, 0.1)  # the waits before the first empty pulls after a message


def parse_follow_up(text: str | None) -> tuple[float, ...]:
    """``--follow-up-pulls``: comma-separated seconds, ``none``, or None for :data:`FOLLOW_UP_S`."""
    if text is None:
        return FOLLOW_UP_S
    if text.strip().lower() == "none":
        return ()
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise ConfigError(f"--follow-up-pulls: {text!r} is not seconds separated by commas (e.g. 0.05,0.1) "
                          "or none") from None


def check_waits(idle: float, follow_up: tuple[float, ...] = FOLLOW_UP_S) -> None:
    """The node's poll interval and its follow-up waits, each within its bounds."""
    if not MIN_IDLE_S <= idle <= MAX_IDLE_S:
        raise ConfigError(f"--poll-interval: {idle:g} s is outside {MIN_IDLE_S:g} to {MAX_IDLE_S:g} s")
    if any(not MIN_FOLLOW_UP_S <= wait <= idle for wait in follow_up):
        raise ConfigError(f"--follow-up-pulls: each wait must lie between {MIN_FOLLOW_UP_S:g} s and the poll "
                          f"interval ({idle:g} s), got {list(follow_up)}")


def shorten_node_waits(idle: float, follow_up: tuple[float, ...] = FOLLOW_UP_S) -> bool:
    """Make this process's SuperNode pull again ``idle`` s after finding no message (Flower: 3 s),
    sooner (``follow_up``) the first times after a message, and check for a ClientApp's reply
    every :data:`REPLY_POLL_S` (Flower: 0.5 s).

    Flower 1.41 hard-codes both waits in its SuperNode loop; :mod:`fl.flower_compat.supernode`
    replaces them (its docstring says how, and what happens when Flower changes). If Flower's
    source no longer reads as expected, nothing is patched and the node keeps Flower's waits,
    with a warning. Each empty pull is one request to the coordinator: ``idle`` bounds the load
    a node puts on it."""
    check_waits(idle, follow_up)
    if not compat_shorten_node_waits(idle, REPLY_POLL_S, follow_up):
        log.warning("Flower's SuperNode no longer waits as flwr 1.41 did; keeping its own polling intervals")
        return False
    return True


def supernode_argv(*, superlink: str, data_dir: Path, state: Path, root_cert: Path | None,
                   auth_key: Path | None, port: int, insecure: bool = False, secret: Path | None = None) -> list[str]:
    """``flower-supernode`` arguments for this node; with ``secret`` (warm workers, see
    :mod:`nodes.worker`) Flower starts no ClientApp process and tasks are taken with that secret."""
    argv = ["flower-supernode", "--superlink", superlink, "--host", "127.0.0.1", "--port", str(port),
            "--node-config", f"{wire.NODE_DATA_DIR}='{data_dir}' {wire.NODE_STATE_DIR}='{state}'"]
    if insecure:
        argv.append("--insecure")
    else:
        if root_cert is None:
            raise ConfigError("--root-cert: required for TLS (the coordinator's ca.crt); "
                              "--insecure only for a local test")
        argv += ["--root-certificates", str(root_cert)]
    if auth_key is not None:
        argv += ["--auth-supernode-private-key", str(auth_key)]
    if secret is not None:
        argv += ["--isolation", "process", "--superexec-auth-secret-file", str(secret)]
    return argv


def run_supernode(argv: list[str], state: Path, *, runtime_port: int | None = None, warm: bool = True,
                  poll_interval: float | None = None, follow_up: tuple[float, ...] = FOLLOW_UP_S) -> int:
    """Run Flower's SuperNode in this process with the app guard installed; with ``warm``, serve
    its tasks with warm workers (:mod:`nodes.worker`; ``argv`` must carry the secret). A
    ``poll_interval`` under Flower's 3 s shortens Flower's waits (:func:`shorten_node_waits`, with
    ``follow_up``; :func:`fl.engine_env.prompt_object_pulls`); 3 s or more keeps all of Flower's own."""
    from fl.engine_env import prompt_object_pulls, with_own_scripts

    if poll_interval is not None:
        check_waits(poll_interval, follow_up)
    install_app_guard(lambda: load_allowlist(state))
    if poll_interval is not None and poll_interval < FLOWER_IDLE_SLEEP_S:  # 3 s or more: Flower's own waits
        shorten_node_waits(poll_interval, follow_up)
        if not prompt_object_pulls():
            log.warning("Flower no longer retries object pulls as flwr 1.41 did; keeping its waits")
    with_own_scripts(os.environ)
    if warm:
        from nodes.worker import start_dispatcher

        secret = Path(argv[argv.index("--superexec-auth-secret-file") + 1])
        start_dispatcher(f"127.0.0.1:{runtime_port}", secret, state, lambda: load_allowlist(state),
                         allowlist_path(state), wake=MESSAGE_STORED)
    run_supernode_cli(argv)
    return 0
