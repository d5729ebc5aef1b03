"""Local training of a catalogue task (its shipped bundle) on one node's cases."""

from __future__ import annotations

from pathlib import Path

import torch

from fl.learn import resolve_task
from fl.learn.bundle_train import evaluate_bundle, train_bundle
from fl.learn.data import load_local_data

TASK = resolve_task("seg2d", lr=0.01, batch_size=8)


def test_local_training_improves_dice_on_the_node(tiny_federation: Path) -> None:
    data = load_local_data(tiny_federation / "node-1", TASK)
    torch.manual_seed(0)
    net = TASK.build_network()
    before = evaluate_bundle(net, TASK, data.val)
    result = train_bundle(net, TASK, data.train, epochs=6, generator=torch.Generator().manual_seed(0))
    after = evaluate_bundle(net, TASK, data.val)
    assert result.steps == 6 * -(-len(data.train) // 8)
    assert result.seconds > 0
    assert after.loss < before.loss
    assert after.score > before.score + 0.3


def _drift(mu: float, data) -> float:  # noqa: ANN001
    torch.manual_seed(0)
    net = TASK.build_network()
    anchor = [p.detach().clone() for p in net.parameters()]
    train_bundle(net, TASK, data, epochs=2, proximal_mu=mu, generator=torch.Generator().manual_seed(0))
    return float(sum((p.detach() - a).pow(2).sum() for p, a in zip(net.parameters(), anchor)))


def test_fedprox_term_keeps_local_weights_near_the_global_ones(tiny_federation: Path) -> None:
    data = load_local_data(tiny_federation / "node-0", TASK).train
    assert _drift(50.0, data) < 0.5 * _drift(0.0, data)


def test_the_run_configs_lr_and_batch_size_apply_to_a_catalogue_task() -> None:
    task = resolve_task("seg2d", lr=0.003, batch_size=5)
    assert task.batch_size == 5 and task.lr == 0.003
    assert task.build_optimizer(task.build_network()).param_groups[0]["lr"] == 0.003
    own = resolve_task("", "configs/bundles/seg2d")  # the bundle as such: its own settings
    assert (own.batch_size, own.lr) == (8, 0.01) and own.digest == task.digest
