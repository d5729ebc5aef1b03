"""Utility under record-level DP: fewer trained parameters, augmentation multiplicity, weight
averaging, public pretraining with its provenance, the plan and the tuner on a public proxy."""

from __future__ import annotations

import hashlib
import json
import math
import tomllib
from pathlib import Path

import dp_accounting
import pytest
import torch
from dp_accounting.rdp import RdpAccountant
from torch import nn

from fl import config
from fl.errors import ConfigError
from fl.learn import resolve_task
from fl.learn.bundle_train import _case_batch, case_views, evaluate_bundle, train_bundle_dp
from fl.learn.data import load_local_data
from fl.learn.dp_train import DpOptions, WeightAverage
from fl.learn.trainable import trained_names
from fl.privacy.noise import SeededGaussian
from fl.privacy.plan import CARRIES, client_line, plan


@pytest.fixture(scope="module")
def site(tiny_federation: Path) -> tuple[object, object]:
    task = resolve_task("seg2d", private=True, lr=0.01, batch_size=8)
    return task, load_local_data(tiny_federation / "node-1", task)


# ----- fewer trained parameters ----------------------------------------------------------------
def test_trainable_choices_select_the_unet_decoder_and_the_biases() -> None:
    net = resolve_task("seg2d").build_network()
    names = [n for n, _ in net.named_parameters()]
    decoder = trained_names(net, "decoder")
    # the decoder is a suffix of the registration order that starts at the first transposed convolution
    assert decoder == names[len(names) - len(decoder):]
    first = decoder[0].rsplit(".", 1)[0]
    assert isinstance(net.get_submodule(first), nn.ConvTranspose2d)
    assert set(trained_names(net, "bias")) == {n for n in names if n.endswith("bias")}
    assert set(trained_names(net, "decoder+bias")) == set(decoder) | set(trained_names(net, "bias"))
    with pytest.raises(ValueError, match="transposed convolution"):
        trained_names(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Conv2d(2, 2, 3)), "decoder")


def test_frozen_parameters_keep_the_global_values_and_the_others_learn(site: tuple) -> None:
    task, data = site
    torch.manual_seed(0)
    net = task.build_network()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    train_bundle_dp(net, task, data.train, epochs=2, noise_multiplier=0.7, max_grad_norm=1.0,
                    noise=SeededGaussian(0), options=DpOptions(trainable="decoder"))
    trained = set(trained_names(net, "decoder"))
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k not in trained)
    assert all(not torch.equal(before[k], after[k]) for k in trained)
    assert all(p.requires_grad for p in net.parameters())  # handed back as it came


# ----- augmentation multiplicity -----------------------------------------------------------------
def test_views_stay_with_their_case_and_move_image_and_label_together(site: tuple) -> None:
    task, data = site
    views = case_views(DpOptions(views=4), 2, torch.Generator().manual_seed(0))
    images, labels = _case_batch(data.train, [0, 3, 5], views)
    assert images.shape[:2] == (3, 4) and labels.shape[:2] == (3, 4)  # one record: 4 views, clipped as one
    plain_images, plain_labels = _case_batch(data.train, [0, 3, 5])
    for case in range(3):
        flat_views = {tuple(images[case, v].flatten().tolist()[:64]) for v in range(4)}
        assert len(flat_views) > 1  # the views differ
        for v in range(4):
            # every view is a flip / quarter turn of its own case, the same one for image and label
            matches = [(torch.equal(images[case, v], t(plain_images[case, 0])),
                        torch.equal(labels[case, v], t(plain_labels[case, 0])))
                       for t in _flips_and_turns()]
            assert (True, True) in matches


def _flips_and_turns() -> list:
    def make(k: int, flip: bool):  # noqa: ANN202
        def apply(x: torch.Tensor) -> torch.Tensor:
            y = torch.flip(x, dims=(1,)) if flip else x
            return torch.rot90(y, k, dims=(1, 2))
        return apply
    return [make(k, f) for k in range(4) for f in (False, True)]


def test_views_average_before_clipping_so_one_case_moves_the_update_by_at_most_the_clip(site: tuple) -> None:
    """With no noise to speak of and one case sampled, the step is the clipped mean over its views."""
    from fl.learn.bundle_train import onehot_outside, per_case_gradients

    task, data = site
    torch.manual_seed(0)
    net = task.build_network()
    views = case_views(DpOptions(views=3), 2, torch.Generator().manual_seed(1))
    images, labels = _case_batch(data.train, [2], views)
    loss_fn, to_onehot = onehot_outside(task.build_loss())
    from monai.networks.utils import one_hot

    onehot = one_hot(labels.flatten(0, 1), 2).view(*labels.shape[:2], 2, *labels.shape[3:])
    grads, _ = per_case_gradients(net, loss_fn, images, onehot)
    # the per-case gradient equals the mean of the views' own gradients
    per_view = [per_case_gradients(net, loss_fn, images[:, v:v + 1], onehot[:, v:v + 1])[0] for v in range(3)]
    for name, g in grads.items():
        mean = sum(p[name] for p in per_view) / 3
        assert torch.allclose(g, mean, atol=1e-6)


# ----- weight averaging ------------------------------------------------------------------------------
def test_weight_average_is_the_exponential_average_of_the_iterates() -> None:
    net = nn.Linear(2, 1)
    iterates = [torch.full_like(net.weight, float(i)) for i in (1, 2, 3)]
    average = WeightAverage(net, 0.5)
    for w in iterates:
        with torch.no_grad():
            net.weight.copy_(w)
        average.update(net)
    average.copy_to(net)
    # started at the first iterate: 1, then 0.5*1 + 0.5*2 = 1.5, then 0.5*1.5 + 0.5*3 = 2.25
    assert torch.allclose(net.weight, torch.full_like(net.weight, 2.25))


# ----- public pretraining ----------------------------------------------------------------------------
def test_public_pretraining_learns_the_task_and_its_provenance_travels(tiny_federation: Path, tmp_path: Path) -> None:
    from fl.server.pretrain import PROVENANCE, WEIGHTS
    from fl.server.rounds import lineage, start_model

    cfg = config.from_flat({"pretrain.source": "synthetic", "pretrain.cases": 24, "pretrain.epochs": 4,
                            "data.image_size": 32, "registry.root": str(tmp_path / "registry")})
    arrays, provenance = start_model(cfg)
    assert provenance is not None and provenance["training_cases"] == 24
    home = next((tmp_path / "registry" / ".pretrained").glob("*/" + PROVENANCE)).parent
    assert hashlib.sha256((home / WEIGHTS).read_bytes()).hexdigest() == provenance["weights_sha256"]
    # it learned the task from public cases alone: better than the untrained network at a private site
    task = cfg.resolved_task()
    data = load_local_data(tiny_federation / "node-0", task)
    net = task.build_network()
    fresh = evaluate_bundle(net, task, data.val).score
    net.load_state_dict(arrays.to_torch_state_dict())
    assert evaluate_bundle(net, task, data.val).score > fresh + 0.2
    # the second run finds the cache; a tampered cache is trained again, not used
    assert start_model(cfg)[1] == provenance
    (home / WEIGHTS).write_bytes((home / WEIGHTS).read_bytes()[:-8] + b"\0" * 8)
    again = start_model(cfg)[1]
    assert hashlib.sha256((home / WEIGHTS).read_bytes()).hexdigest() == again["weights_sha256"]
    assert lineage(cfg, provenance)["pretraining"] == provenance


def test_manifest_names_the_pretraining_and_the_trained_parameters(tmp_path: Path) -> None:
    from fl.registry.checkpoint import manifest_fields
    from fl.server.rounds import lineage

    cfg = config.from_flat({"local_dp.enabled": True, "local_dp.trainable": "decoder+bias", "local_dp.views": 2})
    origin = {"source": "synthetic (fl.learn.synth.synthesize_public)", "public_dataset_sha256": "ab" * 32}
    fields = manifest_fields(cfg, run_id="r", record={"round": 1}, node_info={}, resumed_from=None,
                             lineage=lineage(cfg, origin))
    assert fields["pretraining"] == origin
    net = cfg.resolved_task().build_network()
    names = set(trained_names(net, "decoder+bias"))
    assert fields["dp"]["local"]["trained_parameters"] == sum(p.numel() for n, p in net.named_parameters()
                                                              if n in names)
    assert fields["dp"]["local"]["views"] == 2


@pytest.mark.parametrize(("flat", "fragment"), [
    ({"task": "tabular", "local_dp.views": 4}, "local_dp.views"),
    ({"task": "tabular", "pretrain.source": "synthetic"}, "pretrain.source"),
    ({"pretrain.source": "/no/such/public/folder"}, "neither 'synthetic' nor a folder"),
    ({"local_dp.trainable": "encoder"}, "local_dp.trainable"),
    ({"local_dp.ema_decay": 1.0}, "local_dp.ema_decay"),
])
def test_dp_options_a_run_cannot_honour_are_config_errors(flat: dict, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        config.from_flat(flat).check_resources()  # the public cases' folder is looked at where a config enters


# ----- plan and warning ------------------------------------------------------------------------------
def test_plan_noise_meets_the_target_by_an_independent_accountant_and_picks_record_level() -> None:
    result = plan(nodes=3, cases=[200, 200, 200], epsilon=3.0, delta=1e-5, rounds=5, epochs=2, batch_size=8,
                  params=50_000)
    record, client = result["lines"][0], result["lines"][-1]
    for line in (record, client):
        acc = RdpAccountant()
        acc.compose(dp_accounting.PoissonSampledDpEvent(line["sample_rate"],
                                                        dp_accounting.GaussianDpEvent(line["noise_multiplier"])),
                    line["steps"])
        assert 2.9 < acc.get_epsilon(1e-5) <= 3.0 + 1e-9
    expected = record["noise_multiplier"] * math.sqrt(50_000) / (8 * math.sqrt(record["steps"]))
    assert record["ratio"] == pytest.approx(expected)
    assert record["verdict"] == "carries utility" and client["verdict"] == "cannot carry utility"
    assert result["advice"].startswith("use record-level per site")
    small = plan(nodes=3, cases=[17, 30, 47], epsilon=1.0, delta=1e-5, rounds=5, epochs=2, batch_size=8,
                 params=50_000)
    assert small["advice"].startswith("no guarantee carries utility")


def test_fl_run_warns_of_client_level_dp_three_hospitals_cannot_carry() -> None:
    from fl.cli.run import client_dp_warning

    few = config.from_flat({"central_dp.enabled": True, "central_dp.noise_multiplier": 1.0})
    warning = client_dp_warning(few)
    assert warning is not None and "3 nodes" in warning and "local_dp" in warning
    assert client_line(1000, 1.0, sample_rate=1.0, rounds=5, params=51_768).ratio <= CARRIES
    assert client_dp_warning(config.from_flat({})) is None


# ----- tuning on a public proxy ------------------------------------------------------------------------
def test_tune_writes_a_run_config_that_loads_unchanged(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fl.cli import main
    from fl.server.tune import noise_for

    out = tmp_path / "tuned.toml"
    code = main(["privacy", "tune", "configs/quickstart.toml", "--set", "rounds=1", "--set", "data.image_size=32",
                 "--set", f"registry.root='{tmp_path / 'registry'}'", "--min-cases", "12", "--epsilon", "4",
                 "--epochs", "1,2", "--lrs", "0.01", "--seeds", "1", "--out", str(out)])
    assert code == 0
    tuned = config.load(out)
    assert tuned.local_dp.enabled and tuned.train.epochs in (1, 2)
    assert tuned.local_dp.noise_multiplier == noise_for(tuned, [12, 12, 12], tuned.train.epochs, 4.0, 1e-5, 8)
    trials = [line for line in out.read_text().splitlines() if line.startswith("#   epochs")]
    assert len(trials) == 2
    assert tomllib.loads(out.read_text())["rounds"] == 1
    assert json.dumps(tuned.to_flat())  # a complete config


def test_tune_refuses_a_task_without_a_public_proxy(tmp_path: Path) -> None:
    from fl.cli import main

    code = main(["privacy", "tune", "configs/quickstart.toml", "--set", "task='tabular'", "--min-cases", "40",
                 "--epsilon", "1", "--out", str(tmp_path / "t.toml")])
    assert code != 0 and not (tmp_path / "t.toml").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pretraining_runs_on_the_servers_gpu_and_keeps_cpu_weights(tmp_path: Path) -> None:
    from fl.server.rounds import start_model

    cfg = config.from_flat({"pretrain.source": "synthetic", "pretrain.cases": 8, "pretrain.epochs": 1,
                            "data.image_size": 32, "train.device": "cuda", "registry.root": str(tmp_path / "r")})
    arrays, provenance = start_model(cfg)
    assert provenance is not None
    assert all(t.device.type == "cpu" for t in arrays.to_torch_state_dict().values())
