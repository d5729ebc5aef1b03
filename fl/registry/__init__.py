"""Versioned global models: the hash-chained store, what a round commits (checkpoint), exports
and the MLflow mirror."""

from fl.registry.store import (
    MANIFEST_FILE,
    STATE_FILE,
    WEIGHTS_FILE,
    Registry,
    RegistryError,
    Version,
    check_name,
    manifest_hash,
    sha256_file,
)

__all__ = ["MANIFEST_FILE", "STATE_FILE", "WEIGHTS_FILE", "Registry", "RegistryError", "Version", "check_name",
           "manifest_hash", "sha256_file"]
