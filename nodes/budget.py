"""A node's budgets, spent and remaining, from its own ledgers (``fl node budget``, the node console)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fl.privacy import accounting
from nodes.ledger import Ledger
from nodes.policy import load_policy, state_dir
from nodes.witness import last_match


def budget_report(data_dir: Path) -> dict[str, Any]:
    folder = state_dir(data_dir)
    policy, entries = load_policy(folder), Ledger.in_dir(folder).entries()
    events = [accounting.GaussianEvent.from_dict(e["event"]) for e in entries]
    spent = accounting.epsilon(events, policy.delta, policy.accountant)
    return {
        "budget_epsilon": policy.epsilon or None, "delta": policy.delta, "accountant": policy.accountant,
        "require_secagg": policy.require_secagg, "client_level": _client_level(folder, policy),
        "witness": last_match(folder),
        "spent_epsilon": spent, "remaining_epsilon": max(policy.epsilon - spent, 0.0) if policy.epsilon else None,
        **record_counts(entries),
        "ledger": [{"seq": e["seq"], "round": e.get("server_round"), "release": e.get("release", "training"),
                    "epsilon_after": e.get("epsilon_after"), **e["event"]} for e in entries],
    }


def _client_level(folder: Path, policy: Any) -> dict[str, Any]:
    """The contributions ledger: how often this node's update went into a sum, and epsilon against
    the coordinator (no amplification): counting its own share only, and with every contributor a site."""
    entries = Ledger.contributions_in(folder).entries()
    trains = [e for e in entries if e.get("kind") == "train"]
    own = Ledger.contributions_in(folder).events(trains)
    peers = [accounting.GaussianEvent(float(e["sum_noise_multiplier"]), 1.0, 1) for e in trains
             if e.get("sum_noise_multiplier")]
    delta = policy.client_delta
    return {**client_counts(entries), "with_own_noise": len(own),
            "budget_epsilon": policy.client_epsilon or None, "delta": delta,
            "epsilon_own_share": accounting.epsilon(own, delta, policy.accountant) if own else 0.0,
            "epsilon_honest_peers": accounting.epsilon(peers, delta, policy.accountant) if peers else 0.0}


def record_counts(entries: list[dict[str, Any]]) -> dict[str, int]:
    """The record-level ledger's trainings and noisy metric releases."""
    return {"trainings": sum(1 for e in entries if e.get("release", "training") == "training"),
            "metric_releases": sum(1 for e in entries if e.get("release") == "metrics")}


def client_counts(entries: list[dict[str, Any]]) -> dict[str, int]:
    """The contributions ledger's contributions, those without this node's own noise, evaluations served."""
    trains = [e for e in entries if e.get("kind") == "train"]
    return {"contributions": len(trains), "unnoised": sum(1 for e in trains if not e.get("event")),
            "evaluations": sum(1 for e in entries if e.get("kind") == "evaluate")}
