from __future__ import annotations

import pytest
import torch
from opacus.validators import ModuleValidator

from fl.errors import ConfigError
from fl.tasks import CATALOGUE, get_task


@pytest.mark.parametrize("name", list(CATALOGUE))
def test_network_maps_image_to_class_logits_of_same_size(name: str) -> None:
    task = get_task(name)
    size = task.image_size
    x = torch.randn(2, 1, *([size] * task.spatial_dims))
    out = task.build_network()(x)
    assert out.shape == (2, task.num_classes, *([size] * task.spatial_dims))


@pytest.mark.parametrize("name", list(CATALOGUE))
def test_networks_are_trainable_under_dp_sgd(name: str) -> None:
    net = get_task(name).build_network()
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in net.modules())
    assert ModuleValidator.validate(net, strict=False) == []


def test_dice_is_one_for_perfect_and_zero_for_disjoint_prediction() -> None:
    task = get_task("seg2d")
    labels = torch.zeros(2, 1, 8, 8, dtype=torch.uint8)
    labels[:, :, 2:5, 2:5] = 1
    perfect = torch.cat([1 - labels, labels], dim=1).float()
    assert torch.allclose(task.dice(perfect, labels), torch.ones(2))
    disjoint = torch.cat([labels, 1 - labels], dim=1).float()
    assert torch.allclose(task.dice(disjoint, labels), torch.zeros(2))


def test_dice_counts_half_overlap() -> None:
    task = get_task("seg2d")
    labels = torch.zeros(1, 1, 4, 4, dtype=torch.uint8)
    labels[..., :2] = 1  # 8 voxels
    pred = torch.zeros(1, 1, 4, 4, dtype=torch.long)
    pred[..., :1] = 1  # 4 voxels, all inside: dice = 2*4 / (8 + 4)
    logits = torch.cat([1 - pred, pred], dim=1).float()
    assert task.dice(logits, labels).item() == pytest.approx(8 / 12)


def test_unknown_task_suggests_the_close_one() -> None:
    with pytest.raises(ConfigError, match="did you mean 'seg2d'"):
        get_task("seg2")
