"""What every task is to the rest of OncoFed: the :class:`Task` protocol.

A task is what a node trains and how it is scored, identical on the server and the nodes. Two
kinds implement it: a MONAI bundle (:class:`fl.learn.bundle.BundleTask`, which the catalogue's
image tasks ``seg2d`` and ``seg3d`` are too) and the tabular task
(:class:`fl.learn.catalogue.TabularTask`). Callers (the ClientApp, server pretraining, tune,
the benchmarks, export, the manifest) use these methods and never ask which kind they hold.

Training settings travel in two small records, :class:`TrainSettings` for a plain pass and
:class:`PrivateSettings` for DP-SGD; what is the task's own (its optimizer and learning rate,
its mini-batch size, its loss and metric) stays in the task.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import numpy as np
    import torch

    from fl.learn.data import LocalData
    from fl.learn.dp_train import DpOptions
    from fl.learn.train import EvalResult, TrainResult
    from fl.privacy.noise import NoiseSource


@dataclass(frozen=True)
class TrainSettings:
    """One plain training call: ``epochs`` passes on ``device`` (the CPU when None)."""

    epochs: int
    device: torch.device | None = None
    proximal_mu: float = 0.0
    amp: bool = False
    generator: torch.Generator | None = None
    workers: int = 0  # DataLoader workers (image tasks)


@dataclass(frozen=True)
class PrivateSettings:
    """One DP-SGD call: Poisson-sampled ``epochs`` passes in expectation, each record's gradient
    clipped to ``max_grad_norm`` and Gaussian noise of ``noise_multiplier`` times it added."""

    epochs: int
    noise_multiplier: float
    max_grad_norm: float
    device: torch.device | None = None
    options: DpOptions | None = None  # image tasks: trained parameters, views, weight average
    generator: torch.Generator | None = None  # sampling only; the noise comes from ``noise``
    noise: NoiseSource | None = None  # None: the node's CSPRNG


@runtime_checkable
class Task(Protocol):
    """A trainable, scorable task (see the module's docstring)."""

    name: str
    description: str
    metric: str  # the key metric a node reports ("dice", "auc")
    record_metric: str  # the per-record score a noisy release averages ("dice", "accuracy")
    private: bool  # the network is the one DP-SGD trains (a bundle's BatchNorm replaced)

    @property
    def digest(self) -> str:
        """What identifies the task's definition (a bundle's config files, the tabular network)."""

    @property
    def bundle_digest(self) -> str | None:
        """The MONAI bundle's digest, or None for a task that is no bundle."""

    @property
    def lr(self) -> float: ...

    @property
    def batch_size(self) -> int: ...

    @property
    def loader_workers(self) -> int:
        """DataLoader workers the task asks for on a machine of its own (0: none)."""

    def with_lr(self, lr: float) -> Task:
        """This task trained at learning rate ``lr`` (pretraining's, a tuning candidate's)."""

    def build_network(self) -> torch.nn.Module: ...

    def build_loss(self) -> torch.nn.Module: ...

    def class_labels(self) -> list[str]:
        """The classes a per-class score counts ([] where the task has no per-class score)."""

    def example_input(self) -> torch.Tensor:
        """One input of the network's shape (for tracing and export)."""

    def load_data(self, data_dir: Path, *, use_cache: bool = True, disk_cache: Path | None = None) -> LocalData:
        """A node's dataset, checked; a bad file is a DataError naming it."""

    def load_pooled(self, data_dirs: list[Path]) -> LocalData:
        """Every listed node's cases in one dataset (the centralised reference)."""

    def record_labels(self, data: LocalData) -> np.ndarray | None:
        """The label of every record, where labels are a column of a table (descriptors count
        them); None where they are images read from the node's files."""

    def check_private_options(self, options: DpOptions, net: torch.nn.Module) -> None:
        """Refuse, before any spend, DP-SGD options this task and network cannot honour."""

    def train(self, net: torch.nn.Module, split: Any, settings: TrainSettings) -> TrainResult: ...

    def train_private(self, net: torch.nn.Module, split: Any, settings: PrivateSettings) -> TrainResult: ...

    def evaluate(self, net: torch.nn.Module, split: Any, *, device: torch.device | None = None,
                 workers: int = 0, amp: bool = False) -> EvalResult: ...

    def provenance(self) -> dict[str, Any] | None:
        """What a version's manifest records of the task's definition (None: its name says all)."""
