"""What a round commits to the registry, and how a resumed run reads it back."""

from __future__ import annotations

import datetime as dt
import math
from importlib.metadata import version as dist_version
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord
from safetensors.torch import load as load_torch
from safetensors.torch import save as save_torch

from fl import __version__
from fl.config import Config
from fl.learn import Task
from fl.registry import Registry, RegistryError, Version


def encode_weights(arrays: ArrayRecord) -> bytes:
    tensors = {k: v.detach().contiguous() for k, v in arrays.to_torch_state_dict().items()}
    return save_torch(tensors)


def decode_weights(data: bytes) -> ArrayRecord:
    return ArrayRecord(load_torch(data))


def software_versions() -> dict[str, str]:
    return {
        "oncofed": __version__,
        "flwr": dist_version("flwr"),
        "monai": dist_version("monai"),
        "torch": torch.__version__,
        "numpy": np.__version__,
    }


def _finite(value: Any) -> Any:
    """Manifests are strict JSON: a non-finite metric is recorded as null."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def manifest_fields(
    cfg: Config, *, run_id: str, record: dict[str, Any], node_info: dict[str, dict[str, str]],
    resumed_from: str | None, lineage: dict[str, Any] | None = None, flower_run: int | None = None
) -> dict[str, Any]:
    """Provenance of one round's global model (the registry adds version, parent and hashes).

    A manifest is read by whoever consumes the model. Under DP it holds only public configuration
    and DP releases (:func:`_dp_view`); the coordinator's own details (per-node metrics, counts,
    failures with their reasons) stay in its run folder (``metrics.jsonl``)."""
    task = cfg.resolved_task()
    common = {
        "run_id": run_id,
        # the run's id on Flower's side, as every node's ledger records it: a site matches a version's
        # rounds to its own contributions with it (nodes.provenance)
        "flower_run_id": flower_run,
        "round": record["round"],
        "task": cfg.task_label,
        "bundle": task.provenance(),
        "strategy": _strategy_fields(cfg, task),
        "dp": _dp_settings(cfg, lineage),
        "secure_aggregation": {k: v for k, v in cfg.to_flat().items() if k.startswith("secagg.")}
        if cfg.secagg.enabled else None,
        "config_hash": cfg.settings_hash(),
        "config": cfg.to_flat(),
        "software": software_versions(),
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds"),
        "resumed_from": resumed_from,
        # where the initial model came from: public pretraining's provenance (fl.server.pretrain), or None
        "pretraining": (lineage or {}).get("pretraining"),
    }
    privacy = record.get("privacy") or {"client_level": None, "record_level": {}}
    if cfg.central_dp.enabled or cfg.local_dp.enabled:
        return _finite({**common, **_dp_view(cfg, record, node_info, privacy)})
    train_nodes = record.get("train", {}).get("nodes", {})
    return _finite({
        **common,
        "nodes": [
            {
                "node_id": node,
                "num_examples": int(metrics.get("num-examples", 0)),
                "dataset_fingerprint": node_info.get(node, {}).get("dataset-fingerprint"),
                "device": node_info.get(node, {}).get("device-name"),
            }
            for node, metrics in sorted(train_nodes.items())
        ],
        "failures": record.get("failures", {}),
        "metrics": {"train": record.get("train", {}), "evaluate": record.get("evaluate", {})},
        "privacy": privacy,
    })


def _strategy_fields(cfg: Config, task: Task) -> dict[str, Any]:
    """The manifest's ``strategy``: aggregation and local training as the round ran them."""
    return {
        "name": cfg.strategy.name,
        "fraction_train": cfg.strategy.fraction_train,
        "fraction_evaluate": cfg.strategy.fraction_evaluate,
        "min_nodes": cfg.min_nodes,
        "server_lr": cfg.strategy.server_lr if cfg.strategy.name == "fedadam" else None,
        "tau": cfg.strategy.tau if cfg.strategy.name == "fedadam" else None,
        "server_momentum": cfg.strategy.server_momentum if cfg.strategy.name == "fedavgm" else None,
        "server_step": cfg.strategy.server_step if cfg.strategy.name == "fedavgm" else None,
        "proximal_mu": cfg.train.proximal_mu,
        "local_epochs": cfg.train.epochs,
        "local_lr": task.lr,
        "batch_size": task.batch_size,
        "batchnorm": cfg.train.batchnorm,
    }


def _dp_settings(cfg: Config, lineage: dict[str, Any] | None) -> dict[str, Any]:
    """The manifest's ``dp``: the client-level and record-level DP settings (None where off)."""
    return {
        "central": {k: v for k, v in cfg.to_flat().items() if k.startswith("central_dp.")}
        if cfg.central_dp.enabled else None,
        "local": {"noise_multiplier": cfg.local_dp.noise_multiplier,
                  "max_grad_norm": cfg.local_dp.max_grad_norm, "trainable": cfg.local_dp.trainable,
                  "trained_parameters": (lineage or {}).get("trained_parameters"),
                  "views": cfg.local_dp.views, "view_augment": cfg.local_dp.view_augment,
                  "ema_decay": cfg.local_dp.ema_decay} if cfg.local_dp.enabled else None,
    }


def _dp_view(cfg: Config, record: dict[str, Any], node_info: dict[str, dict[str, str]],
             privacy: dict[str, Any]) -> dict[str, Any]:
    """What a DP run's manifest may say about a round, and nothing more.

    - the nodes that trained, with their keyed fingerprints and devices, but no example counts; under
      Poisson sampling of nodes not even who took part (that would void the amplification
      the client-level accountant counts on);
    - no per-node metrics, no adaptive-clipping bits, no failures (their reasons carry exact
      update norms): the coordinator's run folder keeps them;
    - the evaluation aggregate only when every node that reported a score released it with
      DP noise;
    - the privacy accounting: client-level history and each node's record-level epsilon; under
      Poisson sampling only what does not depend on who took part: the per-round mechanism (public
      configuration) and the number of rounds, from which the bound for a node that trained in every
      round follows for its case count (each node's own ledger holds its exact figure).
    """
    poisson = cfg.central_dp.enabled and cfg.central_dp.sampling == "poisson" and cfg.central_dp.sample_rate < 1
    evaluate = record.get("evaluate", {})
    record_level = privacy.get("record_level") or {}
    if poisson and record_level:
        d = cfg.local_dp
        record_level = {
            "per_node": "withheld under Poisson node sampling (it would show who took part); each node's ledger "
                        "holds its own",
            "bound": {"rounds": int(record["round"]), "noise_multiplier": d.noise_multiplier,
                      "max_grad_norm": d.max_grad_norm, "epochs": cfg.train.epochs,
                      "meaning": "this run's training spends on a node at most this DP-SGD mechanism over its own "
                                 "cases in every one of these rounds (fl privacy estimate); its noisy metrics and "
                                 "descriptors, and earlier runs, add to its total, which its own ledger holds"},
        }
    trained = sorted(record.get("train", {}).get("nodes", {}))
    return {
        "release": "dp: public configuration and DP releases only; details in the coordinator's run folder",
        "nodes": None if poisson else [{"node_id": n, "dataset_fingerprint": node_info.get(n, {}).get("dataset-fingerprint"),
                                        "device": node_info.get(n, {}).get("device-name")} for n in trained],
        "failures": None,
        "metrics": {"evaluate": {"aggregate": evaluate.get("aggregate", {})} if evaluate.get("dp_released")
                    else None},
        "privacy": {**privacy, "record_level": record_level},
    }


def resume_point(registry: Registry, cfg: Config) -> Version:
    """The newest version of ``cfg.model_name``, verified, and fit for this config."""
    versions = registry.verify(cfg.model_name)
    if not versions:
        raise RegistryError(
            f"registry.resume: no version of model {cfg.model_name!r} in {registry.root} to resume from"
        )
    latest = versions[-1]
    if latest.manifest.get("task") != cfg.task_label:
        raise RegistryError(
            f"registry.resume: {latest.ref()} was trained for task {latest.manifest.get('task')!r}, "
            f"this config says {cfg.task_label!r}"
        )
    recorded, task = (latest.manifest.get("bundle") or {}).get("digest"), cfg.resolved_task()
    if task.bundle_digest is not None and recorded is not None and recorded != task.bundle_digest:
        raise RegistryError(f"registry.resume: {latest.ref()} was trained with another version of bundle "
                            f"{task.root} (its configs differ)")
    return latest
