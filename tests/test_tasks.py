from __future__ import annotations

import pytest
import torch
from opacus.validators import ModuleValidator

from fl.errors import ConfigError
from fl.learn import CATALOGUE, ImageSpec, get_task, resolve_task

SEGMENTATION = [name for name, task in CATALOGUE.items() if isinstance(task, ImageSpec)]


@pytest.mark.parametrize("name", SEGMENTATION)
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


def _onehot(mask: torch.Tensor) -> torch.Tensor:
    return torch.cat([1 - mask, mask], dim=1).float()


def test_dice_is_one_for_perfect_and_zero_for_disjoint_prediction() -> None:
    task = resolve_task("seg2d")
    labels = torch.zeros(2, 1, 8, 8)
    labels[:, :, 2:5, 2:5] = 1
    assert torch.allclose(task.record_scores(_onehot(labels), _onehot(labels)), torch.ones(2))
    assert torch.allclose(task.record_scores(_onehot(1 - labels), _onehot(labels)), torch.zeros(2))


def test_dice_counts_half_overlap_and_empty_cases_as_monai_does() -> None:
    task = resolve_task("seg2d")
    labels = torch.zeros(3, 1, 4, 4)
    labels[:2, ..., :2] = 1  # 8 voxels in cases 0 and 1; case 2 has no lesion
    pred = torch.zeros(3, 1, 4, 4)
    pred[0, ..., :1] = 1  # 4 voxels, all inside: dice = 2*4 / (8 + 4)
    scores = task.record_scores(_onehot(pred), _onehot(labels))
    assert scores[0].item() == pytest.approx(8 / 12)
    assert scores[1].item() == 0.0  # lesion missed
    assert scores[2].item() == 1.0  # nothing to find, nothing predicted
    pred[2, ..., 0, 0] = 1
    assert task.record_scores(_onehot(pred), _onehot(labels))[2].item() == 0.0  # a false lesion


def test_unknown_task_suggests_the_close_one() -> None:
    with pytest.raises(ConfigError, match="did you mean 'seg2d'"):
        get_task("seg2")


def test_tabular_auc_against_sklearn() -> None:
    from sklearn.metrics import roc_auc_score

    task = get_task("tabular")
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (200,), generator=generator).to(torch.uint8)
    logits = torch.randn(200, 2, generator=generator) + labels[:, None] * torch.tensor([0.0, 0.8])
    expected = roc_auc_score(labels.numpy(), logits.softmax(dim=1)[:, 1].numpy())
    assert task.score(logits, labels) == pytest.approx(expected, abs=1e-9)
    assert 0.6 < expected < 0.9  # informative, not perfect: the comparison means something
    assert task.build_network()(torch.randn(5, task.features)).shape == (5, 2)


def test_breast_cancer_split_keeps_every_record_once(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from sklearn.datasets import load_breast_cancer

    from fl.learn.data import load_local_data
    from fl.learn.tabular import write_federation

    folders = write_federation(tmp_path / "bc", nodes=4, seed=1, alpha=0.5)
    data = [load_local_data(f, get_task("tabular"), use_cache=False) for f in folders]
    total = sum(len(d.train) + len(d.val) for d in data)
    assert total == len(load_breast_cancer().target) == 569
    positives = sum(int(d.train.labels.sum() + d.val.labels.sum()) for d in data)
    assert positives == 212  # malignant cases
    shares = [float(d.train.labels.float().mean()) for d in data]
    assert max(shares) - min(shares) > 0.2  # label skew: sites differ in their malignant share
    for d in data:  # scaled with the published ranges, record by record: in [-1, 1], not centred per site
        assert d.train.images.abs().max() <= 1.0 and d.val.images.abs().max() <= 1.0
        assert not torch.allclose(d.train.images.mean(dim=0), torch.zeros(30), atol=1e-2)
