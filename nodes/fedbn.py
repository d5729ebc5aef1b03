"""FedBN (Li et al. 2021): a node keeps its own BatchNorm layers, weights and running statistics.

With ``train.batchnorm = "local"`` a node trains on the global model with its own BatchNorm
layers swapped in, stores them in its state folder (one file per run and bundle), and replies
with the global values in their place: the average over nodes leaves the global BatchNorm
layers as they were, and nothing a node's BatchNorm layers learned from its cases (their
running means and variances are statistics over them) leaves the node.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from fl import schema

FOLDER = "fedbn"


def batchnorm_keys(net: torch.nn.Module) -> list[str]:
    """State-dict keys of every BatchNorm layer (weights, biases, running statistics, counters)."""
    keys = []
    for name, module in net.named_modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            prefix = f"{name}." if name else ""
            keys += [prefix + k for k in module.state_dict()]
    return keys


def local_path(state_dir: Path, run_key: str) -> Path:
    return state_dir / FOLDER / f"{hashlib.sha256(run_key.encode()).hexdigest()[:24]}.safetensors"


def swap_in(net: torch.nn.Module, path: Path) -> None:
    """Load this node's own BatchNorm layers into ``net`` (none yet: keep the global ones)."""
    from safetensors import safe_open

    if path.is_file():
        with safe_open(str(path), framework="pt") as handle:  # one read: the version, then the layers
            schema.check_metadata("fedbn", handle.metadata(), path)
            own = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (no iterator on it)
        net.load_state_dict(own, strict=False)


def keep_and_hide(net: torch.nn.Module, global_state: dict[str, torch.Tensor], path: Path) -> None:
    """Store ``net``'s BatchNorm layers at ``path`` (written aside, then renamed) and put the
    global values back into ``net`` for the reply."""
    from safetensors.torch import save_file

    keys = batchnorm_keys(net)
    state = net.state_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: state[k].detach().clone().contiguous() for k in keys}, str(tmp),
              metadata={schema.METADATA_KEY: str(schema.version("fedbn"))})
    tmp.replace(path)
    net.load_state_dict({k: global_state[k] for k in keys}, strict=False)
