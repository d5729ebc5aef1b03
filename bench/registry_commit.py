"""How long a registry commit adds to a round, for each task's network.

    python bench/registry_commit.py [--commits 20]

Times the round's commit (weights and strategy state encoded, staged, fsynced, renamed,
FedAdam moments included) and, for scale, one node's local epoch on a synthetic site of
that task. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from flwr.serverapp.strategy import FedAdam

from fl.config import Config
from fl.learn import TASK_NAMES, TrainSettings, get_task, resolve_task
from fl.learn.data import load_local_data
from fl.learn.synth import synthesize
from fl.registry import Registry
from fl.registry.checkpoint import encode_weights, manifest_fields
from fl.server.rounds import initial_arrays
from strategies.state import encode_state


def commit_seconds(task: str, commits: int, root: Path) -> tuple[float, int]:
    cfg = Config().replace(task=task, model_name=f"bench-{task}")
    arrays = initial_arrays(cfg)
    strategy = FedAdam()
    moments = {k: np.zeros_like(v.numpy()) for k, v in arrays.items()}
    strategy.m_t, strategy.v_t = dict(moments), dict(moments)
    registry, parent, times = Registry(root), None, []
    record = {"round": 1, "train": {"aggregate": {}, "nodes": {}}, "evaluate": {"aggregate": {"dice": 0.5}}}
    for _ in range(commits):
        start = time.perf_counter()
        version = registry.commit(cfg.model_name, weights=encode_weights(arrays), state=encode_state(strategy),
                                  fields=manifest_fields(cfg, run_id="bench", record=record, node_info={},
                                                         resumed_from=None),
                                  expected_parent=parent)
        times.append(time.perf_counter() - start)
        parent = version.hash
    size = version.weights.stat().st_size + version.state.stat().st_size
    return statistics.median(times), size


def epoch_seconds(task_name: str, root: Path) -> float:
    folder = synthesize(root / f"data-{task_name}", nodes=1, task=get_task(task_name), seed=0)[0]
    task = resolve_task(task_name, lr=0.01, batch_size=8)
    data = load_local_data(folder, task, disk_cache=root / "cache")
    torch.manual_seed(0)
    net = task.build_network()

    def epoch() -> float:
        return task.train(net, data.train, TrainSettings(epochs=1)).seconds

    epoch()  # warm-up
    return epoch()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--commits", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| task | weights + state (KB) | commit, median (ms) | one local epoch (s) | commit / epoch |")
    print("| --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        for task in TASK_NAMES:
            seconds, size = commit_seconds(task, args.commits, Path(tmp) / "reg")
            epoch = epoch_seconds(task, Path(tmp))
            print(f"| {task} | {size / 1024:.0f} | {seconds * 1000:.1f} | {epoch:.2f} | {seconds / epoch:.1%} |")


if __name__ == "__main__":
    main()
