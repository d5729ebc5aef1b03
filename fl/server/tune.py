"""``fl privacy tune``: DP-SGD's steps, clipping norm and learning rate chosen on a public proxy.

Tuning hyper-parameters on the private data would itself leak it (each trial is a release nobody
accounts for), so the search runs on a public proxy federation only: one site per node, each with
the case count the operator declares (a lower bound of the real one), drawn by the public synthetic
generator (:func:`fl.learn.synth.synthesize_public`, public seed). Every candidate is a FedAvg run of
the config's rounds, in this process, with DP-SGD on every proxy site, its noise calibrated so that
the whole run meets the target epsilon at the declared case counts, from the config's own start
(its public pretraining, if any). The best candidate, by the proxy sites' validation score averaged
over seeds, is written as a complete run config: ``fl run`` uses it unchanged. Its noise multiplier
is calibrated for the declared counts; a site with more cases samples at a lower rate and spends
less.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fl import wire
from fl.config import Config
from fl.errors import ConfigError
from fl.learn import Task
from fl.privacy import accounting

PUBLIC_SEED = 20250201  # the proxy sites' seed: public, and apart from pretraining's


@dataclasses.dataclass(frozen=True)
class Candidate:
    epochs: int
    lr: float
    clip: float


def noise_for(cfg: Config, cases: list[int], epochs: int, epsilon: float, delta: float, batch_size: int) -> float:
    """The DP-SGD noise multiplier keeping every declared site within ``epsilon`` over all rounds."""
    return accounting.dp_sgd_noise(cases, target_epsilon=epsilon, delta=delta, rounds=cfg.rounds, epochs=epochs,
                                   batch_size=batch_size)


def proxy_sites(cfg: Config, cases: list[int], folder: Path) -> list[Any]:
    """The public proxy federation: one synthetic site per declared count (written once)."""
    from fl.learn import get_task
    from fl.learn.data import load_local_data
    from fl.learn.synth import synthesize_public

    sites = []
    for i, n in enumerate(cases):
        site = folder / f"proxy-{cfg.task}-{cfg.data.image_size}-{n}-seed{PUBLIC_SEED + i}"
        if not (site / "dataset.json").is_file():
            synthesize_public(site, task=get_task(cfg.task), cases=n, seed=PUBLIC_SEED + i,
                              image_size=cfg.data.image_size)
        sites.append(load_local_data(site, cfg.resolved_task(), use_cache=False))
    return sites


def emulate(net: torch.nn.Module, task: Task, sites: list[Any], *, sigmas: list[float], rounds: int, epochs: int,
            clip: float, options: Any = None, generator: torch.Generator | None = None,
            device: torch.device | None = None) -> float:
    """A federation emulated in this process: ``rounds`` of record-level DP-SGD on every site (the
    nodes' own loop, site i with noise multiplier ``sigmas[i]``) from ``net``, averaged by cases
    (FedAvg); returns the sites' validation score, weighted by cases. ``net`` ends as the model."""
    from fl.learn import PrivateSettings

    for _ in range(rounds):
        states, weights = [], []
        for site, sigma in zip(sites, sigmas, strict=True):
            local = copy.deepcopy(net)
            task.train_private(local, site.train, PrivateSettings(epochs=epochs, noise_multiplier=sigma,
                                                                  max_grad_norm=clip, options=options,
                                                                  generator=generator, device=device))
            states.append({k: v.detach().cpu() for k, v in local.state_dict().items()})
            weights.append(len(site.train))
        net.load_state_dict({k: sum(w * s[k] for w, s in zip(weights, states)) / sum(weights) for k in states[0]})
    scored = [(task.evaluate(net, site.val, device=device).score, len(site.val)) for site in sites]
    return sum(s * n for s, n in scored) / sum(n for _, n in scored)


def run_candidate(cfg: Config, sites: list[Any], start: dict[str, torch.Tensor], candidate: Candidate,
                  sigma: float, seed: int) -> float:
    """One emulated federation on the proxy sites; the sites' validation score, weighted by cases."""
    from fl.learn.device import resolve
    from fl.learn.dp_train import DpOptions

    task = cfg.resolved_task().with_lr(candidate.lr)
    options = DpOptions(**wire.local_dp_options(wire.local_dp_instruction(cfg.local_dp)))  # as the nodes get them
    net = task.build_network()
    net.load_state_dict(start)
    return emulate(net, task, sites, sigmas=[sigma] * len(sites), rounds=cfg.rounds, epochs=candidate.epochs,
                   clip=candidate.clip, options=options, generator=torch.Generator().manual_seed(seed),
                   device=resolve(cfg.train.device))  # the machine running the search (auto takes its GPU)


def tune(cfg: Config, *, cases: list[int], epsilon: float, delta: float, epochs: list[int], lrs: list[float],
         clips: list[float], seeds: int, work: Path, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Search the grid on the public proxy; returns the trials and the best candidate's settings."""
    from fl.server.rounds import start_model

    if cfg.bundle or cfg.task == "tabular":
        raise ConfigError("fl privacy tune: the public proxy is the synthetic generator of the catalogue's image "
                          f"tasks (seg2d, seg3d); task {cfg.task_label!r} has none")
    cfg = cfg.replace(**{"local_dp.enabled": True})
    sites = proxy_sites(cfg, cases, work)
    start = start_model(cfg)[0].to_torch_state_dict()
    batch_size = cfg.resolved_task().batch_size
    trials = []
    for e, lr, clip in itertools.product(epochs, lrs, clips):
        candidate = Candidate(e, lr, clip)
        sigma = noise_for(cfg, cases, e, epsilon, delta, batch_size)
        started = time.perf_counter()
        scores = [run_candidate(cfg, sites, start, candidate, sigma, seed) for seed in range(seeds)]
        mean = sum(scores) / len(scores)
        std = math.sqrt(sum((s - mean) ** 2 for s in scores) / max(len(scores) - 1, 1))
        trials.append({**dataclasses.asdict(candidate), "noise_multiplier": sigma, "score": mean, "std": std,
                       "seconds": time.perf_counter() - started})
        say(f"epochs {e}, lr {lr:g}, clip {clip:g}: sigma {sigma:.2f}, proxy score {mean:.3f} +- {std:.3f}")
    best = max(trials, key=lambda t: t["score"])
    settings = {"train.epochs": best["epochs"], "train.lr": best["lr"], "local_dp.enabled": True,
                "local_dp.max_grad_norm": best["clip"], "local_dp.noise_multiplier": best["noise_multiplier"]}
    return {"epsilon": epsilon, "delta": delta, "cases": cases, "rounds": cfg.rounds, "trials": trials,
            "best": best, "settings": settings, "proxy_seed": PUBLIC_SEED}
