"""Our accountants against Google's dp-accounting, an independent implementation."""

from __future__ import annotations

import json

import dp_accounting
import pytest
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import RdpAccountant
from hypothesis import given, settings
from hypothesis import strategies as st

from fl.cli import main
from fl.privacy.accounting import GaussianEvent, calibrate, combined_noise_multiplier, epsilon

SETTINGS = [  # (noise multiplier, sample rate, steps, delta)
    (1.0, 0.01, 1000, 1e-5),
    (1.1, 0.004, 10_000, 1e-5),
    (2.0, 1.0, 10, 1e-5),
    (5.0, 1.0, 100, 1e-6),
    (0.8, 0.25, 40, 1e-5),
    (1.5, 0.05, 2000, 1e-5),
    (3.0, 0.5, 50, 1e-4),
]


def _reference(z: float, q: float, steps: int, delta: float, accountant: str) -> float:
    acc = RdpAccountant() if accountant == "rdp" else pld_privacy_accountant.PLDAccountant()
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), steps)
    return float(acc.get_epsilon(delta))


@pytest.mark.parametrize(("z", "q", "steps", "delta"), SETTINGS)
def test_rdp_matches_dp_accounting_within_one_percent(z: float, q: float, steps: int, delta: float) -> None:
    ours = epsilon([GaussianEvent(z, q, steps)], delta, "rdp")
    assert ours == pytest.approx(_reference(z, q, steps, delta, "rdp"), rel=0.01)


@pytest.mark.parametrize(("z", "q", "steps", "delta"), SETTINGS[:5])
def test_prv_matches_dp_accounting_pld_and_rdp_never_undercuts_it(z: float, q: float, steps: int, delta: float) -> None:
    tight = _reference(z, q, steps, delta, "pld")
    assert epsilon([GaussianEvent(z, q, steps)], delta, "prv") == pytest.approx(tight, rel=0.03)
    assert epsilon([GaussianEvent(z, q, steps)], delta, "rdp") >= tight * 0.999


def test_history_composes_rather_than_summing_epsilons() -> None:
    one = GaussianEvent(1.0, 0.1, 50)
    assert epsilon([one, one], 1e-5) == pytest.approx(epsilon([GaussianEvent(1.0, 0.1, 100)], 1e-5), rel=1e-9)
    assert epsilon([one, one], 1e-5) < 2 * epsilon([one], 1e-5)
    assert epsilon([], 1e-5) == 0.0


def test_adaptive_clipping_count_costs_privacy() -> None:
    z = combined_noise_multiplier(1.0, 1.0)
    assert z == pytest.approx(2**-0.5)
    assert epsilon([GaussianEvent(z, 1.0, 10)], 1e-5) > epsilon([GaussianEvent(1.0, 1.0, 10)], 1e-5)


@settings(max_examples=12, deadline=None)
@given(target=st.floats(0.5, 20.0), q=st.sampled_from([0.01, 0.1, 1.0]), steps=st.integers(1, 300))
def test_calibrated_noise_never_overshoots_the_target(target: float, q: float, steps: int) -> None:
    sigma = calibrate(target_epsilon=target, sample_rate=q, steps=steps, delta=1e-5)
    assert epsilon([GaussianEvent(sigma, q, steps)], 1e-5) <= target
    assert epsilon([GaussianEvent(sigma * 0.98, q, steps)], 1e-5) > target * 0.97


def test_cli_estimate_and_calibrate(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--sample-rate", "0.01", "--steps", "1000", "--delta", "1e-5", "--json"]
    assert main(["privacy", "estimate", "--noise-multiplier", "1.0", *args]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["epsilon"] == pytest.approx(_reference(1.0, 0.01, 1000, 1e-5, "rdp"), rel=0.01)
    assert main(["privacy", "calibrate", "--target-epsilon", str(out["epsilon"]), *args]) == 0
    assert json.loads(capsys.readouterr().out)["noise_multiplier"] == pytest.approx(1.0, rel=0.01)
    assert main(["privacy", "estimate", "--noise-multiplier", "1", "--sample-rate", "2", "--steps", "1",
                 "--delta", "1e-5"]) == 2
    assert "--sample-rate: must be in (0, 1]" in capsys.readouterr().err


@pytest.mark.parametrize("accountant", ["pld", "prv"])
@pytest.mark.parametrize("z", [0.01, 0.05, 0.1])
def test_extreme_noise_fails_closed_instead_of_hanging(accountant: str, z: float) -> None:
    """PLD did not finish and PRV asked for 26 GB (or returned inf) at these multipliers."""
    from fl.privacy.accounting import AccountingError

    with pytest.raises(AccountingError, match=f"accountant {accountant}: .* past the 100"):
        epsilon([GaussianEvent(z, 0.1, 100)], 1e-5, accountant)


def test_cli_refuses_extreme_noise_and_a_delta_of_one(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["privacy", "estimate", "--noise-multiplier", "0.01", "--sample-rate", "0.1", "--steps", "100",
                 "--delta", "1e-5", "--accountant", "pld"]) == 2
    assert "raise the noise multiplier" in capsys.readouterr().err
    from fl import config
    from fl.errors import ConfigError

    for key in ("central_dp.delta", "node_policy.delta"):
        with pytest.raises(ConfigError, match=f"{key}: must be in \\(0, 1\\)"):
            config.from_flat({key: 1.0})
