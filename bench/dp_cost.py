"""DP-SGD's cost on a node: time per step and peak memory, Opacus against non-private.

    python bench/dp_cost.py [--steps 20] [--threads 2]

Each cell runs in a fresh process (peak RSS is per process): the task's UNet, a fixed
batch (seg2d: 16 x 64x64, seg3d: 4 x 32^3), Adam; non-private is the plain step, DP is
OncoFed's DP-SGD step (Opacus per-sample gradients in hook mode, per-sample clipping,
CSPRNG noise). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

BATCH = {"seg2d": 16, "seg3d": 4, "tabular": 64}


def _cell(task_name: str, dp: bool, steps: int, threads: int) -> dict[str, float]:
    import torch
    from opacus import GradSampleModule

    from fl.learn import TabularTask, get_task
    from fl.learn.dp_train import NoiseInjectedDPOptimizer
    from fl.privacy.noise import SecureGaussian

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    task = get_task(task_name)
    batch = BATCH[task_name]
    if isinstance(task, TabularTask):
        images = torch.randn(batch, task.features)
        labels = (images[:, 0] > 0).to(torch.uint8)
    else:
        images = torch.rand(batch, 1, *([task.image_size] * task.spatial_dims))
        labels = (images > 0.7).to(torch.uint8)
    net = task.build_network()
    loss_fn = task.build_loss()
    if dp:
        model = GradSampleModule(net, loss_reduction="sum", force_functorch=task.dp_functorch)
        opt = NoiseInjectedDPOptimizer(torch.optim.Adam(model.parameters(), lr=1e-3), noise_multiplier=1.0,
                                        max_grad_norm=1.0, expected_batch_size=batch, loss_reduction="mean",
                                        noise_source=SecureGaussian())
    else:
        model, opt = net, torch.optim.Adam(net.parameters(), lr=1e-3)
    times = []
    for i in range(steps + 3):
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(images), labels) * (batch if dp else 1)
        loss.backward()
        opt.step()
        if i >= 3:  # warm-up excluded
            times.append(time.perf_counter() - start)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"step_ms": statistics.median(times) * 1000, "peak_mb": peak_mb, "batch": batch}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cell", nargs=2, metavar=("TASK", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cell:
        print(json.dumps(_cell(args.cell[0], args.cell[1] == "dp", args.steps, args.threads)))
        return
    print("| task | batch | non-private step (ms) | DP-SGD step (ms) | time ratio | peak RSS non-private / DP (MB) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for task in BATCH:
        cells = {}
        for mode in ("plain", "dp"):
            out = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--threads", str(args.threads),
                                  "--cell", task, mode], check=True, capture_output=True, text=True).stdout
            cells[mode] = json.loads(out.strip().splitlines()[-1])
        plain, dp = cells["plain"], cells["dp"]
        print(f"| {task} | {BATCH[task]} | {plain['step_ms']:.1f} | {dp['step_ms']:.1f} | "
              f"{dp['step_ms'] / plain['step_ms']:.2f}x | {plain['peak_mb']:.0f} / {dp['peak_mb']:.0f} |")


if __name__ == "__main__":
    main()
