"""Synthetic CT sites written as DICOM (SEG at one site, RTSTRUCT at the other) train a bundle on
exactly what their NIfTI twins give, and a site answers which of its series trained a version."""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fl import wire
from fl.cli import main
from fl.errors import DataError
from fl.learn.bundle import BundleTask
from fl.learn.data import SPLITS, clear_cache, load_local_data, read_datalist
from fl.learn.dicom import source_series
from fl.packing import unpack_message
from fl.registry import Registry
from nodes.client_app import app
from nodes.ledger import Ledger
from nodes.policy import keyed_fingerprint, state_dir
from nodes.provenance import INDEX_FILE, answer, lineage_rounds, series_token


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], list[Path]]:
    from fl.learn.synth_anatomy import synthesize_anatomy

    root = tmp_path_factory.mktemp("sites")
    nifti = synthesize_anatomy(root / "nifti", nodes=2, kind="ct", seed=4, scale=0.25)
    dicom = synthesize_anatomy(root / "dicom", nodes=2, kind="ct", seed=4, scale=0.25, fmt="dicom")
    return nifti, dicom


@pytest.fixture(scope="module")
def spleen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from bundles import small_spleen

    return small_spleen(tmp_path_factory.mktemp("bundle") / "spleen", patch=16)


def test_dicom_sites_preprocess_to_their_nifti_twins_tensors(sites: tuple[list[Path], list[Path]],
                                                            spleen: Path, tmp_path: Path) -> None:
    task = BundleTask.load(str(spleen))
    for nifti, dicom in zip(*sites):  # node-0 labels by SEG, node-1 by RTSTRUCT
        label = read_datalist(dicom)["training"][0]["label"]
        assert type(label).__name__ == ("SegLabel" if dicom.name.endswith("0") else "RtLabel")
        got = load_local_data(dicom, task, use_cache=False, disk_cache=tmp_path / dicom.name)
        want = load_local_data(nifti, task, use_cache=False)
        for split in ("train", "val"):
            a, b = getattr(got, split).dataset, getattr(want, split).dataset
            assert len(a) == len(b) > 0
            for i in range(len(a)):
                x, y = a._cachecheck(a.data[i]), b._cachecheck(b.data[i])  # the deterministic part
                assert torch.allclose(x["image"], y["image"], atol=1e-6) and torch.equal(x["label"], y["label"])
    clear_cache()


def _train(spleen: Path, site: Path, run: int, server_round: int) -> Message:
    task = BundleTask.load(str(spleen))
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = run, secrets.randbits(32), 0
    config = ConfigRecord({wire.TASK: "seg3d", wire.BUNDLE: str(spleen), wire.BUNDLE_DIGEST: task.digest,
                           wire.EPOCHS: 1, wire.SEED: 0, wire.SERVER_ROUND: server_round})
    msg = Message(content=RecordDict({wire.ARRAYS: ArrayRecord(task.build_network().state_dict()),
                                      wire.CONFIG: config}), dst_node_id=7, message_type=MessageType.TRAIN)
    context = Context(run_id=run, node_id=7, node_config={wire.NODE_PARTITION_ID: int(site.name.split("-")[-1])},
                      state=RecordDict(), run_config={"data.root": str(site.parent)})
    return unpack_message(app(msg, context))


def test_a_site_answers_which_of_its_series_trained_a_version(sites: tuple[list[Path], list[Path]], spleen: Path,
                                                               tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    site = sites[1][1]  # the RTSTRUCT site
    run = secrets.randbits(40)
    reply = _train(spleen, site, run, 1)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    folder = state_dir(site)
    cases = read_datalist(site)
    uids = [uid for split in SPLITS for case in cases[split] for uid in source_series(case)]
    assert len(uids) == 2 * sum(len(cases[s]) for s in SPLITS)  # an image series and a label series per case

    # the node recorded, before training, which dataset this round trained on and its series as tokens
    fingerprint = keyed_fingerprint(folder, load_local_data(site, BundleTask.load(str(spleen))).digest)
    assert reply.content[wire.NODE_INFO][wire.DATASET_FINGERPRINT] == fingerprint
    entry = [e for e in Ledger.contributions_in(folder).entries() if e.get("run") == run][-1]
    assert entry["dataset"] == fingerprint and entry["server_round"] == 1
    index = (folder / INDEX_FILE).read_text()
    assert not any(uid in index for uid in uids)  # tokens only, never a UID
    assert series_token(folder, uids[0]) in index

    # the registry's lineage: v1 is round 1 of this run, v2 round 2, which this node did not serve
    registry = Registry(tmp_path / "reg")
    parent = None
    for r in (1, 2):
        parent = registry.commit("m", weights=b"w%d" % r, state=b"s", expected_parent=parent,
                                 fields={"round": r, "flower_run_id": run, "run_id": "r"}).hash
    found = answer(folder, "m:v2", lineage_rounds([v.manifest for v in registry.versions("m")]))
    assert found.contributed == {(run, 1): fingerprint} and found.absent == [(run, 2)]
    assert len(found.training_series()) == len(cases["training"])

    assert main(["node", "provenance", "m:v2", "--registry", str(tmp_path / "reg"), "--data", str(site),
                 "--reveal"]) == 0
    out = capsys.readouterr().out
    assert f"{len(cases['training'])} DICOM series of this node may have trained it" in out and "nothing was sent" in out
    training_images = {source_series(c)[0] for c in cases["training"]}
    assert training_images <= set(out.split())  # revealed on the node's own screen
    assert not {source_series(c)[0] for c in cases["validation"]} & set(out.split())

    (folder / INDEX_FILE).rename(folder / "index.moved")  # without its index, the node says it does not know
    assert answer(folder, "m:v2", [(run, 1)]).unknown == [(run, 1)]
    assert main(["node", "provenance", "m:v2", "--registry", str(tmp_path / "reg"), "--data", str(site)]) == 0
    out = capsys.readouterr().out
    assert "which series trained them is unknown" in out and "no indexed DICOM series" in out
    (folder / "index.moved").rename(folder / INDEX_FILE)

    registry.commit("old", weights=b"w", state=b"s", expected_parent=None, fields={"round": 1})
    with pytest.raises(DataError, match="names no Flower run"):
        lineage_rounds([v.manifest for v in registry.versions("old")])
    assert json.loads(index.splitlines()[0])["schema"] == 1


def test_a_model_card_says_how_many_series_trained_it(sites: tuple[list[Path], list[Path]], spleen: Path,
                                                      tmp_path: Path) -> None:
    from fl.registry.card import _series_line, describe
    from nodes.descriptors import count, release

    site = sites[1][0]  # the SEG site
    data = load_local_data(site, BundleTask.load(str(spleen)), use_cache=False, disk_cache=tmp_path)
    cases = {"training": data.train.items, "validation": data.val.items}
    exact = count(site, None, cases)
    assert exact["dicom_series"] == [len(data.train), len(data.val)] and exact["label_cases"][0] > 0
    nifti = count(sites[0][0])  # the NIfTI twin: the same counts, no series
    assert nifti["dicom_series"] == [0, 0] and nifti["label_cases"] == exact["label_cases"]
    assert nifti["spacing_finest"] == exact["spacing_finest"]
    described = [{**describe(release(exact, cases=(len(data.train), len(data.val)), noise_multiplier=None,
                                     noise=lambda n, std: 0)), "trained_it": True}]
    assert _series_line(described)[0].startswith(f"Trained on {len(data.train)} DICOM series from 1 site(s)")
