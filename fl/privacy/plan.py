"""``fl privacy plan``: which guarantee a federation can carry, before anyone trains.

For a target (epsilon, delta) the plan calibrates each guarantee's noise over the whole run and
compares it with the largest signal the mechanism lets through, as one figure: the **run
noise-to-signal ratio** ``r = sigma * sqrt(d) / (B * sqrt(T))``. ``sigma`` is the noise
multiplier, ``d`` the number of trained parameters, ``B`` the expected number of contributions
averaged per step (a site's expected batch for record-level DP, the expected number of nodes for
client-level DP) and ``T`` the number of noisy steps (DP-SGD steps over all rounds, or rounds).
The noise's norm grows with ``sqrt(d)``; the clipped signal's norm is at most the clipping norm
per step and adds up over ``T`` steps while independent noise adds up as ``sqrt(T)``.

The verdict thresholds are anchored on ``fl bench privacy-utility`` (seg2d, 3 synthetic sites of
17-47 cases, training from scratch, non-private Dice 0.95): record-level DP at epsilon 8 (r 4-10)
kept Dice 0.73-0.85 (two full runs, 5 and 3 seeds), at epsilon 3 (r 8-21) 0.66-0.69, at epsilon 1
(r 21-55) 0.32-0.33; client-level DP over 3 nodes at epsilon 8 (r 48) 0.24. The same r predicts
both guarantees: what matters is how much noise each unit of signal carries, not which guarantee
it is. Public pretraining (``pretrain.source``) is not in the figure:
a network that already knows the task needs less signal, and the benchmark measures by how much.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from fl.privacy import accounting

CARRIES = 10.0  # r up to this: the run learns, with a loss of 0.1-0.2 Dice from scratch (measured at epsilon 8)
MARGINAL = 25.0  # up to this: a large loss (epsilon 3: Dice 0.66-0.69 of 0.95); beyond it: near the untrained model


def verdict(ratio: float) -> str:
    if ratio <= CARRIES:
        return "carries utility"
    if ratio <= MARGINAL:
        return "marginal"
    return "cannot carry utility"


@dataclass(frozen=True)
class Line:
    """One guarantee at one site (record level) or over the federation (client level)."""

    guarantee: str
    who: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    per_step: float  # noise std per coordinate over the clipped mean (units of the clipping norm)
    ratio: float  # the run noise-to-signal ratio r
    verdict: str


def record_level(cases: int, *, epsilon: float, delta: float, rounds: int, epochs: int, batch_size: int,
                 params: int) -> Line:
    """DP-SGD on one site of ``cases`` records, calibrated to ``epsilon`` over all rounds."""
    event = accounting.dp_sgd_event(cases, epochs=epochs, batch_size=batch_size, noise_multiplier=1.0)
    steps = event.steps * rounds
    sigma = accounting.dp_sgd_noise([cases], target_epsilon=epsilon, delta=delta, rounds=rounds, epochs=epochs,
                                    batch_size=batch_size)
    expected = event.sample_rate * cases
    ratio = sigma * math.sqrt(params) / (expected * math.sqrt(steps))
    return Line("record-level", f"site of {cases}", sigma, event.sample_rate, steps, sigma / expected, ratio,
                verdict(ratio))


def client_level(nodes: int, *, epsilon: float, delta: float, rounds: int, sample_rate: float, params: int) -> Line:
    """DP-FedAvg over ``nodes`` nodes (each in a round with ``sample_rate``), over all rounds."""
    sigma = accounting.calibrate(target_epsilon=epsilon, sample_rate=sample_rate, steps=rounds, delta=delta)
    return client_line(nodes, sigma, sample_rate=sample_rate, rounds=rounds, params=params)


def client_line(nodes: int, sigma: float, *, sample_rate: float, rounds: int, params: int) -> Line:
    expected = sample_rate * nodes
    ratio = sigma * math.sqrt(params) / (expected * math.sqrt(rounds))
    return Line("client-level", f"{nodes} nodes", sigma, sample_rate, rounds, sigma / expected, ratio,
                verdict(ratio))


def plan(*, nodes: int, cases: list[int], epsilon: float, delta: float, rounds: int, epochs: int, batch_size: int,
         params: int, client_sample_rate: float = 1.0) -> dict[str, Any]:
    """Both guarantees for the federation, each at ``epsilon``; the recommendation names the
    guarantee (or both) whose every line carries utility."""
    if len(cases) != nodes:
        raise ValueError(f"--cases: {len(cases)} counts for {nodes} nodes; give one per node, or --min-cases")
    if any(c < 1 for c in cases):
        raise ValueError("--cases: every site needs at least one case")
    record = [record_level(c, epsilon=epsilon, delta=delta, rounds=rounds, epochs=epochs, batch_size=batch_size,
                           params=params) for c in cases]
    client = client_level(nodes, epsilon=epsilon, delta=delta, rounds=rounds, sample_rate=client_sample_rate,
                          params=params)
    worst_record = max(line.ratio for line in record)
    # both: each guarantee gets its own epsilon, so the ratios are those above; the model's noise adds
    both_ratio = math.hypot(worst_record, client.ratio)
    options = {"record-level per site": worst_record, "client-level": client.ratio, "both": both_ratio}
    carried = [name for name, r in options.items() if r <= CARRIES]
    if carried:
        advice = (f"use {carried[0]}" + (" (both guarantees fit as well)" if "both" in carried else "")
                  + f": its run noise-to-signal ratio is {options[carried[0]]:.1f} (carries utility up to {CARRIES:g})")
    else:
        best = min(options, key=options.__getitem__)
        advice = (f"no guarantee carries utility from scratch at epsilon {epsilon:g}; the least noisy is {best} "
                  f"(r = {options[best]:.1f}). Pretrain on public data (pretrain.source), train fewer parameters "
                  "(local_dp.trainable), tune steps on a public proxy (fl privacy tune), or gather more cases "
                  "per site")
    return {"epsilon": epsilon, "delta": delta, "nodes": nodes, "cases": cases, "rounds": rounds, "epochs": epochs,
            "batch_size": batch_size, "trained_parameters": params,
            "lines": [asdict(line) for line in [*record, client]], "both_ratio": both_ratio,
            "thresholds": {"carries": CARRIES, "marginal": MARGINAL}, "advice": advice}
