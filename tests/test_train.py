from __future__ import annotations

from pathlib import Path

import torch

from fl.tasks import get_task
from nodes.data import load_local_data
from nodes.train import evaluate_local, train_local

TASK = get_task("seg2d")


def test_local_training_improves_dice_on_the_node(tiny_federation: Path) -> None:
    data = load_local_data(tiny_federation / "node-1", TASK)
    torch.manual_seed(0)
    net = TASK.build_network()
    before = evaluate_local(net, TASK, data.val, batch_size=8)
    result = train_local(net, TASK, data.train, epochs=6, lr=0.01, batch_size=8,
                         generator=torch.Generator().manual_seed(0))
    after = evaluate_local(net, TASK, data.val, batch_size=8)
    assert result.steps == 6 * -(-len(data.train) // 8)
    assert result.seconds > 0
    assert after.loss < before.loss
    assert after.score > before.score + 0.3


def _drift(mu: float, data) -> float:  # noqa: ANN001
    torch.manual_seed(0)
    net = TASK.build_network()
    anchor = [p.detach().clone() for p in net.parameters()]
    train_local(net, TASK, data, epochs=2, lr=0.01, batch_size=8, proximal_mu=mu,
                generator=torch.Generator().manual_seed(0))
    return float(sum((p.detach() - a).pow(2).sum() for p, a in zip(net.parameters(), anchor)))


def test_fedprox_term_keeps_local_weights_near_the_global_ones(tiny_federation: Path) -> None:
    data = load_local_data(tiny_federation / "node-0", TASK).train
    assert _drift(50.0, data) < 0.5 * _drift(0.0, data)
