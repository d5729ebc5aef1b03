"""Dataset descriptors a site releases for the model card: exact counts, their noisy release,
its charge to the ledger, and what a reader derives from them."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from fl.errors import DataError
from fl.learn import get_task
from fl.learn.synth import DATASET_JSON, write_cases
from fl.registry.card import describe
from nodes import descriptors
from nodes.ledger import Ledger
from nodes.policy import Policy

# (finest, coarsest) spacing in mm and the label values each case holds
CASES = [((0.7, 0.7, 5.0), {1}), ((0.9, 0.9, 2.5), {1, 2}), ((1.2, 1.2, 1.2), set()), ((0.7, 0.7, 5.0), {2})]


@pytest.fixture()
def site(tmp_path: Path) -> Path:
    folder = tmp_path / "site"
    made = iter(CASES)

    def make_case() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        spacing, values = next(made)
        label = np.zeros((6, 6, 4), dtype=np.uint8)
        for i, v in enumerate(sorted(values)):
            label[i, 0, 0] = v
        return np.zeros(label.shape, dtype=np.float32), label, np.diag([*spacing, 1.0])

    entries = write_cases(folder, (3, 1), make_case)
    (folder / DATASET_JSON).write_text(json.dumps({
        "modality": {"0": "CT"}, "labels": {"0": "background", "1": "organ", "2": "lesion"}, **entries}))
    return folder


def test_exact_counts_bin_each_case_and_count_the_cases_holding_each_label(site: Path) -> None:
    exact = descriptors.count(site)
    assert exact["modality"] == ["CT"] and exact["labels"] == ["organ", "lesion"]
    assert exact["label_cases"] == [2, 2]
    edges = descriptors.SPACING_EDGES
    expected_finest = [0] * (len(edges) - 1)
    expected_coarsest = [0] * (len(edges) - 1)
    for spacing, _ in CASES:
        expected_finest[next(i for i in range(len(edges) - 1) if edges[i] <= min(spacing) < edges[i + 1])] += 1
        expected_coarsest[next(i for i in range(len(edges) - 1) if edges[i] <= max(spacing) < edges[i + 1])] += 1
    assert exact["spacing_finest"] == expected_finest and exact["spacing_coarsest"] == expected_coarsest
    assert exact["spacing_range"] == pytest.approx([0.7, 5.0])
    assert exact["sensitivity"] == pytest.approx(math.sqrt(5))  # one case: two histograms, two labels, a series count


def test_a_noisy_release_adds_the_calibrated_noise_to_every_count_and_drops_the_exact_range(site: Path) -> None:
    exact = descriptors.count(site)
    rng = np.random.default_rng(0)
    draws = [descriptors.release(exact, cases=(3, 1), noise_multiplier=2.0, noise=lambda n, s: rng.normal(0, s, n))
             for _ in range(3000)]
    assert all(d["release"] == "noisy" and d["spacing_range"] is None for d in draws)
    std = 2.0 * math.sqrt(5)
    assert draws[0]["noise_std"] == pytest.approx(std)
    keys = ("label_cases", "spacing_finest", "dicom_series")
    noise = np.array([np.subtract(sum((d[k] for k in keys), []), sum((exact[k] for k in keys), [])) for d in draws])
    assert noise.shape[1] == 2 + 8 + 2 and noise.mean() == pytest.approx(0.0, abs=0.06)
    assert noise.std(axis=0) == pytest.approx(np.full(noise.shape[1], std), rel=0.06)
    plain = descriptors.release(exact, cases=(3, 1), noise_multiplier=None, noise=lambda n, s: 1 / 0)
    assert plain["release"] == "exact" and plain["label_cases"] == [2, 2] and plain["spacing_range"] == [0.7, 5.0]


def _data(n_train: int = 3, n_val: int = 1) -> SimpleNamespace:
    return SimpleNamespace(digest="ab" * 32, train=[0] * n_train, val=[0] * n_val)


def test_a_noisy_release_is_charged_once_then_served_again_unchanged(site: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    ledger = Ledger.in_dir(state)
    policy = Policy(delta=1e-3, release_descriptors="noisy", descriptors_noise_multiplier=3.0)
    first, why = descriptors.release_for(state, site, _data(), policy, ledger, dp_requested=False, server_round=0,
                                         labels=lambda: None)
    assert why is None and first["release"] == "noisy" and first["noise_std"] == pytest.approx(3.0 * math.sqrt(5))
    events = ledger.events()
    assert len(events) == 1 and events[0].noise_multiplier == 3.0
    assert ledger.entries()[0]["release"] == "descriptors" and first["epsilon_after"] > 0
    again, _ = descriptors.release_for(state, site, _data(), policy, ledger, dp_requested=False, server_round=1,
                                       labels=lambda: None)
    assert again == first and len(ledger.events()) == 1  # post-processing of the kept release: no new charge


def test_descriptors_are_declined_by_policy_budget_or_delta_without_a_charge(site: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    ledger = Ledger.in_dir(state)
    cases = dict(dp_requested=False, server_round=0, labels=lambda: None)
    out, why = descriptors.release_for(state, site, _data(), Policy(epsilon=5.0), ledger, **cases)
    assert out is None and "releases no dataset descriptors" in why  # auto under a budget: none
    poor = Policy(epsilon=0.1, delta=1e-3, release_descriptors="noisy")
    out, why = descriptors.release_for(state, site, _data(), poor, ledger, **cases)
    assert out is None and "privacy budget" in why
    loose = Policy(delta=0.3, release_descriptors="noisy")  # 4 cases: delta must be below 1/4
    out, why = descriptors.release_for(state, site, _data(), loose, ledger, **cases)
    assert out is None and "not below 1/4" in why
    assert ledger.events() == [] and not (state / descriptors.CACHE_FILE).exists()


def test_a_malformed_label_declaration_names_the_file(site: Path) -> None:
    (site / DATASET_JSON).write_text(json.dumps({"labels": {"one": "organ"}}))
    with pytest.raises(DataError, match=r"dataset.json: labels: key 'one'"):
        descriptors.count(site)


def test_a_reader_shows_only_spacing_bins_above_the_noise_and_prevalence_with_its_interval() -> None:
    edges = list(descriptors.SPACING_EDGES[1:-1])
    released = {"cases_training": 90, "cases_validation": 10, "noise_std": 4.0, "release": "noisy",
                "modality": ["CT"], "labels": ["organ"], "label_cases": [60.0], "spacing_edges": edges,
                "spacing_finest": [3.0, 55.0, 40.0, 2.0, 11.0, 0, 0, 0],
                "spacing_coarsest": [0, 0, 0, 0, 0, 0, 50.0, 48.0]}
    view = describe(released)
    assert view["spacing_finest_mm"] == [0.5, 1.0]  # the bins with 3, 2 and 11 (< 3 stds, 12) are not shown
    assert view["spacing_coarsest_mm"] == [3.0, None]  # 3 mm or more
    organ = view["label_prevalence"]["organ"]
    assert organ["share"] == pytest.approx(0.6)
    assert organ["ci_high"] - organ["share"] == pytest.approx(1.959963984540054 * 4.0 / 100)


def test_tabular_records_release_their_label_count_without_spacing(tmp_path: Path) -> None:
    import torch

    folder = tmp_path / "table"
    folder.mkdir()
    (folder / DATASET_JSON).write_text(json.dumps({"format": "tabular", "training": "./train.csv"}))
    data = SimpleNamespace(digest="cd" * 32, train=_Records(torch.tensor([1, 0, 1, 1])),
                           val=_Records(torch.tensor([0, 1])))
    state = tmp_path / "state"
    state.mkdir()
    out, why = descriptors.release_for(state, folder, data, Policy(), Ledger.in_dir(state), dp_requested=False,
                                       server_round=0,
                                       labels=lambda: get_task("tabular").record_labels(data))
    assert why is None and out["release"] == "exact" and out["modality"] == ["tabular"]
    assert out["labels"] == ["label 1"] and out["label_cases"] == [4] and out["spacing_finest"] is None
    assert (out["cases_training"], out["cases_validation"]) == (4, 2)


class _Records:
    def __init__(self, labels: object) -> None:
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)  # type: ignore[arg-type]
