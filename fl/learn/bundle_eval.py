"""Validation of a bundle task on a node, batched as the bundle's own evaluator batches.

A bundle's ``SupervisedEvaluator`` takes ``validate#dataloader#batch_size`` cases per step, runs its
inferer (e.g. a sliding window, ``sw_batch_size`` windows per forward pass) on the batch, then its
post-processing on each case. :func:`evaluate_bundle` does the same with OncoFed's own loop: up to
:attr:`~fl.learn.bundle.BundleTask.eval_batch_size` consecutive cases of one shape go through the
inferer together (cases of another shape start a new batch: each case keeps its own size), the
bundle's inferer settings unchanged; the loss, the post-processing and the key metric stay per case.
The network normalises per case in evaluation (instance or group norm, or BatchNorm's running
statistics), so a case's scores do not depend on the batch it ran in (to float rounding).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from fl.learn import IMAGE_KEY, LABEL_KEY
from fl.learn.train import EvalResult

if TYPE_CHECKING:
    from fl.learn.bundle import BundleTask
    from fl.learn.cases import Cases


def _plain(t: Any) -> torch.Tensor:
    """A MetaTensor's data as a plain tensor (no metadata tracking inside the network)."""
    return t.as_tensor() if hasattr(t, "as_tensor") else torch.as_tensor(t)


def _batches(cases: Cases, size: int, workers: int) -> Any:
    """``(images, labels)`` of up to ``size`` consecutive cases of one shape, in the cases' order."""
    from monai.data import DataLoader

    images: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    for batch in DataLoader(cases.dataset, batch_size=1, shuffle=False, num_workers=workers):
        image, label = _plain(batch[IMAGE_KEY]), _plain(batch[LABEL_KEY])
        if images and (len(images) == size or image.shape[1:] != images[0].shape[1:]
                       or label.shape[1:] != labels[0].shape[1:]):
            yield torch.cat(images), torch.cat(labels)
            images, labels = [], []
        images.append(image)
        labels.append(label)
    if images:
        yield torch.cat(images), torch.cat(labels)


@torch.no_grad()
def evaluate_bundle(net: torch.nn.Module, task: BundleTask, cases: Cases, *, device: torch.device | None = None,
                    workers: int = 0, amp: bool = False, batch_size: int | None = None) -> EvalResult:
    """The bundle's loss, inferer, post-processing and Dice on every validation case (whole volumes,
    ``batch_size`` cases of one shape at a time: by default the bundle's evaluator's); ``net`` is back
    on the CPU after. The loss is each case's own, averaged over cases."""
    from monai.data import decollate_batch

    device = device or torch.device("cpu")
    amp = amp and device.type == "cuda"
    net.to(device)
    net.eval()
    loss_fn, inferer, post = task.build_loss(), task.inferer(), task.postprocessing()
    size = batch_size or task.eval_batch_size
    loss_sum, scores, per_class = 0.0, [], []
    for images, labels in _batches(cases, size, workers):
        image = images.to(device, non_blocking=True)
        label = labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            logits = inferer(image, net).float()
        for i in range(len(logits)):
            loss_sum += float(loss_fn(logits[i:i + 1], label[i:i + 1]))
        items = [post(item) for item in decollate_batch({"pred": logits, LABEL_KEY: label})]
        preds = torch.stack([_plain(i["pred"]) for i in items])
        truth = torch.stack([_plain(i[LABEL_KEY]) for i in items])
        case_scores, class_scores = task.scores(preds, truth)
        scores.append(case_scores.double().cpu())
        per_class.append(class_scores.double().cpu())
    net.to("cpu")
    if not scores:
        return EvalResult(loss=0.0, score=0.0, record_scores=torch.zeros(0, dtype=torch.float64))
    per_case = torch.cat(scores)
    return EvalResult(loss=loss_sum / len(per_case), score=float(per_case.mean()), record_scores=per_case,
                      class_scores=torch.cat(per_class))
