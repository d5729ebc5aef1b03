"""What a node keeps in its process between the messages of one run: its working set.

A virtual node's ClientApp runs in a Ray actor that lives for the whole simulated run; a deployed
node's warm worker (:mod:`nodes.worker`) serves one run. Either way the messages of a run arrive in
one process, and each would otherwise find the task, parse the bundle's config (MONAI's
``ConfigParser``), build its network, loss and inferer and read the node's datalist again. The
working set keeps them for the run instead:

- the task object, found and checked against the digest the server names at the run's first
  message (a message naming another digest, or another bundle, gets its own, checked anew), with
  the components it parses once (:meth:`fl.learn.bundle.BundleTask.build_loss`, ``inferer``,
  ``postprocessing``, the optimizer's recipe);
- the node's loaded data (:class:`fl.learn.data.LocalData`: the preprocessed cases, held in memory by
  :class:`fl.learn.cases.CheckedPersistentDataset`, and the data digest), reused while the size and
  modification time of ``dataset.json`` and of every file it lists are unchanged (a ``stat``, no file
  is opened): an edited dataset is read again and gets a new digest;
- the network, built once; each message gets it with the global weights loaded, its gradients
  cleared and every parameter trainable again; a message that left it changed otherwise (hooks,
  per-case gradient attributes, replaced modules) makes the next one build it afresh.

Entries are keyed by run id, bundle digest (and the task's settings) and data folder; the data
digest is checked through the file signature. Nothing is reused across runs: the first message of
another run drops every entry of the previous ones. Only these pure caches are kept: the policy, the
ledgers, the acknowledgement of ledger heads, the request counts and every DP check are read and
made for each message by :mod:`nodes.client_app`, as before.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fl.learn import Task
from fl.learn.data import SPLITS, LocalData, case_files, load_local_data, read_datalist
from fl.learn.synth import DATASET_JSON

MAX_ENTRIES = 16  # working sets of one run (an actor serves several virtual nodes)


@dataclass
class WorkingSet:
    """One node's task, data and network for one run (see the module's docstring)."""

    run_id: int
    task: Task
    data_dir: Path
    data: LocalData
    files: list[Path]
    signature: tuple[Any, ...]
    loads: int = 1  # times the data was loaded for this entry (1: never again after the first message)
    net: torch.nn.Module | None = None
    shape: tuple[Any, ...] = ()  # what the kept network was built as (its modules, its parameters' attributes)
    holder: int | None = None  # the thread whose message holds the kept network
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def network(self, state: dict[str, torch.Tensor]) -> torch.nn.Module:
        """The task's network with ``state`` (the global weights) loaded: the kept one, reset, for the
        message of this thread (:meth:`release` when it is done), a fresh copy while another message
        holds it. The kept network is built again if a message left it changed beyond its weights."""
        with self.lock:
            if self.holder is None:
                self.holder = threading.get_ident()
                if self.net is None or _shape(self.net) != self.shape:
                    self.net = self.task.build_network()
                    self.shape = _shape(self.net)
                net = self.net
                _reset(net)
            else:
                net = copy.deepcopy(self.net) if self.net is not None else self.task.build_network()
                _reset(net)
        net.load_state_dict(state)
        return net

    def release(self, thread: int) -> None:
        with self.lock:
            if self.holder == thread:
                self.holder = None


def _shape(net: torch.nn.Module) -> tuple[Any, ...]:
    """The network's modules (name, class, hooks) and its parameters' own attributes: training may
    set attributes (per-case gradients) and add hooks, and must leave none behind."""
    modules = tuple((name, type(m), len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks),
                     len(getattr(m, "_full_backward_pre_hooks", {}))) for name, m in net.named_modules())
    params = tuple((name, tuple(sorted(vars(p)))) for name, p in net.named_parameters())
    return modules, params


def _reset(net: torch.nn.Module) -> None:
    """What a message may leave on the kept network besides its weights: gradients, frozen
    parameters, a device."""
    net.to("cpu")
    for p in net.parameters():
        p.grad = None
        p.requires_grad_(True)


class WorkingSets:
    """The working sets of this process, keyed by (run id, task, data folder, disk cache)."""

    def __init__(self) -> None:
        self._tasks: dict[tuple[Any, ...], Task] = {}
        self._sets: dict[tuple[Any, ...], WorkingSet] = {}
        self._run: int | None = None
        self._lock = threading.Lock()
        self.task_loads = 0  # tasks found and checked (parsed afresh) since the process started
        self.data_loads = 0  # datasets loaded (datalist read, cases from the disk cache) since then

    def _enter_run(self, run_id: int) -> None:
        if self._run != run_id:  # a new run: nothing of the previous one is reused
            self._tasks.clear()
            self._sets.clear()
            self._run = run_id

    def task(self, run_id: int, key: tuple[Any, ...], find: Callable[[], Task]) -> Task:
        """The run's task named by ``key`` (the server's instruction: task, bundle, digest, settings);
        ``find()`` finds and checks it at the first message naming it in this run."""
        with self._lock:
            self._enter_run(run_id)
            task = self._tasks.get(key)
        if task is None:
            task = find()
            with self._lock:
                self._enter_run(run_id)
                self._tasks[key] = task
                self.task_loads += 1
        return task

    def get(self, run_id: int, task: Task, data_dir: Path, disk_cache: Path) -> WorkingSet:
        """The working set of ``task`` on ``data_dir`` in this run: the kept one while the data's files
        are unchanged, else a fresh load (raises :class:`fl.errors.DataError` as a load does)."""
        key = (run_id, id(task), str(data_dir), str(disk_cache))
        with self._lock:
            self._enter_run(run_id)
            kept = self._sets.get(key)
        if kept is not None and kept.task is task and _signature(data_dir, kept.files) == kept.signature:
            return kept
        files = _data_files(data_dir, task)  # listed and stat-ed before the load: a change during it shows next time
        signature = _signature(data_dir, files)
        data = load_local_data(data_dir, task, use_cache=False, disk_cache=disk_cache)
        fresh = WorkingSet(run_id, task, data_dir, data, files, signature,
                           loads=(kept.loads + 1) if kept is not None else 1)
        with self._lock:
            self._enter_run(run_id)
            self.data_loads += 1
            if len(self._sets) >= MAX_ENTRIES:
                self._sets.pop(next(iter(self._sets)))
            self._sets[key] = fresh
        return fresh

    def release(self) -> None:
        """The kept networks this thread's message held are free for the next message."""
        thread = threading.get_ident()
        with self._lock:
            sets = list(self._sets.values())
        for kept in sets:
            kept.release(thread)

    def clear(self) -> None:
        with self._lock:
            self._tasks.clear()
            self._sets.clear()
            self._run = None


def _data_files(data_dir: Path, task: Task) -> list[Path]:
    """The files a node's data is: ``dataset.json`` and every file it lists (image cases), or the
    folder's files (tabular records)."""
    if (data_dir / DATASET_JSON).is_file() and getattr(task, "bundle_digest", None) is not None:
        datalist = read_datalist(data_dir, modality_lists=True)
        return [data_dir / DATASET_JSON] + [p for split in SPLITS for case in datalist[split] for p in case_files(case)]
    return sorted(p for p in data_dir.iterdir() if p.is_file()) if data_dir.is_dir() else []


def _signature(data_dir: Path, files: list[Path]) -> tuple[Any, ...] | None:
    """Size and modification time of each file (None when one is gone)."""
    del data_dir
    try:
        stats = [(str(p), p.stat()) for p in files]
    except OSError:
        return None
    return tuple((name, st.st_size, st.st_mtime_ns) for name, st in stats)


SETS = WorkingSets()
