"""What makes a deployed round cost what its training costs: models packed into one array, the
prompt grid, the patches of Flower's fixed waits (each fails loudly if Flower changes them) and
the warm worker's own checks. The end-to-end behaviour (a killed worker, a fresh worker per run,
no data read after the first round) is in ``test_deploy.py``, against a real deployment."""

from __future__ import annotations

import hashlib
import inspect
import re
import socket
import subprocess
import sys
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fl import wire
from fl.engine_env import OBJECT_FIRST_RETRY_S, prompt_object_pulls
from fl.packing import (
    INLINE_MAX,
    PACKED_CONTENT,
    PACKED_DATA,
    PackingGrid,
    pack_content,
    unpack_content,
    unpack_reply,
)
from nodes import supernode
from nodes.worker import WORKER_SCRIPT, write_secret


@pytest.fixture(autouse=True)
def task_identity() -> Any:
    """Flower stamps new messages with the task's identity, which its ClientApp process sets."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = {k: getattr(TaskIdentity, k) for k in ("_task_id", "_run_id", "_node_id")}
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, 1
    yield
    for key, value in saved.items():
        setattr(TaskIdentity, key, value)


def test_a_packed_message_is_one_array_and_unpacks_to_the_same_records() -> None:
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(4, 2))
    arrays = ArrayRecord(net.state_dict())  # float32 weights and an int64 counter
    arrays["extra"] = Array(np.arange(6, dtype=np.float64).reshape(2, 3))
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({"lr": 0.01, "task": "seg2d"}),
                          "metrics": MetricRecord({"num-examples": 12, "train-loss": 0.5})})
    packed = pack_content(content)
    assert list(packed) == [PACKED_CONTENT] and list(packed[PACKED_CONTENT]) == [PACKED_DATA]
    assert isinstance(packed[PACKED_CONTENT], ConfigRecord)  # one object: no array, no chunks
    back = unpack_content(packed)
    assert list(back) == ["arrays", "config", "metrics"] and list(back["arrays"]) == list(arrays)
    for key in arrays:
        assert back["arrays"][key].dtype == arrays[key].dtype and back["arrays"][key].shape == arrays[key].shape
        assert np.array_equal(back["arrays"][key].numpy(), arrays[key].numpy())
    assert back["arrays"].to_torch_state_dict()["1.num_batches_tracked"].dtype == torch.int64
    assert dict(back["config"]) == {"lr": 0.01, "task": "seg2d"} and back["metrics"]["num-examples"] == 12
    assert unpack_content(content) is content and pack_content(packed) is packed
    metrics_only = RecordDict({"metrics": MetricRecord({"dice": 0.5})})
    assert pack_content(metrics_only) is metrics_only  # one record already: nothing to gain
    # a content over INLINE_MAX travels as one array (Flower chunks it) and comes back the same
    weights = np.arange(INLINE_MAX // 4 + 1024, dtype=np.float32)
    big = pack_content(RecordDict({"arrays": ArrayRecord({"w": Array(weights)}), "metrics": MetricRecord({"n": 1})}))
    assert isinstance(big[PACKED_CONTENT], ArrayRecord)
    assert np.array_equal(unpack_content(big)["arrays"]["w"].numpy(), weights)


def test_a_malformed_pack_is_refused_and_a_reply_carrying_one_becomes_that_nodes_error() -> None:
    broken = RecordDict({PACKED_CONTENT: ArrayRecord({PACKED_DATA: Array(dtype="bytes", shape=(3,),
                                                                         stype=PACKED_CONTENT, data=b"\xff\x01a")})})
    with pytest.raises(ValueError, match="packed content: not a record dict"):
        unpack_content(broken)
    with pytest.raises(ValueError, match="packed content: not a record dict"):
        unpack_content(RecordDict({PACKED_CONTENT: ConfigRecord({PACKED_DATA: b"\xff\x01a"})}))
    with pytest.raises(ValueError, match="is not bytes"):
        unpack_content(RecordDict({PACKED_CONTENT: ConfigRecord({PACKED_DATA: "text"})}))
    packed = pack_content(RecordDict({"arrays": ArrayRecord({"a": Array(np.ones(2)), "b": Array(np.ones(3))})}))
    extra = RecordDict({**dict(packed), "more": ConfigRecord({"y": 2})})
    with pytest.raises(ValueError, match="expected only"):
        unpack_content(extra)
    reply = Message(broken, dst_node_id=1, message_type="train", group_id="1")
    out = unpack_reply(reply)  # what the server does with a node's reply
    assert out.has_error() and out.error.code == wire.ERROR_MALFORMED_REPLY
    assert out.metadata.message_id == reply.metadata.message_id


class _SlowGrid:
    """A grid whose replies arrive on the third pull."""

    def __init__(self) -> None:
        self.pulls = 0
        self.pushed: list[Message] = []

    def push_messages(self, messages: Any) -> list[str]:
        self.pushed = list(messages)
        self.sent_keys = [set(m.content) for m in self.pushed]
        return [f"m{i}" for i in range(len(self.pushed))]

    def pull_messages(self, ids: Any) -> list[Message]:
        self.pulls += 1
        if self.pulls < 3:
            return []
        replies = []
        for i, sent in enumerate(self.pushed):
            reply = Message(pack_content(RecordDict({"arrays": sent.content["arrays"]})), dst_node_id=1,
                            message_type="train", group_id="1")
            reply.metadata.__dict__["_reply_to_message_id"] = f"m{i}"
            replies.append(reply)
        return replies


def test_the_grid_packs_what_it_sends_and_pulls_replies_promptly(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []
    monkeypatch.setattr("fl.packing.time.sleep", slept.append)
    inner = _SlowGrid()
    grid = PackingGrid(inner)  # type: ignore[arg-type]
    arrays = ArrayRecord({"a": Array(np.ones(4)), "b": Array(np.zeros(2))})
    out = Message(RecordDict({"arrays": arrays}), dst_node_id=1, message_type="train", group_id="1")
    replies = list(grid.send_and_receive([out], timeout=60))
    assert inner.sent_keys == [{PACKED_CONTENT}]  # one array on the wire
    assert list(out.content["arrays"]) == ["a", "b"]  # the caller's message is as it was
    assert list(replies[0].content["arrays"]) == ["a", "b"]  # unpacked for the strategy
    assert slept == [0.05, 0.05] and inner.pulls == 3  # Flower's grid: two 3 s sleeps
    assert PackingGrid.wrap(grid) is grid


def test_flower_still_waits_where_the_node_patch_expects() -> None:
    """Fails when Flower changes the SuperNode's fixed waits: then the patch would do nothing."""
    import flwr.supernode.start_client_internal as sci

    from fl.flower_compat.supernode import node_wait_sites

    assert node_wait_sites() == ["time.sleep(3)", "time.sleep(0.5)"]
    assert "time.sleep(3)" in inspect.getsource(sci.start_client_internal)
    assert "time.sleep(0.5)" in inspect.getsource(sci._push_messages)


def test_the_node_patch_shortens_flowers_waits_and_keeps_the_others(monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    import flwr.supernode.start_client_internal as sci

    monkeypatch.setattr(sci, "time", time)  # restored after the test
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    assert supernode.shorten_node_waits(0.25)
    sci.time.sleep(3)
    sci.time.sleep(0.5)
    sci.time.sleep(7)
    assert slept == [0.25, supernode.REPLY_POLL_S, 7]
    assert sci.time.monotonic is time.monotonic
    with pytest.raises(supernode.ConfigError, match="--poll-interval: 0.01 s is outside 0.1 to 3 s"):
        supernode.shorten_node_waits(0.01)


def test_after_a_message_the_node_pulls_sooner_then_at_its_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    import flwr.supernode.start_client_internal as sci

    monkeypatch.setattr(sci, "time", time)
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    assert supernode.shorten_node_waits(0.25, (0.05, 0.1))
    clock = sci.time
    for _ in range(2):  # idle from the start: the poll interval
        clock.sleep(3)
    clock.message_stored()
    for _ in range(4):
        clock.sleep(3)
    clock.sleep(0.5)  # waiting for the worker's reply is not an empty pull
    # the app guard around Flower's pull tells the clock when a message was stored
    monkeypatch.setattr(sci, "_pull_and_store_message", lambda **kwargs: 7)
    supernode.install_app_guard(lambda: set())
    assert sci._pull_and_store_message(receive=None, get_fab=None) == 7
    assert supernode.MESSAGE_STORED.is_set()
    supernode.MESSAGE_STORED.clear()
    clock.sleep(3)
    assert slept == [0.25, 0.25, 0.05, 0.1, 0.25, 0.25, supernode.REPLY_POLL_S, 0.05]
    assert supernode.shorten_node_waits(0.25, ())  # none: always the interval
    clock.message_stored()
    clock.sleep(3)
    assert slept[-1] == 0.25
    with pytest.raises(supernode.ConfigError, match=r"--follow-up-pulls: each wait must lie between 0.02 s and "
                                                    r"the poll interval \(0.25 s\), got \[0.5\]"):
        supernode.shorten_node_waits(0.25, (0.5,))
    assert supernode.parse_follow_up(None) == supernode.FOLLOW_UP_S
    assert supernode.parse_follow_up("none") == ()
    assert supernode.parse_follow_up("0.05, 0.1") == (0.05, 0.1)
    with pytest.raises(supernode.ConfigError, match="--follow-up-pulls: '0.05;x' is not seconds"):
        supernode.parse_follow_up("0.05;x")


@pytest.mark.parametrize("flags, message", [
    (["--follow-up-pulls", "0.05;x"], "--follow-up-pulls: '0.05;x' is not seconds"),
    (["--follow-up-pulls", "0.5"], r"--follow-up-pulls: each wait must lie between 0.02 s and the poll interval"),
    (["--poll-interval", "0.01"], "--poll-interval: 0.01 s is outside 0.1 to 3 s"),
])
def test_a_node_with_bad_waits_stops_before_it_writes_anything(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                flags: list[str], message: str) -> None:
    from fl.cli import main

    data = tmp_path / "node"
    data.mkdir()  # checked after the waits: an empty folder would be an error of its own
    assert main(["node", "start", "--superlink", "127.0.0.1:1", "--data", str(data), "--insecure", *flags]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert list(data.iterdir()) == []  # no state folder, policy or worker secret


def test_object_pulls_retry_promptly_where_flower_reads_the_wait() -> None:
    from flwr.supercore.inflatable import inflatable_utils
    from flwr.superlink.grid import http_grid
    from flwr.supernode.runtime import run_clientapp

    functions = (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree)
    saved = [dict(f.__kwdefaults__) for f in functions]  # type: ignore[arg-type]
    try:
        assert prompt_object_pulls()
        assert all(f.__kwdefaults__["initial_backoff"] == OBJECT_FIRST_RETRY_S for f in functions)  # type: ignore[index]
    finally:
        for function, kw in zip(functions, saved, strict=True):
            function.__kwdefaults__ = kw
    for module in (sys.modules["flwr.supernode.start_client_internal"], http_grid, run_clientapp):
        source = inspect.getsource(module)
        assert "pull_objects(" in source or "pull_and_inflate_object_from_tree(" in source
        assert "initial_backoff" not in source  # so the defaults set above are what they use


def test_the_secret_is_the_nodes_alone(tmp_path: Path) -> None:
    path = write_secret(tmp_path)
    first = path.read_bytes()
    assert len(first) == 32 and path.stat().st_mode & 0o777 == 0o600 and path.parent.stat().st_mode & 0o777 == 0o700
    assert write_secret(tmp_path).read_bytes() != first  # a new one per node start


def _worker(tmp_path: Path, allowlist: Path) -> tuple[subprocess.Popen[bytes], Connection]:
    ours, theirs = socket.socketpair()
    proc = subprocess.Popen([sys.executable, str(WORKER_SCRIPT), str(theirs.fileno()), str(allowlist)],
                            pass_fds=(theirs.fileno(),), env={"FLWR_HOME": str(tmp_path / "home"), "PATH": ""})
    theirs.close()
    return proc, Connection(ours.detach())


def test_the_worker_loads_no_app_its_operator_did_not_approve(tmp_path: Path) -> None:
    fab = b"PK\x05\x06" + b"\0" * 18  # an empty zip: whatever it holds, it must not be installed
    digest = hashlib.sha256(fab).hexdigest()
    allowlist = tmp_path / "approved-apps.txt"
    allowlist.write_text("0" * 64 + "\n")
    proc, conn = _worker(tmp_path, allowlist)
    try:
        assert "ready" in conn.recv()
        message = Message(RecordDict(), dst_node_id=1, message_type="train", group_id="1")
        from flwr.app import Context
        from flwr.common.serde import context_to_proto, message_to_proto

        job = {"fab": fab, "fab_hash": digest, "fab_id": "x/y", "fab_version": "1", "run_id": 7, "node_id": 1,
               "task_id": 1, "message_id": "m", "message": message_to_proto(message).SerializeToString(),
               "context": context_to_proto(Context(run_id=7, node_id=1, node_config={}, state=RecordDict(),
                                                   run_config={})).SerializeToString()}
        conn.send(job)
        assert conn.recv() == {"refused": f"app {digest} is not approved by this node's operator"}
        conn.send({**job, "fab_hash": "f" * 64})
        assert "not the announced" in conn.recv()["refused"]
        assert not (tmp_path / "home" / "apps").exists()  # nothing was installed
    finally:
        conn.close()
        proc.wait(timeout=30)
    assert proc.returncode == 0  # it ends when the node's end closes
