"""L2 norm and clipping of a model update, all arrays taken as one vector (float64).

One definition serves the server's update validation, server-side central-DP clipping and
the node's client-side clipping, so the bound a node enforces is the one the server checks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np


def l2_norm(update: Mapping[str, np.ndarray]) -> float:
    """sqrt(sum of squares) over every array of ``update``."""
    return math.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in update.values()))


def clip(update: Mapping[str, np.ndarray], norm_bound: float) -> tuple[dict[str, np.ndarray], float]:
    """Scale ``update`` to L2 norm at most ``norm_bound``; returns it and its norm before clipping."""
    norm = l2_norm(update)
    factor = min(1.0, norm_bound / norm) if norm > 0 else 1.0
    return {k: v * factor for k, v in update.items()}, norm
