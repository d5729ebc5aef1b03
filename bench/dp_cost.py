"""DP-SGD's cost on a node: time per step and peak memory, private against plain, per task.

    python bench/dp_cost.py [--steps 20] [--threads 2] [--cells seg2d,spleen]

Cells: the shipped bundles (seg2d, seg3d, spleen-style UNet, BraTS-style SegResNet) with their
real network, patch size and batch (the bundle's ``train#dataloader#batch_size`` cases, each
the ``num_samples`` patches of its patch sampler), and the tabular task (64 records). Data
are random tensors of those shapes (the step's cost does not depend on the values). Each
measurement runs in a fresh process (peak RSS is per process; on CUDA
``torch.cuda.max_memory_allocated``): the plain step (the bundle's own network, loss and
optimizer on all the batch's patches), then the DP-SGD step of today's method (``vmap``:
torch.func per-case gradients for bundles; ``opacus``: Opacus hooks for tabular) and of ghost
clipping (``ghost``: :mod:`fl.learn.ghost`, the mixed rule), each with the clipping, the
CSPRNG noise and the optimizer's update of :func:`fl.learn.bundle_train.train_bundle_dp`.
Median step time after ``warmup`` steps. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# cell: (bundle folder or None for tabular, spatial shape of one patch)
CELLS: dict[str, tuple[str | None, tuple[int, ...]]] = {
    "seg2d": ("configs/bundles/seg2d", (64, 64)),  # the catalogue's synthetic image size
    "seg3d": ("configs/bundles/seg3d", (32, 32, 32)),
    "spleen": ("configs/bundles/spleen_ct_segmentation", (96, 96, 96)),  # RandCropByPosNegLabeld's patch
    "brats": ("configs/bundles/brats_mri_segmentation", (64, 64, 64)),  # RandSpatialCropd's roi
    "tabular": (None, (30,)),
}
TODAY = {"tabular": "opacus"}  # else vmap
TABULAR_BATCH = 64


def _patches(task: Any) -> int:
    """Patches per case: the ``num_samples`` of the bundle's patch sampler, else 1."""
    found = [1]

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "num_samples" in node and isinstance(node["num_samples"], int):
                found.append(node["num_samples"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(task.train_config.get("train", {}))
    return max(found)


def _peak_mb(device: Any) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _time(step: Any, steps: int, warmup: int, device: Any) -> list[float]:
    import torch

    times = []
    for i in range(steps + warmup):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def _tabular(mode: str, seed: int, steps: int, warmup: int, device: Any) -> dict[str, Any]:
    import torch

    from fl.learn import get_task
    from fl.learn.dp_train import NoiseInjectedDPOptimizer
    from fl.privacy.noise import SecureGaussian

    task = get_task("tabular")
    torch.manual_seed(seed)
    x = torch.randn(TABULAR_BATCH, task.features, device=device)
    y = (x[:, 0] > 0).long()
    net = task.build_network().to(device)
    loss_fn = task.build_loss()
    method = {"plain": "-", "opacus": "opacus hooks", "ghost": ""}[mode]
    if mode == "plain":
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            loss_fn(net(x), y).backward()
            opt.step()
    elif mode == "opacus":
        from opacus import GradSampleModule

        model = GradSampleModule(net, loss_reduction="sum", force_functorch=task.dp_functorch)
        opt = NoiseInjectedDPOptimizer(torch.optim.Adam(model.parameters(), lr=1e-3), noise_multiplier=1.0,
                                       max_grad_norm=1.0, expected_batch_size=len(x), loss_reduction="mean",
                                       noise_source=SecureGaussian())

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            (loss_fn(model(x), y) * len(x)).backward()
            opt.step()
    else:
        from fl.learn.bundle_train import PrivateStep

        opt = NoiseInjectedDPOptimizer(torch.optim.Adam(net.parameters(), lr=1e-3), noise_multiplier=1.0,
                                       max_grad_norm=1.0, expected_batch_size=len(x), loss_reduction="mean",
                                       noise_source=SecureGaussian())
        private = PrivateStep(net, "ghost")
        named = list(net.named_parameters())

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            private.run(opt, named, loss_fn, x.unsqueeze(1), y.unsqueeze(1))
    times = _time(step, steps, warmup, device)
    if mode == "ghost":
        method = private.method
    return {"step_ms": statistics.median(times) * 1000, "peak_mb": _peak_mb(device), "method": method,
            "shape": f"{TABULAR_BATCH} records x {task.features}", "steps": steps}


def _bundle(cell: str, mode: str, seed: int, steps: int, warmup: int, device: Any) -> dict[str, Any]:
    import torch

    from fl.learn.bundle import BundleTask
    from fl.learn.bundle_train import PrivateStep, _one_hot, onehot_outside
    from fl.learn.dp_train import NoiseInjectedDPOptimizer
    from fl.privacy.noise import SecureGaussian

    path, spatial = CELLS[cell]
    task = BundleTask.load(str(REPO / path), private=mode != "plain")
    cases, patches = task.batch_size, _patches(task)
    in_channels = int(task.train_config["network_def"].get("in_channels", 1))
    classes = task.out_channels
    torch.manual_seed(seed)
    images = torch.rand(cases, patches, in_channels, *spatial, device=device)
    loss_fn = task.build_loss()
    multilabel = not any(getattr(m, "to_onehot_y", False) for m in loss_fn.modules())
    if multilabel:  # sigmoid Dice on one channel per class (BraTS-style)
        labels = (torch.rand(cases, patches, classes, *spatial, device=device) > 0.8).float()
    else:
        labels = torch.randint(0, classes, (cases, patches, 1, *spatial), device=device).to(torch.uint8)
    net = task.build_network().to(device)
    shape = f"{cases} cases x {patches} patches x {in_channels}x{'x'.join(map(str, spatial))}"
    method = "-"
    if mode == "plain":
        opt = task.build_optimizer(net)
        flat_x, flat_y = images.flatten(0, 1), labels.flatten(0, 1)
        net.train()

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            loss_fn(net(flat_x), flat_y).backward()
            opt.step()
    else:
        opt = NoiseInjectedDPOptimizer(task.build_optimizer(net), noise_multiplier=1.0, max_grad_norm=1.0,
                                       expected_batch_size=cases, loss_reduction="mean", noise_source=SecureGaussian())
        case_loss, to_onehot = onehot_outside(loss_fn)
        named = [(k, p) for k, p in net.named_parameters() if p.requires_grad]
        private = PrivateStep(net, "vmap" if mode == "vmap" else "auto")
        net.train()

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            hot = _one_hot(labels, classes) if to_onehot else labels
            private.run(opt, named, case_loss, images, hot)
    times = _time(step, steps, warmup, device)
    if mode != "plain":
        method = private.method
    return {"step_ms": statistics.median(times) * 1000, "peak_mb": _peak_mb(device), "method": method,
            "shape": shape, "steps": steps}


def cell(name: str, mode: str, *, seed: int = 0, steps: int = 20, warmup: int = 3, threads: int = 2) -> dict[str, Any]:
    """One measurement (call in a fresh process): ``mode`` plain, vmap, opacus or ghost."""
    import torch

    torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if CELLS[name][0] is None:
        out = _tabular(mode, seed, steps, warmup, device)
    else:
        out = _bundle(name, mode, seed, steps, warmup, device)
    out["device"] = device.type
    return out


def measure(name: str, *, seed: int, steps: int, warmup: int, threads: int) -> dict[str, Any]:
    """Plain, today's DP method and ghost clipping for cell ``name``, each in a fresh process."""
    measured = {}
    for mode in ("plain", TODAY.get(name, "vmap"), "ghost"):
        proc = subprocess.run([sys.executable, __file__, "--steps", str(steps), "--warmup", str(warmup), "--threads",
                               str(threads), "--seed", str(seed), "--cell", name, mode],
                              cwd=REPO, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"dp_cost {name} {mode}: {proc.stderr.strip().splitlines()[-1:]}")
        measured["today" if mode not in ("plain", "ghost") else mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    plain, today, ghost = measured["plain"], measured["today"], measured["ghost"]
    return {"shape": plain["shape"], "steps": steps, "device": plain["device"], "plain_step_ms": plain["step_ms"],
            "before_method": today["method"], "before_step_ms": today["step_ms"],
            "before_ratio": today["step_ms"] / plain["step_ms"], "after_method": ghost["method"],
            "after_step_ms": ghost["step_ms"], "after_ratio": ghost["step_ms"] / plain["step_ms"],
            "plain_peak_mb": plain["peak_mb"], "before_peak_mb": today["peak_mb"], "after_peak_mb": ghost["peak_mb"],
            "before_peak_ratio": today["peak_mb"] / plain["peak_mb"], "after_peak_ratio": ghost["peak_mb"] / plain["peak_mb"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cells", default=",".join(CELLS))
    parser.add_argument("--cell", nargs=2, metavar=("CELL", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cell:
        print(json.dumps(cell(args.cell[0], args.cell[1], seed=args.seed, steps=args.steps, warmup=args.warmup,
                              threads=args.threads)))
        return
    print("| cell | shape | plain (ms) | DP before (ms) | ratio | DP after (ms) | ratio | peak plain / before / "
          "after (MB) | method before | method after |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in args.cells.split(","):
        r = measure(name, seed=args.seed, steps=args.steps, warmup=args.warmup, threads=args.threads)
        print(f"| {name} | {r['shape']} | {r['plain_step_ms']:.1f} | {r['before_step_ms']:.1f} | "
              f"{r['before_ratio']:.2f}x | {r['after_step_ms']:.1f} | {r['after_ratio']:.2f}x | "
              f"{r['plain_peak_mb']:.0f} / {r['before_peak_mb']:.0f} / {r['after_peak_mb']:.0f} | "
              f"{r['before_method']} | {r['after_method']} |", flush=True)


if __name__ == "__main__":
    main()
