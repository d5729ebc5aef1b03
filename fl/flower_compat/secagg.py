"""The SecAgg+ protocol's record names and keys, as Flower 1.41's ``secaggplus_mod`` and
``SecAggPlusWorkflow`` exchange them (``flwr.common.secure_aggregation.secaggplus_constants``).

OncoFed's node guard reads each stage's configuration (``RECORD_KEY_CONFIGS``) and the mod's
state (``RECORD_KEY_STATE``: threshold, clipping and quantisation ranges) in the node's context;
the benchmarks drive the stages themselves. If Flower renames a record or a key, the guard no
longer sees the stages it must check: the canaries pin every value below.
"""

from __future__ import annotations

from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS,
    RECORD_KEY_STATE,
    Key,
    Stage,
)

__all__ = ["RECORD_KEY_CONFIGS", "RECORD_KEY_STATE", "Key", "Stage"]
