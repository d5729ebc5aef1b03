"""Local training and evaluation on a node: plain functions over tensors, no Flower here."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from fl.learn import Task
from fl.learn.data import Split


@dataclass(frozen=True)
class TrainResult:
    """What a node reports after local training (aggregates only, never per-sample values)."""

    loss: float
    seconds: float
    steps: int


@dataclass(frozen=True)
class EvalResult:
    """Mean loss and the task's score (mean foreground Dice, or ROC AUC) on held-out cases, and
    each case's own score in [0, 1] (for a release with DP noise; never sent as such)."""

    loss: float
    score: float
    record_scores: torch.Tensor
    class_scores: torch.Tensor | None = None  # (cases, classes), NaN where absent: bundle tasks only


def fit(net: torch.nn.Module, loss_fn: torch.nn.Module, optimizer: torch.optim.Optimizer,
        epoch_batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]], *, epochs: int,
        device: torch.device, amp: bool = False, proximal_mu: float = 0.0) -> TrainResult:
    """Train ``net`` in place for ``epochs`` passes over ``epoch_batches()`` (image and label
    batches) on ``device``; ``amp``: float16 autocast with loss scaling, CUDA only. With
    ``proximal_mu > 0`` the FedProx term ``mu / 2 * ||w - w_global||^2`` (Li et al. 2020, eq. 2)
    is added to the loss, ``w_global`` being the weights at entry. ``net`` is back on the CPU
    when this returns; the reported loss is the last epoch's mean."""
    started = time.perf_counter()
    amp = amp and device.type == "cuda"
    net.to(device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    anchor = [p.detach().clone() for p in net.parameters()] if proximal_mu > 0 else []
    net.train()
    steps, loss_sum, seen = 0, 0.0, 0
    for _ in range(epochs):
        loss_sum, seen = 0.0, 0
        for images, labels in epoch_batches():
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
                loss = loss_fn(net(images), labels)
            if anchor:
                drift = sum((p - a).pow(2).sum() for p, a in zip(net.parameters(), anchor))
                loss = loss + proximal_mu / 2 * drift
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            steps += 1
            loss_sum += float(loss.detach()) * len(images)
            seen += len(images)
    net.to("cpu")
    return TrainResult(loss=loss_sum / max(seen, 1), seconds=time.perf_counter() - started, steps=steps)


def train_local(
    net: torch.nn.Module,
    task: Task,
    data: Split,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    proximal_mu: float = 0.0,
    generator: torch.Generator | None = None,
    device: torch.device | None = None,
    amp: bool = False,
) -> TrainResult:
    """Train ``net`` in place for ``epochs`` shuffled passes over stacked records (the tabular
    task) with Adam; see :func:`fit`."""

    def batches() -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        for batch in torch.randperm(len(data), generator=generator).split(batch_size):
            yield data.images[batch], data.labels[batch]

    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    return fit(net, task.build_loss(), optimizer, batches, epochs=epochs, device=device or torch.device("cpu"),
               amp=amp, proximal_mu=proximal_mu)


@torch.no_grad()
def evaluate_local(net: torch.nn.Module, task: Task, data: Split, *, batch_size: int,
                   device: torch.device | None = None) -> EvalResult:
    """Loss (averaged over cases) and the task's score (Dice or AUC) of ``net`` on ``data``,
    computed on ``device`` (the CPU by default); ``net`` is back on the CPU when this returns."""
    device = device or torch.device("cpu")
    net.to(device)
    loss_fn = task.build_loss()
    net.eval()
    loss_sum, all_logits = 0.0, []
    for start in range(0, len(data), batch_size):
        images = data.images[start : start + batch_size].to(device, non_blocking=True)
        labels = data.labels[start : start + batch_size].to(device, non_blocking=True)
        logits = net(images)
        loss_sum += float(loss_fn(logits, labels)) * len(images)
        all_logits.append(logits.cpu())
    net.to("cpu")
    n = max(len(data), 1)
    if not all_logits:
        return EvalResult(loss=0.0, score=0.0, record_scores=torch.zeros(0, dtype=torch.float64))
    logits = torch.cat(all_logits)
    return EvalResult(loss=loss_sum / n, score=task.score(logits, data.labels),
                      record_scores=task.record_scores(logits, data.labels).double())
