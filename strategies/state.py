"""Strategy state that an identical continuation needs, as named arrays.

Flower's adaptive optimisers (FedAdam and the other FedOpt strategies) keep first and second
moments between rounds (``m_t``, ``v_t``), FedAvgM its server momentum; they live on the strategy
object and are lost with the process. Exporting them with every committed version lets ``--resume`` continue
exactly where the last round left off.
"""

from __future__ import annotations

import json
import random

import numpy as np
from flwr.serverapp.strategy import Strategy
from safetensors.numpy import load as load_numpy
from safetensors.numpy import save as save_numpy

from fl import schema
from fl.flower_compat.strategy import OPTIMIZER_MOMENTS, SERVER_MOMENTUM

MOMENTS = OPTIMIZER_MOMENTS  # FedOpt's moments ("m_t", "v_t"): dicts by array name (fl.flower_compat.strategy)
MOMENTUM = SERVER_MOMENTUM  # FedAvgM's server momentum: a list of arrays, in the model's array order


CLIP_NORM = "central_dp/clip_norm"
RANDOM_STATE = "python_random"


def _inner(strategy: Strategy) -> Strategy:
    return getattr(strategy, "inner", strategy)  # a CentralDP wrapper keeps the moments inside


def export_state(strategy: Strategy) -> dict[str, np.ndarray]:
    """``{"m_t/<array>": ..., "v_t/<array>": ...}`` for the moments the strategy holds, and
    the adaptive clipping norm of a central-DP wrapper."""
    out: dict[str, np.ndarray] = {}
    if hasattr(strategy, "clip_norm"):
        out[CLIP_NORM] = np.array([strategy.clip_norm], dtype=np.float64)
    strategy = _inner(strategy)
    for attr in MOMENTS:
        for key, value in (getattr(strategy, attr, None) or {}).items():
            out[f"{attr}/{key}"] = np.ascontiguousarray(value)
    for index, value in enumerate(getattr(strategy, MOMENTUM, None) or []):
        out[f"{MOMENTUM}/{index:05d}"] = np.ascontiguousarray(value)
    return out


def import_state(strategy: Strategy, arrays: dict[str, np.ndarray]) -> None:
    """Put exported moments back; refuses moments the strategy does not keep."""
    if CLIP_NORM in arrays:
        if not hasattr(strategy, "clip_norm"):
            raise ValueError(f"state holds a clipping norm but {type(strategy).__name__} has no central DP")
        strategy.clip_norm = float(arrays[CLIP_NORM][0])
    strategy = _inner(strategy)
    momentum = sorted((name, value) for name, value in arrays.items() if name.startswith(f"{MOMENTUM}/"))
    if momentum:
        if not hasattr(strategy, MOMENTUM):
            raise ValueError(f"state holds server momentum but {type(strategy).__name__} keeps none")
        setattr(strategy, MOMENTUM, [value for _, value in momentum])
    for name, value in arrays.items():
        if name == CLIP_NORM or name.startswith(f"{MOMENTUM}/"):
            continue
        attr, _, key = name.partition("/")
        if attr not in MOMENTS or not hasattr(strategy, attr):
            raise ValueError(f"state array {name!r} does not belong to {type(strategy).__name__}")
        moments = getattr(strategy, attr) or {}
        moments[key] = value
        setattr(strategy, attr, moments)


def encode_state(strategy: Strategy) -> bytes:
    """Strategy moments plus the server's Python RNG state (Flower samples nodes with it)."""
    metadata = {RANDOM_STATE: json.dumps(random.getstate()),
                schema.METADATA_KEY: str(schema.version("strategy-state"))}
    return save_numpy(export_state(strategy), metadata=metadata)


def restore_state(strategy: Strategy, data: bytes, source: object = "the version's state.safetensors") -> None:
    """Put back what :func:`encode_state` wrote; ``source`` names the file in errors."""
    header_len = int.from_bytes(data[:8], "little")  # safetensors: u64 length, then JSON header
    metadata = json.loads(data[8 : 8 + header_len]).get("__metadata__", {}) or {}
    schema.check_metadata("strategy-state", metadata, source)
    import_state(strategy, dict(load_numpy(data)))
    if RANDOM_STATE in metadata:
        version, internal, gauss = json.loads(metadata[RANDOM_STATE])
        random.setstate((version, tuple(internal), gauss))
