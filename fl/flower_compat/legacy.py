"""Flower 1.41's legacy (FitIns / FitRes) workflow pieces OncoFed drives SecAgg+ with.

Flower runs SecAgg+ only through ``SecAggPlusWorkflow`` (public), which talks to a legacy
``Strategy`` through client proxies and reads the round from a ``LegacyContext``'s state
records. :mod:`strategies.secagg` builds that context itself, so it needs the record names and
key the workflow reads (``flwr.server.workflow.constant``), the grid-backed client proxy
(``flwr.server.compat.grid_client_proxy``), and the node side converts FitIns / FitRes to and
from record dicts as ``secaggplus_mod`` expects them (``flwr.compat.common.recorddict_compat``).
If Flower changes these, the SecAgg+ round fails (or, worse, the workflow reads a round number
of 0): the canaries pin the names, values and signatures.
"""

from __future__ import annotations

from flwr.compat.common.recorddict_compat import (
           fitins_to_recorddict,
           fitres_to_recorddict,
           recorddict_to_fitres,
)
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey

__all__ = ["MAIN_CONFIGS_RECORD", "MAIN_PARAMS_RECORD", "ClientProxy", "GridClientProxy", "WorkflowKey",
           "fitins_to_recorddict", "fitres_to_recorddict", "recorddict_to_fitres"]
