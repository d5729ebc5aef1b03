"""Record-level DP on a node: DP-SGD (Abadi et al. 2016) with Opacus's per-sample gradients.

Each step samples every training case independently with probability ``q = batch_size / N``
(Poisson sampling, which the accountant assumes), computes per-sample gradients with
Opacus's ``GradSampleModule``, clips each to ``max_grad_norm`` and adds Gaussian noise of
std ``noise_multiplier * max_grad_norm`` to their sum (Opacus's ``DPOptimizer``). Both the
sampling and the noise come from an injected :class:`~fl.privacy.noise.NoiseSource`, the OS CSPRNG
by default: Opacus's own noise would come from torch's generator.
"""

from __future__ import annotations

import math
import time

import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer

from fl.privacy.noise import NoiseSource, SecureGaussian
from fl.tasks import Task
from nodes.data import Split
from nodes.policy import local_event
from nodes.train import TrainResult


class NoiseInjectedDPOptimizer(DPOptimizer):
    """Opacus's DP optimizer whose noise comes from ``noise_source``, added exactly once."""

    def __init__(self, *args: object, noise_source: NoiseSource, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.noise_source = noise_source

    def add_noise(self) -> None:
        std = self.noise_multiplier * self.max_grad_norm
        for p in self.params:
            summed = p.summed_grad
            # added in float64, rounded once to the parameter's dtype (see fl.privacy.noise)
            noise = self.noise_source.gaussian(tuple(summed.shape), std).to(summed.device)
            p.grad = (summed.double() + noise).to(summed.dtype).view_as(p)
            summed._processed = True  # Opacus's marker: this step's noise is in


def train_local_dp(
    net: torch.nn.Module,
    task: Task,
    data: Split,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    noise_multiplier: float,
    max_grad_norm: float,
    noise: NoiseSource | None = None,
    device: torch.device | None = None,
) -> TrainResult:
    """DP-SGD (Adam update on the privatised gradient) for ``epochs`` passes in expectation, on
    ``device`` (the CPU by default); ``net`` is back on the CPU when this returns."""
    if not (math.isfinite(max_grad_norm) and max_grad_norm > 0):
        raise ValueError(f"max_grad_norm must be > 0, got {max_grad_norm}")
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise ValueError(f"noise_multiplier must be > 0, got {noise_multiplier}")
    noise = noise or SecureGaussian()
    device = device or torch.device("cpu")
    net.to(device)
    started = time.perf_counter()
    event = local_event(len(data), epochs=epochs, batch_size=batch_size, noise_multiplier=noise_multiplier)
    # per-sample gradients of per-sample losses ("sum"); the optimizer then divides the noisy
    # sum by the expected batch size ("mean"), as in Abadi et al.'s algorithm 1
    model = GradSampleModule(net, loss_reduction="sum", force_functorch=task.dp_functorch)
    optimizer = NoiseInjectedDPOptimizer(
        torch.optim.Adam(model.parameters(), lr=lr),
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=batch_size,
        loss_reduction="mean",
        noise_source=noise,
    )
    loss_fn = task.build_loss()
    model.train()
    loss_sum, seen = 0.0, 0
    try:
        for _ in range(event.steps):
            chosen = torch.from_numpy(noise.uniform(len(data)) < event.sample_rate).nonzero().flatten()
            optimizer.zero_grad(set_to_none=True)
            if len(chosen):
                # Dice+CE averages over the batch; times the batch size it is the sum of the
                # per-sample losses (instance norm keeps samples independent)
                images, labels = data.images[chosen].to(device), data.labels[chosen].to(device)
                loss = loss_fn(model(images), labels) * len(chosen)
                loss.backward()
                loss_sum += float(loss.detach())
                seen += len(chosen)
            else:  # an empty Poisson sample still releases noise, as the accountant assumes
                for p in model.parameters():
                    p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
            optimizer.step()
    finally:
        model._close()
        net.to("cpu")
    return TrainResult(loss=loss_sum / max(seen, 1), seconds=time.perf_counter() - started, steps=event.steps)
