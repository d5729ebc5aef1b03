"""Distributed discrete Gaussian noise under SecAgg+ (``secagg.noise = "distributed"``).

With server-side noise the coordinator unmasks the exact sum of the clipped updates and adds
the noise itself: the nodes must trust it. Here every node adds its share of the noise before
masking, so the sum the coordinator unmasks already carries it (Kairouz, Liu, Steinke 2021,
"The Distributed Discrete Gaussian Mechanism for Federated Learning with Secure Aggregation").

SecAgg+ works on integers: Flower's ``secaggplus_mod`` clips each coordinate to ``[-r, r]`` and
rounds ``(x + r) T / 2r`` stochastically to an integer (``T`` = the quantisation range). A
continuous Gaussian added before that rounding would be post-processed node by node, and the
sum would not be a Gaussian of the claimed variance. So each node encodes its update on that
integer grid itself, with step ``s = 2r / T`` (a power of two: ``r`` is one here), and the
mod's own rounding has nothing left to do:

1. clip the update to L2 norm ``C``; scale by ``1/s``;
2. round each coordinate stochastically to an integer, conditioned on the rounded vector's
   norm staying within ``B`` (Kairouz et al., section 4.1), so one node's contribution has L2
   sensitivity ``B`` on the integer grid whatever the rounding drew;
3. add discrete Gaussian noise ``N_Z(0, sigma_node^2)`` per coordinate, with
   ``sigma_node = z B / sqrt(t)``, ``t`` the guaranteed minimum number of contributors;
4. check every coordinate lies within ``[-r, r]`` (``r`` is chosen so that this fails with
   probability below 1e-30 per coordinate; a node that sees it fail refuses the round
   rather than let SecAgg+ clip its noise);
5. send ``j s``: an exact multiple of the step, which the mod maps to the integer ``j + T/2``.

The unmasked sum of ``n >= t`` contributions is the sum of the rounded updates plus the sum of
``n`` discrete Gaussians of variance ``sigma_node^2``: at least ``t sigma_node^2 = (z B)^2``.
A sum of discrete Gaussians is not exactly a discrete Gaussian; it is within
``tau = 10 sum_{k=1}^{t-1} exp(-2 pi^2 sigma_node^2 k / (k+1))`` of one (Kairouz et al.,
Theorem 1, Proposition 14), and a discrete Gaussian is at least as private as the continuous
Gaussian of the same variance (Canonne, Kamath, Steinke 2020). With ``sigma_node`` in the
hundreds of thousands of grid steps here, ``tau`` underflows to 0; :func:`plan` refuses any
setting where it exceeds 1e-10. The round is therefore accounted as the Gaussian mechanism with
multiplier ``z`` on sensitivity ``B s`` (>= ``C``, by about 1e-3 relative), exactly as
server-side noise is, Poisson sampling of nodes included.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fl.privacy.noise import NoiseSource

BETA = math.exp(-0.5)  # conditional rounding: P(norm bound violated) per try (Kairouz et al.)
TAU_LIMIT = 1e-10
RANGE_SIGMAS = 12.0  # r >= C + 12 sigma_node s: P(|noise| > 12 sigma) < 4e-33 per coordinate
MAX_ROUNDING_TRIES = 100


def clipping_range(clip: float, noise_multiplier: float, min_contributors: int) -> float:
    """The SecAgg+ coordinate range ``r`` for distributed noise: a power of two that holds a
    clipped coordinate plus 12 standard deviations of one node's noise share."""
    need = clip * (1 + RANGE_SIGMAS * noise_multiplier * 1.01 / math.sqrt(min_contributors))
    return float(2 ** math.ceil(math.log2(need)))


@dataclass(frozen=True)
class Plan:
    """One node's encoding, fixed by public settings: clip, multiplier, contributors, grid."""

    clip: float
    noise_multiplier: float
    min_contributors: int
    dim: int
    range_: float  # SecAgg+ clipping range r
    target_range: int  # SecAgg+ quantisation range T

    @property
    def step(self) -> float:
        return 2 * self.range_ / self.target_range

    @property
    def bound(self) -> float:
        """B: the L2 norm of a rounded update on the integer grid never exceeds it."""
        c, d = self.clip / self.step, self.dim
        return math.sqrt(c * c + d / 4 + math.sqrt(2 * math.log(1 / BETA)) * (c + math.sqrt(d) / 2))

    @property
    def node_sigma(self) -> float:
        """Each node's discrete Gaussian std, in grid steps."""
        return self.noise_multiplier * self.bound / math.sqrt(self.min_contributors)

    @property
    def tau(self) -> float:
        s2 = self.node_sigma**2
        return 10 * sum(math.exp(-2 * math.pi**2 * s2 * k / (k + 1)) for k in range(1, self.min_contributors))

    @property
    def sum_std(self) -> float:
        """Std of the noise on the unmasked sum of ``min_contributors`` contributions, in model units."""
        return self.node_sigma * math.sqrt(self.min_contributors) * self.step


def plan(*, clip: float, noise_multiplier: float, min_contributors: int, dim: int, range_: float,
         target_range: int) -> Plan:
    """Validate a node's encoding; raises ValueError naming what cannot be honoured."""
    if not (math.isfinite(clip) and clip > 0 and math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise ValueError(f"distributed noise: clip {clip} and noise multiplier {noise_multiplier} must be > 0")
    if min_contributors < 1 or dim < 1:
        raise ValueError(f"distributed noise: {min_contributors} contributors, {dim} coordinates")
    exponent = math.log2(range_) if range_ > 0 else math.nan
    if not (math.isfinite(exponent) and exponent == int(exponent)) or target_range % 2 or target_range < 2:
        raise ValueError(f"distributed noise: SecAgg+ range {range_} and quantisation {target_range} must be "
                         "powers of two, or the encoding is not exact")
    p = Plan(clip, noise_multiplier, min_contributors, dim, range_, target_range)
    if p.clip + RANGE_SIGMAS * p.node_sigma * p.step > range_:
        raise ValueError(f"distributed noise: SecAgg+ range {range_} cannot hold a clipped coordinate plus "
                         f"{RANGE_SIGMAS:g} noise standard deviations ({p.node_sigma * p.step:.3g} each)")
    if p.tau > TAU_LIMIT:
        raise ValueError(f"distributed noise: the sum of {min_contributors} discrete Gaussians is {p.tau:.2g} "
                         "away from one; the step is too coarse for this noise")
    return p


def discrete_gaussian(n: int, sigma: float, source: NoiseSource) -> np.ndarray:
    """``n`` samples of the discrete Gaussian N_Z(0, sigma^2), by rejection from the discrete
    Laplace (Canonne, Kamath, Steinke 2020, Algorithm 3), vectorised; uniforms from ``source``."""
    t = math.floor(sigma) + 1
    out = np.empty(n, dtype=np.int64)
    todo = np.arange(n)
    while todo.size:
        u = source.uniform(3 * todo.size).reshape(3, -1)
        # discrete Laplace(t) as the difference of two geometrics with P(G >= k) = exp(-k/t)
        y = np.floor(-t * np.log(u[0])) - np.floor(-t * np.log(u[1]))
        accept = u[2] <= np.exp(-((np.abs(y) - sigma**2 / t) ** 2) / (2 * sigma**2))
        out[todo[accept]] = y[accept].astype(np.int64)
        todo = todo[~accept]
    return out


def encode(update: np.ndarray, p: Plan, source: NoiseSource) -> np.ndarray:
    """A flat update (float64) -> its noisy, exactly representable encoding ``j s`` (float64)."""
    if update.shape != (p.dim,):
        raise ValueError(f"distributed noise: update of shape {update.shape}, plan for {p.dim} coordinates")
    norm = float(np.linalg.norm(update))
    if not math.isfinite(norm):
        raise ValueError("distributed noise: the update is not finite")
    scaled = update * (min(1.0, p.clip / norm) if norm > 0 else 1.0) / p.step
    floor = np.floor(scaled)
    for _ in range(MAX_ROUNDING_TRIES):
        rounded = floor + (source.uniform(p.dim) <= scaled - floor)
        if float(np.linalg.norm(rounded)) <= p.bound:
            break
    else:
        raise ValueError("distributed noise: conditional rounding did not meet its norm bound")
    j = rounded.astype(np.int64) + discrete_gaussian(p.dim, p.node_sigma, source)
    limit = round(p.range_ / p.step)
    if np.abs(j).max(initial=0) > limit:
        raise ValueError("distributed noise: a noisy coordinate left the SecAgg+ range; refusing to send it clipped")
    return j.astype(np.float64) * p.step
