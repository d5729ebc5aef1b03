"""Ghost/mixed clipping (fl.learn.ghost) is today's per-case DP-SGD step, exactly: the same
per-case norms as the torch.func (vmap) path and the same clipped, noised update for the same
noise draw, on MONAI networks whose cases hold several patches."""

from __future__ import annotations

import copy

import pytest
import torch
from monai.losses import DiceCELoss, DiceLoss
from monai.networks.nets import SegResNet, UNet
from monai.networks.utils import one_hot

from fl.learn import ghost
from fl.learn.bundle_train import PrivateStep, onehot_outside, per_case_gradients
from fl.learn.dp_train import NoiseInjectedDPOptimizer
from fl.learn.ghost import GhostClipper, Unsupported
from fl.privacy.noise import SeededGaussian

NORMS = {"instance": ("instance", {"affine": True}),  # the seg bundles'
         "group": ("group", {"num_groups": 1})}  # one group over all channels; instance: one per channel


def _unet(dims: int, norm: str = "instance") -> torch.nn.Module:
    """A small MONAI UNet with residual units (conv, transposed conv, a norm with affine
    parameters, PReLU), as the bundles build them."""
    torch.manual_seed(0)
    return UNet(spatial_dims=dims, in_channels=1, out_channels=3, channels=(4, 8, 16), strides=(2, 2),
                num_res_units=2, norm=NORMS[norm])


def _cases(dims: int, cases: int = 4, patches: int = 3, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    shape = (cases, patches, 1, *([size] * dims))
    images = torch.randn(shape, generator=gen)
    labels = torch.randint(0, 3, shape, generator=gen).float()
    images[0] *= 30  # one case far from the others: its gradient is clipped hardest
    return images, labels


def _loss() -> torch.nn.Module:
    """The spleen bundle's loss: Dice over all of a case's patches together (``batch``) plus CE."""
    return DiceCELoss(to_onehot_y=True, softmax=True, squared_pred=True, batch=True)


def _hot(labels: torch.Tensor) -> torch.Tensor:
    return one_hot(labels.flatten(0, 1), 3).view(*labels.shape[:2], 3, *labels.shape[3:])


def _vmap_norms(net: torch.nn.Module, loss_fn: torch.nn.Module, images: torch.Tensor,
                labels: torch.Tensor) -> torch.Tensor:
    grads, _ = per_case_gradients(net, loss_fn, images, labels)
    return torch.stack([g.flatten(1).norm(dim=1) for g in grads.values()], dim=1).norm(dim=1)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("rule", ["mixed", "ghost", "instantiate"])
@pytest.mark.parametrize("norm", ["instance", "group"])
@pytest.mark.parametrize("elementwise", ["closed form", "vmap (module)"])
def test_per_case_norms_equal_the_vmap_paths(dims: int, rule: str, norm: str, elementwise: str,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    if elementwise == "vmap (module)":  # the path of any other module with parameters, on these layers
        kind = ghost._kind
        monkeypatch.setattr(ghost, "_kind", lambda m: "module" if kind(m) in ("groupnorm", "instancenorm", "prelu")
                            else kind(m))
    net = _unet(dims, norm)
    loss_fn, _ = onehot_outside(_loss())
    images, labels = _cases(dims)
    hot = _hot(labels)
    expected = _vmap_norms(net, loss_fn, images, hot)
    clipper = GhostClipper(net, rule=rule)
    try:
        _, norms, _ = clipper.clipped_sum(loss_fn, images, hot, max_grad_norm=1.0)
        methods = set(clipper.methods().values())
    finally:
        clipper.close()
    assert torch.allclose(norms, expected, rtol=1e-4, atol=1e-6), (norms, expected)
    assert elementwise in methods  # the norms' affines and PReLU
    if rule == "ghost":
        assert "ghost norm" in methods
    if rule == "instantiate":
        assert "ghost norm" not in methods


def _step(net: torch.nn.Module, per_case: str, images: torch.Tensor, labels: torch.Tensor, clip: float,
          rule: str = "mixed") -> tuple[list[torch.Tensor], str]:
    """One DP-SGD step as train_bundle_dp takes it, with a fixed noise draw; the parameters after."""
    net = copy.deepcopy(net)
    loss_fn, _ = onehot_outside(_loss())
    optimizer = NoiseInjectedDPOptimizer(torch.optim.SGD(net.parameters(), lr=1.0), noise_multiplier=0.5,
                                         max_grad_norm=clip, expected_batch_size=len(images),
                                         loss_reduction="mean", noise_source=SeededGaussian(7))
    named = [(k, p) for k, p in net.named_parameters() if p.requires_grad]
    step = PrivateStep(net, per_case, rule=rule)
    optimizer.zero_grad(set_to_none=True)
    step.run(optimizer, named, loss_fn, images, _hot(labels))
    step.close()
    return [p.detach().clone() for p in net.parameters()], step.method


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("rule", ["mixed", "ghost"])
@pytest.mark.parametrize("norm", ["instance", "group"])
def test_clipped_noised_update_equals_the_vmap_paths(dims: int, rule: str, norm: str) -> None:
    net = _unet(dims, norm)
    images, labels = _cases(dims)
    loss_fn, _ = onehot_outside(_loss())
    norms = _vmap_norms(net, loss_fn, images, _hot(labels))
    clip = float(norms.median())  # some cases clipped, some not
    assert (norms > clip * 1.01).any() and (norms < clip * 0.99).any()
    before = [p.detach().clone() for p in net.parameters()]
    today, method_today = _step(net, "vmap", images, labels, clip)
    ghost, method = _step(net, "ghost", images, labels, clip, rule)
    assert method_today == "torch.func vmap" and method.startswith("ghost/mixed")
    moved = max(float((a - b).abs().max()) for a, b in zip(today, before, strict=True))
    assert moved > 1e-3
    for a, b in zip(today, ghost, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), float((a - b).abs().max())


def test_a_wrong_case_grouping_is_caught() -> None:
    """The test above can fail: the same patches grouped into other cases give other norms."""
    net = _unet(2)
    loss_fn, _ = onehot_outside(_loss())
    images, labels = _cases(2)
    hot = _hot(labels)
    expected = _vmap_norms(net, loss_fn, images, hot)
    clipper = GhostClipper(net)
    try:
        _, norms, _ = clipper.clipped_sum(loss_fn, images.reshape(6, 2, *images.shape[2:]),
                                          hot.reshape(6, 2, *hot.shape[2:]), max_grad_norm=1.0)
    finally:
        clipper.close()
    assert norms.shape != expected.shape or not torch.allclose(norms, expected, rtol=1e-4)


def test_segresnet_in_place_residual_and_sigmoid_dice() -> None:
    """SegResNet adds its residual in place (``x += identity``) after the second convolution:
    the hooks see the gradient of the convolution's own output."""
    torch.manual_seed(0)
    net = SegResNet(spatial_dims=3, init_filters=4, in_channels=2, out_channels=3, blocks_down=(1, 1),
                    blocks_up=(1,), norm=("group", {"num_groups": 2}))
    loss_fn = DiceLoss(sigmoid=True, squared_pred=True, smooth_nr=0, smooth_dr=1e-5)
    gen = torch.Generator().manual_seed(2)
    images = torch.randn(3, 2, 2, 8, 8, 8, generator=gen)
    labels = (torch.rand(3, 2, 3, 8, 8, 8, generator=gen) > 0.6).float()
    expected = _vmap_norms(net, loss_fn, images, labels)
    clipper = GhostClipper(net)
    try:
        _, norms, _ = clipper.clipped_sum(loss_fn, images, labels, max_grad_norm=1.0)
    finally:
        clipper.close()
    assert torch.allclose(norms, expected, rtol=1e-4, atol=1e-6), (norms, expected)


def test_batchnorm_and_shared_parameters_fall_back_to_vmap() -> None:
    with pytest.raises(Unsupported, match="BatchNorm"):
        GhostClipper(torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2)))
    shared = torch.nn.Linear(4, 4)
    net = torch.nn.Sequential(shared, torch.nn.ReLU(), torch.nn.Linear(4, 4))
    net[2].weight = shared.weight
    step = PrivateStep(net, "auto")
    assert step.clipper is None and step.method == "torch.func vmap" and "shared" in step.fallback
    with pytest.raises(Unsupported):
        PrivateStep(net, "ghost")


def test_linear_layers_on_records() -> None:
    """The tabular shape: one row per case, Linear layers (ghost norm where 2T^2 < pD)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(30, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2))
    loss_fn = torch.nn.CrossEntropyLoss()
    x = torch.randn(16, 1, 30)
    y = torch.randint(0, 2, (16, 1))
    expected = _vmap_norms(net, loss_fn, x, y)
    clipper = GhostClipper(net)
    try:
        _, norms, _ = clipper.clipped_sum(loss_fn, x, y, max_grad_norm=1.0)
        assert set(clipper.methods().values()) == {"ghost norm"}
    finally:
        clipper.close()
    assert torch.allclose(norms, expected, rtol=1e-4, atol=1e-6)
