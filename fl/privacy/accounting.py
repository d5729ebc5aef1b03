"""Privacy accounting for both guarantees: (epsilon, delta) from a history of mechanisms.

A history is a tuple of :class:`GaussianEvent`: ``steps`` applications of a Gaussian
mechanism with ``noise_multiplier`` on a Poisson sample taken with probability
``sample_rate`` (1.0: everyone). Client-level DP records one event per round
(nodes sampled, clipped update plus, with adaptive clipping, the noisy clipped-count folded
in); record-level DP on a node records one event per local training (records sampled,
DP-SGD steps). Epsilon is always computed from the whole history, never summed.

Accountants: ``rdp`` (Renyi DP of the sampled Gaussian, Mironov et al. 2019, with the
conversion of Balle et al. 2020; Opacus's analysis), ``prv`` (privacy random variables,
Gopi et al. 2021; Opacus) and ``pld`` (privacy loss distributions; Google's dp-accounting).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from fl.errors import OncoFedError

ACCOUNTANTS = ("rdp", "prv", "pld")
RDP_ORDERS: tuple[float, ...] = tuple(
    [1 + x / 10.0 for x in range(1, 100)] + list(range(11, 64)) + [80, 128, 256, 512, 1024]
)


@dataclass(frozen=True)
class GaussianEvent:
    """``steps`` Poisson-sampled Gaussian mechanisms (sensitivity-normalised noise multiplier)."""

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise ValueError(f"noise_multiplier must be > 0, got {self.noise_multiplier}")
        if not (0 < self.sample_rate <= 1):
            raise ValueError(f"sample_rate must be in (0, 1], got {self.sample_rate}")
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> GaussianEvent:
        return cls(float(raw["noise_multiplier"]), float(raw["sample_rate"]), int(raw["steps"]))


def dp_sgd_event(num_examples: int, *, epochs: int, batch_size: int, noise_multiplier: float) -> GaussianEvent:
    """DP-SGD over ``num_examples`` records: ``epochs`` passes in expectation of
    ``ceil(n / batch_size)`` Poisson-sampled steps each, at rate ``batch_size / n``."""
    q = min(1.0, batch_size / num_examples)
    return GaussianEvent(noise_multiplier, q, epochs * max(1, math.ceil(num_examples / batch_size)))


def dp_sgd_noise(counts: Sequence[int], *, target_epsilon: float, delta: float, rounds: int, epochs: int,
                 batch_size: int) -> float:
    """The DP-SGD noise multiplier that keeps a site of each of ``counts`` records within
    ``target_epsilon`` after ``rounds`` rounds of :func:`dp_sgd_event` (the largest over the sites)."""
    sigmas = []
    for n in counts:
        event = dp_sgd_event(n, epochs=epochs, batch_size=batch_size, noise_multiplier=1.0)
        sigmas.append(calibrate(target_epsilon=target_epsilon, sample_rate=event.sample_rate,
                                steps=event.steps * rounds, delta=delta))
    return max(sigmas)


def combined_noise_multiplier(update_multiplier: float, count_stddev: float) -> float:
    """One Gaussian mechanism equivalent to releasing the clipped update (multiplier ``z``)
    and the clipped-count (sensitivity 1, std ``s``) on the same sample: their RDP adds,
    ``a/(2 z^2) + a/(2 s^2) = a/(2 z_eff^2)`` (Andrew et al. 2021, section 3)."""
    return (update_multiplier**-2 + count_stddev**-2) ** -0.5


def _rdp_epsilon(events: Sequence[GaussianEvent], delta: float) -> float:
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    total = sum(
        compute_rdp(q=e.sample_rate, noise_multiplier=e.noise_multiplier, steps=e.steps, orders=list(RDP_ORDERS))
        for e in events
    )
    epsilon, _ = get_privacy_spent(orders=list(RDP_ORDERS), rdp=total, delta=delta)
    return float(epsilon)


def _prv_epsilon(events: Sequence[GaussianEvent], delta: float) -> float:
    from opacus.accountants import PRVAccountant

    accountant = PRVAccountant()
    accountant.history = [(e.noise_multiplier, e.sample_rate, e.steps) for e in events]
    return float(accountant.get_epsilon(delta=delta))


def _pld_epsilon(events: Sequence[GaussianEvent], delta: float) -> float:
    import dp_accounting
    from dp_accounting.pld import pld_privacy_accountant

    accountant = pld_privacy_accountant.PLDAccountant()
    for e in events:
        accountant.compose(
            dp_accounting.PoissonSampledDpEvent(e.sample_rate, dp_accounting.GaussianDpEvent(e.noise_multiplier)),
            e.steps,
        )
    return float(accountant.get_epsilon(delta))


# PLD and PRV discretise the privacy loss; for a history whose RDP bound is past this, their
# grids grow without bound (z = 0.1, q = 0.1, 100 steps: PLD 20 s and 1.6 GB, PRV 3.8 GB and
# an infinite epsilon; z = 0.01: PRV asks for 26 GB, PLD does not finish). Such an epsilon is
# no guarantee worth refining, so they refuse it instead of hanging or running out of memory.
FINE_ACCOUNTANT_LIMIT = 100.0


class AccountingError(OncoFedError, ValueError):
    """The accountant cannot give a finite, trustworthy epsilon for this history."""


def epsilon(events: Iterable[GaussianEvent], delta: float, accountant: str = "rdp") -> float:
    """Epsilon of the whole history at ``delta``; 0 for an empty history.

    Fails closed: a history whose epsilon is not finite, or too large for PLD/PRV to compute in
    bounded time and memory, raises :class:`AccountingError` naming the accountant.
    """
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {', '.join(ACCOUNTANTS)}, got {accountant!r}")
    history = [e for e in events if e.steps > 0]
    if not history:
        return 0.0
    if accountant != "rdp":
        bound = _rdp_epsilon(history, delta)  # cheap, and an upper bound on what PLD/PRV give
        if not bound <= FINE_ACCOUNTANT_LIMIT:
            raise AccountingError(
                f"accountant {accountant}: this history's epsilon is {bound:.4g} by RDP, past the "
                f"{FINE_ACCOUNTANT_LIMIT:g} that {accountant.upper()} can refine in bounded memory; raise the noise "
                "multiplier or lower the steps or sample rate (or use the rdp accountant)"
            )
    value = {"rdp": _rdp_epsilon, "prv": _prv_epsilon, "pld": _pld_epsilon}[accountant](history, delta)
    if not math.isfinite(value):
        raise AccountingError(f"accountant {accountant}: epsilon is not finite for this history")
    return value


def calibrate(
    *, target_epsilon: float, sample_rate: float, steps: int, delta: float, accountant: str = "rdp",
    prior: Sequence[GaussianEvent] = (), tolerance: float = 0.005,
) -> float:
    """The smallest noise multiplier (within ``tolerance`` relative) keeping epsilon <= target.

    ``prior`` is history already spent; the result never overshoots the target.
    """
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ValueError(f"target epsilon must be > 0, got {target_epsilon}")

    def eps(sigma: float) -> float:
        try:
            return epsilon([*prior, GaussianEvent(sigma, sample_rate, steps)], delta, accountant)
        except AccountingError:  # far past any target: search higher
            return math.inf

    low, high = 0.05, 1.0
    while eps(high) > target_epsilon:
        low, high = high, high * 2
        if high > 1e4:
            raise ValueError(f"epsilon {target_epsilon} is out of reach (already spent or too many steps)")
    while (high - low) / high > tolerance:
        mid = (low + high) / 2
        low, high = (mid, high) if eps(mid) > target_epsilon else (low, mid)
    return high


def local_event(num_examples: int, *, epochs: int, batch_size: int, noise_multiplier: float) -> GaussianEvent:
    """The mechanism one private training call on a node applies to its records
    (:func:`fl.learn.dp_train.train_local_dp`, :func:`fl.learn.bundle_train.train_bundle_dp`)."""
    return dp_sgd_event(num_examples, epochs=epochs, batch_size=batch_size, noise_multiplier=noise_multiplier)
