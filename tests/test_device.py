"""Devices: auto picks CUDA where present, a device that is not there is named, and the same
training runs on CUDA (tests marked gpu run wherever CUDA is present; CI has none)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fl import config
from fl.errors import ConfigError
from fl.learn import device
from fl.learn.bundle_train import evaluate_bundle, train_bundle
from fl.learn.data import load_local_data
from fl.server.rounds import initial_arrays

CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not CUDA, reason="needs CUDA")


def test_auto_takes_cuda_only_where_present() -> None:
    assert device.resolve("auto") == (torch.device("cuda", 0) if CUDA else torch.device("cpu"))
    assert device.resolve("cpu") == torch.device("cpu") and device.describe(torch.device("cpu")) == "cpu"


def test_a_device_that_is_not_there_is_named() -> None:
    count = torch.cuda.device_count() if CUDA else 0
    with pytest.raises(ConfigError, match=f"cuda:{count} was asked for, this node has {count} CUDA device"):
        device.resolve(f"cuda:{count}")
    with pytest.raises(ConfigError, match="train.device: 'tpu' is not a device"):
        device.resolve("tpu")
    with pytest.raises(ConfigError, match="train.device: must be auto, cpu, cuda or cuda:N"):
        config.from_flat({"train.device": "gpu"})


def test_mixed_precision_is_refused_under_dp_sgd() -> None:
    with pytest.raises(ConfigError, match="train.amp: .* cannot be combined with local_dp.enabled"):
        config.from_flat({"train.amp": True, "local_dp.enabled": True})


def _net_and_data(tiny_federation: Path, private: bool = False) -> tuple[torch.nn.Module, object, object]:
    cfg = config.from_flat({"data.image_size": 32, "local_dp.enabled": private})
    task = cfg.resolved_task()
    net = task.build_network()
    net.load_state_dict(initial_arrays(cfg).to_torch_state_dict())
    return task, net, load_local_data(tiny_federation / "node-0", task)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("amp", [False, True])
def test_training_on_cuda_learns_and_returns_the_model_to_the_cpu(tiny_federation: Path, amp: bool) -> None:
    task, net, data = _net_and_data(tiny_federation)
    before = evaluate_bundle(net, task, data.val, device=torch.device("cuda", 0)).loss
    result = train_bundle(net, task, data.train, epochs=3, device=torch.device("cuda", 0), amp=amp,
                          generator=torch.Generator().manual_seed(0))
    assert all(p.device.type == "cpu" for p in net.parameters())
    after = evaluate_bundle(net, task, data.val, device=torch.device("cuda", 0), amp=amp)
    assert result.steps > 0 and after.loss < before


@pytest.mark.gpu
@gpu
def test_dp_sgd_on_cuda_matches_the_cpu_accounting(tiny_federation: Path) -> None:
    from fl.learn.bundle_train import train_bundle_dp

    task, net, data = _net_and_data(tiny_federation, private=True)
    result = train_bundle_dp(net, task, data.train, epochs=1, noise_multiplier=1.0, max_grad_norm=1.0,
                             device=torch.device("cuda", 0))
    assert result.steps > 0 and all(p.device.type == "cpu" for p in net.parameters())
    assert all(torch.isfinite(p).all() for p in net.parameters())
