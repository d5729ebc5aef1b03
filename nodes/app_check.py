"""The check of a run's app bundle (FAB) against the node operator's approved list, shared by the
SuperNode's guard (:mod:`nodes.supernode`) and the warm workers' dispatcher (:mod:`nodes.worker`)."""

from __future__ import annotations

import hashlib


class AppRefused(Exception):
    """The FAB of a run is not one this node's operator approved."""


def check_fab(content: bytes, announced_hash: str, approved: set[str]) -> str:
    """The FAB's hash if it matches what the SuperLink announced and is approved; else refuse."""
    digest = hashlib.sha256(content).hexdigest()
    if digest != announced_hash:
        raise AppRefused(f"app content hashes to {digest[:12]}, not the announced {announced_hash[:12]}: tampered")
    if digest not in approved:
        raise AppRefused(f"app {digest} is not approved by this node's operator")
    return digest
