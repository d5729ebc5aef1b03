"""Internals of Flower 1.41's message-API strategies (``flwr.serverapp.strategy``).

- The adaptive optimisers (``FedOpt`` and its subclasses ``FedAdam``, ``FedYogi``,
  ``FedAdagrad``) keep their first and second moments as ``self.m_t`` / ``self.v_t`` (dicts by
  array name, None before the first round); ``FedAvgM`` keeps its server momentum as
  ``self.momentum_vector`` (a list of arrays, None before the first round). None of these is
  documented. :mod:`strategies.state` exports and restores them so ``--resume`` continues
  exactly; if Flower renames them the export finds nothing and a resumed run restarts its
  optimiser silently: the canaries check the attributes exist on fresh strategies and that
  the aggregation code still assigns them.
- ``aggregate_metricrecords`` (``flwr.serverapp.strategy.strategy_utils``): the weighted
  average of the replies' metric records that ``FedAvg`` itself uses.
"""

from __future__ import annotations

from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

OPTIMIZER_MOMENTS = ("m_t", "v_t")  # FedOpt.__init__: self.m_t, self.v_t
SERVER_MOMENTUM = "momentum_vector"  # FedAvgM.__init__: self.momentum_vector

__all__ = ["OPTIMIZER_MOMENTS", "SERVER_MOMENTUM", "aggregate_metricrecords"]
