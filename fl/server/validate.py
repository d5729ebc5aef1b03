"""Federated validation (``fl validate NAME:VERSION``, or any run with ``validation.ref`` set).

The ServerApp sends the registered version's weights, after checking them against the registry's
hashes, in one evaluation message to every connected node, including nodes that never trained
it: external validation. Each node runs the same evaluate handler as in training (its app
approval, policy and ledger checks apply unchanged), scores its held-out cases locally and
releases what its policy allows, with a confidence interval computed on the node
(:mod:`nodes.site_scores`): exact metrics with a bootstrap interval, or a DP-noised score with an
interval derived from public quantities, or nothing. Only aggregates leave a site.

Each released score becomes a validation record appended to the version's hash-chained
``validations.jsonl`` (:mod:`fl.registry.records`): the version's hash, the site's pseudonymous
id and keyed dataset fingerprint, whether that fingerprint trained the version, the score and
its interval, the time, the code version and the app's hash. ``fl models verify`` checks them.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fl import __version__, wire
from fl.config import Config, from_flat
from fl.errors import ConfigError, FederationError
from fl.packing import PackingGrid
from fl.registry import Registry, Version
from fl.registry.checkpoint import decode_weights
from fl.server.observer import Observer
from fl.server.phases import exchange
from fl.server.run_folder import atomic_write
from fl.server.witness import LedgerWitness

log = logging.getLogger(__name__)

EVALUATE = "validate"
RESULT_FILE = "validation.json"


def version_config(cfg: Config, version: Version) -> Config:
    """The config that trained ``version`` (its task, bundle, network conversion), with this run's
    data, federation, engine, registry and output settings."""
    recorded = dict(version.manifest.get("config") or {})
    if not recorded:
        raise ConfigError(f"validation.ref: {version.ref()} records no config; cannot rebuild its task")
    local = {k: v for k, v in cfg.to_flat().items()
             if k.split(".")[0] in ("data", "simulation", "registry", "output", "validation", "node_policy")
             or k in ("strategy.timeout", "strategy.min_nodes", "train.device", "train.workers")}
    kept = {k: v for k, v in recorded.items() if k in cfg.to_flat() and k.split(".")[0] != "pretrain"}
    # one evaluation message per node: no aggregation-side mechanism (SecAgg+, client-level DP) takes part
    quiet = {"secagg.enabled": False, "central_dp.enabled": False}
    vcfg = from_flat({**kept, **local, **quiet, "model_name": version.name}, source=f"{version.ref()} config")
    try:
        vcfg.check_resources()  # the version's bundle found and parsed, before any node is asked
    except ConfigError as exc:
        raise ConfigError(f"{version.ref()} config: {exc}") from None
    return vcfg


def app_hash(grid: Grid) -> str:
    """The run's app: its FAB hash in a deployment, else the SHA-256 of the Python sources that ran."""
    try:
        fab = str(grid.run.fab_hash or "")
    except Exception:  # noqa: BLE001 (a grid without run information)
        fab = ""
    if fab:
        return fab
    root = Path(__file__).resolve().parents[2]
    digest = hashlib.sha256()
    for package in ("fl", "nodes", "strategies"):
        for path in sorted((root / package).rglob("*.py")):
            digest.update(str(path.relative_to(root)).encode())
            digest.update(path.read_bytes())
    return "source-sha256:" + digest.hexdigest()


def _per_class(metrics: dict[str, Any], labels: list[str]) -> dict[str, dict[str, float]] | None:
    """A multi-class task's per-class scores from a reply (None for one class); under a noisy
    release the scores and the case counts are the DP values."""
    out = {}
    for c, label in enumerate(labels):
        key = f"{wire.CLASS_PREFIX}{c}"
        if key in metrics:
            out[label] = {"score": float(metrics[key]), "ci_low": float(metrics[f"{key}-low"]),
                          "ci_high": float(metrics[f"{key}-high"]), "cases": round(float(metrics[f"{key}-cases"]), 1)}
    return out or None


def _descriptors(content: Any) -> dict[str, Any] | None:
    """A site's dataset descriptors from a reply (nodes.descriptors.release), checked for shape."""
    if wire.DESCRIPTORS not in content.config_records:
        return None
    raw = dict(content[wire.DESCRIPTORS])
    try:
        out = {"release": str(raw["release"]), "noise_std": float(raw.get("noise_std", 0.0)),
               "epsilon_after": float(raw["epsilon_after"]) if "epsilon_after" in raw else None,
               "cases_training": int(raw["cases_training"]), "cases_validation": int(raw["cases_validation"]),
               "modality": [str(v) for v in raw.get("modality", [])],
               "labels": [str(v) for v in raw.get("labels", [])],
               "label_cases": [float(v) for v in raw.get("label_cases", [])],
               "spacing_edges": [float(v) for v in raw.get("spacing_edges", [])]}
        for key in ("spacing_finest", "spacing_coarsest", "spacing_range"):
            out[key] = [float(v) for v in raw[key]] if key in raw else None
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"its descriptors are malformed ({exc!r})") from None
    if len(out["labels"]) != len(out["label_cases"]):
        raise ValueError("its descriptors name a different number of labels than counts")
    return out


def site_records(replies: list[Any], *, trained: set[str], labels: list[str], confidence: float,
                 provenance: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """One validation record per site from the nodes' replies, and the sites that gave none with
    the reason; a malformed reply (only modified node code sends one) is that site's failure."""
    records, declined = [], {}
    for message in replies:
        node = str(message.metadata.src_node_id)
        metrics = dict(message.content[wire.METRICS])
        score = wire.score(metrics)
        if score is None or wire.NODE_INFO not in message.content.config_records:
            declined[node] = "its policy releases no metrics"
            if wire.DESCRIPTORS in message.content.config_records:  # released (and maybe charged) all the same
                try:
                    declined[node] += f"; its descriptors: {json.dumps(_descriptors(message.content))}"
                except ValueError as exc:
                    declined[node] += f"; malformed descriptors: {exc}"
            continue
        info = dict(message.content[wire.NODE_INFO])
        fingerprint = str(info.get(wire.DATASET_FINGERPRINT, ""))
        try:
            descriptors = _descriptors(message.content)
            record = {
                "site": str(info.get(wire.SITE_ID, "")),
                "dataset_fingerprint": fingerprint,
                "trained_it": fingerprint in trained if trained else None,
                "metric": next(k for k in wire.SCORES if k in metrics),
                "score": score,
                "ci_low": float(metrics[wire.SCORE_LOW]),
                "ci_high": float(metrics[wire.SCORE_HIGH]),
                "confidence": confidence,
                "cases": int(metrics.get(wire.NUM_EXAMPLES, 0)),
                "release": "noisy (DP)" if metrics.get(wire.METRICS_DP) == 1.0 else "exact",
                "epsilon_spent": metrics.get(wire.EPSILON_RECORD),
                "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                **provenance,
                "per_class": _per_class(metrics, labels),
                "descriptors": descriptors,
                "descriptors_declined": info.get(wire.DESCRIPTORS_DECLINED),
            }
        except (KeyError, TypeError, ValueError) as exc:
            reason = str(exc) if isinstance(exc, ValueError) else f"its metrics are malformed ({exc!r})"
            log.warning("validation: node %s: %s", node, reason)
            declined[node] = f"malformed reply: {reason}"
            continue
        records.append(record)
    return records, declined


def run_validation(grid: Grid, cfg: Config, run_dir: Path, observer: Observer) -> dict[str, Any]:
    from fl.server.rounds import _instructions

    grid = PackingGrid.wrap(grid)  # contents travel packed each way (fl.packing), as in training
    registry = Registry(cfg.registry.root)
    version = registry.get(cfg.validation.ref)
    registry.verify(version.name)  # the weights sent are the ones the chain vouches for
    vcfg = version_config(cfg, version)
    _, eval_cfg = _instructions(vcfg)
    eval_cfg[wire.VALIDATE] = cfg.validation.bootstrap
    eval_cfg[wire.CONFIDENCE] = cfg.validation.confidence
    if cfg.validation.descriptors:
        eval_cfg[wire.DESCRIBE] = 1
    witness = LedgerWitness.of(cfg.registry.root)
    arrays = decode_weights(version.weights.read_bytes())
    # every node of the federation: the strategy waits for them all, then samples them all
    strategy = FedAvg(fraction_evaluate=1.0, min_evaluate_nodes=vcfg.min_nodes, min_available_nodes=vcfg.min_nodes,
                      weighted_by_key=wire.NUM_EXAMPLES, arrayrecord_key=wire.ARRAYS, configrecord_key=wire.CONFIG)
    observer.on_start(1)
    started = time.perf_counter()
    messages = witness.with_acks(strategy.configure_evaluate(0, arrays, ConfigRecord(dict(eval_cfg)), grid))

    def report(done: int, total: int) -> None:
        observer.on_phase(0, EVALUATE, done, total)

    res = exchange(grid, messages, timeout=cfg.strategy.timeout, report=report)
    witness.observe(res.node_info())
    if not res.ok and not res.failures:
        raise FederationError("validation: no node answered")
    trained = set(registry.training_sites(version))
    task = vcfg.resolved_task()
    labels = task.class_labels()
    records, malformed = site_records(res.ok, trained=trained, labels=labels, confidence=cfg.validation.confidence,
                                      provenance={"code_version": __version__, "app_hash": app_hash(grid),
                                                  "run_id": run_dir.name})
    declined = {**dict(res.failures), **malformed}
    sites = [registry.add_validation(version, record) for record in records]  # written once all are read
    summary = {"version": version.ref(), "version_hash": version.hash, "sites": sites, "declined": declined,
               "seconds": time.perf_counter() - started}
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(run_dir / RESULT_FILE, (json.dumps(summary, indent=2) + "\n").encode())
    observer.on_phase(0, EVALUATE, len(res.ok), len(res.ok) + len(res.failures))
    return summary
