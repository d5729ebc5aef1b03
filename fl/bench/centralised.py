"""The centralised reference for the ``overhead`` suite: every node's training cases pooled in
one process, trained with the same loop, epochs, batch size and learning rate as a federated
round, ``rounds`` times; Dice on the pooled validation cases.

    python -m fl.bench.centralised --data DIR --nodes N --rounds R --epochs E --lr LR --batch-size B --result FILE
                                   [--task seg2d] [--bundle DIR]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from fl.tasks import resolve_task
from nodes.bundle_train import evaluate_bundle, train_bundle
from nodes.cases import bundle_cases
from nodes.data import Split, load_local_data, read_datalist
from nodes.synth import node_dir
from nodes.train import evaluate_local, train_local


def main() -> None:
    parser = argparse.ArgumentParser()
    for flag, kind in (("--data", str), ("--nodes", int), ("--rounds", int), ("--epochs", int), ("--lr", float),
                       ("--batch-size", int), ("--seed", int), ("--result", str)):
        parser.add_argument(flag, type=kind, required=flag != "--seed", default=0)
    parser.add_argument("--task", default="seg2d")
    parser.add_argument("--bundle", default="", help="the run config's bundle, if it names one")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    task = resolve_task(args.task, args.bundle, lr=args.lr, batch_size=args.batch_size)
    bundle = getattr(task, "kind", "") == "bundle"
    if bundle:  # every node's cases in one list, preprocessed as each node does
        lists = [read_datalist(node_dir(args.data, i).resolve(), modality_lists=True) for i in range(args.nodes)]
        train = bundle_cases([c for d in lists for c in d["training"]], task, None, train=True)
        val = bundle_cases([c for d in lists for c in d["validation"]], task, None, train=False)
    else:
        parts = [load_local_data(node_dir(args.data, i), task, use_cache=False) for i in range(args.nodes)]
        train = Split(torch.cat([p.train.images for p in parts]), torch.cat([p.train.labels for p in parts]))
        val = Split(torch.cat([p.val.images for p in parts]), torch.cat([p.val.labels for p in parts]))
    torch.manual_seed(args.seed)
    net = task.build_network()
    generator = torch.Generator().manual_seed(args.seed)
    walls, trains = [], []
    for _ in range(args.rounds):
        started = time.perf_counter()
        if bundle:
            result = train_bundle(net, task, train, epochs=args.epochs, generator=generator)
        else:
            result = train_local(net, task, train, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                                 generator=generator)
        walls.append(time.perf_counter() - started)
        trains.append(result.seconds)
    score = (evaluate_bundle(net, task, val) if bundle else evaluate_local(net, task, val, batch_size=args.batch_size)).score
    Path(args.result).write_text(json.dumps({
        "wall_per_round_s": sum(walls) / len(walls), "round_seconds": walls,
        "train_per_round_s": sum(trains) / len(trains), "dice": score,
    }))


if __name__ == "__main__":
    main()
