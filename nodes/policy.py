"""The node operator's privacy policy, and the decision on each train request.

The policy (``<node dir>/.oncofed/policy.toml``, written by ``fl node policy``) sets a total
record-level budget (epsilon, delta), the accountant, and the weakest DP settings the node
accepts. The server can ask; only the node decides: a request that breaks the policy or
would spend past the budget is refused, and an accepted spend is written to the ledger
*before* training starts, so a crash mid-training can never leave budget unrecorded.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import tempfile
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import tomli_w

from fl import schema, wire
from fl.errors import ConfigError
from fl.privacy import accounting
from fl.privacy.accounting import GaussianEvent
from nodes.ledger import Ledger

STATE_DIR = ".oncofed"
POLICY_FILE = "policy.toml"
SECRET_FILE = "fingerprint.key"  # 32 random bytes, only on the node, mode 0600
SECRET_BYTES = 32
AUTO, EXACT, NOISY, NONE = "auto", "exact", "noisy", "none"
METRICS_MODES = (AUTO, EXACT, NOISY, NONE)
SECAGG_PROTOCOLS = ("any", "malicious")


class Refusal(Exception):
    """A train request this node will not run; the message is sent to the server."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass(frozen=True)
class Policy:
    """A node's record-level privacy policy. ``epsilon = 0`` means no budget is set."""

    epsilon: float = 0.0
    delta: float = 1e-5
    accountant: str = "rdp"
    min_noise_multiplier: float = 0.0
    max_clip_norm: float = 0.0  # 0: no limit
    require_secagg: bool = False  # send updates only masked by SecAgg+, never in the clear
    # send updates only under SecAgg+ with this node's own share of the central noise in them
    require_distributed_noise: bool = False
    # what leaves besides the DP model: exact metrics, metrics released with noise and charged,
    # or none; auto: none when the node has a budget or the server asks for DP, exact otherwise
    release_metrics: str = "auto"
    metrics_noise_multiplier: float = 5.0  # std of the noise on a released metric sum (sensitivity 1)
    # dataset descriptors for model cards (nodes.descriptors): the same modes, auto as for metrics
    release_descriptors: str = "auto"
    descriptors_noise_multiplier: float = 5.0  # noise std over the descriptors' L2 sensitivity
    # client-level guarantee against the coordinator, counted from this node's own noise only
    # (distributed noise: its share, z / sqrt(t)), with no amplification; 0: no budget
    client_epsilon: float = 0.0
    client_delta: float = 1e-5
    min_distributed_noise: float = 0.0  # the weakest multiplier z on the sum this node accepts
    max_distributed_clip: float = 0.0  # the largest update clipping norm C it accepts; 0: any
    min_contributors: int = wire.SECAGG_MIN_NODES  # the smallest SecAgg+ threshold t it accepts
    max_contributors: int = 0  # the largest t: each node's share is sized z / sqrt(t); 0: any
    max_evaluations_per_round: int = 1  # evaluate requests served per (run, round)
    # which secure aggregation this node takes part in: any (Flower's SecAgg+, honest-but-curious
    # coordinator, or OncoFed's malicious-secure stages), or malicious only
    secagg_protocol: str = "any"
    # malicious-secure stages: how many roster sites may collude with the coordinator; the node
    # accepts a threshold t only with 2t > s + colluding_sites (s: the neighbourhood's size)
    colluding_sites: int = 1

    def __post_init__(self) -> None:
        checks = {
            "epsilon": math.isfinite(self.epsilon) and self.epsilon >= 0,
            "delta": 0 < self.delta < 1,
            "accountant": self.accountant in accounting.ACCOUNTANTS,
            "min_noise_multiplier": math.isfinite(self.min_noise_multiplier) and self.min_noise_multiplier >= 0,
            "max_clip_norm": math.isfinite(self.max_clip_norm) and self.max_clip_norm >= 0,
            "require_secagg": isinstance(self.require_secagg, bool),
            "require_distributed_noise": isinstance(self.require_distributed_noise, bool),
            "release_metrics": self.release_metrics in METRICS_MODES,
            "metrics_noise_multiplier": math.isfinite(self.metrics_noise_multiplier)
            and self.metrics_noise_multiplier > 0,
            "release_descriptors": self.release_descriptors in METRICS_MODES,
            "descriptors_noise_multiplier": math.isfinite(self.descriptors_noise_multiplier)
            and self.descriptors_noise_multiplier > 0,
            "client_epsilon": math.isfinite(self.client_epsilon) and self.client_epsilon >= 0,
            "client_delta": 0 < self.client_delta < 1,
            "min_distributed_noise": math.isfinite(self.min_distributed_noise) and self.min_distributed_noise >= 0,
            "max_distributed_clip": math.isfinite(self.max_distributed_clip) and self.max_distributed_clip >= 0,
            "min_contributors": isinstance(self.min_contributors, int)
            and self.min_contributors >= wire.SECAGG_MIN_NODES,
            "max_contributors": isinstance(self.max_contributors, int)
            and (self.max_contributors == 0 or self.max_contributors >= self.min_contributors),
            "max_evaluations_per_round": isinstance(self.max_evaluations_per_round, int)
            and self.max_evaluations_per_round >= 1,
            "secagg_protocol": self.secagg_protocol in SECAGG_PROTOCOLS,
            "colluding_sites": isinstance(self.colluding_sites, int) and not isinstance(self.colluding_sites, bool)
            and self.colluding_sites >= 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ConfigError(f"policy {name}: invalid value {getattr(self, name)!r}")

    @property
    def requires_dp(self) -> bool:
        """A node with a budget trains only under DP."""
        return self.epsilon > 0

    def metrics_mode(self, dp_requested: bool) -> str:
        """``exact``, ``noisy`` or ``none``: what this node releases besides its model."""
        return self._mode(self.release_metrics, dp_requested)

    def descriptors_mode(self, dp_requested: bool) -> str:
        """``exact``, ``noisy`` or ``none``: the dataset descriptors this node releases (``fl validate``)."""
        return self._mode(self.release_descriptors, dp_requested)

    @property
    def distrusts_coordinator(self) -> bool:
        """The node sends its update only masked (SecAgg+), or with its own noise in it, or counts a
        client-level budget against the coordinator: nothing exact may travel beside it."""
        return (self.require_secagg or self.require_distributed_noise or self.client_epsilon > 0
                or self.secagg_protocol == "malicious")

    def _mode(self, setting: str, dp_requested: bool) -> str:
        if setting != AUTO:
            return setting
        return NONE if self.requires_dp or dp_requested or self.distrusts_coordinator else EXACT


def state_dir(data_dir: Path) -> Path:
    return data_dir / STATE_DIR


def load_policy(folder: Path) -> Policy:
    path = folder / POLICY_FILE
    if not path.exists():
        return Policy()
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: unreadable policy ({exc})") from None
    schema.check("policy", raw, path, error=ConfigError)
    raw.pop(schema.KEY, None)
    unknown = set(raw) - set(Policy.__dataclass_fields__)
    if unknown:
        raise ConfigError(f"{path}: unknown policy key {sorted(unknown)[0]!r}")
    defaults = Policy()
    for key, value in raw.items():
        default = getattr(defaults, key)
        if isinstance(default, bool) != isinstance(value, bool) or (
                type(default) is int and not (type(value) is int or (type(value) is float and value.is_integer()))):
            raise ConfigError(f"{path}: policy {key}: invalid value {value!r}")
    try:
        return Policy(**{k: type(getattr(defaults, k))(v) for k, v in raw.items()})
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{path}: {exc}") from None


def node_secret(folder: Path) -> bytes:
    """This node's fingerprint key, created on first use (``fl node check``, ``fl node start`` or the
    first request) with the OS CSPRNG, mode 0600, and never overwritten."""
    path = folder / SECRET_FILE
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".key-", dir=folder)  # mode 0600
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(os.urandom(SECRET_BYTES))
                handle.flush()
                os.fsync(handle.fileno())
            try:
                os.link(tmp, path)  # atomic, and never replaces a key another process made first
            except FileExistsError:
                pass
        finally:
            os.unlink(tmp)
    try:
        secret = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: unreadable fingerprint key ({exc})") from None
    if len(secret) != SECRET_BYTES:
        raise ConfigError(f"{path}: fingerprint key must be {SECRET_BYTES} bytes, found {len(secret)}")
    return secret


def keyed_fingerprint(folder: Path, digest: str) -> str:
    """HMAC-SHA256 of the dataset's digest under this node's secret key: the same data gives the
    same value on this node, so it shows the node that its data did not change, while nobody
    without the key can confirm a candidate dataset or compare two datasets with it."""
    return hmac.new(node_secret(folder), bytes.fromhex(digest), hashlib.sha256).hexdigest()


def save_policy(folder: Path, policy: Policy) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / POLICY_FILE
    schema.refuse_newer_file("policy", path, tomllib.loads, error=ConfigError)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(tomli_w.dumps({**schema.stamp("policy"), **asdict(policy)}), encoding="utf-8")
    tmp.replace(path)
    return path


@dataclass(frozen=True)
class LocalDpRequest:
    """The local DP settings a server asks for."""

    noise_multiplier: float
    max_grad_norm: float


def admit(
    policy: Policy, ledger: Ledger, request: LocalDpRequest | None, event: GaussianEvent | None, *,
    secure: bool = False, distributed_noise: bool = False, num_records: int = 0, **context: Any
) -> dict[str, Any] | None:
    """Check a train request against the policy and budget; record the spend if admitted.

    ``secure``: the request runs through SecAgg+ (the node's update leaves masked);
    ``distributed_noise``: and the node adds its share of the central noise before masking.
    ``num_records``: the node's record count; a delta of 1/n or more is refused, since a mechanism
    that publishes one record outright is (0, 1/n)-DP. Returns the
    ledger entry (None for a non-DP request the policy allows); raises :class:`Refusal`
    otherwise. Call inside ``ledger.locked()``.
    """
    if (policy.require_secagg or policy.secagg_protocol == "malicious") and not secure:
        raise Refusal(wire.ERROR_POLICY, "policy: this node sends its update only under secure aggregation "
                                         "(SecAgg+); the server asked for it in the clear")
    if policy.require_distributed_noise and not distributed_noise:
        raise Refusal(wire.ERROR_POLICY, "policy: this node sends its update only under SecAgg+ with its own "
                                         "share of the noise (secagg.noise = 'distributed')")
    if request is None or event is None:
        if policy.requires_dp:
            raise Refusal(wire.ERROR_POLICY, "policy: this node trains only with local DP (it has a privacy budget)")
        return None
    if request.noise_multiplier < policy.min_noise_multiplier:
        raise Refusal(
            wire.ERROR_POLICY,
            f"policy: noise multiplier {request.noise_multiplier:g} is below this node's minimum "
            f"{policy.min_noise_multiplier:g}",
        )
    if policy.max_clip_norm and request.max_grad_norm > policy.max_clip_norm:
        raise Refusal(
            wire.ERROR_POLICY,
            f"policy: clipping norm {request.max_grad_norm:g} exceeds this node's maximum {policy.max_clip_norm:g}",
        )
    return charge(policy, ledger, event, num_records=num_records, **context)


def charge(policy: Policy, ledger: Ledger, event: GaussianEvent, *, num_records: int = 0,
           **context: Any) -> dict[str, Any]:
    """Record ``event`` in the ledger if the budget allows it, else raise :class:`Refusal`.
    Every release a node makes (training, metrics) passes here. Call inside ``ledger.locked()``."""
    if num_records and policy.delta >= 1 / num_records:
        raise Refusal(
            wire.ERROR_POLICY,
            f"policy: delta {policy.delta:g} is not below 1/{num_records} (this node's record count); "
            "with it, releasing one record outright would meet the guarantee. Lower the node's delta",
        )
    history = ledger.events()
    try:
        spent = accounting.epsilon(history, policy.delta, policy.accountant)
        after = accounting.epsilon([*history, event], policy.delta, policy.accountant)
    except accounting.AccountingError as exc:
        raise Refusal(wire.ERROR_POLICY, f"privacy accounting: {exc}") from None
    if policy.epsilon and after > policy.epsilon:
        raise Refusal(
            wire.ERROR_BUDGET,
            f"privacy budget: this round would bring epsilon to {after:.3f}, over the budget "
            f"{policy.epsilon:g} (spent {spent:.3f}, delta {policy.delta:g})",
        )
    return ledger.append(event, epsilon_after=after, delta=policy.delta, accountant=policy.accountant, **context)


@dataclass(frozen=True)
class Contribution:
    """One contribution of this node's update to a sum, as the node itself applies it.

    ``noise_multiplier``: the node's own noise on its update, over the update's sensitivity (its
    share of distributed noise: ``z / sqrt(t)``); None when the update leaves without noise of its own."""

    run: int
    server_round: int
    secure: bool
    noise_multiplier: float | None = None
    sum_noise: float | None = None  # the multiplier z on the whole sum, were every other contributor a site


def check_distributed(policy: Policy, *, noise_multiplier: float, clip: float) -> None:
    """Refuse distributed-noise settings below this node's floors: the multiplier z on the sum and the
    clipping norm C (the threshold t is :func:`check_threshold`'s, asked of every SecAgg+ contribution)."""
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0 and math.isfinite(clip) and clip > 0):
        raise Refusal(wire.ERROR_POLICY, f"distributed noise multiplier {noise_multiplier!r} and clipping norm "
                                         f"{clip!r} must be positive numbers")
    if noise_multiplier < policy.min_distributed_noise:
        raise Refusal(wire.ERROR_POLICY, f"policy: distributed noise multiplier {noise_multiplier:g} is below this "
                                         f"node's minimum {policy.min_distributed_noise:g}")
    if policy.max_distributed_clip and clip > policy.max_distributed_clip:
        raise Refusal(wire.ERROR_POLICY, f"policy: clipping norm {clip:g} exceeds this node's maximum "
                                         f"{policy.max_distributed_clip:g} for distributed noise")


def check_threshold(policy: Policy, threshold: int) -> None:
    """Refuse a SecAgg+ threshold t outside this node's bounds: below ``min_contributors`` a sum of too
    few exposes an update; above ``max_contributors`` each node's share, sized z / sqrt(t), is too
    small should the other contributors be the coordinator's own."""
    if threshold < policy.min_contributors:
        raise Refusal(wire.ERROR_POLICY, f"policy: SecAgg+ threshold {threshold} is below this node's minimum of "
                                         f"{policy.min_contributors} contributors")
    if policy.max_contributors and threshold > policy.max_contributors:
        raise Refusal(wire.ERROR_POLICY, f"policy: SecAgg+ threshold {threshold} is above this node's maximum of "
                                         f"{policy.max_contributors} (each share is sized z / sqrt(t))")


def plan_contribution(policy: Policy, log: Ledger, c: Contribution) -> tuple[GaussianEvent | None, dict[str, Any]]:
    """The client-level entry ``c`` would write, or :class:`Refusal`: a second contribution to the
    same (run, round), a contribution without this node's own noise under a client-level budget, or
    one past that budget. Call inside ``log.locked()``; append only once every other check passed."""
    entries = log.entries()
    last = _last_round(entries, "train", c.run)
    if last is not None and c.server_round <= last:
        raise Refusal(wire.ERROR_POLICY, f"policy: this node already contributed to round {last} of run {c.run}; "
                                         f"round {c.server_round} again would be a second release (a run's rounds "
                                         "only move forward)")
    event = GaussianEvent(c.noise_multiplier, 1.0, 1) if c.noise_multiplier else None
    fields: dict[str, Any] = {"kind": "train", "run": c.run, "server_round": c.server_round, "secure": c.secure,
                              "noise_multiplier": c.noise_multiplier, "sum_noise_multiplier": c.sum_noise}
    if event is None:
        if policy.client_epsilon:
            raise Refusal(wire.ERROR_POLICY, "policy: this node's client-level budget counts only its own noise; the "
                                             "request adds none (ask for secagg.noise = 'distributed')")
        return None, fields
    try:
        after = accounting.epsilon([*log.events(entries), event], policy.client_delta, policy.accountant)
    except accounting.AccountingError as exc:
        raise Refusal(wire.ERROR_POLICY, f"privacy accounting: {exc}") from None
    if policy.client_epsilon and after > policy.client_epsilon:
        raise Refusal(wire.ERROR_BUDGET, f"client-level budget: this contribution would bring epsilon against the "
                                         f"coordinator to {after:.3f}, over the budget {policy.client_epsilon:g}")
    return event, {**fields, "epsilon_after": after, "delta": policy.client_delta}


def count_request(policy: Policy, log: Ledger, *, run: int, server_round: int, kind: str, **context: Any) -> None:
    """Record one ``kind`` request of (run, round), or refuse it past the policy's cap: each
    evaluation a coordinator asks for again may spend budget, and it may ask without end."""
    with log.locked():
        entries = log.entries()
        last = _last_round(entries, kind, run)
        if last is not None and server_round < last:
            raise Refusal(wire.ERROR_POLICY, f"policy: {kind} of round {server_round} of run {run} comes after "
                                             f"round {last}'s; a run's rounds only move forward")
        served = sum(1 for e in entries
                     if e.get("kind") == kind and e.get("run") == run and e.get("server_round") == server_round)
        if served >= policy.max_evaluations_per_round:
            raise Refusal(wire.ERROR_POLICY, f"policy: {kind} of round {server_round} of run {run} was already "
                                             f"served {served} time(s), this node's maximum")
        log.append(None, kind=kind, run=run, server_round=server_round, **context)


def _last_round(entries: list[dict[str, Any]], kind: str, run: int) -> int | None:
    """The newest round of ``run`` this node served a ``kind`` request for, or None."""
    rounds = [int(e["server_round"]) for e in entries if e.get("kind") == kind and e.get("run") == run]
    return max(rounds) if rounds else None
