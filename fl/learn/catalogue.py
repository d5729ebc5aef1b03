"""The task catalogue: named tasks, identical on server and nodes.

``seg2d`` and ``seg3d`` are MONAI bundles shipped in ``configs/bundles/`` (network,
preprocessing, loss, metric: :mod:`fl.learn.bundle`); their :class:`ImageSpec` entry adds what
the synthetic sites need (dimensions, image size, classes) and the bundle's path; resolved, they
are a :class:`fl.learn.bundle.BundleTask`. Their networks use instance normalisation and
non-inplace activations, never BatchNorm, so they train under DP-SGD unchanged. ``tabular`` is a
small MLP defined here; it implements :class:`fl.learn.task.Task` itself. Heavy objects are built
on demand so that importing the catalogue stays cheap.
"""

from __future__ import annotations

import difflib
import hashlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fl.errors import ConfigError

if TYPE_CHECKING:
    import numpy as np
    import torch
    from monai.transforms import Compose

    from fl.learn.bundle import BundleTask
    from fl.learn.data import LocalData
    from fl.learn.dp_train import DpOptions
    from fl.learn.task import PrivateSettings, TrainSettings
    from fl.learn.train import EvalResult, TrainResult

IMAGE_KEY = "image"
LABEL_KEY = "label"


@dataclass(frozen=True)
class ImageSpec:
    """A catalogue image task: its shipped bundle, and the shape of its synthetic sites
    (``num_classes`` includes the background, label 0)."""

    name: str
    description: str
    spatial_dims: int
    num_classes: int
    image_size: int  # of the synthetic sites
    # Opacus per-sample gradient mode, the fastest correct one measured for this network on
    # CPU (bench/dp_cost.py): hooks for the 2D UNet, functorch (vmap) for the 3D UNet
    dp_functorch: bool = False
    # the shipped bundle that defines this task's network, preprocessing, loss and metric, and that
    # nodes train (relative to the app's folder)
    bundle: str = ""

    def resolve(self, *, private: bool = False, digest: str | None = None, lr: float | None = None,
                batch_size: int | None = None, inside_app: bool = False) -> BundleTask:
        """The task a run trains: the shipped bundle with the run's ``lr`` and ``batch_size``."""
        from fl.learn.bundle import BundleTask

        del inside_app  # the shipped bundle is part of the app
        return BundleTask.load(self.bundle, private=private, digest=digest, lr=lr, batch_size=batch_size)

    def bundle_task(self) -> BundleTask:
        """The shipped bundle this task is (its network, preprocessing, loss and metric)."""
        return self.resolve()

    def load_data(self, data_dir: Path, *, use_cache: bool = True, disk_cache: Path | None = None) -> LocalData:
        return self.bundle_task().load_data(data_dir, use_cache=use_cache, disk_cache=disk_cache)

    def synthesize(self, root: Path, *, nodes: int, seed: int = 0, image_size: int = 0,
                   train_cases: int = 0) -> list[Path]:
        """Synthetic sites of this task's images (:func:`fl.learn.synth.synthesize_images`)."""
        from fl.learn.synth import synthesize_images

        return synthesize_images(root, nodes=nodes, task=self, seed=seed, image_size=image_size,
                                 train_cases=train_cases)

    def build_network(self) -> torch.nn.Module:
        """A fresh MONAI UNet (instance norm, LeakyReLU without in-place ops): the bundle's."""
        return self.bundle_task().build_network()

    def build_loss(self) -> torch.nn.Module:
        """Dice + cross-entropy on softmax outputs against integer label maps: the bundle's."""
        return self.bundle_task().build_loss()

    def preprocess(self) -> Compose:
        """The bundle's validation preprocessing of a case already in memory (arrays, no file
        reading): channel first, scaled to [0, 1] (this removes the scanner-dependent intensity
        range, as a hospital's pipeline would), padded to the multiple the UNet's down-sampling
        needs, plain tensors (float32 image, uint8 label)."""
        from monai.transforms import Compose, LoadImaged

        chain = self.bundle_task().val_transform()
        return Compose([t for t in chain.transforms if not isinstance(t, LoadImaged)])

    divisor = 8  # spatial sizes the UNet's three down-samplings take (its bundle pads to it)


CATALOGUE: dict[str, ImageSpec | TabularTask] = {
    task.name: task
    for task in (
        ImageSpec(
            name="seg2d",
            description="2D lesion segmentation (UNet, Dice+CE loss, mean foreground Dice)",
            spatial_dims=2,
            num_classes=2,
            image_size=64,
            bundle="configs/bundles/seg2d",
        ),
        ImageSpec(
            name="seg3d",
            description="3D lesion segmentation on volumes (UNet, Dice+CE loss, mean Dice)",
            spatial_dims=3,
            num_classes=2,
            image_size=32,
            dp_functorch=True,
            bundle="configs/bundles/seg3d",
        ),
    )
}


@dataclass(frozen=True)
class TabularTask:
    """Binary classification of tabular records (a node's ``train.csv`` / ``val.csv``): a small
    MLP, cross-entropy, ROC AUC. Features are standardised with the node's own training
    statistics, so no statistic leaves the node. Trained with Adam at the run's ``lr`` in
    mini-batches of the run's ``batch_size`` (:meth:`resolve` sets both; training without them
    is a ConfigError, never a default the coordinator did not state)."""

    name: str
    description: str
    features: int
    hidden: int = 32
    num_classes: int = 2
    dp_functorch: bool = False
    run_lr: float | None = None  # the run's train.lr and train.batch_size (:meth:`resolve`)
    run_batch_size: int | None = None
    private: bool = False
    metric = "auc"
    # ROC AUC is no sum over records (one record moves it by up to 1/min(positives, negatives)),
    # so a node releasing noisy metrics releases accuracy instead
    record_metric = "accuracy"
    loader_workers = 0
    bundle_digest = None

    def resolve(self, *, private: bool = False, digest: str | None = None, lr: float | None = None,
                batch_size: int | None = None, inside_app: bool = False) -> TabularTask:
        """This task with the run's ``lr`` and ``batch_size``."""
        del digest, inside_app  # no bundle
        return replace(self, private=private, run_lr=self.run_lr if lr is None else lr,
                       run_batch_size=self.run_batch_size if batch_size is None else batch_size)

    def with_lr(self, lr: float) -> TabularTask:
        return replace(self, run_lr=lr)

    @property
    def lr(self) -> float:
        if self.run_lr is None:  # never a default the coordinator did not state
            raise ConfigError(f"task {self.name}: no learning rate given (the run's train.lr)")
        return self.run_lr

    @property
    def batch_size(self) -> int:
        if self.run_batch_size is None:
            raise ConfigError(f"task {self.name}: no batch size given (the run's train.batch_size)")
        return self.run_batch_size

    @property
    def digest(self) -> str:
        spec = f"tabular|{self.features}|{self.hidden}|{self.num_classes}"
        return hashlib.sha256(spec.encode()).hexdigest()

    def build_network(self) -> torch.nn.Module:
        """Linear - LeakyReLU - Linear - LeakyReLU - Linear (no normalisation: DP-SGD ready)."""
        from torch import nn

        return nn.Sequential(nn.Linear(self.features, self.hidden), nn.LeakyReLU(),
                             nn.Linear(self.hidden, self.hidden), nn.LeakyReLU(),
                             nn.Linear(self.hidden, self.num_classes))

    def build_loss(self) -> torch.nn.Module:
        from torch import nn

        class _CrossEntropy(nn.Module):
            def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
                return nn.functional.cross_entropy(logits, labels.long())

        return _CrossEntropy()

    def score(self, logits: torch.Tensor, labels: torch.Tensor) -> float:
        """ROC AUC of the positive class (0.5 when the node's validation set has one class)."""
        from monai.metrics import compute_roc_auc

        if labels.min() == labels.max():
            return 0.5
        return float(compute_roc_auc(logits.softmax(dim=1)[:, 1], labels.long()))

    def record_scores(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return (logits.argmax(dim=1) == labels.long()).double()

    def class_labels(self) -> list[str]:
        return []  # one score (AUC), no per-class release

    def example_input(self) -> torch.Tensor:
        import torch

        return torch.zeros(1, self.features)

    # --- data ---------------------------------------------------------------------------------
    def synthesize(self, root: Path, *, nodes: int, seed: int = 0, image_size: int = 0,
                   train_cases: int = 0) -> list[Path]:
        """Synthetic tabular sites (:func:`fl.learn.tabular.write_federation`)."""
        from fl.learn.tabular import write_federation

        del image_size, train_cases  # an image federation's settings
        return write_federation(root, nodes=nodes, source="synthetic", seed=seed)

    def load_data(self, data_dir: Path, *, use_cache: bool = True, disk_cache: Path | None = None) -> LocalData:
        from fl.learn.data import load_tabular

        del disk_cache  # records load in milliseconds: nothing to keep between processes
        return load_tabular(Path(data_dir).resolve(), self, use_cache)

    def load_pooled(self, data_dirs: list[Path]) -> LocalData:
        import torch

        from fl.learn.data import LocalData, Split

        parts = [self.load_data(d, use_cache=False) for d in data_dirs]
        return LocalData(Split(torch.cat([p.train.images for p in parts]), torch.cat([p.train.labels for p in parts])),
                         Split(torch.cat([p.val.images for p in parts]), torch.cat([p.val.labels for p in parts])),
                         digest="")

    def record_labels(self, data: LocalData) -> np.ndarray:
        import numpy as np

        return np.concatenate([data.train.labels.numpy().ravel(), data.val.labels.numpy().ravel()])

    # --- training -----------------------------------------------------------------------------
    def check_private_options(self, options: DpOptions, net: torch.nn.Module) -> None:
        del net
        raise ConfigError(f"local DP options {options} are for image tasks, not {self.name}")

    def train(self, net: torch.nn.Module, split: Any, settings: TrainSettings) -> TrainResult:
        from fl.learn.train import train_local

        return train_local(net, self, split, epochs=settings.epochs, lr=self.lr, batch_size=self.batch_size,
                           proximal_mu=settings.proximal_mu, generator=settings.generator, device=settings.device,
                           amp=settings.amp)

    def train_private(self, net: torch.nn.Module, split: Any, settings: PrivateSettings) -> TrainResult:
        # imported here: Opacus takes 1.4 s to import (python -X importtime)
        from fl.learn.dp_train import train_local_dp

        return train_local_dp(net, self, split, epochs=settings.epochs, lr=self.lr, batch_size=self.batch_size,
                              noise_multiplier=settings.noise_multiplier, max_grad_norm=settings.max_grad_norm,
                              noise=settings.noise, device=settings.device)

    def evaluate(self, net: torch.nn.Module, split: Any, *, device: torch.device | None = None,
                 workers: int = 0, amp: bool = False) -> EvalResult:
        from fl.learn.train import evaluate_local

        del workers, amp  # records in memory, evaluated in full precision
        return evaluate_local(net, self, split, batch_size=self.batch_size, device=device)

    def provenance(self) -> None:
        return None  # the catalogue's name says all


CATALOGUE["tabular"] = TabularTask(
    name="tabular",
    description="binary classification of tabular records (MLP, cross-entropy, ROC AUC); "
                "e.g. Breast Cancer Wisconsin Diagnostic, 30 features",
    features=30,
)
TASK_NAMES: tuple[str, ...] = tuple(CATALOGUE)


def torch_dtype(name: str) -> torch.dtype:
    """A torch dtype by name, importing torch only when needed."""
    import torch

    return getattr(torch, name)


def get_task(name: str) -> ImageSpec | TabularTask:
    """Look a catalogue entry up by name; an unknown name gets a did-you-mean."""
    try:
        return CATALOGUE[name]
    except KeyError:
        close = difflib.get_close_matches(name, TASK_NAMES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"task: unknown task {name!r}{hint}; known: {', '.join(TASK_NAMES)}") from None
