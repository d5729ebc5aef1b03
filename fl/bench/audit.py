"""Empirical privacy audit: canaries, a membership attack, and a lower bound on epsilon.

Following Jagielski et al. (2020, "Auditing differentially private machine learning: how
private is private SGD?"):

1. ``2K`` canaries are drawn: noise images with a random rectangle as their label, so the only
   way a model can fit one is to memorise it. ``K`` of them (the *members*) are added to node
   0's training set; the other ``K`` are never seen.
2. The federation trains as configured (no DP, local DP, central DP).
3. The attack scores each canary by the final global model's loss on it (members should have
   lower loss). Half of the canaries pick the loss threshold; on the other half the attack's
   true- and false-positive rates get one-sided 95% Clopper-Pearson bounds, and
   ``eps_lower = max(ln((TPR_lo - delta) / FPR_hi), ln((1 - FPR_hi - delta) / (1 - TPR_lo)))``.

Any (epsilon, delta)-DP training bounds every such attack, so ``eps_lower`` must stay below the
accountant's claim (with 95% confidence); without DP it shows how much a model memorises. The
bound is loose by construction (it tests one attack, with 2K samples).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fl.bench import runners as bench_runners
from fl.bench.suite import runner

if TYPE_CHECKING:
    from fl.bench.suite import Cell, Row, Suite


def clopper_pearson(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """One-sided lower and upper bounds on a binomial proportion at ``confidence``."""
    from scipy.stats import beta

    alpha = 1 - confidence
    low = 0.0 if successes == 0 else float(beta.ppf(alpha, successes, trials - successes + 1))
    high = 1.0 if successes == trials else float(beta.ppf(1 - alpha, successes + 1, trials - successes))
    return low, high


def epsilon_lower_bound(tp: int, positives: int, fp: int, negatives: int, delta: float) -> float:
    """The epsilon an attack with these counts proves, at 95% confidence (0 if none)."""
    tpr_lo, _ = clopper_pearson(tp, positives)
    _, fpr_hi = clopper_pearson(fp, negatives)
    candidates = [0.0]
    if fpr_hi > 0 and tpr_lo - delta > 0:
        candidates.append(math.log((tpr_lo - delta) / fpr_hi))
    if 1 - tpr_lo > 0 and 1 - fpr_hi - delta > 0:
        candidates.append(math.log((1 - fpr_hi - delta) / (1 - tpr_lo)))
    return max(candidates)


def attack(member_loss: np.ndarray, outsider_loss: np.ndarray, delta: float, seed: int) -> dict[str, float]:
    """Threshold attack: pick the threshold on one half, bound epsilon on the other."""
    rng = np.random.default_rng(seed)
    m, o = rng.permutation(member_loss), rng.permutation(outsider_loss)
    m_pick, m_test = m[: len(m) // 2], m[len(m) // 2:]
    o_pick, o_test = o[: len(o) // 2], o[len(o) // 2:]
    thresholds = np.unique(np.concatenate([m_pick, o_pick]))
    best, best_t = -1.0, float(thresholds[0])
    for t in thresholds:
        tp, fp = int((m_pick <= t).sum()), int((o_pick <= t).sum())
        eps = epsilon_lower_bound(tp, len(m_pick), fp, len(o_pick), delta)
        if eps > best:
            best, best_t = eps, float(t)
    tp, fp = int((m_test <= best_t).sum()), int((o_test <= best_t).sum())
    return {"eps_lower": epsilon_lower_bound(tp, len(m_test), fp, len(o_test), delta),
            "attack_tpr": tp / len(m_test), "attack_fpr": fp / len(o_test),
            "loss_gap": float(np.median(outsider_loss) - np.median(member_loss))}


def make_canaries(count: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` noise images (size x size) each with a random rectangle as its label."""
    rng = np.random.default_rng(10_000 + seed)
    images = rng.random((count, size, size)).astype(np.float32)
    labels = np.zeros((count, size, size), dtype=np.uint8)
    for i in range(count):
        h, w = rng.integers(size // 4, size // 2, size=2)
        y, x = rng.integers(0, size - h), rng.integers(0, size - w)
        labels[i, y:y + h, x:x + w] = 1
    return images, labels


def plant(node: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """Add the canaries to ``node``'s training list (NIfTI files beside the real cases)."""
    import nibabel as nib

    folder = node / "canaries"
    folder.mkdir()
    manifest_path = node / "dataset.json"
    manifest = json.loads(manifest_path.read_text())
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        for kind, array in (("image", image), ("label", label)):
            nib.save(nib.Nifti1Image(array, np.eye(4)), folder / f"canary_{i:03d}_{kind}.nii.gz")
        manifest["training"].append({"image": f"./canaries/canary_{i:03d}_image.nii.gz",
                                     "label": f"./canaries/canary_{i:03d}_label.nii.gz"})
    manifest["numTraining"] = len(manifest["training"])
    manifest_path.write_text(json.dumps(manifest, indent=2))


def canary_losses(run_dir: Path, task_name: str, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-canary loss of the run's final global model (the same preprocessing as training)."""
    import torch
    from safetensors.torch import load_file

    from fl.learn import IMAGE_KEY, LABEL_KEY, get_task

    task = get_task(task_name)
    net = task.build_network()
    net.load_state_dict(load_file(run_dir / "model.safetensors"))
    net.eval()
    loss_fn, prep = task.build_loss(), task.preprocess()
    out = []
    with torch.no_grad():
        for image, label in zip(images, labels, strict=True):
            sample = prep({IMAGE_KEY: image, LABEL_KEY: label})
            logits = net(sample[IMAGE_KEY][None])
            out.append(float(loss_fn(logits, sample[LABEL_KEY][None])))
    return np.array(out)


@runner("privacy-audit")
def audit_cell(suite: Suite, cell: Cell, seed: int, out: Path) -> Row:
    """One audit: plant, train (a ``federation`` cell), attack."""
    k = int(suite.settings.get("canaries", 100))
    size = int(suite.settings.get("image_size", 32))
    _, _, cfg = bench_runners.cell_config(suite, cell, seed)
    pristine = bench_runners.prepare_data(suite, cfg.data.nodes, cfg.task, seed, out)
    planted = out / "data" / f"planted-{k}-seed{seed}"
    images, labels = make_canaries(2 * k, size, seed)
    if not planted.exists():
        staging = out / "data" / f".planted-{k}-seed{seed}"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(pristine, staging)
        plant(staging / "node-0", images[:k], labels[:k])
        staging.rename(planted)
    delta = float(suite.settings.get("delta", 1e-5))
    run_dir, summary, _, _ = bench_runners.run_cell(suite, cell, seed, out, planted)
    losses = canary_losses(run_dir, cfg.task, images, labels)
    result = attack(losses[:k], losses[k:], delta, seed)
    privacy = summary.get("privacy") or {}
    record = [v["epsilon"] for v in (privacy.get("record_level") or {}).values()]
    client = (privacy.get("client_level") or {}).get("epsilon")
    claims = [e for e in (max(record) if record else None, client) if e is not None]
    return {"eps_claimed": min(claims) if claims else None, **result,
            "dice": summary["final_metrics"].get("dice"), "canaries": k}

