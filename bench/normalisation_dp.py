"""Normalisation under record-level DP: the bundle's instance norm, GroupNorm, and GroupNorm with
weight-standardised convolutions (Qiao et al. 2019; the pairing De et al. 2022 recommend for
DP-SGD), on the quickstart's sites.

    python bench/normalisation_dp.py [--seeds 3] [--epsilons 8,1] [--rounds 5] [--threads 2]

An in-process emulation of the quickstart federation (``fl.server.tune.emulate``, as ``fl privacy
tune`` runs it): the 3 synthetic sites of ``fl.learn.synth`` (seed s), FedAvg weighted by cases,
record-level DP-SGD on every site with the nodes' own loop
(``fl.learn.bundle_train.train_bundle_dp``: Poisson sampling, per-case clipping at
``local_dp.max_grad_norm``, the bundle's loss and optimizer). Each site's noise is calibrated so
that its own epsilon after all rounds is the target (delta 1e-5). Every variant gets the same
data, seed and noise calibration; only the network's normalisation differs (the seg2d bundle's
UNet, channels 8-16-32-64). Prints a Markdown table: the sites' case-weighted validation Dice,
mean +- std over seeds.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

VARIANTS = ("instance", "group", "group+ws")


class Standardised(nn.Module):
    """A convolution's weight with zero mean and unit variance over each output channel's fan-in."""

    def __init__(self, out_dim: int) -> None:
        super().__init__()
        self.out_dim = out_dim

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        dims = [d for d in range(weight.dim()) if d != self.out_dim]
        mean = weight.mean(dim=dims, keepdim=True)
        std = weight.std(dim=dims, keepdim=True)
        return (weight - mean) / (std + 1e-5)


def network(variant: str) -> nn.Module:
    from monai.networks.nets import UNet

    norm = "instance" if variant == "instance" else ("group", {"num_groups": 2})
    net = UNet(spatial_dims=2, in_channels=1, out_channels=2, channels=(8, 16, 32, 64), strides=(2, 2, 2),
               num_res_units=1, act=("leakyrelu", {"inplace": False}), norm=norm)
    if variant.endswith("+ws"):
        for module in net.modules():
            if isinstance(module, nn.ConvTranspose2d):
                parametrize.register_parametrization(module, "weight", Standardised(1))
            elif isinstance(module, nn.Conv2d) and module.weight.shape[1] * module.weight[0, 0].numel() > 1:
                parametrize.register_parametrization(module, "weight", Standardised(0))
    return net


def federation(variant: str, sites: list, task: object, *, epsilon: float, rounds: int, epochs: int,
               clip: float, batch_size: int, seed: int) -> float:
    from fl.privacy.accounting import dp_sgd_noise
    from fl.server.tune import emulate

    torch.manual_seed(seed)
    sigmas = [dp_sgd_noise([len(s.train)], target_epsilon=epsilon, delta=1e-5, rounds=rounds, epochs=epochs,
                           batch_size=batch_size) for s in sites]  # each site at its own epsilon
    return emulate(network(variant), task, sites, sigmas=sigmas, rounds=rounds, epochs=epochs, clip=clip,
                   generator=torch.Generator().manual_seed(seed))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epsilons", default="8,1")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from fl.config import Config
    from fl.learn import get_task, resolve_task
    from fl.learn.data import load_local_data
    from fl.learn.synth import synthesize

    cfg = Config()  # the quickstart's training settings are the defaults
    task = resolve_task("seg2d", lr=cfg.train.lr, batch_size=cfg.train.batch_size, private=True)
    epsilons = [float(e) for e in args.epsilons.split(",")]
    results: dict[tuple[str, float], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            folders = synthesize(Path(tmp) / f"seed{seed}", nodes=3, task=get_task("seg2d"), seed=seed)
            sites = [load_local_data(f, task, use_cache=False) for f in folders]
            for epsilon in epsilons:
                for variant in VARIANTS:
                    dice = federation(variant, sites, task, epsilon=epsilon, rounds=args.rounds,
                                      epochs=cfg.train.epochs, clip=cfg.local_dp.max_grad_norm,
                                      batch_size=task.batch_size, seed=seed)
                    results.setdefault((variant, epsilon), []).append(dice)
                    print(f"seed {seed} epsilon {epsilon:g} {variant}: {dice:.4f}", flush=True)
    print("\n| normalisation | " + " | ".join(f"epsilon {e:g}" for e in epsilons) + " |")
    print("| --- | " + " | ".join("---" for _ in epsilons) + " |")
    for variant in VARIANTS:
        cells = []
        for epsilon in epsilons:
            values = results[(variant, epsilon)]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.3f} ± {spread:.3f}")
        print(f"| {variant} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
