"""The server's client-level accountant, beside the central DP it accounts for.

One event per round released, from round 1 on; every release is written to the
:class:`~fl.privacy.journal.ReleaseJournal` before the model leaves the server, so a crash
between release and commit cannot lose it, and a resumed run continues the same history.
"""

from __future__ import annotations

import uuid
from typing import Any

from fl import wire
from fl.config import Config
from fl.privacy import accounting
from fl.privacy.accounting import GaussianEvent
from fl.privacy.journal import ReleaseJournal
from strategies.factory import central_dp_settings


class CentralAccount:
    """The server's client-level accountant: one event per round released, from round 1 on.

    Every release is written to the :class:`~fl.privacy.journal.ReleaseJournal` before the model leaves
    the server, so the history survives a crash between release and commit."""

    def __init__(self, cfg: Config, journal: ReleaseJournal, lineage: str, events: list[GaussianEvent]) -> None:
        self.cfg, self.journal, self.lineage, self.events = cfg, journal, lineage, events
        self.event = central_dp_settings(cfg).round_event() if cfg.central_dp.enabled else None
        if self.event is not None:  # an accountant that cannot answer fails here, before any release
            self.epsilon([*events, self.event])

    @classmethod
    def start(cls, cfg: Config) -> CentralAccount:
        return cls(cfg, ReleaseJournal.of(cfg.registry.root, cfg.model_name), uuid.uuid4().hex, [])

    @classmethod
    def resume(cls, cfg: Config, manifest: dict[str, Any]) -> CentralAccount:
        """Continue the lineage of the version a run resumes from, with every release the
        journal holds for it (committed or not): never reset."""
        journal = ReleaseJournal.of(cfg.registry.root, cfg.model_name)
        spent = (manifest.get("privacy") or {}).get("client_level") or {}
        lineage = spent.get("lineage")
        if lineage:
            return cls(cfg, journal, lineage, journal.events(lineage))
        # a version from before the journal: carry its recorded history into a new lineage
        account = cls(cfg, journal, uuid.uuid4().hex, [])
        for event in (GaussianEvent.from_dict(e) for e in spent.get("events", [])):
            account.journal.record(account.lineage, event, carried_from=manifest.get("hash"))
            account.events.append(event)
        return account

    def epsilon(self, events: list[GaussianEvent] | None = None) -> float:
        c = self.cfg.central_dp
        return accounting.epsilon(self.events if events is None else events, c.delta, c.accountant)

    def would_exceed(self) -> str | None:
        target = self.cfg.central_dp.target_epsilon
        if self.event is None or not target:
            return None
        after = self.epsilon([*self.events, self.event])
        return f"client-level epsilon would reach {after:.3f} > target {target:g}" if after > target else None

    def spend(self, server_round: int, run_id: str, **fields: Any) -> None:
        """Journal this round's release (durably) before the model leaves the server; under SecAgg+,
        before the workflow starts, since the coordinator sees the unmasked sum inside it."""
        if self.event is not None:
            self.journal.record(self.lineage, self.event, round=server_round, run_id=run_id, **fields)
            self.events.append(self.event)

    def note(self, server_round: int, run_id: str, outcome: str) -> None:
        """Journal how a round journaled ahead ended: released, halted (nothing unmasked), discarded
        (unmasked, then dropped) or skipped (too few sampled). Its charge stands whatever the outcome."""
        if self.event is not None:
            self.journal.record(self.lineage, None, round=server_round, run_id=run_id, outcome=outcome)

    def against_coordinator(self) -> dict[str, Any]:
        """Client-level epsilon against the coordinator itself: it drew the sample and sees who runs
        SecAgg+, so no amplification by sampling (q = 1 in every round released). Only distributed
        noise gives one: with server noise the coordinator sees the sum before its noise."""
        c = self.cfg
        if not (c.secagg.enabled and c.secagg.noise == "distributed"):
            return {"epsilon": None, "why": "the coordinator adds the noise to a sum it sees without it: no "
                                            "guarantee against the coordinator"}
        unamplified = [GaussianEvent(e.noise_multiplier, 1.0, e.steps) for e in self.events]
        return {"epsilon": self.epsilon(unamplified), "delta": c.central_dp.delta, "sample_rate": 1.0,
                "meaning": "a node that contributed to every round released so far; one that joined fewer has "
                           "less, and who joined is not published. Assumes the sum's other contributors are sites, "
                           "not the coordinator's own: each node's contributions ledger also counts its share "
                           "alone, z / sqrt(t) (fl node budget)"}

    def report(self) -> dict[str, Any] | None:
        if not self.events:
            return None
        c = self.cfg.central_dp
        return {"epsilon": self.epsilon(), "delta": c.delta, "accountant": c.accountant,
                "rounds": len(self.events), "events": [e.to_dict() for e in self.events], "lineage": self.lineage,
                "against_coordinator": self.against_coordinator(),
                "outcomes": self.journal.outcomes(self.lineage)}


def privacy_record(central: CentralAccount, nodes: dict[str, dict[str, float]],
                   evaluated: dict[str, dict[str, float]] | None = None) -> dict[str, Any]:
    """Epsilon spent: client-level (this server's accountant) and each node's record-level, as reported
    after the round's last charge (a noisy evaluation after training counts too)."""
    record_level: dict[str, dict[str, Any]] = {}
    for replies in (nodes, evaluated or {}):
        for node, m in replies.items():
            if wire.EPSILON_RECORD in m and m[wire.EPSILON_RECORD] >= record_level.get(node, {}).get("epsilon", 0.0):
                delta = m.get(wire.DELTA_RECORD, record_level.get(node, {}).get("delta"))
                record_level[node] = {"epsilon": m[wire.EPSILON_RECORD], "delta": delta}
    return {"client_level": central.report(), "record_level": record_level}
