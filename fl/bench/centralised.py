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

from fl.learn import TrainSettings, resolve_task
from fl.learn.synth import node_dir


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
    pooled = task.load_pooled([node_dir(args.data, i) for i in range(args.nodes)])  # preprocessed as each node does
    torch.manual_seed(args.seed)
    net = task.build_network()
    generator = torch.Generator().manual_seed(args.seed)
    walls, trains = [], []
    for _ in range(args.rounds):
        started = time.perf_counter()
        result = task.train(net, pooled.train, TrainSettings(epochs=args.epochs, generator=generator))
        walls.append(time.perf_counter() - started)
        trains.append(result.seconds)
    score = task.evaluate(net, pooled.val).score
    Path(args.result).write_text(json.dumps({
        "wall_per_round_s": sum(walls) / len(walls), "round_seconds": walls,
        "train_per_round_s": sum(trains) / len(trains), "dice": score,
    }))


if __name__ == "__main__":
    main()
