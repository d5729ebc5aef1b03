"""Client-level (central) DP around any Flower strategy: DP-FedAvg with fixed or adaptive clipping.

Per round (McMahan et al. 2018, "Learning differentially private recurrent language models"):

1. sample nodes: all of them (``q = 1``) or each independently with probability ``q``
   (Poisson), using the secure noise source's uniforms;
2. each update ``delta_i = w_i - w`` is clipped to L2 norm ``C``, by the server or by the
   node itself (then the server only checks ``||delta_i|| <= C`` and drops any that isn't);
3. ``w' = w + (sum_i clip(delta_i) + N(0, (z C)^2 I)) / m`` with the *fixed* denominator
   ``m = q N`` (expected participants), so one node changes the sum by at most ``C``
   whatever the number of replies, and updates weigh equally (example counts would
   otherwise scale a node's influence past ``C``);
4. the noisy model is handed to the wrapped strategy as the round's aggregate, so FedAvg
   keeps it and FedAdam takes its server step from it (post-processing);
5. adaptive clipping (Andrew et al. 2021): the count of unclipped updates is released with
   noise ``N(0, s^2)`` and ``C <- C exp(-eta (count/m - gamma))``; the accountant sees one
   Gaussian of multiplier ``(z^-2 + s^-2)^-1/2`` per round, see
   :func:`fl.privacy.accounting.combined_noise_multiplier`.

Unlike Flower's DP wrappers, noise comes from an injected CSPRNG-backed source, never from
NumPy's global generator, and the accountant event describes exactly this sampling.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fl import wire
from fl.flower_compat.strategy import aggregate_metricrecords
from fl.privacy.accounting import GaussianEvent, combined_noise_multiplier
from fl.privacy.clipping import clip
from fl.privacy.noise import NoiseSource, SecureGaussian

FIXED, ADAPTIVE = "fixed", "adaptive"
SERVER, CLIENT = "server", "client"
ALL, POISSON = "all", "poisson"


@dataclass(frozen=True)
class CentralDpSettings:
    """Client-level DP settings, validated on construction."""

    noise_multiplier: float
    clipping_norm: float
    num_nodes: int
    clipping: str = FIXED
    clip_on: str = SERVER
    sampling: str = ALL
    sample_rate: float = 1.0
    target_quantile: float = 0.5
    clip_lr: float = 0.2
    count_stddev: float = 0.0  # 0: expected participants / 20 (Andrew et al.)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise ValueError(f"noise_multiplier must be > 0, got {self.noise_multiplier}")
        if not (math.isfinite(self.clipping_norm) and self.clipping_norm > 0):
            raise ValueError(f"clipping_norm must be > 0, got {self.clipping_norm}")
        if self.clipping not in (FIXED, ADAPTIVE) or self.clip_on not in (SERVER, CLIENT):
            raise ValueError(f"clipping {self.clipping!r} / clip_on {self.clip_on!r} not supported")
        if self.sampling not in (ALL, POISSON) or not 0 < self.sample_rate <= 1:
            raise ValueError(f"sampling {self.sampling!r} with rate {self.sample_rate} not supported")

    @property
    def q(self) -> float:
        return self.sample_rate if self.sampling == POISSON else 1.0

    @property
    def expected_nodes(self) -> float:
        return self.q * self.num_nodes

    @property
    def count_std(self) -> float:
        return self.count_stddev or self.expected_nodes / 20

    def round_event(self) -> GaussianEvent:
        """The mechanism one round applies, for the client-level accountant."""
        z = self.noise_multiplier
        if self.clipping == ADAPTIVE:
            z = combined_noise_multiplier(z, self.count_std)
        return GaussianEvent(z, self.q, 1)


class CentralDP(Strategy):
    """Wraps ``inner`` (FedAvg, FedProx, FedAdam, ...) with client-level DP."""

    def __init__(self, inner: Strategy, settings: CentralDpSettings, noise: NoiseSource | None = None) -> None:
        self.inner = inner
        self.settings = settings
        self.noise = noise or SecureGaussian()
        self.clip_norm = settings.clipping_norm
        self._current: dict[str, np.ndarray] = {}
        self._carrier: Message | None = None  # hands the noisy model to the inner strategy
        self.excluded: dict[str, str] = {}

    def summary(self) -> None:
        self.inner.summary()

    # ----- training -----------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        current = {k: a.numpy() for k, a in arrays.items()}
        for key, value in current.items():
            if not np.issubdtype(value.dtype, np.floating):
                raise ValueError(f"central DP: array {key!r} is not floating point ({value.dtype})")
        self._current = {k: v.astype(np.float64) for k, v in current.items()}
        if self.settings.clip_on == CLIENT:
            config[wire.CLIENT_CLIP_NORM] = self.clip_norm
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        self._carrier = messages[0] if messages else None
        if self.settings.sampling == POISSON:
            keep = self.noise.uniform(len(messages)) < self.settings.sample_rate
            messages = [m for m, k in zip(messages, keep) if k]
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        s, bound = self.settings, self.clip_norm
        self.excluded = {}
        total = {k: np.zeros_like(v) for k, v in self._current.items()}
        used, below = [], 0.0
        for reply in replies:
            if reply.has_error():
                continue
            node = str(reply.metadata.src_node_id)
            received = reply.content[wire.ARRAYS]
            if set(received.keys()) != set(total):
                self.excluded[node] = "update has different arrays than the global model"
                continue
            update = {k: received[k].numpy().astype(np.float64) - self._current[k] for k in total}
            clipped, norm = clip(update, bound)
            if not math.isfinite(norm):
                self.excluded[node] = "update is not finite"
                continue
            if s.clip_on == CLIENT:
                if norm > bound * (1 + 1e-4):
                    self.excluded[node] = f"update norm {norm:.4g} exceeds the clipping norm {bound:.4g}"
                    continue
                bit = reply.content[wire.METRICS].get(wire.UPDATE_NORM_BELOW_CLIP)
                if bit not in (0.0, 1.0):  # NaN, inf, 1e6 would steer the clipping norm
                    self.excluded[node] = f"invalid '{wire.UPDATE_NORM_BELOW_CLIP}' value (must be 0 or 1)"
                    continue
                below += float(bit)
            else:
                below += 1.0 if norm <= bound else 0.0
            for k in total:
                total[k] += clipped[k]
            used.append(reply)
        metrics = aggregate_metricrecords([r.content for r in used], wire.NUM_EXAMPLES) if used else None
        return self.release(server_round, total, below), metrics

    def release(self, server_round: int, total: dict[str, np.ndarray], below: float, *,
                add_noise: bool = True) -> ArrayRecord | None:
        """Release ``w + (sum of clipped updates + N(0, (zC)^2 I)) / m`` as the round's model and
        update the clipping norm; ``total`` may come from the replies or from SecAgg+.
        ``add_noise=False``: the nodes already put the noise into ``total`` (distributed noise).

        The noisy sum is released even when nobody was sampled or every update was dropped:
        the accountant's mechanism always outputs sum + noise."""
        s, bound = self.settings, self.clip_norm
        if self._carrier is None:
            return None
        m = s.expected_nodes
        std = s.noise_multiplier * bound if add_noise else 0.0
        # float64 throughout; rounded once below, to the model's dtypes (see fl.privacy.noise)
        noisy = {k: self._current[k] + (v + self.noise.gaussian(v.shape, std).numpy()) / m for k, v in total.items()}
        if s.clipping == ADAPTIVE:
            noisy_count = below + float(self.noise.gaussian((1,), s.count_std)[0])
            self.clip_norm = bound * math.exp(-s.clip_lr * (noisy_count / m - s.target_quantile))
        template = self._carrier.content[wire.ARRAYS]
        dtypes = {k: template[k].numpy().dtype for k in noisy}
        carrier = copy.copy(self._carrier)
        carrier.content = RecordDict(
            {
                wire.ARRAYS: ArrayRecord({k: Array(np.asarray(v, dtype=dtypes[k])) for k, v in noisy.items()}),
                wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: 1}),
            }
        )
        arrays, _ = self.inner.aggregate_train(server_round, [carrier])
        return arrays

    def zero_sum(self) -> dict[str, np.ndarray]:
        """An all-zero update sum shaped like the current model (a round with no contribution)."""
        return {k: np.zeros_like(v) for k, v in self._current.items()}

    # ----- evaluation: unchanged -----------------------------------------------------------
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)
