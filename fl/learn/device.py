"""Which device a node trains on: the node's own setting, else the run's ``train.device``.

``auto`` takes CUDA when this node has it, else the CPU. A device that was asked for and is not
there is an error that names it (the node does not quietly fall back to the CPU).
"""

from __future__ import annotations

import torch

from fl.errors import ConfigError

AUTO = "auto"


def resolve(spec: str) -> torch.device:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` -> a device present on this node."""
    if spec == AUTO:
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"train.device: {spec!r} is not a device (auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = device.index or 0
        if index >= count:
            raise ConfigError(f"train.device: {spec} was asked for, this node has {count} CUDA device(s)")
        return torch.device("cuda", index)
    if device.type != "cpu":
        raise ConfigError(f"train.device: {spec!r} is not supported (auto, cpu, cuda or cuda:N)")
    return device


def describe(device: torch.device) -> str:
    """``cpu``, or ``cuda:N (<GPU name>)``: what the reply and the manifest record."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return "cpu"
