"""Federated validation, its hash-chained records, release gates and model cards."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from fl.cli import main
from fl.errors import RegistryError
from fl.registry import Registry
from fl.registry.card import card_data, render
from fl.registry.release import Gate, GateFailed, promote
from nodes.ledger import Ledger
from nodes.policy import Policy, save_policy, state_dir
from nodes.site_scores import bootstrap_interval, noisy_interval


# ----- the node's intervals -------------------------------------------------------------------------
def test_bootstrap_interval_brackets_the_mean_is_reproducible_and_narrows_with_cases() -> None:
    torch.manual_seed(0)
    few, many = torch.rand(8), torch.rand(200)
    low, high = bootstrap_interval(few, resamples=2000, confidence=0.95, digest="ab" * 32)
    assert low < float(few.mean()) < high
    assert (low, high) == bootstrap_interval(few, resamples=2000, confidence=0.95, digest="ab" * 32)
    low_m, high_m = bootstrap_interval(many, resamples=2000, confidence=0.95, digest="ab" * 32)
    assert high_m - low_m < high - low
    # the percentile bootstrap of a mean is close to the normal interval for 200 cases
    half = 1.96 * float(many.std()) / 200 ** 0.5
    assert (high_m - low_m) / 2 == pytest.approx(half, rel=0.15)


def test_noisy_interval_uses_public_quantities_only() -> None:
    low, high = noisy_interval(0.8, 25, 5.0, 0.95)
    half = 1.959963984540054 * (0.25 / 25 + (5.0 / 25) ** 2) ** 0.5
    assert (low, high) == pytest.approx((0.8 - half, min(1.0, 0.8 + half)))


def test_a_multi_class_task_releases_each_class_with_its_interval_over_the_cases_that_hold_it() -> None:
    from fl import wire
    from fl.learn.bundle import BundleTask
    from fl.server.validate import _per_class
    from nodes.site_scores import class_intervals

    task = BundleTask.load("configs/bundles/brats_mri_segmentation")
    assert task.class_labels() == ["TC", "WT", "ET"]
    labels = torch.zeros(3, 3, 4, 4, 4)
    labels[:, 0, :2], labels[:, 1, :3] = 1, 1  # TC and WT in every case, ET in none ...
    labels[2, 2, 0] = 1  # ... but the last
    preds = labels.clone()
    preds[0, 1] = 0  # case 0 misses WT entirely
    scores = task.scores(preds, labels)[1]
    assert scores.shape == (3, 3) and torch.isnan(scores[:2, 2]).all()
    per_class = class_intervals(scores, resamples=500, confidence=0.95, digest="cd" * 32)
    assert per_class[0][0] == pytest.approx(1.0) and per_class[1][0] == pytest.approx(2 / 3)
    assert per_class[2][3] == 1  # ET is scored on the one case that holds it
    metrics = {f"{wire.CLASS_PREFIX}{c}{suffix}": value for c, (score, low, high, n) in enumerate(per_class)
               for suffix, value in (("", score), ("-low", low), ("-high", high), ("-cases", n))}
    released = _per_class(metrics, task.class_labels())
    assert released["WT"]["cases"] == 3 and released["WT"]["ci_low"] <= 2 / 3 <= released["WT"]["ci_high"]


# ----- one trained version, validated at 3 sites of which one never trained it ------------------------
@pytest.fixture(scope="module")
def validated(tmp_path_factory: pytest.TempPathFactory) -> dict:  # type: ignore[type-arg]
    from fl.learn import get_task
    from fl.learn.synth import synthesize

    out = tmp_path_factory.mktemp("validation")
    synthesize(out / "data", nodes=2, task=get_task("seg2d"), seed=3, image_size=32)
    synthesize(out / "other", nodes=3, task=get_task("seg2d"), seed=11, image_size=32)
    common = ["--set", f"data.root='{out / 'data'}'", "--set", "data.synthesize=false", "--set", "data.image_size=32",
              "--set", "model_name='val'", "--set", f"registry.root='{out / 'registry'}'", "--out", str(out / "runs")]
    assert main(["run", "configs/quickstart.toml", "--set", "rounds=1", "--set", "data.nodes=2", *common]) == 0
    shutil.copytree(out / "other" / "node-2", out / "data" / "node-2")  # a hospital that never trained it
    # ... whose policy releases its dataset descriptors with noise; the others' (auto, no budget): exact
    save_policy(state_dir(out / "data" / "node-2"), Policy(release_descriptors="noisy"))
    assert main(["validate", "val:v1", "configs/quickstart.toml", "--set", "data.nodes=3", *common]) == 0
    return {"out": out, "registry": Registry(out / "registry")}


def test_validate_records_every_site_with_its_interval_and_names_the_untrained_one(validated: dict) -> None:  # type: ignore[type-arg]
    registry = validated["registry"]
    version = registry.get("val:v1")
    records = registry.validations(version)
    assert len(records) == 3 and len({r["site"] for r in records}) == 3
    assert sorted(r["trained_it"] for r in records) == [False, True, True]
    for r in records:
        assert r["version_hash"] == version.hash and r["metric"] == "dice" and r["release"] == "exact"
        assert 0 <= r["ci_low"] <= r["score"] <= r["ci_high"] <= 1
        assert r["app_hash"].startswith("source-sha256:") and r["code_version"]
    # the run folder says the same, and no per-case value left a site
    result = json.loads(next((validated["out"] / "runs").glob("*/validation.json")).read_text())
    assert [s["hash"] for s in result["sites"]] == [r["hash"] for r in records]
    assert all(set(r) <= {"site", "dataset_fingerprint", "trained_it", "metric", "score", "ci_low", "ci_high",
                          "confidence", "cases", "release", "epsilon_spent", "time", "code_version", "app_hash",
                          "run_id", "per_class", "descriptors", "descriptors_declined", "version", "version_hash",
                          "prev", "hash", "schema"} for r in records)
    assert all(r["per_class"] is None for r in records)  # one foreground class: the score is that class's


def test_each_site_releases_its_dataset_descriptors_as_its_policy_says(validated: dict) -> None:  # type: ignore[type-arg]
    import nibabel as nib

    records = validated["registry"].validations(validated["registry"].get("val:v1"))
    data = validated["out"] / "data"
    for r in records:
        d = r["descriptors"]
        assert d["modality"] == ["synthetic"] and d["labels"] == ["lesion-1"] and r["descriptors_declined"] is None
        assert d["cases_validation"] == r["cases"]
        if r["trained_it"]:  # exact: the counts are the dataset's own
            folder = next(f for f in data.iterdir() if Ledger.in_dir(state_dir(f)).events() == [] and
                          len(json.loads((f / "dataset.json").read_text())["training"]) == d["cases_training"])
            listed = json.loads((folder / "dataset.json").read_text())
            holding = sum(bool((np.asanyarray(nib.load(folder / c["label"]).dataobj) == 1).any())
                          for split in ("training", "validation") for c in listed[split])
            assert d["release"] == "exact" and d["label_cases"] == [holding] and d["spacing_range"] == [1.0, 1.0]
            assert sum(d["spacing_finest"]) == d["cases_training"] + d["cases_validation"]
        else:  # noisy: one Gaussian mechanism, z = 5 over sensitivity sqrt(3 + 1 label), charged once
            assert d["release"] == "noisy" and d["spacing_range"] is None
            assert d["noise_std"] == pytest.approx(5.0 * 4 ** 0.5)
            entries = Ledger.in_dir(state_dir(data / "node-2")).entries()
            assert [e["release"] for e in entries] == ["descriptors"]
            assert d["epsilon_after"] == pytest.approx(entries[0]["epsilon_after"])
    assert all(Ledger.in_dir(state_dir(data / f"node-{i}")).events() == [] for i in (0, 1))


def _copy(registry: Registry, tmp_path: Path) -> Registry:
    shutil.copytree(registry.root, tmp_path / "registry")
    return Registry(tmp_path / "registry")


def test_verify_fails_after_a_record_is_edited(validated: dict, tmp_path: Path,  # type: ignore[type-arg]
                                               capsys: pytest.CaptureFixture[str]) -> None:
    registry = _copy(validated["registry"], tmp_path)
    path = registry.get("val:v1").path / "validations.jsonl"
    lines = path.read_text().splitlines()
    record = json.loads(lines[0])
    record["score"] = 0.99
    path.write_text("\n".join([json.dumps(record, sort_keys=True), *lines[1:]]) + "\n")
    assert main(["models", "verify", "val", "--registry", str(registry.root)]) != 0
    assert "record 1 was changed after it was written" in capsys.readouterr().err


def test_verify_fails_after_records_move_to_other_weights(validated: dict, tmp_path: Path) -> None:  # type: ignore[type-arg]
    from fl.registry.checkpoint import encode_weights
    from fl.server.rounds import initial_arrays

    registry = _copy(validated["registry"], tmp_path)
    v1 = registry.get("val:v1")
    from fl import config

    v2 = registry.commit("val", weights=encode_weights(initial_arrays(config.from_flat({}))), state=b"",
                         fields={"config": v1.manifest["config"]}, expected_parent=v1.hash)
    shutil.move(str(v1.path / "validations.jsonl"), str(v2.path / "validations.jsonl"))
    with pytest.raises(RegistryError, match="v2/validations.jsonl: record 1"):
        registry.verify("val")


def test_promotion_is_refused_by_its_gate_naming_the_sites_then_a_passing_version_is_tagged(
        validated: dict, tmp_path: Path) -> None:  # type: ignore[type-arg]
    registry = _copy(validated["registry"], tmp_path)
    v1 = registry.get("val:v1")
    scores = sorted(r["score"] for r in registry.validations(v1))
    strict = Gate(min_score=scores[1] + 1e-6)  # two sites fall below it
    with pytest.raises(GateFailed) as refused:
        promote(registry, "val:v1", "production", strict)
    assert refused.value.args[0].count("site ") == 2
    assert registry.current_tags("val") == {}
    record = promote(registry, "val:v1", "production", Gate(min_score=scores[0] - 1e-6, min_sites=3))
    assert registry.current_tags("val") == {"production": 1} and record["gate"]["min_sites"] == 3
    with pytest.raises(GateFailed, match=r"3 site\(s\) validated it; the gate needs 4"):
        promote(registry, "val:v1", "staging", Gate(min_sites=4))
    # a tag record edited by hand fails verification
    tags = registry.root / "val" / "tags.jsonl"
    tags.write_text(tags.read_text().replace('"production"', '"prod"'))
    with pytest.raises(RegistryError, match="tags.jsonl: record 1 was changed"):
        registry.verify("val")


def test_model_card_is_built_from_provenance_and_travels_in_the_bundle(validated: dict, tmp_path: Path) -> None:  # type: ignore[type-arg]
    from fl.registry.export import export

    registry = validated["registry"]
    version = registry.get("val:v1")
    card = card_data(registry, version)
    worst = min(registry.validations(version), key=lambda r: r["score"])
    assert card["validation"][0]["site"] == worst["site"]
    assert any(worst["site"] in line for line in card["limitations"])
    assert any("1 of 3 validating site(s) never trained it" in line for line in card["limitations"])
    assert len(card["training_sites"]) == 2 and all(s["validated_this_version"] for s in card["training_sites"])
    assert len(card["dataset_descriptors"]) == 3 and [d["trained_it"] for d in card["dataset_descriptors"]] == [
        True, True, False]  # training sites first
    assert not any("released no dataset descriptors" in line for line in card["limitations"])
    text = render(card)
    assert "## Data" in text and "| synthetic | 1 to 1.5 (smallest 1) | 1 to 1.5 (largest 1) |" in text
    # sensitivity sqrt(3 + labels): two spacing bins, a split's series count and the one label
    assert f"noisy (std {5 * (3 + 1) ** 0.5:.1f} per count" in text
    assert f"| {worst['site']} |" in text and "EU AI Act Annex IV" in text and version.hash in text
    folder = export(version, "bundle", tmp_path / "export")
    assert (folder / "docs" / "MODEL_CARD.md").read_text() == text


def test_noisy_per_class_scores_carry_the_calibrated_noise_and_cover_the_truth() -> None:
    from fl.privacy.noise import SeededGaussian
    from nodes.site_scores import noisy_class_scores

    torch.manual_seed(0)
    scores = torch.rand(400, 3)
    scores[:100, 2] = float("nan")  # the third class is in 300 cases only
    truth = [float(scores[~torch.isnan(scores[:, c]), c].mean()) for c in range(3)]
    draws = [noisy_class_scores(scores, 4.0, SeededGaussian(seed), 0.95) for seed in range(400)]
    counts = np.array([[d[c][3] for c in range(3)] for d in draws])
    assert counts.mean(axis=0) == pytest.approx([400, 400, 300], abs=1.5)
    assert counts.std(axis=0) == pytest.approx([4.0 * 6 ** 0.5] * 3, rel=0.12)  # z sqrt(2C), C = 3
    covered = np.mean([[d[c][1] <= truth[c] <= d[c][2] for c in range(3)] for d in draws])
    assert covered >= 0.95  # the interval covers the noise (and the sampling, conservatively)


def test_a_noisy_validation_of_a_multi_class_task_releases_each_class_in_the_same_charge(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bundles import small_brats
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fl import wire
    from fl.learn.bundle import BundleTask
    from fl.learn.synth_anatomy import synthesize_anatomy
    from fl.packing import unpack_message
    from fl.privacy import accounting
    from nodes.client_app import app

    task = BundleTask.load(str(small_brats(tmp_path / "brats_mri_segmentation")))
    (site,) = synthesize_anatomy(tmp_path / "brain", nodes=1, kind="brain-mri", seed=3, scale=0.5)
    save_policy(state_dir(site), Policy(release_metrics="noisy", metrics_noise_multiplier=3.0,
                                        release_descriptors="none"))
    config = ConfigRecord({wire.TASK: "seg3d", wire.BUNDLE: str(task.root), wire.BUNDLE_DIGEST: task.digest,
                           wire.SERVER_ROUND: 0, wire.SEED: 0, wire.VALIDATE: 200, wire.CONFIDENCE: 0.95,
                           wire.DESCRIBE: 1})
    for name, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 0)):  # as Flower sets them for a ClientApp
        monkeypatch.setattr(TaskIdentity, name, value)
    msg = Message(content=RecordDict({wire.ARRAYS: ArrayRecord(task.build_network().state_dict()),
                                      wire.CONFIG: config}), dst_node_id=7, message_type=MessageType.EVALUATE)
    reply = unpack_message(app(msg, Context(run_id=1, node_id=7, node_config={wire.NODE_DATA_DIR: str(site),
                                                                                 wire.NODE_PARTITION_ID: 0},
                                            state=RecordDict(), run_config={})))
    assert not reply.has_error(), reply.error
    metrics = dict(reply.content[wire.METRICS])
    assert metrics[wire.METRICS_DP] == 1.0 and wire.VAL_LOSS not in metrics
    for c in range(3):  # every class, with a noisy case count (never an exact one)
        assert f"{wire.CLASS_PREFIX}{c}-cases" in metrics
        assert metrics[f"{wire.CLASS_PREFIX}{c}-low"] <= metrics[f"{wire.CLASS_PREFIX}{c}"]
    entries = Ledger.in_dir(state_dir(site)).entries()
    assert [e["release"] for e in entries] == ["metrics+classes"]  # score and classes: two mechanisms, one entry
    assert entries[0]["event"] == {"noise_multiplier": 3.0, "sample_rate": 1.0, "steps": 2}
    assert metrics[wire.EPSILON_RECORD] == pytest.approx(
        accounting.epsilon([accounting.GaussianEvent(3.0, 1.0, 2)], 1e-5))
    info = dict(reply.content[wire.NODE_INFO])
    assert "releases no dataset descriptors" in info[wire.DESCRIPTORS_DECLINED]
    assert wire.DESCRIPTORS not in reply.content.config_records


def test_a_malformed_reply_is_that_sites_failure_and_the_other_sites_are_recorded() -> None:
    from flwr.app import ConfigRecord, Message, Metadata, MetricRecord, RecordDict
    from flwr.common.serde import make_message

    from fl import wire
    from fl.server.validate import site_records

    def reply(node: int, descriptors: dict | None = None, metrics: dict | None = None) -> Message:  # type: ignore[type-arg]
        content = RecordDict({
            wire.METRICS: MetricRecord(metrics or {wire.DICE: 0.9, wire.SCORE_LOW: 0.85, wire.SCORE_HIGH: 0.95,
                                                   wire.NUM_EXAMPLES: 12}),
            wire.NODE_INFO: ConfigRecord({wire.SITE_ID: f"site-{node}", wire.DATASET_FINGERPRINT: f"fp-{node}"})})
        if descriptors is not None:
            content[wire.DESCRIPTORS] = ConfigRecord(descriptors)
        metadata = Metadata(run_id=1, message_id=f"m{node}", src_node_id=node, dst_node_id=0, reply_to_message_id="q",
                            group_id="", created_at=0.0, ttl=60.0, message_type="evaluate")
        return make_message(metadata, content)

    good = {"release": "exact", "cases_training": 40, "cases_validation": 12, "labels": ["lesion"],
            "label_cases": [30.0]}
    replies = [reply(1, good), reply(2, {**good, "label_cases": [30.0, 2.0]}), reply(3, {"release": "exact"}),
               reply(4, metrics={wire.DICE: 0.9, wire.NUM_EXAMPLES: 12}), reply(5)]
    records, declined = site_records(replies, trained={"fp-1"}, labels=[], confidence=0.95, provenance={"run_id": "r"})
    assert [r["site"] for r in records] == ["site-1", "site-5"]
    assert records[0]["trained_it"] is True and records[1]["trained_it"] is False
    assert records[0]["descriptors"]["label_cases"] == [30.0] and records[1]["descriptors"] is None
    assert records[0]["run_id"] == "r" and records[0]["score"] == pytest.approx(0.9)
    assert declined == {
        "2": "malformed reply: its descriptors name a different number of labels than counts",
        "3": "malformed reply: its descriptors are malformed (KeyError('cases_training'))",
        "4": "malformed reply: its metrics are malformed (KeyError('score-ci-low'))",
    }
