"""Public pretraining: the initial model trained, non-privately, on public data by the server.

DP fine-tuning from a network that already knows the task keeps far more utility than DP
training from scratch (De et al. 2022; ``../shared/research/dp-utility.md``). The server trains
the task's network, before round 1, on public cases only: the public synthetic generator
(``pretrain.source = synthetic``: ``fl.learn.synth.synthesize_public``, whose parameters and seed
are public) or a folder of public cases with a ``dataset.json``. No node's data is involved, so
the nodes' budgets pay nothing for it.

The result is cached under ``<registry.root>/.pretrained/<key>/`` (key: the task's bundle digest,
the source's fingerprint and the settings), with its provenance: the source, the SHA-256 of its
``dataset.json`` and files (public data: anyone holding it can confirm it), the settings and the
weights' SHA-256. Every version the run commits names that provenance (``pretraining`` in its
manifest), so a model's lineage says what it started from.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_torch
from safetensors.torch import save as save_torch

from fl.config import Config
from fl.errors import ConfigError, DataError
from fl.learn.bundle import BundleTask
from fl.server.run_folder import atomic_write

log = logging.getLogger(__name__)

WEIGHTS = "weights.safetensors"
PROVENANCE = "provenance.json"


def _settings(cfg: Config) -> dict[str, Any]:
    p = cfg.pretrain
    return {"source": p.source, "cases": p.cases if p.source == "synthetic" else None, "epochs": p.epochs,
            "lr": p.lr, "seed": p.seed}


def public_folder(cfg: Config, cache: Path) -> Path:
    """The public cases' folder: the synthetic source written once under ``cache``, or the named folder."""
    from fl.learn import get_task
    from fl.learn.synth import synthesize_public

    p = cfg.pretrain
    if p.source != "synthetic":
        return Path(p.source).resolve()
    folder = cache / f"public-synthetic-{cfg.task}-{cfg.data.image_size}-{p.cases}-seed{p.seed}"
    if not (folder / "dataset.json").is_file():
        synthesize_public(folder, task=get_task(cfg.task), cases=p.cases, seed=p.seed, image_size=cfg.data.image_size)
    return folder


def pretrained(cfg: Config) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The pretrained initial weights and their provenance (trained now, or found in the cache)."""
    from fl.learn.data import digest, read_datalist

    task = cfg.resolved_task()
    cache = Path(cfg.registry.root) / ".pretrained"
    folder = public_folder(cfg, cache)
    try:
        datalist = read_datalist(folder, modality_lists=True)
    except DataError as exc:
        raise ConfigError(f"pretrain.source: {exc}") from None
    fingerprint = digest(folder, datalist)
    settings = _settings(cfg)
    key = hashlib.sha256(json.dumps([task.digest, task.private, fingerprint, settings], sort_keys=True).encode())
    home = cache / key.hexdigest()[:24]
    if (home / PROVENANCE).is_file() and (home / WEIGHTS).is_file():
        provenance = json.loads((home / PROVENANCE).read_text(encoding="utf-8"))
        data = (home / WEIGHTS).read_bytes()
        if hashlib.sha256(data).hexdigest() == provenance["weights_sha256"]:
            return load_torch(data), provenance
        log.warning("pretrained weights in %s fail their hash; pretraining again", home)
    weights, seconds, loss = _train(cfg, task, datalist)
    data = save_torch({k: v.detach().contiguous() for k, v in weights.items()})
    provenance = {
        **settings,
        "source": cfg.pretrain.source if cfg.pretrain.source != "synthetic" else "synthetic (fl.learn.synth.synthesize_public)",
        "public_dataset_sha256": fingerprint,
        "training_cases": len(datalist["training"]),
        "final_loss": loss,
        "seconds": round(seconds, 2),
        "weights_sha256": hashlib.sha256(data).hexdigest(),
    }
    home.mkdir(parents=True, exist_ok=True)
    atomic_write(home / WEIGHTS, data)
    atomic_write(home / PROVENANCE, (json.dumps(provenance, indent=2) + "\n").encode())
    return weights, provenance


def _train(cfg: Config, task: BundleTask, datalist: dict[str, Any]) -> tuple[dict[str, torch.Tensor], float, float]:
    """The task's network trained on the public cases with its own loss and optimizer."""
    from fl.learn import TrainSettings
    from fl.learn.cases import bundle_cases
    from fl.learn.device import resolve

    task = task.with_lr(cfg.pretrain.lr)
    torch.manual_seed(cfg.seed)
    net = task.build_network()
    cases = bundle_cases(datalist["training"], task, None, train=True)
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(cfg.pretrain.seed)
    device = resolve(cfg.train.device)  # the server's own device (train.device: auto takes its GPU)
    result = task.train(net, cases, TrainSettings(epochs=cfg.pretrain.epochs, generator=generator, device=device))
    seconds = time.perf_counter() - started
    log.info("pretrained on %d public cases on %s in %.1f s (loss %.4f)", len(cases), device, seconds, result.loss)
    return {k: v.detach().cpu() for k, v in net.state_dict().items()}, seconds, result.loss
