"""Build the Flower strategy a config names.

Flower's own Message-API strategies do the aggregation; OncoFed only configures them. The
server waits until every node of the federation is connected (``min_available_nodes``)
so that early rounds don't sample only the nodes that connected first.
"""

from __future__ import annotations

from typing import Any

from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, Strategy

from fl import wire
from fl.config import Config


def build_strategy(cfg: Config) -> Strategy:
    """The strategy for ``cfg.strategy.name`` with the config's sampling settings."""
    common: dict[str, Any] = dict(
        fraction_train=cfg.strategy.fraction_train,
        fraction_evaluate=cfg.strategy.fraction_evaluate,
        min_train_nodes=1,
        min_evaluate_nodes=1,
        min_available_nodes=cfg.min_nodes,
        weighted_by_key=wire.NUM_EXAMPLES,
        arrayrecord_key=wire.ARRAYS,
        configrecord_key=wire.CONFIG,
    )
    name = cfg.strategy.name
    if name == "fedavg":
        return FedAvg(**common)
    if name == "fedprox":
        return FedProx(**common, proximal_mu=cfg.train.proximal_mu)
    if name == "fedadam":
        return FedAdam(**common, eta=cfg.strategy.server_lr, tau=cfg.strategy.tau)
    raise AssertionError(f"strategy.name {name!r} passed config validation but has no builder")
