from __future__ import annotations

import numpy as np
import pytest
import torch

from fl.privacy.noise import SecureGaussian, SeededGaussian


def test_seeding_torch_and_numpy_does_not_reproduce_the_default_noise() -> None:
    draws = []
    for _ in range(2):
        torch.manual_seed(0)
        np.random.seed(0)
        draws.append(SecureGaussian().gaussian((1000,), 1.0))
    assert not torch.equal(draws[0], draws[1])
    assert float((draws[0] - draws[1]).abs().mean()) > 0.5


def test_secure_noise_has_the_requested_std_and_zero_mean() -> None:
    sample = SecureGaussian().gaussian((400_000,), 2.5).double()
    assert float(sample.std()) == pytest.approx(2.5, rel=0.01)
    assert abs(float(sample.mean())) < 0.02
    # normal, not uniform: about 68.3% within one std
    assert float((sample.abs() < 2.5).double().mean()) == pytest.approx(0.6827, abs=0.005)


def test_secure_uniforms_are_in_the_open_unit_interval() -> None:
    u = SecureGaussian().uniform(100_000)
    assert u.min() > 0 and u.max() <= 1 and abs(u.mean() - 0.5) < 0.01


def test_seeded_source_is_reproducible_only_when_injected() -> None:
    assert torch.equal(SeededGaussian(3).gaussian((10,), 1.0), SeededGaussian(3).gaussian((10,), 1.0))
    with pytest.raises(ValueError):
        SecureGaussian().gaussian((2,), float("nan"))
