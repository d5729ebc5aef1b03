"""Training and validation of a bundle task on a node: the bundle's components, OncoFed's loop.

Training iterates the node's cases in shuffled order, ``batch_size`` cases a step (the bundle's
``train#dataloader#batch_size``; a patch sampler such as ``RandCropByPosNegLabeld`` turns each
case into several patches), with the bundle's loss and optimizer. Validation runs the bundle's
inferer (e.g. a sliding window) over each whole case, then its post-processing, and scores the
key metric (Dice) per case. Under local DP (:func:`train_bundle_dp`) a record is a case: cases
are Poisson-sampled, each case's loss is computed on its own patches only, and the per-patch
gradients of a case are summed before they are clipped, so one case moves the update by at most
the clipping norm however many patches it yields.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch

from fl.learn import IMAGE_KEY, LABEL_KEY
from fl.learn.cases import Cases
from fl.learn.dp_train import DpOptions, WeightAverage, check_mechanism, freeze_for_dp
from fl.learn.train import EvalResult, TrainResult, fit
from fl.privacy.noise import NoiseSource, SecureGaussian

if TYPE_CHECKING:
    from fl.learn.bundle import BundleTask


def _plain(t: Any) -> torch.Tensor:
    """A MetaTensor's data as a plain tensor (no metadata tracking inside the network)."""
    return t.as_tensor() if hasattr(t, "as_tensor") else torch.as_tensor(t)


def loader(cases: Cases, *, batch_size: int, shuffle: bool, workers: int, device: torch.device,
           generator: torch.Generator | None = None) -> Any:
    """MONAI's DataLoader (list collation: a case's patches become rows of the batch); worker
    processes preprocess ahead of the model, pinned memory speeds the copy to a GPU."""
    from monai.data import DataLoader

    return DataLoader(cases.dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers,
                      pin_memory=device.type == "cuda", generator=generator,
                      persistent_workers=False)


def _seed_transforms(cases: Cases, generator: torch.Generator | None) -> None:
    """The random transforms' state from the node's round generator (reproducible, per node)."""
    if generator is not None and hasattr(cases.dataset.transform, "set_random_state"):
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        cases.dataset.transform.set_random_state(seed=seed)


def train_bundle(net: torch.nn.Module, task: BundleTask, cases: Cases, *, epochs: int,
                 device: torch.device | None = None, amp: bool = False, proximal_mu: float = 0.0,
                 generator: torch.Generator | None = None, workers: int = 0) -> TrainResult:
    """Train ``net`` in place for ``epochs`` passes over ``cases`` with the bundle's loss and
    optimizer (:func:`fl.learn.train.fit`); ``net`` is back on the CPU after."""
    device = device or torch.device("cpu")
    _seed_transforms(cases, generator)
    batches = loader(cases, batch_size=task.batch_size, shuffle=True, workers=workers, device=device,
                     generator=generator)

    def epoch_batches() -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        return ((_plain(b[IMAGE_KEY]), _plain(b[LABEL_KEY])) for b in batches)

    return fit(net, task.build_loss(), task.build_optimizer(net), epoch_batches, epochs=epochs, device=device,
               amp=amp, proximal_mu=proximal_mu)


def evaluate_bundle(net: torch.nn.Module, task: BundleTask, cases: Cases, *, device: torch.device | None = None,
                    workers: int = 0, amp: bool = False) -> EvalResult:
    """The bundle's loss, inferer, post-processing and Dice on every validation case, one whole
    volume at a time (:func:`fl.learn.bundle_eval.evaluate_bundle` with a batch of one: the dry run
    and the tests' reference); ``net`` is back on the CPU after."""
    from fl.learn.bundle_eval import evaluate_bundle as batched

    return batched(net, task, cases, device=device, workers=workers, amp=amp, batch_size=1)


def _case_batch(cases: Cases, chosen: list[int], views: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The chosen cases' training samples as ``(cases, samples per case, ...)``: a patch sampler's
    samples of one case stay together, as one record. ``views(sample) -> samples``: several
    augmented views of each sample, which stay with their case too."""
    images, labels = [], []
    for index in chosen:
        sample = cases.dataset[index]
        samples = sample if isinstance(sample, list) else [sample]
        if views is not None:
            samples = views(cases, index, samples)
        images.append(torch.stack([_plain(s[IMAGE_KEY]) for s in samples]))
        labels.append(torch.stack([_plain(s[LABEL_KEY]) for s in samples]))
    if len({tuple(i.shape) for i in images}) > 1:
        raise ValueError("local DP: every case must give the same number and size of training samples "
                         f"(got {sorted({tuple(i.shape) for i in images})}); use a fixed-size patch sampler")
    return torch.stack(images), torch.stack(labels)


def case_views(options: DpOptions, spatial_dims: int, generator: torch.Generator | None) -> Any:
    """``views(cases, index, samples) -> samples``: ``options.views`` augmented views of one
    case's training samples, or None for one view. ``flips``: random flips along every spatial axis and
    quarter turns in the first two (square planes only), MONAI dictionary transforms that move
    image and label together, on top of the bundle's own random transforms; ``bundle``: fresh
    draws of the bundle's own random training transforms only (where flips are not
    anatomy-preserving)."""
    if options.views == 1:
        return None
    from monai.transforms import Compose, RandFlipd, RandRotate90d

    keys = [IMAGE_KEY, LABEL_KEY]
    flips = Compose([RandFlipd(keys=keys, prob=0.5, spatial_axis=axis) for axis in range(spatial_dims)])
    turn = RandRotate90d(keys=keys, prob=0.75, max_k=3, spatial_axes=(0, 1))
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator)) if generator is not None else 0
    flips.set_random_state(seed=seed)
    turn.set_random_state(seed=seed + 1)

    def augment(sample: dict[str, Any]) -> dict[str, Any]:
        out = flips(dict(sample))
        image = _plain(out[IMAGE_KEY])
        return turn(out) if image.shape[1] == image.shape[2] else out

    def views(cases: Cases, index: int, samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if options.view_augment == "bundle":
            draws = [samples] + [cases.dataset[index] for _ in range(options.views - 1)]
            return [s for d in draws for s in (d if isinstance(d, list) else [d])]
        return [augment(s) for _ in range(options.views) for s in samples]

    return views


def per_case_gradients(net: torch.nn.Module, loss_fn: Any, images: torch.Tensor,
                       labels: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Each case's gradient of its own loss (on its own samples only), with ``torch.func``:
    ``vmap`` over cases of ``grad`` of the loss of one case. No term mixes two cases (BatchNorm
    is converted away), dropout draws independently per case. Returns the gradients by
    parameter name, shaped ``(cases, *parameter)``, and the cases' losses."""
    from torch.func import functional_call, grad_and_value, vmap

    params = {k: v.detach() for k, v in net.named_parameters() if v.requires_grad}
    buffers = dict(net.named_buffers())

    def case_loss(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return loss_fn(functional_call(net, (p, buffers), (x,)), y)

    return vmap(grad_and_value(case_loss), in_dims=(None, 0, 0), randomness="different")(params, images, labels)


def onehot_outside(loss_fn: torch.nn.Module) -> tuple[torch.nn.Module, bool]:
    """The loss with its one-hot encoding of the labels moved out (``vmap`` cannot batch MONAI's
    in-place ``one_hot``), and whether the caller must one-hot the labels: a copy of the loss with
    every ``to_onehot_y`` off. Dice on one-hot labels, and cross-entropy on one-hot class
    probabilities, equal the same losses on the label map."""
    import copy

    flagged = [m for m in loss_fn.modules() if getattr(m, "to_onehot_y", False)]
    if not flagged:
        return loss_fn, False
    loss_fn = copy.deepcopy(loss_fn)
    for module in loss_fn.modules():
        if getattr(module, "to_onehot_y", False):
            module.to_onehot_y = False
    return loss_fn, True


def _check_private(task: BundleTask, noise_multiplier: float, max_grad_norm: float) -> None:
    check_mechanism(noise_multiplier, max_grad_norm)
    if not task.private:
        raise ValueError("train_bundle_dp needs the task's private (DP-SGD ready) network")


def _one_hot(labels: torch.Tensor, classes: int) -> torch.Tensor:
    """Label maps ``(cases, views, 1, ...)`` as one-hot ``(cases, views, classes, ...)``."""
    from monai.networks.utils import one_hot

    return one_hot(labels.flatten(0, 1), classes).view(*labels.shape[:2], classes, *labels.shape[3:])


def _set_grad_samples(net: torch.nn.Module, named: list[tuple[str, torch.nn.Parameter]], loss_fn: Any,
                      images: torch.Tensor, labels: torch.Tensor) -> float:
    """Each sampled case's gradient into ``grad_sample`` (for the DP optimizer to clip); returns
    the summed loss of the cases."""
    grads, losses = per_case_gradients(net, loss_fn, images, labels)
    for name, p in named:
        p.grad_sample = grads[name].detach()
    return float(losses.detach().sum())


PER_CASE = ("auto", "ghost", "vmap")  # DpOptions.per_case


class PrivateStep:
    """One DP-SGD step's per-case clipping for a bundle network, by ``per_case``:

    - ``vmap``: today's path, every case's whole gradient with :func:`per_case_gradients`, then
      Opacus's DPOptimizer clips them;
    - ``ghost``: :class:`fl.learn.ghost.GhostClipper`, per-case norms and the clipped sum from one
      backward pass (ghost norm or per-case weight gradient per layer by the mixed rule, vmap of
      the module alone for norm layers and activations with parameters), no per-case gradient of
      the whole network;
    - ``auto``: ``ghost`` where the network allows it, else ``vmap`` (the reason is logged).

    The noise, its draw order and the update are the optimizer's either way. :attr:`method`
    names what ran (e.g. "ghost/mixed: 9 closed form, 3 ghost norm, 20 instantiate")."""

    def __init__(self, net: torch.nn.Module, per_case: str = "auto", *, rule: str = "mixed") -> None:
        from fl.learn.ghost import GhostClipper, Unsupported

        if per_case not in PER_CASE:
            raise ValueError(f"per-case method must be one of {PER_CASE}, got {per_case!r}")
        self.net, self.per_case, self.clipper, self.method = net, per_case, None, "torch.func vmap"
        self.fallback = ""
        if per_case != "vmap":
            try:
                self.clipper = GhostClipper(net, rule=rule)
            except Unsupported as exc:
                self._fall_back(exc)

    def _fall_back(self, exc: Exception) -> None:
        import logging

        if self.per_case == "ghost":
            raise exc
        if self.clipper is not None:
            self.clipper.close()
        self.clipper, self.method, self.fallback = None, "torch.func vmap", str(exc)
        logging.getLogger(__name__).info("local DP: ghost clipping does not apply (%s); per-case gradients by "
                                         "torch.func vmap", exc)

    def run(self, optimizer: Any, named: list[tuple[str, torch.nn.Parameter]], loss_fn: Any,
            images: torch.Tensor, labels: torch.Tensor) -> float:
        """Clip, noise and step for the sampled cases; returns their summed loss."""
        from fl.learn.ghost import Unsupported, summarise

        if self.clipper is not None:
            try:
                sums, _, losses = self.clipper.clipped_sum(loss_fn, images, labels, optimizer.max_grad_norm)
            except Unsupported as exc:
                self._fall_back(exc)
            else:
                self.method = summarise(self.clipper.methods())
                optimizer.step_clipped(sums)
                return float(losses.sum())
        loss = _set_grad_samples(self.net, named, loss_fn, images, labels)
        optimizer.step()
        return loss

    def close(self) -> None:
        if self.clipper is not None:
            self.clipper.close()


def train_bundle_dp(net: torch.nn.Module, task: BundleTask, cases: Cases, *, epochs: int, noise_multiplier: float,
                    max_grad_norm: float, noise: NoiseSource | None = None,
                    device: torch.device | None = None, options: DpOptions | None = None,
                    generator: torch.Generator | None = None) -> TrainResult:
    """DP-SGD over cases with the bundle's loss and optimizer (see the module's docstring).

    Per-case clipping is :class:`PrivateStep`'s (``options.per_case``): ghost/mixed clipping
    (:mod:`fl.learn.ghost`) by default; with ``vmap``, or where a layer rules ghost clipping out,
    :func:`per_case_gradients` (not Opacus's hooks, which forbid MONAI's in-place residual
    additions). The DP optimizer adds the noise (from ``noise``) and steps the bundle's optimizer.

    ``options`` (:class:`DpOptions`): which parameters train (the others keep the global model's
    values), how many augmented views of each sampled case its gradient averages before
    clipping, and the decay of the weight average that is released instead of the last iterate.
    None of them changes the mechanism the accountant charges. ``generator`` draws the views'
    random augmentations (not the sampling or the noise, which come from ``noise``)."""
    from fl.learn.dp_train import NoiseInjectedDPOptimizer
    from fl.privacy.accounting import local_event

    _check_private(task, noise_multiplier, max_grad_norm)
    noise, device, started = noise or SecureGaussian(), device or torch.device("cpu"), time.perf_counter()
    net.to(device)
    batch_size = task.batch_size
    event = local_event(len(cases), epochs=epochs, batch_size=batch_size, noise_multiplier=noise_multiplier)
    options = options or DpOptions()
    frozen = freeze_for_dp(net, options.trainable)
    optimizer = NoiseInjectedDPOptimizer(task.build_optimizer(net), noise_multiplier=noise_multiplier,
                                         max_grad_norm=max_grad_norm, expected_batch_size=batch_size,
                                         loss_reduction="mean", noise_source=noise)
    loss_fn, to_onehot = onehot_outside(task.build_loss())
    classes = task.out_channels
    named = [(k, p) for k, p in net.named_parameters() if p.requires_grad]
    views = case_views(options, task.spatial_dims, generator)
    average = WeightAverage(net, options.ema_decay) if options.ema_decay > 0 else None
    net.train()
    loss_sum, seen = 0.0, 0
    private_step = PrivateStep(net, options.per_case)
    try:
        for _ in range(event.steps):
            chosen = torch.from_numpy(noise.uniform(len(cases)) < event.sample_rate).nonzero().flatten().tolist()
            optimizer.zero_grad(set_to_none=True)
            if chosen:
                images, labels = _case_batch(cases, chosen, views)
                if to_onehot:
                    labels = _one_hot(labels, classes)
                loss_sum += private_step.run(optimizer, named, loss_fn, images.to(device), labels.to(device))
                seen += len(chosen)
            else:  # an empty Poisson sample still releases noise, as the accountant assumes
                for _, p in named:
                    p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
                optimizer.step()
            if average is not None:
                average.update(net)
        if average is not None:
            average.copy_to(net)
    finally:
        private_step.close()
        _restore(net, named, frozen)
    return TrainResult(loss=loss_sum / max(seen, 1), seconds=time.perf_counter() - started, steps=event.steps)


def _restore(net: torch.nn.Module, named: list[tuple[str, torch.nn.Parameter]],
             frozen: list[torch.nn.Parameter]) -> None:
    """``net`` as DP-SGD found it: no per-case gradients held, every parameter trainable, on the CPU."""
    for _, p in named:
        p.grad_sample = None
    for p in frozen:
        p.requires_grad_(True)
    net.to("cpu")
