from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from fl import config
from fl.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_defaults_round_trip_through_flat_keys() -> None:
    cfg = config.Config()
    assert config.from_flat(cfg.to_flat()) == cfg
    assert cfg.min_nodes == cfg.data.nodes


def test_nested_tables_become_dotted_keys(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('rounds = 7\n[train]\nlr = 0.5\n[data]\nnodes = 4\n')
    cfg = config.load(path)
    assert (cfg.rounds, cfg.train.lr, cfg.data.nodes) == (7, 0.5, 4)


def test_set_overrides_any_key_and_parses_toml_values(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("rounds = 7\n")
    cfg = config.load(path, ["rounds=2", "train.lr=0.25", "strategy.name=fedadam", "data.synthesize=false"])
    assert (cfg.rounds, cfg.train.lr, cfg.strategy.name, cfg.data.synthesize) == (2, 0.25, "fedadam", False)


@pytest.mark.parametrize(
    ("flat", "fragment"),
    [
        ({"round": 3}, "unknown key 'round' (did you mean 'rounds'?)"),
        ({"train.lrr": 0.1}, "did you mean 'train.lr'?"),
        ({"rounds": "3"}, "rounds: expected int, got str '3'"),
        ({"rounds": 0}, "rounds: must be > 0, got 0"),
        ({"rounds": True}, "rounds: expected int, got bool"),
        ({"train.lr": float("nan")}, "train.lr: must be a finite number"),
        ({"strategy.fraction_train": 1.5}, "strategy.fraction_train: must be in (0, 1]"),
        ({"strategy.name": "fedavgg"}, "did you mean 'fedavg'?"),
        ({"task": "seg4d"}, "task: must be one of seg2d, seg3d"),
        ({"strategy.name": "fedprox"}, "train.proximal_mu: strategy.name = 'fedprox' needs"),
        ({"strategy.min_nodes": 9}, "strategy.min_nodes: 9 is more than data.nodes = 3"),
    ],
)
def test_bad_values_name_the_key_and_the_problem(flat: dict, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        config.from_flat(flat, source="cfg.toml")
    assert fragment in str(err.value)
    assert str(err.value).startswith("cfg.toml: ")


def test_bad_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="missing.toml: config file not found"):
        config.load(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("rounds = [\n")
    with pytest.raises(ConfigError, match="broken.toml: invalid TOML"):
        config.load(broken)
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        config.parse_override("rounds")


def test_flower_app_config_holds_every_key_with_a_valid_value() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    app_config = pyproject["tool"]["flwr"]["app"]["config"]
    assert set(app_config) == {spec.key for spec in config.KEYS}
    config.from_flat(app_config, source="pyproject.toml")
    # one source: `flwr run .` with no run config trains what `fl run` does with an empty file
    differs = {k: (v, config.Config().to_flat()[k]) for k, v in app_config.items() if config.Config().to_flat()[k] != v}
    assert not differs, f"pyproject.toml [tool.flwr.app.config] differs from fl.config's defaults: {differs}"


def test_docs_document_every_key() -> None:
    page = (REPO / "docs" / "reference" / "config.md").read_text()
    assert config.reference_markdown() in page, "docs/reference/config.md is stale: run python -m fl.cli.reference --write"


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_configs_load(path: Path) -> None:
    config.load(path)


def test_sections_map_by_name_onto_the_node_policy_and_the_central_dp_settings() -> None:
    """Config sections reach the node's Policy and the strategy's DP settings key by name: a field
    added on one side without the other fails here, not silently in a run."""
    import dataclasses

    from nodes.policy import Policy
    from strategies.central_dp import CentralDpSettings
    from strategies.factory import central_dp_settings

    # every node_policy key is a Policy field (`fl run` writes Policy(**asdict(cfg.node_policy)))
    assert {f.name for f in dataclasses.fields(config.NodePolicyConfig)} <= {f.name for f in dataclasses.fields(Policy)}
    settings = {f.name for f in dataclasses.fields(CentralDpSettings)} - {"num_nodes"}
    assert settings <= {f.name for f in dataclasses.fields(config.CentralDpConfig)}
    cfg = config.Config().replace(**{"central_dp.enabled": True, "central_dp.noise_multiplier": 0.7,
                                     "central_dp.clip_lr": 0.3, "data.nodes": 4})
    built = central_dp_settings(cfg)
    assert (built.noise_multiplier, built.clip_lr, built.num_nodes) == (0.7, 0.3, 4)


def test_local_dp_keys_reach_the_node_by_name() -> None:
    """The server's local_dp section and the node's DP-SGD options are the same names, mapped once (fl.wire)."""
    import dataclasses

    from fl import wire
    from fl.learn.dp_train import DpOptions

    options = {f.name for f in dataclasses.fields(DpOptions)}
    assert options == {name for _, name, _, _ in wire.LOCAL_DP_OPTIONS}
    assert options <= {f.name for f in dataclasses.fields(config.LocalDpConfig)}
    cfg = config.Config().replace(**{"local_dp.enabled": True, "local_dp.trainable": "decoder", "local_dp.views": 3,
                                     "local_dp.ema_decay": 0.9})
    sent = wire.local_dp_instruction(cfg.local_dp)
    got = DpOptions(**wire.local_dp_options(sent))
    assert got == DpOptions(trainable="decoder", views=3, view_augment=cfg.local_dp.view_augment, ema_decay=0.9,
                            per_case="auto")
    assert DpOptions(**wire.local_dp_options({})) == DpOptions()  # a server that sends none: the plain mechanism
    assert sent[wire.LOCAL_NOISE_MULTIPLIER] == cfg.local_dp.noise_multiplier
