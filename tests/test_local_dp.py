"""Record-level DP on a node: DP-SGD, the ledger and the node's policy."""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from opacus import GradSampleModule

from fl import wire
from fl.config import Config
from fl.errors import ConfigError
from fl.learn import get_task, resolve_task
from fl.learn.bundle_train import evaluate_bundle, train_bundle_dp
from fl.learn.data import load_local_data
from fl.learn.dp_train import NoiseInjectedDPOptimizer
from fl.packing import unpack_message
from fl.privacy import accounting
from fl.privacy.accounting import local_event
from fl.privacy.noise import SeededGaussian
from fl.server.rounds import initial_arrays
from nodes.client_app import app
from nodes.ledger import Ledger, LedgerError
from nodes.policy import (
    LocalDpRequest,
    Policy,
    Refusal,
    admit,
    load_policy,
    save_policy,
    state_dir,
)

TASK = get_task("seg2d")


def _dp_step(scale: float, noise_multiplier: float, batch: int = 8) -> torch.Tensor:
    torch.manual_seed(0)
    model = GradSampleModule(torch.nn.Linear(20, 1), loss_reduction="sum")
    opt = NoiseInjectedDPOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=noise_multiplier,
                                    max_grad_norm=1.0, expected_batch_size=batch, loss_reduction="mean",
                                    noise_source=SeededGaussian(1))
    x = torch.randn(batch, 20)
    (model(x).sum() * scale).backward()
    opt.step()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def test_per_sample_gradients_are_clipped() -> None:
    grad = _dp_step(scale=1e6, noise_multiplier=1e-12)
    assert float(grad.norm()) <= 1.0 * (1 + 1e-5)  # mean of 8 per-sample grads, each of norm <= 1
    assert float(grad.norm()) > 0.1  # clipped, not zeroed


def test_noise_is_added_once_with_std_sigma_c_over_batch() -> None:
    torch.manual_seed(0)
    model = GradSampleModule(torch.nn.Linear(4000, 1), loss_reduction="sum")
    opt = NoiseInjectedDPOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=3.0,
                                    max_grad_norm=2.0, expected_batch_size=4, loss_reduction="mean",
                                    noise_source=SeededGaussian(2))
    (model(torch.randn(4, 4000)).sum() * 0.0).backward()
    opt.step()
    grad = model._module.weight.grad.flatten()
    assert float(grad.std()) == pytest.approx(3.0 * 2.0 / 4, rel=0.05)  # twice-added noise would be x1.41


def test_dp_sgd_still_learns_the_node_task(tiny_federation: Path) -> None:
    task = resolve_task("seg2d", private=True, lr=0.01, batch_size=8)
    data = load_local_data(tiny_federation / "node-1", task)
    torch.manual_seed(0)
    net = task.build_network()
    before = evaluate_bundle(net, task, data.val).score
    result = train_bundle_dp(net, task, data.train, epochs=6, noise_multiplier=0.7, max_grad_norm=1.0,
                             noise=SeededGaussian(0))
    after = evaluate_bundle(net, task, data.val).score
    assert result.steps == local_event(len(data.train), epochs=6, batch_size=8, noise_multiplier=0.7).steps
    assert after > before + 0.2
    assert all(getattr(p, "grad_sample", None) is None for p in net.parameters())


def test_every_catalogue_task_trains_under_dp_sgd(tmp_path: Path) -> None:
    from fl.learn.synth import synthesize

    folder = synthesize(tmp_path / "d3", nodes=1, task=get_task("seg3d"), seed=0, image_size=32)[0]
    task = resolve_task("seg3d", private=True, lr=0.01, batch_size=4)
    data = load_local_data(folder, task)
    net = task.build_network()
    result = train_bundle_dp(net, task, data.train, epochs=1, noise_multiplier=1.0, max_grad_norm=1.0,
                             noise=SeededGaussian(0))
    assert result.steps > 0 and all(torch.isfinite(p).all() for p in net.parameters())


# ----- ledger and policy ---------------------------------------------------------------------
EVENT = accounting.GaussianEvent(1.0, 0.25, 8)
REQUEST = LocalDpRequest(noise_multiplier=1.0, max_grad_norm=1.0)


def test_ledger_survives_a_restart_and_only_grows(tmp_path: Path) -> None:
    policy = Policy(epsilon=100.0)
    first = Ledger.in_dir(tmp_path)
    with first.locked():
        a = admit(policy, first, REQUEST, EVENT, server_round=1)
    restarted = Ledger.in_dir(tmp_path)  # a new process reads the same file
    with restarted.locked():
        b = admit(policy, restarted, REQUEST, EVENT, server_round=1)  # a new run, round 1 again
    assert [e["seq"] for e in restarted.entries()] == [1, 2]
    assert b["epsilon_after"] > a["epsilon_after"]
    assert b["epsilon_after"] == pytest.approx(accounting.epsilon([EVENT, EVENT], 1e-5))


def test_tampered_ledger_stops_the_node(tmp_path: Path) -> None:
    ledger = Ledger.in_dir(tmp_path)
    with ledger.locked():
        admit(Policy(epsilon=100.0), ledger, REQUEST, EVENT)
        admit(Policy(epsilon=100.0), ledger, REQUEST, EVENT)
    lines = ledger.path.read_text().splitlines()
    entry = json.loads(lines[0])
    entry["event"]["steps"] = 1  # pretend less was spent
    ledger.path.write_text("\n".join([json.dumps(entry), lines[1]]) + "\n")
    with pytest.raises(LedgerError, match="line 1 fails its checksum chain"):
        ledger.entries()
    ledger.path.write_text(lines[1] + "\n")  # dropping the first spend breaks the chain too
    with pytest.raises(LedgerError, match="line 1"):
        ledger.entries()


def test_node_refuses_once_its_budget_is_spent(tmp_path: Path) -> None:
    ledger = Ledger.in_dir(tmp_path)
    budget = accounting.epsilon([EVENT, EVENT], 1e-5) * 1.01
    policy = Policy(epsilon=budget)
    with ledger.locked():
        admit(policy, ledger, REQUEST, EVENT)
        admit(policy, ledger, REQUEST, EVENT)
        with pytest.raises(Refusal, match="privacy budget: this round would bring epsilon to") as refusal:
            admit(policy, ledger, REQUEST, EVENT)
    assert refusal.value.code == wire.ERROR_BUDGET
    assert len(ledger.entries()) == 2


@pytest.mark.parametrize(
    ("policy", "request_", "fragment"),
    [
        (Policy(epsilon=10, min_noise_multiplier=1.5), REQUEST, "noise multiplier 1 is below this node's minimum 1.5"),
        (Policy(epsilon=10, max_clip_norm=0.5), REQUEST, "clipping norm 1 exceeds this node's maximum 0.5"),
        (Policy(epsilon=10), None, "this node trains only with local DP"),
        (Policy(epsilon=10, require_secagg=True), REQUEST, "only under secure aggregation"),  # not `secure`
    ],
)
def test_policy_violations_are_refused(tmp_path: Path, policy: Policy, request_, fragment: str) -> None:  # noqa: ANN001
    ledger = Ledger.in_dir(tmp_path)
    with pytest.raises(Refusal, match=fragment) as refusal:
        admit(policy, ledger, request_, EVENT if request_ else None)
    assert refusal.value.code == wire.ERROR_POLICY and ledger.entries() == []


def test_client_app_refuses_past_budget_and_says_why(tiny_federation: Path, tmp_path: Path) -> None:
    # a fresh run for every test: a node serves one contribution per (run, round)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = secrets.randbits(48), 1, 0
    node = tmp_path / "site"
    shutil.copytree(tiny_federation / "node-0", node, ignore=shutil.ignore_patterns(".oncofed"))
    n_train = len(load_local_data(node, TASK).train)
    one_round = local_event(n_train, epochs=1, batch_size=8, noise_multiplier=1.0)
    save_policy(state_dir(node), Policy(epsilon=accounting.epsilon([one_round], 1e-5) * 1.001))
    config = ConfigRecord({wire.TASK: "seg2d", wire.EPOCHS: 1, wire.LR: 0.01, wire.BATCH_SIZE: 8, wire.SEED: 0,
                           wire.SERVER_ROUND: 1, wire.LOCAL_NOISE_MULTIPLIER: 1.0, wire.LOCAL_MAX_GRAD_NORM: 1.0})
    context = Context(run_id=1, node_id=7, node_config={wire.NODE_DATA_DIR: str(node)}, state=RecordDict(), run_config={})

    def ask() -> Message:
        msg = Message(content=RecordDict({wire.ARRAYS: initial_arrays(Config()), wire.CONFIG: config}),
                      dst_node_id=7, message_type=MessageType.TRAIN)
        return unpack_message(app(msg, context))  # as the server reads it (fl.packing)

    first = ask()
    assert not first.has_error()
    assert first.content[wire.METRICS][wire.EPSILON_RECORD] == pytest.approx(accounting.epsilon([one_round], 1e-5))
    config[wire.SERVER_ROUND] = 2  # the next round (a second request for round 1 is refused as a replay)
    second = ask()
    assert second.has_error() and second.error.code == wire.ERROR_BUDGET
    assert "privacy budget" in second.error.reason and str(node) not in second.error.reason
    assert len(Ledger.in_dir(state_dir(node)).entries()) == 1


def test_node_processes_without_local_dp_do_not_load_opacus() -> None:
    # every virtual node and every deployed ClientApp process imports the node app; Opacus
    # (1.4 s to import here) is loaded only when a train request asks for DP-SGD
    probe = "import sys, nodes.client_app; print('opacus' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.stdout.strip() == "False"


def test_policy_file_with_a_wrong_type_is_named(tmp_path: Path) -> None:
    folder = state_dir(tmp_path)
    save_policy(folder, Policy(require_secagg=True))
    assert load_policy(folder).require_secagg is True
    (folder / "policy.toml").write_text('require_secagg = "yes"\n')
    with pytest.raises(ConfigError, match="policy.toml: policy require_secagg: invalid value 'yes'"):
        load_policy(folder)
    (folder / "policy.toml").write_text("epsilon = true\n")
    with pytest.raises(ConfigError, match="policy epsilon"):
        load_policy(folder)


def test_node_policy_command_sets_the_secagg_requirement(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fl.cli import main

    assert main(["node", "policy", "--data", str(tmp_path), "--epsilon", "4", "--require-secagg"]) == 0
    assert load_policy(state_dir(tmp_path)) == Policy(epsilon=4.0, require_secagg=True)
    capsys.readouterr()
    assert main(["node", "budget", "--data", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["require_secagg"] is True


def test_a_delta_not_below_one_over_the_record_count_is_refused(tmp_path: Path) -> None:
    ledger = Ledger.in_dir(tmp_path)
    with ledger.locked(), pytest.raises(Refusal, match=r"delta 0.05 is not below 1/40") as refusal:
        admit(Policy(epsilon=10, delta=0.05), ledger, REQUEST, EVENT, num_records=40)
    assert refusal.value.code == wire.ERROR_POLICY and ledger.entries() == []
    with ledger.locked():
        assert admit(Policy(epsilon=10, delta=1e-3), ledger, REQUEST, EVENT, num_records=40) is not None


def test_an_accounting_failure_is_a_refusal_not_a_spend(tmp_path: Path) -> None:
    ledger = Ledger.in_dir(tmp_path)
    tiny = accounting.GaussianEvent(0.01, 0.1, 100)  # PLD would not finish; PRV would ask for 26 GB
    with ledger.locked(), pytest.raises(Refusal, match="privacy accounting: accountant pld"):
        admit(Policy(epsilon=1e9, accountant="pld"), ledger, LocalDpRequest(0.01, 1.0), tiny)
    assert ledger.entries() == []
