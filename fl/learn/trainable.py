"""Which parameters train under record-level DP (``local_dp.trainable``).

DP-SGD's noise grows with the number of trained parameters while the clipped signal does not, so
a network pretrained on public data and fine-tuned in few parameters keeps more of its utility
(Bu et al., DP-BiTFiT; De et al. 2022). The choice is part of the run's configuration: the nodes
freeze the other parameters, the manifest names the choice and the count, the accountant charges
the same mechanism (each record's gradient over the trained parameters is clipped and noised).

- ``all``: every parameter;
- ``decoder``: the parameters from the network's first transposed convolution on, in registration
  order: the up-sampling path and output block of a MONAI UNet;
- ``bias``: the biases and the normalisation layers' affine parameters;
- ``decoder+bias``: both.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

TRAINABLE = ("all", "decoder", "bias", "decoder+bias")


def trained_names(net: torch.nn.Module, which: str) -> list[str]:
    """The names of ``net``'s parameters that train under ``which`` (one of :data:`TRAINABLE`);
    a choice this network cannot honour is a ValueError naming why."""
    from torch import nn

    if which not in TRAINABLE:
        raise ValueError(f"local_dp.trainable: {which!r} is not one of {', '.join(TRAINABLE)}")
    names = [name for name, _ in net.named_parameters()]
    if which == "all":
        return names
    chosen: set[str] = set()
    if "decoder" in which:
        transposed = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
        first = next((f"{m}." for m, module in net.named_modules() if isinstance(module, transposed)), None)
        if first is None:
            raise ValueError("local_dp.trainable: 'decoder' needs a network whose decoder starts at a transposed "
                             f"convolution (a MONAI UNet); {type(net).__name__} has none: use 'bias' or 'all'")
        start = next(i for i, name in enumerate(names) if name.startswith(first))
        chosen.update(names[start:])
    if "bias" in which:
        norms = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
        affine = {f"{m}.{p}" if m else p for m, module in net.named_modules() if isinstance(module, norms)
                  for p, _ in module.named_parameters(recurse=False)}
        chosen.update(n for n in names if n.endswith("bias") or n in affine)
    if not chosen:
        raise ValueError(f"local_dp.trainable: {which!r} selects no parameter of {type(net).__name__}")
    return [n for n in names if n in chosen]


def trained_count(net: torch.nn.Module, which: str) -> int:
    """How many parameters (scalars) of ``net`` train under ``which`` (for the manifest and the plan)."""
    names = set(trained_names(net, which))
    return sum(p.numel() for n, p in net.named_parameters() if n in names)
