"""How node updates are combined: Flower's strategies, configured from an OncoFed config."""

from strategies.factory import build_strategy

__all__ = ["build_strategy"]
