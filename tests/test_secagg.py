"""SecAgg+ (``secagg.enabled``): the combinations it cannot honour are refused, and the model it
produces is the one plain equal-weight FedAvg produces, to within quantisation error."""

from __future__ import annotations

import json
import secrets
import tomllib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fl import config
from fl.cli import main
from fl.errors import ConfigError
from fl.learn import get_task
from fl.learn.synth import node_dir, synthesize
from fl.server.rounds import initial_arrays

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("overrides, message", [
    ({"strategy.name": "median"}, "median needs every update"),
    ({"strategy.name": "fedexp"}, "fedexp needs every update"),
    ({"strategy.max_update_norm": 5.0}, "cannot check one update's norm"),
    ({"central_dp.enabled": True}, "central_dp.clip_on: the server cannot clip"),
    ({"central_dp.enabled": True, "central_dp.clip_on": "client", "central_dp.clipping": "adaptive"},
     "adaptive clipping needs each node's unclipped bit"),
    ({"data.nodes": 2}, "SecAgg\\+ among 2 nodes"),
    ({"central_dp.enabled": True, "central_dp.clip_on": "client", "secagg.clipping_range": 0.5},
     "below central_dp.clipping_norm"),
])
def test_refuses_what_it_cannot_honour(overrides: dict, message: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ConfigError, match=message):
        config.from_flat({"secagg.enabled": True, **overrides})
    config.from_flat({"secagg.enabled": False, **overrides} if "central_dp.clipping" not in overrides
                     else {**overrides})


def _equal_sized(root: Path, nodes: int, cases: int) -> None:
    """Give every node the same number of training cases, so FedAvg's weights are equal."""
    for i in range(nodes):
        path = node_dir(root, i) / "dataset.json"
        manifest = json.loads(path.read_text())
        manifest["training"] = manifest["training"][:cases]
        manifest["numTraining"] = cases
        path.write_text(json.dumps(manifest))


def _run(tmp: Path, name: str, *extra: str, code: int = 0) -> dict[str, torch.Tensor]:
    assert main([
        "run", str(REPO / "configs" / "quickstart.toml"), "--out", str(tmp / "runs"),
        "--set", f'data.root="{tmp / "data"}"', "--set", "data.nodes=3", "--set", "data.image_size=32",
        "--set", "rounds=1", "--set", "train.epochs=1", "--set", "strategy.evaluate_initial=false",
        "--set", f'registry.root="{tmp / "registry"}"', "--set", f"model_name={name}",
        "--set", f"output.run_name={name}", *extra,
    ]) == code
    return load_file(tmp / "runs" / name / "model.safetensors") if code == 0 else {}


def test_secure_sum_equals_plain_fedavg_and_a_node_requiring_it_refuses_plain_requests(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    synthesize(tmp_path / "data", nodes=3, task=get_task("seg2d"), image_size=32)
    _equal_sized(tmp_path / "data", 3, 12)
    plain = _run(tmp_path, "plain")
    # the nodes' operators now require secure aggregation: the same round under SecAgg+ is served
    require = ["--set", "node_policy.require_secagg=true"]
    secure = _run(tmp_path, "secure", *require, "--set", "secagg.enabled=true")
    policy = tomllib.loads((node_dir(tmp_path / "data", 0) / ".oncofed" / "policy.toml").read_text())
    assert policy["require_secagg"] is True
    initial = initial_arrays(config.from_flat({"data.image_size": 32})).to_torch_state_dict()
    moved = max(float((plain[k] - v).abs().max()) for k, v in initial.items())
    assert moved > 1e-3  # the round did change the model
    worst = max(float((plain[k] - secure[k]).abs().max()) for k in plain)
    assert worst < 1e-4, worst  # quantisation step 16 / 2**22 = 3.8e-6 per node
    # OncoFed's malicious-secure stages on the Simulation Engine: fl run makes each virtual node's site
    # key and pins one roster; the same model, to within quantisation
    malicious = _run(tmp_path, "malicious", *require, "--set", "secagg.enabled=true",
                     "--set", "secagg.protocol='malicious'")
    worst = max(float((plain[k] - malicious[k]).abs().max()) for k in plain)
    assert worst < 1e-4, worst

    line = json.loads((tmp_path / "runs" / "secure" / "metrics.jsonl").read_text().splitlines()[-1])
    assert len(line["train"]["nodes"]) == 3 and line["failures"] == {}
    manifest = json.loads((tmp_path / "registry" / "secure" / "v1" / "manifest.json").read_text())
    assert [bool(n["dataset_fingerprint"]) for n in manifest["nodes"]] == [True] * 3  # provenance per node
    assert manifest["secure_aggregation"]["secagg.enabled"] is True

    capsys.readouterr()
    _run(tmp_path, "refused", *require, code=2)  # every node refuses to send its weights in the clear
    err = capsys.readouterr().err
    assert "every node refused" in err and "only under secure aggregation" in err
    assert not (tmp_path / "registry" / "refused" / "v1").exists()
    status = json.loads((tmp_path / "runs" / "refused" / "status.json").read_text())
    assert status["state"] == "failed" and "only under secure aggregation" in status["error"]  # the console says why


def test_secure_aggregation_with_central_dp(tmp_path: Path) -> None:
    synthesize(tmp_path / "data", nodes=3, task=get_task("seg2d"), image_size=32)
    _run(tmp_path, "dp", "--set", "secagg.enabled=true", "--set", "central_dp.enabled=true",
         "--set", "central_dp.clip_on='client'", "--set", "central_dp.noise_multiplier=1.0")
    line = json.loads((tmp_path / "runs" / "dp" / "metrics.jsonl").read_text().splitlines()[-1])
    from fl.privacy.accounting import GaussianEvent, epsilon

    expected = epsilon([GaussianEvent(1.0, 1.0, 1)], 1e-5, "rdp")
    assert abs(line["privacy"]["client_level"]["epsilon"] - expected) < 1e-9
    # scalars travel unmasked beside the masked update: no clipping bit describing it among them
    assert all("update-norm-below-clip" not in n for n in line["train"]["nodes"].values())


def test_instruction_shaped_like_secagg_outside_the_protocol_is_refused(tmp_path: Path) -> None:
    # a server could send SecAgg+'s training instruction without the SecAgg+ stages, to get an
    # unmasked update from a node that insists on SecAgg+: the node tells the paths apart
    from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
    from flwr.common import FitIns, ndarrays_to_parameters
    from flwr.compat.common.recorddict_compat import fitins_to_recorddict
    from flwr.supercore.task_identity import TaskIdentity

    from fl import wire
    from nodes.client_app import app
    from nodes.policy import Policy, save_policy, state_dir
    ARRAY_KEYS = wire.SECAGG_ARRAY_KEYS

    # a fresh run for every test: a node serves one contribution per (run, round)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = secrets.randbits(48), 1, 0
    synthesize(tmp_path / "data", nodes=1, task=get_task("seg2d"), image_size=32)
    node = node_dir(tmp_path / "data", 0)
    arrays = initial_arrays(config.from_flat({"data.image_size": 32}))
    keys = list(arrays.keys())
    settings = {wire.TASK: "seg2d", wire.EPOCHS: 1, wire.LR: 0.01, wire.BATCH_SIZE: 8, wire.SEED: 0,
                wire.SERVER_ROUND: 1, ARRAY_KEYS: json.dumps(keys)}
    context = Context(run_id=1, node_id=7, node_config={wire.NODE_DATA_DIR: str(node)}, state=RecordDict(),
                      run_config={})

    def ask(server_round: int) -> Message:
        fitins = FitIns(ndarrays_to_parameters([arrays[k].numpy() for k in keys]),
                        {**settings, wire.SERVER_ROUND: server_round})
        msg = Message(content=fitins_to_recorddict(fitins, keep_input=True), dst_node_id=7,
                      message_type=MessageType.TRAIN)
        return app(msg, context)

    assert not ask(1).has_error()  # the default policy: a plain update, as without SecAgg+
    save_policy(state_dir(node), Policy(require_secagg=True))
    reply = ask(2)
    assert reply.has_error() and reply.error.code == wire.ERROR_POLICY
    assert "secure aggregation" in reply.error.reason
    plain = Message(content=RecordDict({wire.ARRAYS: arrays, wire.CONFIG: ConfigRecord(dict(settings))}),
                    dst_node_id=7, message_type=MessageType.TRAIN)
    assert app(plain, context).error.code == wire.ERROR_POLICY


def test_a_round_with_two_sampled_nodes_aggregates_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """The 3-node minimum holds per round, not only in the config: Poisson sampling that picks 2
    nodes must not run SecAgg+ between them (each could read the other's update)."""
    from unittest.mock import MagicMock

    from flwr.app import ArrayRecord, ConfigRecord

    from strategies import secagg

    workflow = MagicMock()
    monkeypatch.setattr(secagg, "SecAggPlusWorkflow", workflow)
    strategy = MagicMock()
    strategy.configure_train.return_value = [MagicMock(), MagicMock()]
    result = secagg.secure_round(MagicMock(), strategy, 1, ArrayRecord(), ConfigRecord(), shares=1.0,
                                 threshold=0.7, clipping_range=1.0, timeout=10)
    assert result.update_sum is None and result.contributors == 0
    assert "fewer than the 3" in (result.skipped or "")
    workflow.assert_not_called()
