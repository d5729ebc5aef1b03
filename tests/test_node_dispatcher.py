"""The node's dispatcher answers every message it took from the SuperNode, even when the node
itself fails (a full disk, a worker that cannot start): Flower's SuperNode waits for a reply to
each message before it pulls the next, so a message left unanswered wedges the node for good."""

from __future__ import annotations

import errno
import hashlib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from flwr.app import ConfigRecord, Message, RecordDict

import fl.flower_compat.runtime as runtime
from fl import wire
from fl.flower_compat.task import set_task_identity
from nodes.worker import STATUS_FILE, Dispatcher


class _Runtime:
    """Flower's runtime API as the dispatcher sees it: one task holding ``message``; what the
    dispatcher pushes back is recorded."""

    def __init__(self, message: Message, fab: bytes) -> None:
        self.message, self.fab = message, fab
        self.replies: list[Message] = []
        self.outputs: list[dict[str, Any]] = []

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        run = SimpleNamespace(run_id=7, fab_id="oncofed", fab_version="1")
        fab = SimpleNamespace(content=self.fab, hash_str=hashlib.sha256(self.fab).hexdigest())
        context = SimpleNamespace(node_id=3)
        monkeypatch.setattr(runtime, "task_client", lambda address, token: SimpleNamespace(close=lambda: None))
        monkeypatch.setattr(runtime, "start_heartbeat", lambda client: None)
        monkeypatch.setattr(runtime, "stop_heartbeat", lambda heartbeat: None)
        monkeypatch.setattr(runtime, "pull_task_input", lambda client: (self.message, context, run, fab))
        monkeypatch.setattr(runtime, "push_message", lambda client, reply, context: self.replies.append(reply))
        monkeypatch.setattr(runtime, "push_task_output", lambda **kw: self.outputs.append(kw))


def _dispatcher(tmp_path: Path, fab: bytes) -> Dispatcher:
    (tmp_path / "worker").mkdir()
    digest = hashlib.sha256(fab).hexdigest()
    return Dispatcher("127.0.0.1:1", b"secret", tmp_path, lambda: {digest}, tmp_path / "allow.txt")


def test_a_node_failing_while_it_serves_still_answers_with_its_error(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    set_task_identity(task_id=1, run_id=7, node_id=0)  # as the coordinator's process that made the message
    message = Message(RecordDict({"config": ConfigRecord({"lr": 0.01})}), dst_node_id=3, message_type="train",
                      group_id="2")
    api = _Runtime(message, b"the approved app")
    api.install(monkeypatch)
    dispatcher = _dispatcher(tmp_path, api.fab)

    def no_space(run_id: int, digest: str) -> Any:
        raise OSError(errno.ENOSPC, "No space left on device", "/data/hospital/patient-0042/.oncofed/worker.json")

    monkeypatch.setattr(dispatcher, "worker_for", no_space)
    assert dispatcher.serve_task("token") is None
    (reply,) = api.replies  # answered, so the SuperNode goes on to its next message
    assert reply.has_error() and reply.error.code == wire.ERROR_NODE_FAILED
    assert "OSError ENOSPC: No space left on device" in reply.error.reason
    assert "/data" not in reply.error.reason and "patient" not in reply.error.reason  # no path leaves the node
    assert reply.metadata.reply_to_message_id == message.metadata.message_id
    (output,) = api.outputs
    assert "ENOSPC" in output["details"] and "/data" not in output["details"]


def test_the_informational_worker_status_never_fails_a_message(tmp_path: Path) -> None:
    dispatcher = _dispatcher(tmp_path, b"app")
    dispatcher._status(busy="train")
    assert (tmp_path / "worker" / STATUS_FILE).exists()
    (tmp_path / "worker" / STATUS_FILE).unlink()
    (tmp_path / "worker").rmdir()
    (tmp_path / "worker").write_text("a file where the folder was")  # every write below it fails
    dispatcher._status(busy="train")  # logged, not raised
