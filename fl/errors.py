"""OncoFed's exception hierarchy.

Every error a user can cause derives from :class:`OncoFedError`; the CLI prints it as one
line and exits non-zero. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class OncoFedError(Exception):
    """Base class for errors caused by input: config, data, or the federation's state."""


class ConfigError(OncoFedError):
    """A config file, key or value is wrong; the message names the key and the fix."""


class DataError(OncoFedError):
    """A node's local dataset is missing, unreadable or inconsistent; the message names the file."""


class FederationError(OncoFedError):
    """A round could not be completed (too few nodes replied, every node failed, ...)."""


class RegistryError(OncoFedError):
    """The registry is unreadable, inconsistent, or a commit conflicts."""
