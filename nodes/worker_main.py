"""A node's warm worker process: it serves one run's ClientApp messages, one at a time, for as
long as that run lasts (:mod:`nodes.worker` starts, feeds and replaces it).

Run by path (``python nodes/worker_main.py FD ALLOWLIST``), not as ``nodes.worker_main``: before a
job names an approved app this process imports only the standard library, Flower, torch and
MONAI, so the app's own packages (``nodes``, ``fl``, ``strategies``) come from the app bundle the
run shipped, as in the one-process-per-message ClientApp Flower starts, never from what is
installed beside the node.

Jobs arrive on the inherited end of a socket pair (``FD``; no address anyone else can reach) as
dicts of bytes and numbers: the FAB, the message and the context, in Flower's protobuf form. The
worker checks the FAB's SHA-256 against the operator's list (``ALLOWLIST``) itself before it
installs or imports anything of it, and refuses a job of another app or another run: the
supervisor then starts a fresh worker, so no module, cache or random state of one run is seen by
the next.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # the script's own folder must not shadow the app's packages
    sys.path.pop(0)

TORCH_DEFAULT_SEED = 67280421310721  # torch's global seed in a fresh process
log = logging.getLogger("flwr.oncofed.node")
FLOWER_COMPAT = Path(__file__).resolve().parents[1] / "fl" / "flower_compat" / "clientapp_process.py"


def flower_compat() -> Any:
    """:mod:`fl.flower_compat.clientapp_process` (every non-public piece of Flower this process
    uses), loaded by path under a name of its own: importing it as ``fl.flower_compat...`` would
    import the installed ``fl`` before the app bundle's. It imports only the standard library and
    Flower."""
    spec = importlib.util.spec_from_file_location("oncofed_worker_flower_compat", FLOWER_COMPAT)
    assert spec is not None and spec.loader is not None, FLOWER_COMPAT
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def approved(allowlist: Path) -> set[str]:
    """The hashes in the operator's list (``nodes.supernode.load_allowlist`` validates its form
    when the node starts; here a malformed line simply approves nothing)."""
    try:
        lines = allowlist.read_text(encoding="utf-8").splitlines()
    except OSError:
        return set()
    return {line.split("#", 1)[0].strip() for line in lines} - {""}


class DataReads:
    """Counts the files a message opens under the node's data folder: cases and the disk cache,
    not the state folder's ledger, policy or allowlist, nor ``dataset.json`` (read every message
    to notice changed data). Python's audit hook sees every ``open``."""

    def __init__(self) -> None:
        self.data = self.state = self.cache = ""
        self.on = False
        self.count = 0
        sys.addaudithook(self._hook)

    def start(self, node_config: Any) -> None:
        data = str(node_config.get("data-dir", ""))
        self.on, self.count = bool(data), 0
        if self.on:
            self.data = os.path.realpath(data) + os.sep
            self.state = os.path.realpath(str(node_config.get("state-dir", "")) or data + "/.oncofed") + os.sep
            self.cache = self.state + "cache" + os.sep

    def stop(self) -> int:
        self.on = False
        return self.count

    def _hook(self, event: str, args: tuple[Any, ...]) -> None:
        if event != "open" or not self.on or not isinstance(args[0], (str, os.PathLike)):
            return
        path = os.fspath(args[0])
        if path.startswith(self.cache) or (path.startswith(self.data) and not path.startswith(self.state)
                                           and not path.endswith("dataset.json")):
            self.count += 1


def preload() -> None:
    """Libraries every OncoFed app uses, and the device context, before the first job."""
    import monai  # noqa: F401
    import torch

    if torch.cuda.is_available():
        torch.cuda.init()


class Worker:
    def __init__(self, allowlist: Path, flower: Any = None) -> None:
        self.allowlist = allowlist
        self.flower = flower if flower is not None else flower_compat()
        self.app: Any = None
        self.fab_hash: str | None = None
        self.run_id: int | None = None
        self.reads = DataReads()

    def load(self, job: dict[str, Any]) -> None:
        """Check, install and import the job's app (once per worker)."""
        digest = hashlib.sha256(job["fab"]).hexdigest()
        if digest != job["fab_hash"]:
            raise PermissionError(f"app content hashes to {digest[:12]}, not the announced {job['fab_hash'][:12]}")
        if digest not in approved(self.allowlist):
            raise PermissionError(f"app {digest} is not approved by this node's operator")
        self.app = self.flower.install_and_load_client_app(job["fab"], job["fab_id"], job["fab_version"], digest)
        self.fab_hash, self.run_id = digest, job["run_id"]

    def serve(self, job: dict[str, Any]) -> dict[str, Any]:
        import random

        import numpy as np
        import torch
        from flwr.app import Error, Message

        flower = self.flower
        if self.app is not None and (job["fab_hash"] != self.fab_hash or job["run_id"] != self.run_id):
            return {"restart": f"this worker serves run {self.run_id}"}
        flower.set_task_identity(job["task_id"], job["run_id"], job["node_id"])
        message = flower.message_from_bytes(job["message"], job["message_id"])
        context = flower.context_from_bytes(job["context"])
        # each message starts from the random state a fresh process would have
        torch.manual_seed(TORCH_DEFAULT_SEED)
        np.random.seed(None)
        random.seed(None)
        self.reads.start(context.node_config)
        started = time.perf_counter()
        failed = ""
        if self.app is None:
            try:
                self.load(job)
            except PermissionError as refusal:
                return {"refused": str(refusal)}
            except Exception as exc:  # noqa: BLE001 - the app failed to import
                log.exception("the ClientApp failed to load")
                return {"load_failed": f"{type(exc).__name__}: {exc}"}
        try:
            reply = self.app(message=message, context=context)
        except Exception as exc:  # noqa: BLE001 - reported to the coordinator as Flower reports it
            log.exception("ClientApp raised an exception")
            failed = f"{type(exc)}:<'{exc}'>"
            reply = Message(Error(code=flower.CLIENT_APP_RAISED_EXCEPTION, reason=failed), reply_to=message)
        reads = self.reads.stop()
        return {"reply": flower.message_to_bytes(reply), "context": flower.context_to_bytes(context), "failed": failed,
                "seconds": time.perf_counter() - started, "data_files_read": reads}


def main() -> None:
    fd, allowlist = int(sys.argv[1]), Path(sys.argv[2])
    conn = Connection(fd)
    flower = flower_compat()
    flower.monitor_parent(os.getppid())
    preload()
    conn.send({"ready": os.getpid()})
    worker = Worker(allowlist, flower)
    while True:
        try:
            job = conn.recv()
        except EOFError:
            return
        conn.send(worker.serve(job))


if __name__ == "__main__":
    main()
