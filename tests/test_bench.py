"""``fl bench``: suites load, cells resume, tables hold mean and std; the audit's epsilon lower
bound is sound; ``fl report`` and the TensorBoard event files carry a run's numbers."""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fl import bench
from fl.bench import suite as bench_suite
from fl.bench.audit import attack, clopper_pearson, epsilon_lower_bound
from fl.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


# ----- suites ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", bench.suite_names())
@pytest.mark.parametrize("quick", [False, True])
def test_every_suite_loads(name: str, quick: bool) -> None:
    suite = bench.load_suite(name, quick=quick)
    assert suite.cells and suite.seeds >= 1 and suite.runner in bench.RUNNERS
    if quick:
        assert suite.seeds == 1


def test_the_suites_the_issue_names_exist() -> None:
    assert {"privacy-utility", "overhead", "dp-cost", "scale", "strategies", "privacy-audit",
            "real-tabular"} <= set(bench.suite_names())


def test_unknown_suite_names_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="suites: .*privacy-utility"):
        bench.load_suite("privacy-utilty")


def test_cells_resume_and_the_table_holds_mean_and_std(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, int]] = []

    def fake(suite: bench.Suite, cell: bench.Cell, seed: int, out: Path) -> dict:  # type: ignore[type-arg]
        calls.append((cell.name, seed))
        return {"score": float(cell.get("epsilon", 10)) + seed, "label": "x"}

    monkeypatch.setitem(bench.RUNNERS, "fake", fake)
    suites = tmp_path / "configs" / "bench"
    suites.mkdir(parents=True)
    (suites / "toy.toml").write_text("""
title = "toy"
runner = "fake"
seeds = 3
columns = ["cell", "epsilon", "score"]
[[cells]]
name = "a"
epsilon = 1.0
[[cells]]
name = "b"
epsilon = 2.0
[[plots]]
file = "score.png"
x = "epsilon"
y = "score"
""")
    monkeypatch.setattr(bench_suite, "SUITES", suites)
    monkeypatch.setattr(bench_suite, "REPO", tmp_path)
    out = tmp_path / "out"
    rows = bench.run_suite(bench.load_suite("toy"), out, say=lambda _: None)
    assert len(rows) == 6 and len(calls) == 6
    assert bench.run_suite(bench.load_suite("toy"), out, say=lambda _: None) == rows
    assert len(calls) == 6  # resumed: nothing measured again
    (out / "cells" / "b--seed1.json").unlink()
    bench.run_suite(bench.load_suite("toy"), out, say=lambda _: None)
    assert calls[6:] == [("b", 1)]  # only the missing cell
    summary = {r["cell"]: r for r in bench.summarise(bench.load_suite("toy"), rows)}
    assert summary["a"]["score"] == pytest.approx(2.0) and summary["a"]["score_std"] == pytest.approx(1.0)
    report = (out / "report.md").read_text()
    assert "| a | 1 | 2 ± 1 |" in report and "![score](score.png)" in report
    assert (out / "score.png").stat().st_size > 1000
    assert (out / "results.csv").read_text().count("\n") == 7


# ----- the audit's lower bound ---------------------------------------------------------------------
def test_clopper_pearson_matches_scipy_exact_interval() -> None:
    from scipy.stats import binomtest

    for k, n in ((0, 50), (7, 50), (50, 50), (312, 1000)):
        low, high = clopper_pearson(k, n)
        ci = binomtest(k, n).proportion_ci(confidence_level=0.90, method="exact")  # one-sided 95% each side
        assert low == pytest.approx(ci.low, abs=1e-9) and high == pytest.approx(ci.high, abs=1e-9)


def test_lower_bound_is_sound_and_tight_for_randomised_response() -> None:
    """A mechanism that is exactly eps-DP: the bound stays below eps and, with many samples,
    comes close to it."""
    eps = 1.0
    rng = np.random.default_rng(0)
    n = 20_000
    p = math.exp(eps) / (1 + math.exp(eps))
    members = rng.random(n) < p  # the attack guesses "member" on output 1
    outsiders = rng.random(n) < 1 - p
    bound = epsilon_lower_bound(int(members.sum()), n, int(outsiders.sum()), n, delta=0.0)
    assert 0.85 * eps < bound < eps


def test_attack_separates_memorised_canaries_only() -> None:
    rng = np.random.default_rng(1)
    memorised = attack(rng.normal(0.2, 0.05, 100), rng.normal(1.0, 0.05, 100), 1e-5, seed=0)
    assert memorised["eps_lower"] > 2.0 and memorised["attack_tpr"] > 0.9
    same = attack(rng.normal(1.0, 0.1, 100), rng.normal(1.0, 0.1, 100), 1e-5, seed=0)
    assert same["eps_lower"] < 0.5


# ----- fl report and TensorBoard ---------------------------------------------------------------------
def _events(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Scalars from TensorBoard event files (TFRecord framing, Event protos)."""
    from tensorboardX.proto import event_pb2

    out: dict[str, list[tuple[int, float]]] = {}
    for path in folder.glob("events.out.tfevents.*"):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12: offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out


@pytest.fixture(scope="module")
def tabular_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-round tabular federation on the real Breast Cancer Wisconsin split (4 hospitals)."""
    from fl.cli import main
    from fl.learn.tabular import write_federation

    tmp = tmp_path_factory.mktemp("tab")
    write_federation(tmp / "data", nodes=4, seed=0)
    assert main(["run", str(REPO / "configs" / "quickstart.toml"), "--out", str(tmp / "runs"),
                 "--set", "task='tabular'", "--set", f"data.root='{tmp / 'data'}'", "--set", "data.nodes=4",
                 "--set", "data.synthesize=false", "--set", "rounds=3", "--set", "train.epochs=5",
                 "--set", "train.lr=0.005", "--set", "train.batch_size=16", "--set", "output.run_name=tab",
                 "--set", f"registry.root='{tmp / 'registry'}'", "--set", "model_name=tab"]) == 0
    return tmp / "runs" / "tab"


@pytest.mark.federation
def test_tabular_federation_learns_real_data(tabular_run: Path) -> None:
    summary = json.loads((tabular_run / "summary.json").read_text())
    assert summary["metric"] == "auc"
    assert summary["final_metrics"]["auc"] > 0.9 > summary["initial_metrics"]["auc"] + 0.2


@pytest.mark.federation
def test_tensorboard_events_match_metrics(tabular_run: Path) -> None:
    events = _events(tabular_run / "tensorboard")
    lines = [json.loads(line) for line in (tabular_run / "metrics.jsonl").read_text().splitlines()]
    expected = [(r["round"], r["evaluate"]["aggregate"]["auc"]) for r in lines]
    assert [(s, pytest.approx(v, rel=1e-6)) for s, v in events["evaluate/auc"]] == expected
    assert len([tag for tag in events if tag.startswith("nodes/auc/")]) == 4


@pytest.mark.federation
def test_report_draws_the_curves(tabular_run: Path, tmp_path: Path) -> None:
    from fl.cli import main

    assert main(["report", str(tabular_run), "--out", str(tmp_path)]) == 0
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    assert main(["report", str(tmp_path)]) == 2  # not a run folder: one-line error


@pytest.mark.federation
def test_flower_baseline_app_runs(tmp_path: Path) -> None:
    """The overhead suite's yardstick still runs against this Flower version."""
    from fl.learn import get_task
    from fl.learn.synth import synthesize

    synthesize(tmp_path / "data", nodes=2, task=get_task("seg2d"), image_size=32)
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "baselines" / "flower_app.py"), "--data",
                           str(tmp_path / "data"), "--nodes", "2", "--rounds", "2", "--epochs", "2", "--lr", "0.01",
                           "--batch-size", "8", "--result", str(tmp_path / "r.json")], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["wall_per_round_s"] > result["train_per_round_s"] > 0 and result["dice"] > 0.2


@pytest.mark.federation
def test_the_pooled_reference_trains_the_bundle_the_run_config_names(tmp_path: Path) -> None:
    # a run config with its own bundle gets a pooled reference with that bundle, not the catalogue's
    missing = tmp_path / "no-such-bundle"
    proc = subprocess.run([sys.executable, "-m", "fl.bench.centralised", "--data", str(tmp_path), "--nodes", "1",
                           "--rounds", "1", "--epochs", "1", "--lr", "0.01", "--batch-size", "2",
                           "--result", str(tmp_path / "r.json"), "--bundle", str(missing)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and str(missing) in proc.stderr
    assert not (tmp_path / "r.json").exists()
