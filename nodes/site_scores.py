"""A site's confidence interval around its validation score (``fl validate``), computed on the node.

- Exact release (the node's policy allows exact metrics): the percentile bootstrap of the mean
  per-case score (Efron and Tibshirani 1993), ``resamples`` resamples drawn with a generator seeded
  from the dataset's digest, so the same data gives the same interval. Only the two quantiles leave
  the node, never a case's score.
- Noisy release (DP, charged to the ledger): the interval is post-processing of public quantities
  only, the noisy mean, the case count and the noise's std: ``m +- z * sqrt(1/(4n) + (sigma/n)^2)``,
  the normal interval with the largest variance a score in [0, 1] can have plus the noise's. No
  statistic of the records enters it.
- Per-class scores of a multi-class task: exact, each class's mean over the cases that hold it
  with its bootstrap interval (:func:`class_intervals`); or noisy (:func:`noisy_class_scores`):
  for every class the sum of its Dice and the number of cases holding it, all 2C values with one
  Gaussian noise of std ``z sqrt(2C)`` (one case moves each by at most 1), charged as one more
  Gaussian mechanism of multiplier z.
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np
import torch

from nodes.policy import node_secret

SITE_ID_CONTEXT = b"oncofed-site-id"


def site_id(folder: Path) -> str:
    """This node's pseudonymous id: an HMAC under its own key, stable across datasets and runs."""
    return hmac.new(node_secret(folder), SITE_ID_CONTEXT, hashlib.sha256).hexdigest()[:16]


def bootstrap_interval(scores: torch.Tensor, *, resamples: int, confidence: float, digest: str) -> tuple[float, float]:
    values = scores.double().numpy()
    if len(values) == 0:
        return 0.0, 1.0
    rng = np.random.default_rng(int(digest[:16], 16))
    means = values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low), float(high)


def noisy_interval(noisy_mean: float, count: int, noise_multiplier: float, confidence: float) -> tuple[float, float]:
    z = NormalDist().inv_cdf((1 + confidence) / 2)
    n = max(count, 1)
    half = z * (0.25 / n + (noise_multiplier / n) ** 2) ** 0.5
    return max(0.0, noisy_mean - half), min(1.0, noisy_mean + half)


def class_intervals(class_scores: torch.Tensor, *, resamples: int, confidence: float,
                    digest: str) -> list[tuple[float, float, float, int]]:
    """Per class: (mean Dice over the cases that hold the class, bootstrap interval, those cases),
    for an exact release of a multi-class task's per-class scores."""
    out = []
    for c in range(class_scores.shape[1]):
        column = class_scores[:, c]
        present = column[~torch.isnan(column)]
        if len(present) == 0:
            out.append((float("nan"), float("nan"), float("nan"), 0))
            continue
        low, high = bootstrap_interval(present, resamples=resamples, confidence=confidence, digest=digest)
        out.append((float(present.mean()), low, high, len(present)))
    return out


def noisy_class_scores(class_scores: torch.Tensor, noise_multiplier: float, source: Any,
                       confidence: float) -> list[tuple[float, float, float, float]]:
    """Per class: (noisy mean Dice over the cases that hold it, interval, noisy count of those
    cases), from ``class_scores`` [cases, classes] (NaN where a case lacks the class). The interval
    uses the released values only: ``m +- z sqrt(1/(4n) + sigma^2 (1 + m^2) / n^2)`` with n the noisy
    count (at least 1), the sampling variance a score in [0, 1] can have plus the ratio's noise."""
    present = ~torch.isnan(class_scores)
    sums = torch.where(present, class_scores, torch.zeros_like(class_scores)).double().clamp(0, 1).sum(0)
    counts = present.double().sum(0)
    classes = class_scores.shape[1]
    std = noise_multiplier * (2 * classes) ** 0.5
    noisy = torch.cat([sums, counts]) + source.gaussian((2 * classes,), std).double()
    z = NormalDist().inv_cdf((1 + confidence) / 2)
    out = []
    for c in range(classes):
        n = max(float(noisy[classes + c]), 1.0)
        mean = min(max(float(noisy[c]) / n, 0.0), 1.0)
        half = z * (0.25 / n + std ** 2 * (1 + mean ** 2) / n ** 2) ** 0.5
        out.append((mean, max(0.0, mean - half), min(1.0, mean + half), float(noisy[classes + c])))
    return out
