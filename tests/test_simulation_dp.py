"""End to end with both guarantees: epsilon in every manifest, nodes stopping at their budget."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fl import wire
from fl.cli import main
from fl.config import Config
from fl.learn import get_task
from fl.learn.data import load_local_data
from fl.learn.synth import synthesize
from fl.privacy import accounting
from fl.privacy.accounting import local_event
from fl.registry import Registry
from nodes.ledger import Ledger
from nodes.policy import Policy, save_policy, state_dir
from strategies.central_account import CentralAccount
from strategies.factory import central_dp_settings

REPO = Path(__file__).resolve().parents[1]


def test_dp_run_accounts_both_levels_and_stops_at_the_nodes_budget(tmp_path: Path) -> None:
    root = tmp_path / "data"
    synthesize(root, nodes=2, task=get_task("seg2d"), seed=2, image_size=32)
    events = [local_event(len(load_local_data(root / f"node-{i}", get_task("seg2d")).train), epochs=1,
                          batch_size=8, noise_multiplier=1.0) for i in range(2)]
    budgets = []
    for i, e in enumerate(events):  # each operator leaves room for two rounds, not three
        budgets.append((accounting.epsilon([e, e], 1e-5) + accounting.epsilon([e, e, e], 1e-5)) / 2)
        save_policy(state_dir(root / f"node-{i}"), Policy(epsilon=budgets[-1], min_noise_multiplier=0.5))

    code = main([
        "run", str(REPO / "configs" / "dp-both.toml"), "--out", str(tmp_path / "runs"),
        "--set", f'data.root="{root}"', "--set", "data.nodes=2", "--set", "rounds=3",
        "--set", "train.epochs=1", "--set", f'registry.root="{tmp_path / "reg"}"', "--set", "output.run_name=dp",
        "--set", "node_policy.epsilon=0", "--set", "node_policy.release_metrics='auto'",  # keep the operators' own policies
    ])
    assert code == 0
    summary = json.loads((tmp_path / "runs" / "dp" / "summary.json").read_text())
    assert summary["versions"] == ["dp-both:v1", "dp-both:v2"]
    assert "every node refused" in summary["stopped"] and "privacy budget" in summary["stopped"]

    versions = Registry(tmp_path / "reg").verify("dp-both")
    privacy = versions[-1].manifest["privacy"]
    cfg = Config().replace(**{"central_dp.enabled": True, "central_dp.clipping": "adaptive",
                              "central_dp.noise_multiplier": 0.3, "data.nodes": 2})
    expected_central = accounting.epsilon([central_dp_settings(cfg).round_event()] * 2, 1e-5)
    assert privacy["client_level"]["epsilon"] == pytest.approx(expected_central)
    assert privacy["client_level"]["rounds"] == 2
    local = versions[-1].manifest["dp"]["local"]
    assert {k: local[k] for k in ("noise_multiplier", "max_grad_norm", "trainable", "views", "ema_decay")} == {
        "noise_multiplier": 1.0, "max_grad_norm": 1.0, "trainable": "all", "views": 1, "ema_decay": 0.0}
    net = get_task("seg2d").build_network()
    assert local["trained_parameters"] == sum(p.numel() for p in net.parameters())
    # a DP manifest holds public configuration and DP releases only: no adaptive-clipping bits,
    # example counts, exact metrics or failure reasons (the coordinator's run folder keeps those)
    for version in versions:
        text = json.dumps({k: v for k, v in version.manifest.items() if k != "config"})
        for leak in ("update-norm-below-clip", "num_examples", "num-examples", "train-loss", "val-loss", "dice"):
            assert leak not in text, leak
        assert version.manifest["failures"] is None and version.manifest["metrics"] == {"evaluate": None}
        assert [set(n) for n in version.manifest["nodes"]] == [{"node_id", "dataset_fingerprint", "device"}] * 2
    line = json.loads((tmp_path / "runs" / "dp" / "metrics.jsonl").read_text().splitlines()[1])
    assert all(wire.NUM_EXAMPLES in m for m in line["train"]["nodes"].values())  # the coordinator's own log
    reported = sorted(v["epsilon"] for v in privacy["record_level"].values())
    ledgers = sorted(Ledger.in_dir(state_dir(root / f"node-{i}")).entries()[-1]["epsilon_after"] for i in range(2))
    assert reported == pytest.approx(ledgers)
    for i in range(2):
        entries = Ledger.in_dir(state_dir(root / f"node-{i}")).entries()
        assert len(entries) == 2 and entries[-1]["epsilon_after"] <= budgets[i]
    metrics = [json.loads(line) for line in (tmp_path / "runs" / "dp" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["privacy"]["client_level"]["epsilon"] == pytest.approx(expected_central)


def test_server_stops_before_the_round_that_would_pass_its_central_target(tmp_path: Path) -> None:
    cfg = Config().replace(**{"central_dp.enabled": True, "central_dp.noise_multiplier": 2.0,
                              "registry.root": str(tmp_path / "reg")})
    per_round = central_dp_settings(cfg).round_event()
    target = accounting.epsilon([per_round] * 3, 1e-5) * 1.001
    account = CentralAccount.start(cfg.replace(**{"central_dp.target_epsilon": target}))
    for r in range(3):
        assert account.would_exceed() is None
        account.spend(r + 1, "run")
    assert "would reach" in account.would_exceed()
    resumed = CentralAccount.resume(cfg, {"privacy": {"client_level": account.report()}})
    assert resumed.epsilon() == pytest.approx(account.epsilon())  # a restart forgets nothing
    # a release journaled after the last commit's manifest was written still counts on resume
    report = account.report()
    account.spend(4, "run")
    assert len(CentralAccount.resume(cfg, {"privacy": {"client_level": report}}).events) == 4


def test_noisy_metrics_reach_the_manifest_as_a_dp_release(tmp_path: Path) -> None:
    """Nodes whose policy releases noisy scores: the manifest carries the aggregate score (and
    only it), each node's ledger holds the metric releases beside its trainings."""
    root = tmp_path / "data"
    synthesize(root, nodes=2, task=get_task("seg2d"), seed=3, image_size=32)
    assert main([
        "run", str(REPO / "configs" / "dp-local.toml"), "--out", str(tmp_path / "runs"),
        "--set", f'data.root="{root}"', "--set", "data.nodes=2", "--set", "rounds=1", "--set", "train.epochs=1",
        "--set", f'registry.root="{tmp_path / "reg"}"', "--set", "output.run_name=noisy",
        "--set", "node_policy.release_metrics='noisy'", "--set", "node_policy.metrics_noise_multiplier=4.0",
    ]) == 0
    manifest = Registry(tmp_path / "reg").verify("dp-local")[-1].manifest
    aggregate = manifest["metrics"]["evaluate"]["aggregate"]
    assert set(aggregate) == {"dice"} and 0.0 <= aggregate["dice"] <= 1.0
    for i in range(2):
        kinds = [e.get("release", "training") for e in Ledger.in_dir(state_dir(root / f"node-{i}")).entries()]
        assert kinds == ["metrics", "training", "metrics"]  # initial evaluation, round 1, its evaluation
