"""A node's messages of one run do only their work: the run's working set (nodes.working_set) keeps
the task, its parsed components, the network and the cases; evaluation is batched as the bundle's
own evaluator batches, with the same scores as case by case."""

from __future__ import annotations

import functools
import os
import secrets
import shutil
import sys
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fl import wire
from fl.config import Config
from fl.learn import resolve_task
from fl.learn.bundle import BundleTask
from fl.learn.data import load_local_data
from fl.packing import unpack_message
from fl.server.rounds import _instructions, initial_arrays
from nodes.client_app import app
from nodes.working_set import SETS


class _Opens:
    """Files opened under a node's data folder: its cases and its disk cache, not its ledgers."""

    def __init__(self) -> None:
        self.root, self.count = "", 0
        sys.addaudithook(self._hook)

    def watch(self, data_dir: Path) -> None:
        self.root, self.count = os.path.realpath(data_dir) + os.sep, 0

    def _hook(self, event: str, args: tuple) -> None:
        if event == "open" and self.root and isinstance(args[0], (str, os.PathLike)):
            path = os.path.realpath(os.fspath(args[0]))
            inside = path.startswith(self.root)
            state = path.startswith(self.root + ".oncofed" + os.sep)
            cache = path.startswith(self.root + ".oncofed" + os.sep + "cache" + os.sep)
            if inside and (cache or not state):
                self.count += 1


_OPENS = _Opens()


@pytest.fixture
def parses(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every ConfigParser a bundle task builds (one per parsed component)."""
    built: list[str] = []
    original = BundleTask.parser

    def counted(self: BundleTask) -> object:
        built.append(self.name)
        return original(self)

    monkeypatch.setattr(BundleTask, "parser", counted)
    return built


@pytest.fixture
def site(tiny_federation: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "site"
    shutil.copytree(tiny_federation / "node-0", folder, ignore=shutil.ignore_patterns(".oncofed"))
    return folder


@functools.lru_cache(maxsize=1)
def _server() -> tuple[ConfigRecord, ConfigRecord, ArrayRecord]:
    """What the server sends (built once: the server's own parsing is not the node's)."""
    cfg = Config().replace(task="seg2d")
    return (*_instructions(cfg), initial_arrays(cfg))


def _send(kind: str, site: Path, run_id: int, server_round: int) -> Message:
    train, evaluate, arrays = _server()
    config = ConfigRecord(dict(train if kind == MessageType.TRAIN else evaluate))
    config[wire.SERVER_ROUND] = server_round
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = run_id, 1, 0
    msg = Message(content=RecordDict({wire.ARRAYS: arrays, wire.CONFIG: config}), dst_node_id=7,
                  message_type=kind)
    context = Context(run_id=run_id, node_id=7, node_config={wire.NODE_DATA_DIR: str(site)}, state=RecordDict(),
                      run_config={})
    reply = unpack_message(app(msg, context))
    assert not reply.has_error(), reply.error
    return reply


def test_batched_evaluation_scores_each_case_as_case_by_case(tiny_federation: Path) -> None:
    from fl.learn.bundle_eval import evaluate_bundle
    from fl.learn.bundle_train import evaluate_bundle as case_by_case

    task = resolve_task("seg2d")
    assert task.eval_batch_size == 8  # the bundle's own evaluator (validate#dataloader#batch_size)
    data = load_local_data(tiny_federation / "node-1", task, use_cache=False)
    torch.manual_seed(3)
    net = task.build_network()
    batched = evaluate_bundle(net, task, data.val)
    one = evaluate_bundle(net, task, data.val, batch_size=1)
    reference = case_by_case(net, task, data.val)
    assert len(data.val) > 1 and len(batched.record_scores) == len(data.val)
    for other in (one, reference):
        torch.testing.assert_close(batched.record_scores, other.record_scores, atol=1e-6, rtol=0)
        torch.testing.assert_close(batched.class_scores, other.class_scores, atol=1e-6, rtol=0, equal_nan=True)
        assert batched.loss == pytest.approx(other.loss, abs=1e-6)
        assert batched.score == pytest.approx(other.score, abs=1e-6)


def test_later_messages_of_a_run_read_no_case_and_parse_no_bundle(site: Path, parses: list[str]) -> None:
    run = secrets.randbits(48)
    _OPENS.watch(site)
    first = _send(MessageType.EVALUATE, site, run, 0)
    _send(MessageType.TRAIN, site, run, 1)
    assert _OPENS.count > 0 and parses  # the run's first messages read the cases and parse the bundle
    loads = (SETS.task_loads, SETS.data_loads)
    _OPENS.watch(site)
    parses.clear()
    again = _send(MessageType.EVALUATE, site, run, 1)
    _send(MessageType.TRAIN, site, run, 2)
    assert _OPENS.count == 0, "a later message opened a file of the node's data"
    assert parses == [], "a later message parsed the bundle's config"
    assert (SETS.task_loads, SETS.data_loads) == loads
    assert dict(again.content[wire.METRICS]) == dict(first.content[wire.METRICS])  # same weights, same scores


def test_a_new_run_or_changed_data_builds_afresh(site: Path, parses: list[str]) -> None:
    run = secrets.randbits(48)
    _send(MessageType.EVALUATE, site, run, 0)
    loads = (SETS.task_loads, SETS.data_loads)
    parses.clear()
    _send(MessageType.EVALUATE, site, run + 1, 0)  # another run: nothing of the previous one is reused
    assert (SETS.task_loads, SETS.data_loads) == (loads[0] + 1, loads[1] + 1) and parses
    kept = next(iter(SETS._sets.values()))
    before = kept.data.digest
    images = sorted((site / "imagesTr").iterdir())
    shutil.copyfile(images[1], images[0])  # a case's file changes: its size or time, and the data digest
    os.utime(images[0], ns=(images[0].stat().st_atime_ns, images[0].stat().st_mtime_ns + 10**9))
    _send(MessageType.EVALUATE, site, run + 1, 1)
    assert SETS.data_loads == loads[1] + 2 and SETS.task_loads == loads[0] + 1
    kept = next(iter(SETS._sets.values()))
    assert kept.loads == 2 and kept.data.digest != before
