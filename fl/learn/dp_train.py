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
from dataclasses import dataclass

import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer

from fl.learn import Task
from fl.learn.data import Split
from fl.learn.train import TrainResult
from fl.privacy.accounting import local_event
from fl.privacy.noise import NoiseSource, SecureGaussian


@dataclass(frozen=True)
class DpOptions:
    """What a run asks of a node's DP-SGD beyond the mechanism's noise and clipping norm (the
    ``local_dp`` keys of :mod:`fl.config`); none of them changes what the accountant charges."""

    trainable: str = "all"  # fl.learn.trainable.TRAINABLE
    views: int = 1  # augmented views of a sampled record, averaged before clipping (De et al. 2022)
    view_augment: str = "flips"  # flips (and quarter turns) on top of the bundle's random transforms, or bundle
    ema_decay: float = 0.0  # > 0: release the exponential moving average of the iterates
    # how a bundle's per-case gradients are clipped (fl.learn.bundle_train.PER_CASE): "auto" is
    # ghost/mixed clipping (fl.learn.ghost) where every layer allows it, else "vmap" (torch.func)
    per_case: str = "auto"

    def __post_init__(self) -> None:
        if self.views < 1:
            raise ValueError(f"local_dp.views must be >= 1, got {self.views}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"local_dp.ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.view_augment not in ("flips", "bundle"):
            raise ValueError(f"local_dp.view_augment must be flips or bundle, got {self.view_augment!r}")
        if self.per_case not in ("auto", "ghost", "vmap"):
            raise ValueError(f"local_dp per-case method must be auto, ghost or vmap, got {self.per_case!r}")


def freeze_for_dp(net: torch.nn.Module, trainable: str) -> list[torch.nn.Parameter]:
    """Turn off the gradients of the parameters ``trainable`` leaves out (before any optimizer or
    per-sample machinery sees the network); returns them, for the caller to turn back on."""
    from fl.learn.trainable import trained_names

    keep = set(trained_names(net, trainable))
    frozen = [p for name, p in net.named_parameters() if name not in keep and p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    return frozen


class WeightAverage:
    """Exponential moving average of a network's parameters over the DP iterates, started at
    the first iterate (``torch.optim.swa_utils``): post-processing of DP releases, so free of
    privacy cost. :meth:`copy_to` writes the average into the network that is then released."""

    def __init__(self, net: torch.nn.Module, decay: float) -> None:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        self.model = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=False)

    def update(self, net: torch.nn.Module) -> None:
        self.model.update_parameters(net)

    @torch.no_grad()
    def copy_to(self, net: torch.nn.Module) -> None:
        for target, average in zip(net.parameters(), self.model.module.parameters(), strict=True):
            target.copy_(average)


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

    def step_clipped(self, clipped_sums: dict[int, torch.Tensor]) -> None:
        """The step for per-case gradients clipped and summed elsewhere (:mod:`fl.learn.ghost`,
        sums by parameter id): what :meth:`step` does after its own clipping, the same noise
        draw (:meth:`add_noise`, parameters in the same order), the same division by the expected
        batch size, the wrapped optimizer's update."""
        for p in self.params:
            p.summed_grad = clipped_sums[id(p)].to(p.dtype).view_as(p)
        self.add_noise()
        if self.loss_reduction == "mean":
            for p in self.params:
                p.grad /= self.expected_batch_size
        if self.step_hook:
            self.step_hook(self)
        self._is_last_step_skipped = False
        self.original_optimizer.step()


def check_mechanism(noise_multiplier: float, max_grad_norm: float) -> None:
    """DP-SGD's two parameters are finite and positive (a ValueError naming the bad one)."""
    if not (math.isfinite(max_grad_norm) and max_grad_norm > 0):
        raise ValueError(f"max_grad_norm must be > 0, got {max_grad_norm}")
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise ValueError(f"noise_multiplier must be > 0, got {noise_multiplier}")


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
    check_mechanism(noise_multiplier, max_grad_norm)
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
