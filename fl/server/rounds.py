"""The server's round loop: the round's steps, in order, and nothing else.

Each round: check the client-level budget; train (sample, instruct, collect, validate, aggregate
and noise: :mod:`fl.server.phases` and the strategy); journal the release; evaluate; commit the
version with its manifest. Sampling and aggregation stay Flower's (``configure_train``,
``aggregate_train``, ``configure_evaluate``, ``aggregate_evaluate`` of the configured strategy).
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid

from fl import __version__, wire
from fl.config import Config
from fl.errors import ConfigError, FederationError
from fl.packing import PackingGrid
from fl.registry import Registry, Version
from fl.registry.checkpoint import decode_weights, encode_weights, manifest_fields, resume_point
from fl.registry.mlflow_mirror import MlflowMirror
from fl.server.observer import Observer
from fl.server.phases import PhaseResult, exchange, secure_phase
from fl.server.run_folder import RunFolder
from fl.server.witness import LedgerWitness
from strategies import build_strategy
from strategies.central_account import CentralAccount, privacy_record
from strategies.state import encode_state, restore_state
from strategies.updates import same_dtypes
from strategies.validation import validate

log = logging.getLogger("flwr.oncofed.server")  # under Flower's logger: same handler, same levels

TRAIN, EVALUATE = "train", "evaluate"
REFUSALS = {wire.ERROR_BUDGET, wire.ERROR_POLICY}  # a node's own decision, not a fault
# tests only: kill this process group right after round N's model left the server, before its commit
CRASH_AFTER_RELEASE = "ONCOFED_CRASH_AFTER_RELEASE"


def _task_spec(cfg: Config) -> dict[str, Any]:
    """What names the task to a node: the catalogue name, or the bundle's path and digest."""
    spec: dict[str, Any] = {wire.TASK: cfg.task, wire.BATCHNORM: cfg.train.batchnorm, wire.WORKERS: cfg.train.workers}
    task = cfg.resolved_task()
    if getattr(task, "kind", "") == "bundle":  # a catalogue task's shipped bundle, or the run's own
        spec.update({wire.BUNDLE: cfg.bundle, wire.BUNDLE_DIGEST: task.digest})
    return spec


def _instructions(cfg: Config) -> tuple[ConfigRecord, ConfigRecord]:
    train = ConfigRecord(
        {
            **_task_spec(cfg),
            wire.EPOCHS: cfg.train.epochs,
            wire.LR: cfg.train.lr,
            wire.BATCH_SIZE: cfg.train.batch_size,
            wire.PROXIMAL_MU: cfg.train.proximal_mu,
            wire.SEED: cfg.seed,
            wire.DEVICE: cfg.train.device,
            wire.AMP: cfg.train.amp,
        }
    )
    if cfg.local_dp.enabled:
        train[wire.LOCAL_NOISE_MULTIPLIER] = cfg.local_dp.noise_multiplier
        train[wire.LOCAL_MAX_GRAD_NORM] = cfg.local_dp.max_grad_norm
        train[wire.LOCAL_TRAINABLE] = cfg.local_dp.trainable
        train[wire.LOCAL_VIEWS] = cfg.local_dp.views
        train[wire.LOCAL_VIEW_AUGMENT] = cfg.local_dp.view_augment
        train[wire.LOCAL_EMA_DECAY] = cfg.local_dp.ema_decay
    evaluate = ConfigRecord({**_task_spec(cfg), wire.BATCH_SIZE: cfg.train.batch_size, wire.DEVICE: cfg.train.device,
                             wire.AMP: cfg.train.amp})
    if cfg.local_dp.enabled:  # tells nodes the run is under DP: their metrics default to none
        evaluate[wire.LOCAL_NOISE_MULTIPLIER] = cfg.local_dp.noise_multiplier
    return train, evaluate


def initial_arrays(cfg: Config) -> ArrayRecord:
    """The task's freshly initialised network, seeded by ``cfg.seed``."""
    torch.manual_seed(cfg.seed)
    return ArrayRecord(cfg.resolved_task().build_network().state_dict())


def start_model(cfg: Config) -> tuple[ArrayRecord, dict[str, Any] | None]:
    """The run's initial global model and its pretraining provenance: :func:`initial_arrays`, or
    the network pretrained on public data (``pretrain.source``, :mod:`fl.server.pretrain`)."""
    if not cfg.pretrain.source:
        return initial_arrays(cfg), None
    from fl.server.pretrain import pretrained

    weights, provenance = pretrained(cfg)
    return ArrayRecord(weights), provenance


def lineage(cfg: Config, pretraining: dict[str, Any] | None) -> dict[str, Any]:
    """What every version of the run records about its start: the pretraining provenance and,
    under local DP, how many parameters DP-SGD trains (a choice this network cannot honour is a
    ConfigError now, not an error on every node)."""
    from fl.tasks.trainable import trained_count

    trained = None
    if cfg.local_dp.enabled and getattr(cfg.resolved_task(), "kind", "") == "bundle":
        try:
            trained = trained_count(cfg.resolved_task().build_network(), cfg.local_dp.trainable)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    return {"pretraining": pretraining, "trained_parameters": trained}


def run_federation(grid: Grid, cfg: Config, run_dir: Path, observer: Observer) -> dict[str, Any]:
    """Run ``cfg.rounds`` rounds, committing a registry version after each; return the summary."""
    started = time.perf_counter()
    grid = PackingGrid.wrap(grid)  # a message's content travels as one array (fl.packing)
    registry = Registry(cfg.registry.root)
    strategy = build_strategy(cfg)
    if cfg.registry.resume:
        start = resume_point(registry, cfg)
        arrays = decode_weights(start.weights.read_bytes())
        restore_state(strategy, start.state.read_bytes())
        first_round, parent, resumed_from = int(start.manifest["round"]) + 1, start.hash, start.ref()
        central = CentralAccount.resume(cfg, start.manifest)
        pretraining = start.manifest.get("pretraining")
    else:
        newest = registry.latest(cfg.model_name)
        (arrays, pretraining), first_round = start_model(cfg), 1
        parent, resumed_from = newest.hash if newest else None, None
        central = CentralAccount.start(cfg)
    start_lineage = lineage(cfg, pretraining)
    mirror = MlflowMirror(cfg.registry.mlflow_uri) if cfg.registry.mlflow_uri else None
    folder = RunFolder.create(run_dir, cfg)
    train_cfg, eval_cfg = _instructions(cfg)
    witness = LedgerWitness.of(cfg.registry.root)  # the nodes' ledger heads, sent back with every instruction
    last_round = first_round + cfg.rounds - 1
    observer.on_start(cfg.rounds)

    def phase(server_round: int, name: str, messages: Iterable[Message]) -> PhaseResult:
        def report(done: int, total: int) -> None:
            observer.on_phase(server_round, name, done, total)

        return exchange(grid, messages, timeout=cfg.strategy.timeout, report=report)

    def evaluate(server_round: int) -> tuple[dict[str, Any], dict[str, str]]:
        messages = strategy.configure_evaluate(server_round, arrays, ConfigRecord(dict(eval_cfg)), grid)
        res = phase(server_round, EVALUATE, witness.with_acks(messages))
        witness.observe(res.node_info())
        # nodes whose policy releases no metrics reply with their count only; a weighted mean
        # over every reply would pull the score towards 0
        scored = [m for m in res.ok if wire.score(dict(m.content[wire.METRICS])) is not None]
        agg = strategy.aggregate_evaluate(server_round, scored) if scored else None
        dp_released = bool(scored) and all(m.content[wire.METRICS].get(wire.METRICS_DP) == 1.0 for m in scored)
        # per-node quantities have no meaningful average: they stay in the per-node record
        aggregate = {k: v for k, v in (agg or {}).items() if k not in (wire.METRICS_DP, wire.EPSILON_RECORD)}
        return {"aggregate": aggregate, "nodes": res.per_node(), "dp_released": dp_released}, res.failures

    def train(server_round: int) -> tuple[PhaseResult, ArrayRecord | None, dict[str, float] | None]:
        instructions = ConfigRecord(dict(train_cfg))
        if cfg.secagg.enabled:
            observer.on_phase(server_round, TRAIN, 0, 0)
            # journaled ahead: the coordinator sees the unmasked sum inside the workflow, whatever follows
            central.spend(server_round, run_dir.name, stage="before secure aggregation")
            res, new_arrays, train_agg = secure_phase(grid, strategy, server_round, arrays, instructions, cfg,
                                                      acks=witness.acks_for)
            central.note(server_round, run_dir.name, str(res.outcome))
        else:
            messages = strategy.configure_train(server_round, arrays, instructions, grid)
            res = phase(server_round, TRAIN, witness.with_acks(messages))
            res.ok, rejected = validate(res.ok, arrays, cfg.strategy.max_update_norm)
            res.failures.update({node: f"rejected, {why}" for node, why in rejected.items()})
            new_arrays, train_agg = None, None  # aggregated once the replies are known to suffice
        for node, why in res.failures.items():
            log.warning("round %d: node %s did not train (%s)", server_round, node, why)
        witness.observe(res.node_info())
        return res, new_arrays, train_agg

    def finish_round(record: dict[str, Any]) -> None:
        folder.append_round(record)
        history.append(record)
        observer.on_round(record)

    history: list[dict[str, Any]] = []
    if cfg.strategy.evaluate_initial:
        t0 = time.perf_counter()
        ev, failures = evaluate(first_round - 1)
        finish_round({"round": first_round - 1, "evaluate": ev, "failures": failures,
                      "seconds": time.perf_counter() - t0, "initial": True})

    versions: list[str] = []
    stopped: str | None = None
    for server_round in range(first_round, last_round + 1):
        if (reason := central.would_exceed()) is not None:
            stopped = f"stopped before round {server_round}: {reason}"
            log.warning("%s", stopped)
            break
        t0 = time.perf_counter()
        res, new_arrays, train_agg = train(server_round)
        if (stopped := _too_few_replies(res, cfg, server_round)) is not None:
            log.warning("%s", stopped)
            break
        if not cfg.secagg.enabled:  # under SecAgg+ the workflow already gave the aggregate
            new_arrays, train_agg = strategy.aggregate_train(server_round, res.ok)
        if new_arrays is None:
            raise FederationError(f"round {server_round}: no node was sampled")
        arrays = same_dtypes(new_arrays, arrays)
        if not cfg.secagg.enabled:  # journaled before the model leaves for evaluation
            central.spend(server_round, run_dir.name)
        ev, eval_failures = evaluate(server_round)
        if os.environ.get(CRASH_AFTER_RELEASE) == str(server_round):  # fault injection for the resume tests
            os.killpg(os.getpgid(0), signal.SIGKILL)
        trained = res.per_node()
        record: dict[str, Any] = {
            "round": server_round,
            "train": {"aggregate": dict(train_agg or {}), "nodes": trained},
            "evaluate": ev,
            "failures": _round_failures(server_round, res, getattr(strategy, "excluded", {}), eval_failures),
            "privacy": privacy_record(central, trained, ev["nodes"]),
        }
        t_commit = time.perf_counter()
        version = registry.commit(
            cfg.model_name,
            weights=encode_weights(arrays),
            state=encode_state(strategy),
            fields=manifest_fields(cfg, run_id=run_dir.name, record=record,
                                   node_info=res.node_info(), resumed_from=resumed_from, lineage=start_lineage),
            expected_parent=parent,
        )
        parent = version.hash
        versions.append(version.ref())
        if mirror is not None:
            _publish(mirror, version)
        record.update(version=version.ref(), commit_seconds=time.perf_counter() - t_commit,
                      seconds=time.perf_counter() - t0)
        finish_round(record)

    if not versions:
        raise FederationError(f"no round ran ({stopped})")
    summary = _summary(cfg, history, wall=time.perf_counter() - started)
    summary.update(first_round=first_round, last_round=history[-1]["round"], versions=versions,
                   registry=str(registry.root), resumed_from=resumed_from, stopped=stopped,
                   privacy=history[-1].get("privacy"))
    folder.save_weights(arrays.to_torch_state_dict(), {"task": cfg.task_label, "version": versions[-1]})
    folder.write_summary(summary)
    folder.close()
    return summary


def _too_few_replies(res: PhaseResult, cfg: Config, server_round: int) -> str | None:
    """Why the run stops here (every node refused: a clean stop), or raise when too few replied."""
    if res.failures and (not res.replied or res.replied < cfg.strategy.min_replies):
        detail = "; ".join(f"node {n}: {why}" for n, why in res.failures.items())
        if not res.replied:
            if len(res.codes) == len(res.failures) and set(res.codes.values()) <= REFUSALS:
                return f"stopped at round {server_round}: every node refused ({detail})"
            raise FederationError(f"round {server_round}: no node returned an update ({detail})")
        raise FederationError(
            f"round {server_round}: {res.replied} valid update(s), fewer than strategy.min_replies = "
            f"{cfg.strategy.min_replies} ({detail})"
        )
    return None


def _round_failures(server_round: int, res: PhaseResult, excluded: dict[str, str],
                    eval_failures: dict[str, str]) -> dict[str, str]:
    """Every node that did not contribute to the round, and why (logged unless it said so itself)."""
    failures = {**{n: f"train: {w}" for n, w in res.failures.items()},
                **{n: f"train: update excluded, {w}" for n, w in excluded.items()},
                **{n: f"evaluate: {w}" for n, w in eval_failures.items()}}
    for node, why in failures.items():
        if not why.startswith("train: error"):
            log.warning("round %d: node %s failed (%s)", server_round, node, why)
    return failures


def _publish(mirror: MlflowMirror, version: Version) -> None:
    """Mirror a committed version; the local registry is the truth, so a failure only warns."""
    try:
        mirror.publish(version)
    except Exception as exc:  # MLflow raises many types; the round's commit already stands
        log.warning("MLflow mirror of %s failed (%s); the local registry has it", version.ref(), exc)


def _summary(cfg: Config, history: list[dict[str, Any]], wall: float) -> dict[str, Any]:
    train_seconds = sum(
        node.get(wire.TRAIN_SECONDS, 0.0) for rec in history for node in rec.get("train", {}).get("nodes", {}).values()
    )
    last = history[-1]
    metric = cfg.resolved_task().metric
    final = last.get("evaluate", {}).get("aggregate", {})
    initial = history[0]["evaluate"]["aggregate"] if history[0].get("initial") else {}
    return {
        "oncofed_version": __version__,
        "task": cfg.task_label,
        "strategy": cfg.strategy.name,
        "model_name": cfg.model_name,
        "rounds": cfg.rounds,
        "nodes": cfg.data.nodes,
        "metric": metric,
        "initial_metrics": {metric: wire.score(initial), "val_loss": initial.get(wire.VAL_LOSS)},
        "final_metrics": {
            metric: wire.score(final),
            "val_loss": final.get(wire.VAL_LOSS),
            "train_loss": last.get("train", {}).get("aggregate", {}).get(wire.TRAIN_LOSS),
        },
        "wall_seconds": wall,
        "train_seconds": train_seconds,
        "overhead": wall / train_seconds if train_seconds > 0 else None,
    }
