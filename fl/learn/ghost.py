"""Per-case clipping without per-case gradients of the whole network: ghost norms, the mixed rule.

DP-SGD needs, for each case i, the norm of its gradient ``||g_i||`` and the clipped sum
``sum_i min(1, C / ||g_i||) g_i``. :func:`fl.learn.bundle_train.per_case_gradients` gets both by
materialising every case's gradient of every parameter with ``torch.func.vmap``, which repeats
the network's backward per case. This module gets the same two quantities layer by layer from
what one ordinary backward pass already computes, each layer's input ``a`` and the gradient of
the summed case losses with respect to its output ``g`` (captured by forward hooks and tensor
hooks, in one backward that computes no parameter gradient at all):

- **Convolutions** (1D/2D/3D, also transposed) and **linear layers**, per layer, by the mixed
  rule of Bu, Mao and Xu 2022 (arXiv 2205.10683): with ``T`` the output positions of one case
  (summed over its patches), ``D`` the weight's fan-in and ``p`` its output channels,

  - *ghost norm* iff ``2 T^2 < p D``: ``||G_i||^2 = <a_i a_i^T, g_i g_i^T>`` from the unfolded
    input (Li et al. 2021; Bu et al. 2022), never forming ``G_i``; the clipped sum is then one
    more weight-gradient computation of the layer on ``g`` scaled per case;
  - else *instantiate*: ``G_i`` itself, as the layer's own weight-gradient kernel
    (``aten.convolution_backward``) applied to one case's patches at a time, which costs what
    the plain step's weight gradient costs, and keeps ``p D`` numbers per case (the weights'
    size, not the activations'). The clipped sum is then ``sum_i c_i G_i``: no second backward.

  Biases are always instantiated (``sum_t g_it``).
- **GroupNorm, InstanceNorm with affine parameters and no running statistics, PReLU**: their
  per-case gradients in closed form ("closed form"), elementwise from ``a`` and ``g``: the norm's
  weight gradient is ``sum(x_hat * g)`` and its bias's ``sum(g)`` over a case's positions, with
  ``x_hat`` the normalised input (the norm run again without its affine); PReLU's is
  ``sum(min(a, 0) * g)``. One pass over the activation, no backward.
- **Any other module with parameters of its own**: its per-case gradients by ``torch.func.vmap``
  of that module alone, on its captured input and output gradient ("vmap (module)"): exact, and
  as cheap as the module's forward and backward.

So this is book-keeping in one backward pass (Bu et al. 2023, "book-keeping"): norms and clipped
sum come from the same captured ``a`` and ``g``, with no second backward through the network.
A case may hold several patches: every quantity above is summed over that case's patches and
never mixes two cases, which needs a network without BatchNorm (the private network has none:
:func:`fl.learn.bundle.private_network`) and modules whose output row depends on their input row
only. Where the hooks cannot see a layer as a function of one input tensor (a parameter shared
between modules, a module with several inputs, an input changed in place after the layer read
it), :class:`Unsupported` is raised and the caller falls back to today's whole-network
``torch.func`` path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
RULES = ("mixed", "ghost", "instantiate")  # ghost / instantiate: force one branch (tests, profiling)


class Unsupported(RuntimeError):
    """The network has a layer this path cannot see exactly; use the whole-network vmap path."""


@dataclass
class _Layer:
    name: str
    module: nn.Module
    params: dict[str, nn.Parameter]  # the module's own trainable parameters, by local name
    calls: list[tuple[torch.Tensor, int]] = field(default_factory=list)  # (input, its version) per call
    grads: list[torch.Tensor] = field(default_factory=list)  # output gradient per call
    case_grads: dict[str, torch.Tensor] = field(default_factory=dict)  # (cases, *shape), instantiated
    ghost_sq: torch.Tensor | None = None  # per-case squared weight-gradient norm (ghost layers)
    kept: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (a, g) of ghost layers
    method: str = ""


INSTANCE_NORMS = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)


def _kind(module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, CONVS) and not isinstance(module.padding, str):
        return "conv"
    if isinstance(module, nn.GroupNorm) and module.affine:
        return "groupnorm"
    if isinstance(module, INSTANCE_NORMS) and module.affine and not module.track_running_stats:
        return "instancenorm"
    if isinstance(module, nn.PReLU):
        return "prelu"
    return "module"


def _closed_form(module: nn.Module, kind: str, a: torch.Tensor, g: torch.Tensor, cases: int
                 ) -> dict[str, torch.Tensor]:
    """Per-case gradients ``(cases, *shape)`` of a norm's affine parameters or PReLU's slope, from
    the layer's input ``a`` and output gradient ``g`` (rows, channels, *positions)."""
    positions = tuple(range(2, a.dim()))
    if kind == "prelu":
        slope = torch.clamp(a, max=0) * g  # d/dw of max(0, a) + w min(0, a)
        per_row = slope.sum(positions) if module.weight.numel() > 1 else slope.flatten(1).sum(1, keepdim=True)
        return {"weight": per_row.reshape(cases, -1, *module.weight.shape).sum(1)}
    if kind == "groupnorm":
        normalised = nn.functional.group_norm(a, module.num_groups, None, None, module.eps)
    else:
        normalised = nn.functional.instance_norm(a, eps=module.eps)
    out = {"weight": (normalised * g).sum(positions), "bias": g.sum(positions)}
    return {k: v.reshape(cases, -1, v.shape[-1]).sum(1) for k, v in out.items()}


def _conv_input(module: nn.Module, a: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """The input the convolution kernel saw and the padding it used (non-zero padding modes pad first)."""
    if getattr(module, "padding_mode", "zeros") != "zeros":
        pad = module._reversed_padding_repeated_twice
        return nn.functional.pad(a, pad, mode=module.padding_mode), (0,) * (a.dim() - 2)
    return a, tuple(module.padding)


def _conv_weight_grad(module: nn.Module, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The layer's weight gradient for input ``a`` and output gradient ``g`` (summed over the rows)."""
    x, padding = _conv_input(module, a)
    transposed = isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d))
    output_padding = tuple(module.output_padding) if transposed else (0,) * (a.dim() - 2)
    return torch.ops.aten.convolution_backward(
        g, x, module.weight, None, list(module.stride), list(padding), list(module.dilation), transposed,
        list(output_padding), module.groups, [False, True, False])[1]


def _case_conv_weight_grads(module: nn.Module, a: torch.Tensor, g: torch.Tensor, cases: int) -> torch.Tensor:
    """Each case's weight gradient ``(cases, *weight)`` in one kernel call: the cases become groups
    of a convolution whose batch is a case's patches (the layer's own groups nest inside)."""
    x, padding = _conv_input(module, a)
    rows = x.shape[0] // cases
    x = x.reshape(cases, rows, *x.shape[1:]).transpose(0, 1).reshape(rows, cases * x.shape[1], *x.shape[2:])
    gc = g.reshape(cases, rows, *g.shape[1:]).transpose(0, 1).reshape(rows, cases * g.shape[1], *g.shape[2:])
    weight = module.weight
    transposed = isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d))
    output_padding = tuple(module.output_padding) if transposed else (0,) * (a.dim() - 2)
    expanded = weight.detach().expand(cases, *weight.shape).reshape(cases * weight.shape[0], *weight.shape[1:])
    grad = torch.ops.aten.convolution_backward(
        gc, x, expanded, None, list(module.stride), list(padding), list(module.dilation), transposed,
        list(output_padding), module.groups * cases, [False, True, False])[1]
    return grad.reshape(cases, *weight.shape)


def _unfold(module: nn.Module, a: torch.Tensor) -> torch.Tensor:
    """im2col of a (non-transposed, ungrouped) convolution's input: (rows, positions, fan-in)."""
    from opacus.utils.tensor_utils import unfold2d, unfold3d

    x, padding = _conv_input(module, a)
    k, s, d = tuple(module.kernel_size), tuple(module.stride), tuple(module.dilation)
    if x.dim() == 3:  # Conv1d as a 2D unfold of height 1
        cols = unfold2d(x.unsqueeze(-2), kernel_size=(1, k[0]), padding=(0, padding[0]), stride=(1, s[0]),
                        dilation=(1, d[0]))
    elif x.dim() == 4:
        cols = unfold2d(x, kernel_size=k, padding=padding, stride=s, dilation=d)
    else:
        cols = unfold3d(x, kernel_size=k, padding=padding, stride=s, dilation=d)
    return cols.transpose(1, 2)


def _ghost_sq(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``||g_i^T a_i||_F^2`` per case without forming it: ``<a_i a_i^T, g_i g_i^T>``; a: (cases, T, D),
    g: (cases, T, p)."""
    return (torch.bmm(a, a.transpose(1, 2)) * torch.bmm(g, g.transpose(1, 2))).sum((1, 2))


class GhostClipper:
    """Per-case norms and clipped sums of a network's trainable parameters (see the module's
    docstring). Hooks stay on the network while the clipper lives; :meth:`close` removes them."""

    def __init__(self, net: nn.Module, *, rule: str = "mixed") -> None:
        if rule not in RULES:
            raise ValueError(f"ghost clipping rule must be one of {RULES}, got {rule!r}")
        if any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in net.modules()):
            raise Unsupported("BatchNorm mixes the cases of a batch (convert the network for DP first)")
        self.net, self.rule = net, rule
        self.layers: list[_Layer] = []
        owners: dict[int, str] = {}
        for name, module in net.named_modules():
            params = {k: p for k, p in module.named_parameters(recurse=False) if p.requires_grad}
            for k, p in params.items():
                if id(p) in owners:
                    raise Unsupported(f"parameter {name}.{k} is shared with {owners[id(p)]}")
                owners[id(p)] = f"{name}.{k}"
            if params:
                self.layers.append(_Layer(name, module, params))
        self.names = {id(p): f"{layer.name}.{k}" if layer.name else k
                      for layer in self.layers for k, p in layer.params.items()}
        self._cases = 0
        self._active = False
        self._handles = [layer.module.register_forward_hook(self._forward_hook(layer)) for layer in self.layers]

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # --- capture ------------------------------------------------------------------------------
    def _forward_hook(self, layer: _Layer) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            if not self._active:
                return
            if len(inputs) != 1 or not isinstance(inputs[0], torch.Tensor) or not isinstance(output, torch.Tensor):
                raise Unsupported(f"{layer.name} ({type(module).__name__}) is not a function of one tensor")
            a = inputs[0].detach()
            layer.calls.append((a, a._version))
            index = len(layer.calls) - 1
            output.register_hook(lambda g: self._backward(layer, index, g))  # the gradient before any in-place op

        return hook

    @torch.no_grad()
    def _backward(self, layer: _Layer, index: int, g: torch.Tensor) -> None:
        a, version = layer.calls[index]
        if a._version != version:
            raise Unsupported(f"the input of {layer.name} changed in place after the layer read it")
        cases = self._cases
        kind = _kind(layer.module)
        if kind == "module":
            self._module_grads(layer, a, g, cases)
        elif kind in ("groupnorm", "instancenorm", "prelu"):
            layer.method = "closed form"
            for key, value in _closed_form(layer.module, kind, a, g, cases).items():
                if key in layer.params:
                    self._add(layer, key, value)
        else:
            self._weight_grads(layer, kind, a, g, cases)
        layer.calls[index] = (a.new_empty(0), 0)  # release the activation once its layer is done

    def _add(self, layer: _Layer, key: str, value: torch.Tensor) -> None:
        layer.case_grads[key] = layer.case_grads[key] + value if key in layer.case_grads else value

    def _weight_grads(self, layer: _Layer, kind: str, a: torch.Tensor, g: torch.Tensor, cases: int) -> None:
        module = layer.module
        weight = layer.params.get("weight")
        if "bias" in layer.params:
            self._add(layer, "bias", g.reshape(cases, -1, g.shape[1], g[0, 0].numel()).sum((1, 3)) if kind == "conv"
                      else g.reshape(cases, -1, g.shape[-1]).sum(1))
        if weight is None:
            return
        p_out = g.shape[1] if kind == "conv" else g.shape[-1]
        fan_in = weight[0].numel() if kind == "linear" or not self._transposed(module) else weight.numel() // p_out
        positions = (g[0, 0].numel() if kind == "conv" else g[0].numel() // p_out) * (g.shape[0] // cases)
        ghostable = kind == "linear" or (not self._transposed(module) and module.groups == 1)
        ghost = ghostable and (self.rule == "ghost" or (self.rule == "mixed" and 2 * positions ** 2 < p_out * fan_in))
        layer.method = "ghost norm" if ghost else "instantiate"
        if ghost:
            if kind == "linear":
                ac, gc = a.reshape(cases, -1, a.shape[-1]), g.reshape(cases, -1, g.shape[-1])
            else:
                ac = _unfold(module, a).reshape(cases, -1, fan_in)
                gc = g.reshape(cases, -1, p_out, g[0, 0].numel()).transpose(2, 3).reshape(cases, -1, p_out)
            sq = _ghost_sq(ac, gc)
            layer.ghost_sq = sq if layer.ghost_sq is None else layer.ghost_sq + sq
            layer.kept.append((a, g))
            return
        if kind == "linear":
            ac, gc = a.reshape(cases, -1, a.shape[-1]), g.reshape(cases, -1, g.shape[-1])
            self._add(layer, "weight", torch.bmm(gc.transpose(1, 2), ac))
        else:
            self._add(layer, "weight", _case_conv_weight_grads(module, a, g, cases))

    @staticmethod
    def _transposed(module: nn.Module) -> bool:
        return isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d))

    def _module_grads(self, layer: _Layer, a: torch.Tensor, g: torch.Tensor, cases: int) -> None:
        from torch.func import functional_call, grad, vmap

        module = layer.module
        layer.method = "vmap (module)"
        params = {k: p.detach() for k, p in layer.params.items()}

        def case_term(p: dict[str, torch.Tensor], x: torch.Tensor, go: torch.Tensor) -> torch.Tensor:
            return (functional_call(module, p, (x,)) * go).sum()

        with torch.enable_grad():
            per_case = vmap(grad(case_term), in_dims=(None, 0, 0), randomness="different")(
                params, a.reshape(cases, -1, *a.shape[1:]), g.reshape(cases, -1, *g.shape[1:]))
        for key, value in per_case.items():
            self._add(layer, key, value.detach())

    # --- one step -----------------------------------------------------------------------------
    def clipped_sum(self, loss_fn: Any, images: torch.Tensor, labels: torch.Tensor, max_grad_norm: float
                    ) -> tuple[dict[int, torch.Tensor], torch.Tensor, torch.Tensor]:
        """For cases ``images`` ``(cases, samples, ...)`` and ``labels`` alike: the clipped sum of
        the per-case gradients by parameter id, each case's gradient norm, and each case's loss
        (``loss_fn`` on its own samples). Clipping as Opacus's DPOptimizer clips:
        ``min(1, C / (||g_i|| + 1e-6))``."""
        cases, rows = images.shape[0], images.shape[1]
        for layer in self.layers:
            layer.calls, layer.grads, layer.case_grads, layer.ghost_sq, layer.kept = [], [], {}, None, []
        self._cases = cases
        x = images.flatten(0, 1).detach().requires_grad_(True)  # the backward's target: reaches every layer
        self._active = True
        try:
            out = self.net(x)
        finally:
            self._active = False
        losses = torch.stack([loss_fn(out[i * rows:(i + 1) * rows], labels[i]) for i in range(cases)])
        torch.autograd.grad(losses.sum(), x)  # fills the layers through the hooks; no parameter gradient
        del out, x
        sq = torch.zeros(cases, dtype=torch.float32, device=images.device)
        for layer in self.layers:
            missing = [k for k in layer.params if k not in layer.case_grads and not (k == "weight" and layer.kept)]
            if missing and layer.calls:
                raise Unsupported(f"{layer.name}: no output gradient reached its hooks")
            if len(layer.kept) > 1:  # a ghost layer called twice: the norm of a sum needs the sum itself
                raise Unsupported(f"{layer.name} is called more than once per forward")
            for value in layer.case_grads.values():
                sq += value.reshape(cases, -1).pow(2).sum(1)
            if layer.ghost_sq is not None:
                sq += layer.ghost_sq
        norms = sq.sqrt()
        clip = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        sums: dict[int, torch.Tensor] = {}
        with torch.no_grad():
            for layer in self.layers:
                for key, p in layer.params.items():
                    if key in layer.case_grads:
                        sums[id(p)] = torch.einsum("i,i...", clip.to(p.dtype), layer.case_grads[key])
                    elif layer.kept:
                        sums[id(p)] = self._ghost_sum(layer, clip)
                    else:  # a layer the forward never ran: zero gradient
                        sums[id(p)] = torch.zeros_like(p)
                layer.case_grads, layer.kept, layer.calls = {}, [], []
        return sums, norms, losses.detach()

    def _ghost_sum(self, layer: _Layer, clip: torch.Tensor) -> torch.Tensor:
        (a, g), = layer.kept
        cases = clip.shape[0]
        scale = clip.repeat_interleave(g.shape[0] // cases).to(g.dtype).view(-1, *([1] * (g.dim() - 1)))
        if isinstance(layer.module, nn.Linear):
            return torch.einsum("np,nd->pd", (g * scale).reshape(-1, g.shape[-1]), a.reshape(-1, a.shape[-1]))
        return _conv_weight_grad(layer.module, a, g * scale)

    def methods(self) -> dict[str, str]:
        """The method each layer used at the last step (ghost norm, instantiate, closed form, vmap (module))."""
        return {layer.name: layer.method for layer in self.layers if layer.method}


def summarise(methods: dict[str, str]) -> str:
    """'ghost/mixed: 25 closed form, 12 ghost norm, 30 instantiate'."""
    counts: dict[str, int] = {}
    for method in methods.values():
        counts[method] = counts.get(method, 0) + 1
    return "ghost/mixed: " + ", ".join(f"{n} {m}" for m, n in sorted(counts.items())) if counts else "ghost/mixed"

