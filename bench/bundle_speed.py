"""A node's training speed on a bundle against the bundle's own trainer, same cases, same epochs.

    python bench/bundle_speed.py --bundle configs/bundles/brats_mri_segmentation --data DIR [--epochs 1]

``DIR`` is one node's folder (a Decathlon ``dataset.json``). Both sides train a freshly built
network from the same seed for the same epochs over the node's training cases:

- OncoFed: :func:`fl.learn.bundle_train.train_bundle`, cases read from its on-disk cache (warmed
  first, untimed), as a node in its second round;
- the bundle: its ``train#trainer`` (MONAI's ignite ``SupervisedTrainer``) with the node's
  training cases as ``train#dataset#data``, built first (its ``CacheDataset`` preprocesses,
  untimed), then ``trainer.run()`` timed, as ``python -m monai.bundle run training`` runs it.

Prints seconds, steps and the ratio OncoFed / bundle, and writes results.json under --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--data", required=True, help="one node's folder")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0: torch's default")
    parser.add_argument("--out", default="bench-results/bundle-speed")
    args = parser.parse_args()

    import torch

    from fl.learn import TrainSettings
    from fl.learn.bundle import BundleTask
    from fl.learn.data import load_local_data, read_datalist

    if args.threads:
        torch.set_num_threads(args.threads)
    task = BundleTask.load(args.bundle)
    data_dir = Path(args.data).resolve()
    cache = Path(tempfile.mkdtemp(prefix="bundle-speed-"))
    data = load_local_data(data_dir, task, use_cache=False, disk_cache=cache)
    for i in range(len(data.train)):  # warm the disk cache: a node's later rounds
        data.train.dataset[i]

    torch.manual_seed(0)
    net = task.build_network()
    ours = task.train(net, data.train, TrainSettings(epochs=args.epochs, generator=torch.Generator().manual_seed(0)))

    from fl.learn.quiet import quiet_monai

    items = [{k: [str(p) for p in v] if isinstance(v, list) else str(v) for k, v in case.items()}
             for case in read_datalist(data_dir, modality_lists=True)["training"]]
    with quiet_monai():
        bundle_parser = task.parser()
        bundle_parser["train#dataset#data"] = items
        bundle_parser["max_epochs"] = args.epochs
        bundle_parser["train#trainer#max_epochs"] = args.epochs
        bundle_parser["device"] = torch.device("cpu")
        bundle_parser["train#handlers"] = []  # no logging or validation inside the timed loop
        torch.manual_seed(0)
        trainer = bundle_parser.get_parsed_content("train#trainer")  # builds (and preprocesses) the dataset
    started = time.perf_counter()
    trainer.run()
    theirs = time.perf_counter() - started
    steps = trainer.state.iteration

    result = {"bundle": task.name, "cases": len(data.train), "epochs": args.epochs,
              "oncofed_seconds": ours.seconds, "oncofed_steps": ours.steps,
              "bundle_trainer_seconds": theirs, "bundle_trainer_steps": steps,
              "ratio": ours.seconds / theirs, "threads": torch.get_num_threads()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
