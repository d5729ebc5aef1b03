"""``fl node check --bundle``: a bundle's dry run on one of the node's own cases, on its device.

Before a federation's first round, the node runs what a round will run, once, on one training
case: parse the bundle (:class:`~fl.learn.bundle.BundleTask` builds its network, loss, optimizer,
inferer and post-processing, as in a round), preprocess the case through the node's data path
(:func:`fl.learn.cases.bundle_cases`: the bundle's deterministic transforms, the case's checks,
then its random transforms and the batch collation of :func:`fl.learn.bundle_train.loader`), one
training step as :func:`fl.learn.train.fit` takes it (forward, loss, backward, optimizer step),
then one evaluation as :func:`fl.learn.bundle_train.evaluate_bundle` makes it (the validation
preprocessing of the same case, the inferer, the loss) and its post-processing and Dice.

Each stage is timed. The first that fails ends the run, named with its failing component by
:func:`nodes.failure.classify`, the classifier a node's failing round replies with too. A bundle
that disagrees with the installed MONAI (Model Zoo's BraTS bundle leaves its label boolean, which
MONAI 1.6's ``DiceLoss`` refuses) fails here, on the node, rather than in the first round.
Nothing leaves the node; the global model is not involved (the network starts from the bundle's
own initialisation).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fl.learn import IMAGE_KEY, LABEL_KEY
from fl.learn.bundle import BundleTask
from fl.learn.device import AUTO, describe, resolve
from nodes.failure import Failure, classify, full_traceback

SEED = 0  # the random transforms' draw: a dry run is reproducible


@dataclass(frozen=True)
class StageTime:
    stage: str
    seconds: float


@dataclass
class DryRun:
    """A dry run's stages (those that passed, with their times) and its failure, if any."""

    bundle: str
    device: str
    stages: list[StageTime] = field(default_factory=list)
    failure: Failure | None = None
    traceback: str = ""  # the failure's full traceback: the node's own log and --verbose

    @property
    def passed(self) -> bool:
        return self.failure is None

    def lines(self, *, verbose: bool = False) -> list[str]:
        """One line per stage and ``dry run passed: ...``; or one ``dry run failed at ...`` line
        (``verbose``: after the stages that passed, and followed by the traceback)."""
        timed = [f"  {s.stage:<15} {s.seconds:8.2f} s" for s in self.stages]
        if self.failure is None:
            total = sum(s.seconds for s in self.stages)
            return [*timed, f"dry run passed: bundle {self.bundle}, {len(self.stages)} stages on one case "
                            f"in {total:.2f} s on {self.device}"]
        failed = f"dry run failed at {self.failure.line()}"
        return [*timed, failed, self.traceback.rstrip()] if verbose else [failed]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"bundle": self.bundle, "device": self.device, "passed": self.passed,
                               "stages": {s.stage: s.seconds for s in self.stages}}
        if self.failure is not None:
            out["failure"] = {"stage": self.failure.stage, "component": self.failure.component,
                              "module": self.failure.module, "inner": self.failure.inner,
                              "error": self.failure.error, "message": self.failure.message}
        return out


class _Failed(Exception):
    def __init__(self, failure: Failure, trace: str) -> None:
        super().__init__(failure.line())
        self.failure, self.trace = failure, trace


class _Stages:
    """Times each stage; the first exception becomes a :class:`_Failed` naming the stage."""

    def __init__(self, run: DryRun) -> None:
        self.run = run

    @contextlib.contextmanager
    def stage(self, name: str, component: Any = None) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
            if self.run.device.startswith("cuda"):
                torch.cuda.synchronize()  # the stage's kernels done (and their errors raised) within it
        except Exception as exc:  # noqa: BLE001 - whatever the bundle raises is the finding
            raise _Failed(classify(exc, stage=name, fallback=component), full_traceback(exc)) from None
        self.run.stages.append(StageTime(name, time.perf_counter() - started))


@dataclass
class _Parts:
    """What the bundle's parser builds for a round, built once."""

    task: BundleTask
    net: torch.nn.Module
    loss: Any
    optimizer: Any
    inferer: Any
    post: Any

    @classmethod
    def build(cls, bundle: str | Path | BundleTask) -> _Parts:
        task = bundle if isinstance(bundle, BundleTask) else BundleTask.load(str(bundle))
        net = task.build_network()
        return cls(task=task, net=net, loss=task.build_loss(), optimizer=task.build_optimizer(net),
                   inferer=task.inferer(), post=task.postprocessing())


def _tensor(value: Any) -> torch.Tensor:
    """A MetaTensor's data as a plain tensor, as the trainer feeds the network."""
    return value.as_tensor() if hasattr(value, "as_tensor") else torch.as_tensor(value)


def one_case(data_dir: Path) -> dict[str, Any]:
    """The node's first training case, as its datalist names it."""
    from fl.learn.data import read_datalist

    return read_datalist(Path(data_dir).resolve(), modality_lists=True)["training"][0]


def _first_batch(task: BundleTask, case: dict[str, Any], *, train: bool,
                 device: torch.device) -> tuple[Any, Any]:
    """The case through the node's data path (no disk cache) and the trainer's loader: one batch."""
    from fl.learn.bundle_train import loader
    from fl.learn.cases import bundle_cases

    cases = bundle_cases([case], task, None, train=train)
    if hasattr(cases.dataset.transform, "set_random_state"):
        cases.dataset.transform.set_random_state(seed=SEED)
    batch = next(iter(loader(cases, batch_size=task.batch_size if train else 1, shuffle=False, workers=0,
                             device=device)))
    return _tensor(batch[IMAGE_KEY]).to(device), _tensor(batch[LABEL_KEY]).to(device)


def dry_run(data_dir: Path, bundle: str | Path | BundleTask, *, device: torch.device | None = None) -> DryRun:
    """Run ``bundle`` once on the node's first training case (see the module's docstring)."""
    device = device or resolve(AUTO)
    name = bundle.name if isinstance(bundle, BundleTask) else str(bundle)
    run = DryRun(bundle=name, device=describe(device))
    stages = _Stages(run)
    built: list[_Parts] = []
    try:
        with stages.stage("parse"):
            built.append(_Parts.build(bundle))
        run.bundle = built[0].task.name
        _train_step(stages, built[0], data_dir, device)
        _evaluation(stages, built[0], data_dir, device)
    except _Failed as failed:
        run.failure, run.traceback = failed.failure, failed.trace
    finally:
        for parts in built:
            parts.net.to("cpu")
    return run


def _train_step(stages: _Stages, parts: _Parts, data_dir: Path, device: torch.device) -> None:
    """One step of :func:`fl.learn.train.fit` on the case, a stage at a time."""
    with stages.stage("preprocessing"):
        images, labels = _first_batch(parts.task, one_case(data_dir), train=True, device=device)
    with stages.stage("forward", parts.net):
        parts.net.to(device)
        parts.net.train()
        parts.optimizer.zero_grad(set_to_none=True)
        logits = parts.net(images)
    with stages.stage("loss", parts.loss):
        loss = parts.loss(logits, labels)
    with stages.stage("backward", parts.net):
        loss.backward()
    with stages.stage("optimiser step", parts.optimizer):
        parts.optimizer.step()


@torch.no_grad()
def _evaluation(stages: _Stages, parts: _Parts, data_dir: Path, device: torch.device) -> None:
    """:func:`fl.learn.bundle_train.evaluate_bundle` on the same case, a stage at a time."""
    from monai.data import decollate_batch

    with stages.stage("evaluation", parts.inferer):
        image, label = _first_batch(parts.task, one_case(data_dir), train=False, device=device)
        parts.net.eval()
        logits = parts.inferer(image, parts.net).float()
        float(parts.loss(logits, label))
    with stages.stage("postprocessing", parts.post):
        items = [parts.post(item) for item in decollate_batch({"pred": logits, LABEL_KEY: label})]
        preds = torch.stack([_tensor(i["pred"]) for i in items])
        truth = torch.stack([_tensor(i[LABEL_KEY]) for i in items])
        parts.task.scores(preds, truth)
