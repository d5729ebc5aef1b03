"""Build the Flower strategy a config names.

Flower's own Message-API strategies do the aggregation; OncoFed only configures them. The
server waits until every node of the federation is connected (``min_available_nodes``)
so that early rounds don't sample only the nodes that connected first.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from flwr.serverapp.strategy import (
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    Krum,
    Strategy,
)

from fl import wire
from fl.config import Config
from strategies.central_dp import CentralDP, CentralDpSettings
from strategies.fedexp import FedExP


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
    inner = _aggregation(cfg, common)
    if not cfg.central_dp.enabled:
        return inner
    return CentralDP(inner, central_dp_settings(cfg))


def central_dp_settings(cfg: Config) -> CentralDpSettings:
    """The client-level DP settings of ``cfg``: the ``central_dp`` section's keys by name (every
    setting but the federation's size, which is ``data.nodes``, is one of them)."""
    wanted = {f.name for f in dataclasses.fields(CentralDpSettings)} - {"num_nodes"}
    return CentralDpSettings(**{k: v for k, v in dataclasses.asdict(cfg.central_dp).items() if k in wanted},
                             num_nodes=cfg.data.nodes)


def _aggregation(cfg: Config, common: dict[str, Any]) -> Strategy:
    name = cfg.strategy.name
    if name == "fedavg":
        return FedAvg(**common)
    if name == "fedprox":
        return FedProx(**common, proximal_mu=cfg.train.proximal_mu)
    if name == "fedadam":
        return FedAdam(**common, eta=cfg.strategy.server_lr, tau=cfg.strategy.tau)
    if name == "fedavgm":
        return FedAvgM(**common, server_learning_rate=cfg.strategy.server_step,
                       server_momentum=cfg.strategy.server_momentum)
    if name == "fedexp":
        return FedExP(**common)
    if name == "median":
        return FedMedian(**common)
    if name == "trimmedavg":
        return FedTrimmedAvg(**common, beta=cfg.strategy.trim_beta)
    if name == "krum":
        return Krum(**common, num_malicious_nodes=cfg.strategy.krum_malicious)
    raise AssertionError(f"strategy.name {name!r} passed config validation but has no builder")
