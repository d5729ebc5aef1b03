"""Warm node workers: a deployed node serves each message in a process that is already running.

Flower 1.41 starts a fresh ClientApp process for every message a SuperNode receives (train,
evaluate, each SecAgg+ stage): it imports torch, MONAI and Flower, reloads the node's data and
initialises the device every time. ``fl node start`` instead runs its SuperNode with Flower's
isolation mode ``process`` (Flower starts no SuperExec and no ClientApp process) and takes the
tasks itself, as a SuperExec would, from the SuperNode's runtime API:

- :class:`Dispatcher`, a thread of the node process, acquires each task (authenticated with a
  per-start secret, see below), pulls its message, context and app bundle, checks the bundle's
  hash against the operator's list, hands the job to the worker, and pushes the reply and the
  updated context back, as Flower's ClientApp process does;
- the worker (:mod:`nodes.worker_main`, a child process) imports torch and MONAI once, then the
  run's approved app, and keeps the app's caches (the node's preprocessed cases) for the whole
  run. It serves exactly one run: a task of another run (or another app) gets a fresh worker, so
  nothing of a run (modules, caches, random state) reaches the next, and Python's module cache
  cannot run an old app's code for a new one. A spare worker with the libraries loaded is kept
  ready for the next run; it is started when the node starts and after the node has had no task
  for :data:`SPARE_AFTER_IDLE_S` s, so its imports do not compete with a round's training. A run's
  worker ends after :data:`RETIRE_AFTER_IDLE_S` s without a task (its memory is freed; a later
  message of the same run gets a fresh worker, which reads the cases from the disk cache).

Safety. The runtime API listens on 127.0.0.1 only; acquiring a task needs an HMAC with a random
secret written 0600 in the node's state folder (Flower's SuperExec authentication), and every
other call needs that task's token; the worker talks to nothing but its end of a socket pair
inherited from the node process. If the worker dies while serving a message, the node replies
:data:`fl.wire.ERROR_NODE_WORKER_DIED` for it, starts a new worker and serves the next message.
The ClientApp does its privacy checks and ledger entries exactly as in a fresh process, once per
message.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import secrets
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from fl import wire
from nodes.app_check import AppRefused, check_fab

log = logging.getLogger("flwr.oncofed.node")

WORKER_SCRIPT = Path(__file__).with_name("worker_main.py")
SECRET_FILE = "superexec-secret"
STATUS_FILE = "worker.json"
TASK_POLL_S = 1.0  # a fallback: the SuperNode wakes the dispatcher when it stores a message
SPARE_AFTER_IDLE_S = 5.0  # start the next run's worker only once the node has had no task this long
RETIRE_AFTER_IDLE_S = 1800.0  # a run's worker (and the cases it holds in memory) ends after this long idle


def write_secret(state: Path) -> Path:
    """A fresh random secret for this node start, readable by the node's user only."""
    folder = state / "worker"
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    path = folder / SECRET_FILE
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(secrets.token_bytes(32))
    return path


class WorkerDied(Exception):
    """The worker process ended while it held a job."""


class WorkerProcess:
    """One worker child process and the node's end of its socket pair."""

    def __init__(self, allowlist: Path, env: dict[str, str]) -> None:
        ours, theirs = socket.socketpair()
        self.proc = subprocess.Popen([sys.executable, str(WORKER_SCRIPT), str(theirs.fileno()), str(allowlist)],
                                     pass_fds=(theirs.fileno(),), env=env, stdin=subprocess.DEVNULL)
        theirs.close()
        self.conn = Connection(ours.detach())
        self.run_id: int | None = None
        self.fab_hash: str | None = None
        self.ready = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self) -> None:
        if not self.ready:
            self._recv()
            self.ready = True

    def call(self, job: dict[str, Any]) -> dict[str, Any]:
        self.wait_ready()
        try:
            self.conn.send(job)
        except OSError:
            raise WorkerDied(self._ended()) from None
        return self._recv()

    def _recv(self) -> dict[str, Any]:
        try:
            return dict(self.conn.recv())
        except (EOFError, OSError):
            raise WorkerDied(self._ended()) from None

    def _ended(self) -> str:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        code = self.proc.poll()
        return f"worker process {self.pid} ended" + (f" with status {code}" if code is not None else "")

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


SERVED_LOG = "run %s: %s message served by worker %s in %.2f s; %d data file(s) read; %s"
_SERVED_LINE = re.compile(r"run (\d+): (\w+) message served by worker (\d+) in [\d.]+ s; (\d+) data file\(s\) "
                          r"read; (.*)")


def served_in_log(text: str, run_id: str) -> list[tuple[str, int, int, str]]:
    """(message type, worker pid, data files read, outcome) of each message a node's log says
    its workers served in run ``run_id``, in order (the lines :data:`SERVED_LOG` writes)."""
    return [(m[2], int(m[3]), int(m[4]), m[5].strip()) for m in _SERVED_LINE.finditer(text) if m[1] == str(run_id)]


@dataclass
class Served:
    """What the node logs for each message (nothing of its content)."""

    run_id: int
    message_type: str
    worker_pid: int
    seconds: float
    data_files_read: int
    outcome: str


class Dispatcher:
    """Takes the SuperNode's ClientApp tasks from its runtime API and serves them with warm
    workers (see the module's docstring)."""

    def __init__(self, runtime_address: str, secret: bytes, state: Path, approved: Callable[[], set[str]],
                 allowlist: Path, env: dict[str, str] | None = None, wake: threading.Event | None = None) -> None:
        self.address, self.secret, self.state = runtime_address, secret, state
        self.wake = wake or threading.Event()
        self.approved, self.allowlist = approved, allowlist
        self.env = dict(os.environ if env is None else env)
        self.active: WorkerProcess | None = None
        self.spare: WorkerProcess | None = None
        self.stopping = threading.Event()

    # ----- workers -------------------------------------------------------------------------
    def _fresh(self) -> WorkerProcess:
        worker, self.spare = (self.spare or WorkerProcess(self.allowlist, self.env)), None
        return worker

    def _keep_spare(self) -> None:
        if self.spare is None or self.spare.proc.poll() is not None:
            self.spare = WorkerProcess(self.allowlist, self.env)

    def _retire_active(self) -> None:
        if self.active is not None:
            self.active.stop()
            self.active = None

    def worker_for(self, run_id: int, fab_hash: str) -> WorkerProcess:
        """The worker of this run; a fresh one for a new run or app (the old one is stopped)."""
        current = self.active
        if current is not None and current.proc.poll() is None and current.run_id == run_id \
                and current.fab_hash == fab_hash:
            return current
        self._retire_active()
        self.active = self._fresh()
        self.active.run_id, self.active.fab_hash = run_id, fab_hash
        return self.active

    def _status(self, **fields: Any) -> None:
        """``worker.json`` in the state folder: which process serves which run, and whether busy."""
        path = self.state / "worker" / STATUS_FILE
        tmp = path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps({"node_pid": os.getpid(), **fields}), encoding="utf-8")
            tmp.replace(path)
        except OSError as exc:  # informational only; what guards the node's records (its ledger) raises itself
            log.warning("could not write %s: %s", path, exc)
            with contextlib.suppress(OSError):
                tmp.unlink()

    # ----- the runtime API ----------------------------------------------------------------
    def serve_forever(self) -> None:
        from fl.flower_compat.runtime import acquire_client, acquire_client_app_task

        client = acquire_client(self.address, self.secret)
        self._keep_spare()
        last_task = time.monotonic()
        try:
            while not self.stopping.is_set():
                try:
                    token = acquire_client_app_task(client)
                except Exception as exc:  # noqa: BLE001 - the SuperNode is starting or stopping
                    log.debug("runtime API not answering: %s", exc)
                    time.sleep(0.5)
                    continue
                if token is not None:
                    self.serve_task(token)
                    last_task = time.monotonic()
                else:
                    idle = time.monotonic() - last_task
                    if idle > SPARE_AFTER_IDLE_S:
                        self._keep_spare()
                    if idle > RETIRE_AFTER_IDLE_S:  # its run is most likely over
                        self._retire_active()
                    self.wake.wait(TASK_POLL_S)
                    self.wake.clear()
        finally:
            client.close()
            self.close()

    def serve_task(self, token: str) -> Served | None:
        """Serve one task as Flower's ClientApp process would, with a warm worker."""
        from flwr.app import Error, Message

        from fl.flower_compat.runtime import (
            TASK_COMPLETED,
            TASK_FAILED,
            pull_task_input,
            push_message,
            push_task_output,
            start_heartbeat,
            stop_heartbeat,
            task_client,
        )
        from fl.flower_compat.serde import context_to_bytes, message_to_bytes

        client = task_client(self.address, token)
        heartbeat = start_heartbeat(client)
        message = context = served = None
        status, details, replied = TASK_FAILED, "the node could not serve the task", False
        try:
            message, context, run, fab = pull_task_input(client)
            kind = message.metadata.message_type
            reply: Message
            try:
                digest = check_fab(fab.content, fab.hash_str, self.approved())
            except AppRefused as refusal:  # the SuperNode's guard refused it already; checked again here
                log.error("run %s refused: %s", run.run_id, refusal)
                reply = Message(Error(code=wire.ERROR_APP_NOT_APPROVED, reason=f"node refused the app: {refusal}"),
                                reply_to=message)
                served = Served(run.run_id, kind, 0, 0.0, 0, "refused")
            else:
                worker = self.worker_for(run.run_id, digest)
                self._status(worker_pid=worker.pid, run_id=run.run_id, busy=kind)
                job = {"fab": fab.content, "fab_hash": digest, "fab_id": run.fab_id, "fab_version": run.fab_version,
                       "run_id": run.run_id, "node_id": context.node_id, "task_id": _task_id(),
                       "message_id": message.metadata.message_id,
                       "message": message_to_bytes(message), "context": context_to_bytes(context)}
                reply, context, served = self._call(worker, job, message, context, run.run_id, kind)
                self._status(worker_pid=self.active.pid if self.active else None, run_id=run.run_id, busy=None)
            push_message(client, reply, context)
            replied = True
            if served.outcome == "ok":
                status, details = TASK_COMPLETED, ""
            else:
                details = served.outcome
            log.info(SERVED_LOG, served.run_id, served.message_type, served.worker_pid, served.seconds,
                     served.data_files_read, served.outcome)
            return served
        except Exception as exc:  # noqa: BLE001 - the task fails; the node keeps serving
            log.exception("could not serve a ClientApp task")
            details = f"the node could not serve the message ({_cause(exc)}); details are in the node's log"
            if message is not None and not replied:
                _reply_error(client, message, context, details)
            return None
        finally:
            with contextlib.suppress(Exception):
                push_task_output(client=client, context=context, sub_status=status, details=details)
            stop_heartbeat(heartbeat)
            client.close()

    def _call(self, worker: WorkerProcess, job: dict[str, Any], message: Any, context: Any, run_id: int,
              kind: str) -> tuple[Any, Any, Served]:
        from flwr.app import Error, Message

        from fl.flower_compat.serde import context_from_bytes, message_from_bytes

        started = time.perf_counter()
        try:
            answer = worker.call(job)
        except WorkerDied as death:
            log.error("run %s: %s while serving a %s message; starting a new worker", run_id, death, kind)
            self._retire_active()
            self._keep_spare()  # its replacement starts importing now, for the next message
            reply = Message(Error(code=wire.ERROR_NODE_WORKER_DIED, reason=f"node worker died: {death}"),
                            reply_to=message)
            return reply, context, Served(run_id, kind, worker.pid, time.perf_counter() - started, 0, "worker died")
        if "restart" in answer:  # cannot happen while worker_for keeps one run per worker; never serve it
            self._retire_active()
            raise RuntimeError(f"worker {worker.pid} refused a job: {answer['restart']}")
        if "refused" in answer or "load_failed" in answer:
            self._retire_active()
            code = wire.ERROR_APP_NOT_APPROVED if "refused" in answer else wire.ERROR_APP_LOAD_FAILED
            reason = answer.get("refused") or answer["load_failed"]
            log.error("run %s: the worker did not load the app: %s", run_id, reason)
            reply = Message(Error(code=code, reason=f"node could not load the app: {reason}"), reply_to=message)
            return reply, context, Served(run_id, kind, worker.pid, time.perf_counter() - started, 0, "app refused")
        reply = message_from_bytes(answer["reply"])
        context = context_from_bytes(answer["context"])
        outcome = "ok" if not answer["failed"] else f"ClientApp raised {answer['failed']}"
        return reply, context, Served(run_id, kind, worker.pid, float(answer["seconds"]), int(answer["data_files_read"]),
                                      outcome)

    def close(self) -> None:
        for worker in (self.active, self.spare):
            if worker is not None:
                worker.stop()
        self.active = self.spare = None


def _cause(exc: BaseException) -> str:
    """What a failure's reply may say: its type and, for an OS error, the errno's name and text;
    never the message itself, which may name a file on the node ("ENOSPC ...: '/data/...'")."""
    cause = type(exc).__name__
    if isinstance(exc, OSError) and exc.errno:
        cause += f" {errno.errorcode.get(exc.errno, exc.errno)}: {os.strerror(exc.errno)}"
    return cause


def _reply_error(client: Any, message: Any, context: Any, details: str) -> None:
    """Answer ``message`` with the node's own failure: Flower's SuperNode waits for a reply to each
    message it handed out before it pulls the next, so without one it would hang, its runtime API
    still open, serving nothing."""
    from flwr.app import Error, Message

    from fl.flower_compat.runtime import push_message

    with contextlib.suppress(Exception):
        push_message(client, Message(Error(code=wire.ERROR_NODE_FAILED, reason=details), reply_to=message), context)


def _task_id() -> int:
    from fl.flower_compat.task import task_id

    return task_id()


def start_dispatcher(runtime_address: str, secret_file: Path, state: Path, approved: Callable[[], set[str]],
                     allowlist: Path, wake: threading.Event | None = None) -> threading.Thread:
    """Serve the SuperNode's tasks from a daemon thread of this process; ``wake`` is set when the
    SuperNode stores a message (it is also polled every :data:`TASK_POLL_S` s)."""
    dispatcher = Dispatcher(runtime_address, secret_file.read_bytes(), state, approved, allowlist, wake=wake)
    thread = threading.Thread(target=dispatcher.serve_forever, name="oncofed-dispatcher", daemon=True)
    thread.start()
    return thread
