"""Gaussian noise for differential privacy, from the operating system's CSPRNG by default.

Noise that a seed or a leaked generator state reproduces can be subtracted again, which
voids the guarantee. :class:`SecureGaussian` draws its bits from a ChaCha20 keystream keyed
with 256 bits from ``os.urandom`` (a CSPRNG construction, several times faster than reading
``os.urandom`` for millions of samples), takes 53-bit uniforms from them and turns those into
normals with the Box-Muller transform in float64; no global generator of torch or NumPy is
ever touched. :class:`SeededGaussian` exists for tests that need reproducible noise
and must be injected explicitly.

Noise is float64, and callers add it to a float64 value and round once, at release, to the
model's dtype. Noise drawn on a coarser grid than the value it is added to keeps that grid
in the sum: whoever knows the other contributions can test, coordinate by coordinate, whether
``released - known`` lies on the noise's grid, and so tell whether a record or node took part
(Mironov, "On significance of the least significant bits for differential privacy", CCS 2012).
Rounding the float64 result to float32 at release is itself a snapping step: the float32 grid
is 2^29 times coarser than the float64 one the noise lives on.
"""

from __future__ import annotations

import math
import os
from typing import Protocol

import numpy as np
import torch


class NoiseSource(Protocol):
    """Draws i.i.d. N(0, std^2) samples."""

    def gaussian(self, shape: tuple[int, ...], std: float) -> torch.Tensor:
        """float64 samples: add them in float64 and round once, at release."""
        ...

    def uniform(self, n: int) -> np.ndarray: ...


def _uniform_open(n: int, raw: bytes) -> np.ndarray:
    """Map 64-bit words to uniforms in (0, 1] using their top 53 bits."""
    words = np.frombuffer(raw, dtype=np.uint64, count=n)
    return ((words >> np.uint64(11)).astype(np.float64) + 1.0) * (1.0 / 2**53)


class SecureGaussian:
    """Cryptographically secure Gaussian noise (ChaCha20 keystream from OS entropy + Box-Muller)."""

    def __init__(self) -> None:
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

        cipher = Cipher(algorithms.ChaCha20(os.urandom(32), os.urandom(16)), mode=None)
        self._stream = cipher.encryptor()

    def _bytes(self, n: int) -> bytes:
        return self._stream.update(bytes(n))

    def uniform(self, n: int) -> np.ndarray:
        return _uniform_open(n, self._bytes(8 * n))

    def gaussian(self, shape: tuple[int, ...], std: float) -> torch.Tensor:
        if not (math.isfinite(std) and std >= 0):
            raise ValueError(f"noise std must be finite and >= 0, got {std}")
        count = math.prod(shape)
        pairs = (count + 1) // 2
        u = torch.from_numpy(self.uniform(2 * pairs))
        radius = torch.sqrt(-2.0 * torch.log(u[:pairs]))
        angle = (2.0 * math.pi) * u[pairs:]
        normals = torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)])[:count]
        return (normals * std).reshape(shape)


class SeededGaussian:
    """Reproducible noise for tests only: never the default anywhere."""

    def __init__(self, seed: int) -> None:
        self._rng = np.random.default_rng(seed)

    def uniform(self, n: int) -> np.ndarray:
        return 1.0 - self._rng.random(n)

    def gaussian(self, shape: tuple[int, ...], std: float) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self._rng.standard_normal(shape) * std, dtype=np.float64))


def noisy_mean(values: torch.Tensor, noise_multiplier: float, source: NoiseSource) -> float:
    """The mean of per-record values in [0, 1], released with Gaussian noise: ``(sum + N(0, z^2)) / n``,
    clipped to [0, 1]. The record count ``n`` is public (as in DP-SGD's sampling rate); replacing
    one record moves the sum by at most 1, so this is the Gaussian mechanism with multiplier ``z``."""
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise ValueError(f"noise multiplier must be > 0, got {noise_multiplier}")
    clipped = values.double().clamp(0.0, 1.0)
    noisy = float(clipped.sum()) + float(source.gaussian((1,), noise_multiplier)[0])
    return min(1.0, max(0.0, noisy / max(len(values), 1)))
