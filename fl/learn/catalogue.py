"""The task catalogue: named tasks, identical on server and nodes.

``seg2d`` and ``seg3d`` are MONAI bundles shipped in ``configs/bundles/`` (network,
preprocessing, loss, metric: :mod:`fl.tasks.bundle`); their :class:`Task` entry adds what the
synthetic sites need (dimensions, image size, classes) and the bundle's path. Their networks use
instance normalisation and non-inplace activations, never BatchNorm, so they train under DP-SGD
unchanged. ``tabular`` is a small MLP defined here. Heavy objects are built on demand so that
importing the catalogue stays cheap.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fl.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from monai.transforms import Compose

IMAGE_KEY = "image"
LABEL_KEY = "label"


@dataclass(frozen=True)
class Task:
    """A segmentation task: ``num_classes`` includes the background (label 0)."""

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

    kind = "segmentation"

    def bundle_task(self) -> Any:
        """The shipped bundle this task is (its network, preprocessing, loss and metric)."""
        from fl.tasks.bundle import BundleTask

        return BundleTask.load(self.bundle)

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


CATALOGUE: dict[str, Task] = {
    task.name: task
    for task in (
        Task(
            name="seg2d",
            description="2D lesion segmentation (UNet, Dice+CE loss, mean foreground Dice)",
            spatial_dims=2,
            num_classes=2,
            image_size=64,
            bundle="configs/bundles/seg2d",
        ),
        Task(
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
    statistics, so no statistic leaves the node."""

    name: str
    description: str
    features: int
    hidden: int = 32
    num_classes: int = 2
    dp_functorch: bool = False
    kind = "tabular"
    metric = "auc"
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

    # ROC AUC is no sum over records (one record moves it by up to 1/min(positives, negatives)),
    # so a node releasing noisy metrics releases accuracy instead
    record_metric = "accuracy"

    def record_scores(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return (logits.argmax(dim=1) == labels.long()).double()


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


def get_task(name: str) -> Any:
    """Look a task up by name; an unknown name gets a did-you-mean."""
    try:
        return CATALOGUE[name]
    except KeyError:
        close = difflib.get_close_matches(name, TASK_NAMES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"task: unknown task {name!r}{hint}; known: {', '.join(TASK_NAMES)}") from None
