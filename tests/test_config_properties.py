"""Property tests: any config or --set a user can type yields a Config or one ConfigError, never a traceback."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from fl import config
from fl.cli import main
from fl.errors import ConfigError

KEYS = [spec.key for spec in config.KEYS]
VALUES = st.one_of(
    st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.none(), st.lists(st.integers(), max_size=2),
)
KEY_NAMES = st.one_of(st.sampled_from(KEYS), st.text(min_size=1, max_size=20))


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(KEY_NAMES, VALUES, max_size=5))
def test_any_flat_config_builds_or_raises_config_error(flat: dict) -> None:
    try:
        cfg = config.from_flat(flat, source="prop.toml")
    except ConfigError as exc:
        assert str(exc).startswith("prop.toml")
    else:
        assert config.from_flat(cfg.to_flat()) == cfg


@settings(max_examples=60, deadline=None)
@given(key=KEY_NAMES, raw=st.text(max_size=15).filter(lambda t: "\n" not in t and "\r" not in t))
def test_any_set_override_is_refused_with_one_line_or_loads(key: str, raw: str) -> None:
    try:
        item = config.parse_override(f"{key}={raw}")
        config.from_flat({item[0]: item[1]}, source="--set")
    except ConfigError as exc:
        assert "\n" not in str(exc)


def test_cli_never_shows_a_traceback_for_bad_sets(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    for bad in ("rounds=-1", "task=seg9d", "train.lr=nan", "central_dp.clipping=adaptve", "=3", "data.nodes=0.5",
                "strategy.name=fedprox", "simulation.adversaries=9"):
        code = main(["run", str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.toml"), "--out", str(tmp_path), "--set", bad])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error: ") and "Traceback" not in err, (bad, err)
