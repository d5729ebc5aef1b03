"""Mirror registry versions into an MLflow Model Registry (optional: `pip install oncofed[mlflow]`).

The local registry stays the source of truth: MLflow gets one model version per OncoFed
version, whose ``source`` is the local version folder and whose tags carry the manifest's
provenance (hashes, round, run, task, strategy, metrics, nodes). Publishing the same
version twice is a no-op, so a failed mirror can be repeated.
"""

from __future__ import annotations

import json
from typing import Any

from fl.errors import ConfigError
from fl.registry import Version

TAG_PREFIX = "oncofed."


def tags_for(version: Version) -> dict[str, str]:
    """The manifest as MLflow tags (strings; nested values as compact JSON)."""
    m = version.manifest
    picked: dict[str, Any] = {
        "version": m.get("version"), "hash": m.get("hash"), "parent": m.get("parent"), "round": m.get("round"),
        "run_id": m.get("run_id"), "task": m.get("task"), "strategy": m.get("strategy"), "dp": m.get("dp"),
        "privacy": m.get("privacy"), "secure_aggregation": m.get("secure_aggregation"),
        "nodes": m.get("nodes"), "metrics": ((m.get("metrics") or {}).get("evaluate") or {}).get("aggregate"),
        "config_hash": m.get("config_hash"), "software": m.get("software"), "created_at": m.get("created_at"),
        "weights_sha256": m.get("weights_sha256"),
    }
    return {TAG_PREFIX + k: v if isinstance(v, str) else json.dumps(v, sort_keys=True, separators=(",", ":"))
            for k, v in picked.items()}


class MlflowMirror:
    """Publishes versions to the MLflow registry at ``uri`` (e.g. ``sqlite:///mlflow.db``)."""

    def __init__(self, uri: str) -> None:
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise ConfigError(
                "registry.mlflow_uri: MLflow is not installed; `pip install oncofed[mlflow]` or clear the key"
            ) from None
        self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)

    def publish(self, version: Version) -> str:
        """Create (once) the MLflow model version for ``version``; returns its MLflow version."""
        from mlflow.exceptions import MlflowException

        name = version.name
        try:
            self.client.get_registered_model(name)
        except MlflowException:
            self.client.create_registered_model(name, description="Mirrored from the OncoFed registry")
        existing = self.client.search_model_versions(f"name='{name}' and tag.`{TAG_PREFIX}hash`='{version.hash}'")
        if existing:
            return str(existing[0].version)
        created = self.client.create_model_version(
            name, source=version.path.resolve().as_uri(), tags=tags_for(version),
            description=f"OncoFed {version.ref()}, round {version.manifest.get('round')}",
        )
        return str(created.version)
