"""The server's round loop: the round's steps, in order, and nothing else.

Each round (a step of :class:`Federation`): check the client-level budget; train (sample, instruct,
collect, validate, aggregate and noise: :mod:`fl.server.phases` and the strategy); journal the
release; evaluate; commit the version with its manifest. Sampling and aggregation stay Flower's (``configure_train``,
``aggregate_train``, ``configure_evaluate``, ``aggregate_evaluate`` of the configured strategy).
"""

from __future__ import annotations

import logging
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
from strategies.reply_checks import check_replies
from strategies.state import encode_state, restore_state
from strategies.updates import same_dtypes

log = logging.getLogger("flwr.oncofed.server")  # under Flower's logger: same handler, same levels

TRAIN, EVALUATE = "train", "evaluate"
REFUSALS = {wire.ERROR_BUDGET, wire.ERROR_POLICY}  # a node's own decision, not a fault


def _task_spec(cfg: Config) -> dict[str, Any]:
    """What names the task to a node: the catalogue name, or the bundle's path and digest."""
    spec: dict[str, Any] = {wire.TASK: cfg.task, wire.BATCHNORM: cfg.train.batchnorm, wire.WORKERS: cfg.train.workers}
    task = cfg.resolved_task()
    if task.bundle_digest is not None:  # a catalogue task's shipped bundle, or the run's own
        spec.update({wire.BUNDLE: cfg.bundle, wire.BUNDLE_DIGEST: task.bundle_digest})
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
        train.update(wire.local_dp_instruction(cfg.local_dp))
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
    from fl.learn.trainable import trained_count

    trained = None
    if cfg.local_dp.enabled and cfg.resolved_task().bundle_digest is not None:  # a bundle task (not tabular)
        try:
            trained = trained_count(cfg.resolved_task().build_network(), cfg.local_dp.trainable)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    return {"pretraining": pretraining, "trained_parameters": trained}


class Federation:
    """One run of the round loop, step by step: :meth:`start` (fresh or resumed), then per round
    :meth:`train`, :meth:`journal`, :meth:`evaluate` and :meth:`commit`; :meth:`finish` writes the
    run folder. What the steps share (the global model, the chain's parent, the client-level
    account, the history) lives on the object."""

    def __init__(self, grid: Grid, cfg: Config, run_dir: Path, observer: Observer) -> None:
        self.started = time.perf_counter()
        self.cfg, self.run_dir, self.observer = cfg, run_dir, observer
        self.secure = cfg.secagg.enabled  # SecAgg+: Flower's or the malicious-secure protocol (secure_phase)
        self.grid = PackingGrid.wrap(grid)  # a message's content travels as one array (fl.packing)
        self.registry = Registry(cfg.registry.root)
        self.strategy = build_strategy(cfg)
        self.history: list[dict[str, Any]] = []
        self.versions: list[str] = []
        self.stopped: str | None = None

    def run(self) -> dict[str, Any]:
        """Every round of ``cfg.rounds`` until one stops the run; the summary."""
        self.start()
        try:
            if self.cfg.strategy.evaluate_initial:
                self.evaluate_initial()
            for server_round in range(self.first_round, self.last_round + 1):
                if not self.play_round(server_round):
                    break
            return self.finish()
        except Exception as exc:  # the view says why the run ended; the error still ends it
            last = self.history[-1]["round"] if self.history else self.first_round - 1
            self.folder.write_status(state="failed", round=last, last_round=self.last_round, phase="failed",
                                     error=f"{type(exc).__name__}: {exc}"[:2000], done=0, total=0)
            raise

    # ----- start -------------------------------------------------------------------------------
    def start(self) -> None:
        """The starting model, the chain it continues and the client-level account: from the newest
        version (``registry.resume``) or fresh; then the run folder and the instructions."""
        cfg = self.cfg
        if cfg.registry.resume:
            pretraining = self._resume()
        else:
            pretraining = self._fresh()
        self.lineage = lineage(cfg, pretraining)
        self.mirror = MlflowMirror(cfg.registry.mlflow_uri) if cfg.registry.mlflow_uri else None
        self.folder = RunFolder.create(self.run_dir, cfg)
        self.train_cfg, self.eval_cfg = _instructions(cfg)
        self.witness = LedgerWitness.of(cfg.registry.root)  # the nodes' ledger heads, sent back with every instruction
        self.last_round = self.first_round + cfg.rounds - 1
        self.observer.on_start(cfg.rounds)
        self.folder.write_status(state="running", round=self.first_round, last_round=self.last_round,
                                 phase="waiting for nodes", done=0, total=0)

    def _resume(self) -> dict[str, Any] | None:
        start = resume_point(self.registry, self.cfg)
        self.arrays = decode_weights(start.weights.read_bytes())
        restore_state(self.strategy, start.state.read_bytes(), source=start.state)
        self.first_round, self.parent, self.resumed_from = int(start.manifest["round"]) + 1, start.hash, start.ref()
        self.central = CentralAccount.resume(self.cfg, start.manifest)
        return start.manifest.get("pretraining")

    def _fresh(self) -> dict[str, Any] | None:
        newest = self.registry.latest(self.cfg.model_name)
        (self.arrays, pretraining), self.first_round = start_model(self.cfg), 1
        self.parent, self.resumed_from = newest.hash if newest else None, None
        self.central = CentralAccount.start(self.cfg)
        return pretraining

    # ----- one round ---------------------------------------------------------------------------
    def play_round(self, server_round: int) -> bool:
        """Train, journal, evaluate, commit; False when the run stops before or during training."""
        if (reason := self.central.would_exceed()) is not None:
            self.stopped = f"stopped before round {server_round}: {reason}"
            log.warning("%s", self.stopped)
            return False
        t0 = time.perf_counter()
        trained = self.train(server_round)
        if trained is None:
            return False
        res, train_agg = trained
        self.journal(server_round)
        ev, eval_failures = self.evaluate(server_round)
        self.commit(server_round, res, train_agg, ev, eval_failures, t0)
        return True

    def train(self, server_round: int) -> tuple[PhaseResult, dict[str, float]] | None:
        """One round's training, the new global model in ``self.arrays``: (replies, train metrics),
        or None when every node refused. Under SecAgg+ the workflow aggregates; otherwise the
        replies are validated, counted, then aggregated by the strategy."""
        if self.secure:
            res, new_arrays, train_agg = self._train_secure(server_round)
        else:
            res, new_arrays, train_agg = self._train_plain(server_round), None, None
        for node, why in res.failures.items():
            log.warning("round %d: node %s did not train (%s)", server_round, node, why)
        self.witness.observe(res.node_info())
        if (stopped := _too_few_replies(res, self.cfg, server_round)) is not None:
            self.stopped = stopped
            log.warning("%s", stopped)
            return None
        if not self.secure:  # aggregated once the replies are known to suffice
            new_arrays, train_agg = self.strategy.aggregate_train(server_round, res.ok)
        if new_arrays is None:
            raise FederationError(f"round {server_round}: no node was sampled")
        self.arrays = same_dtypes(new_arrays, self.arrays)
        return res, dict(train_agg or {})

    def _train_secure(self, server_round: int) -> tuple[PhaseResult, ArrayRecord | None, dict[str, float] | None]:
        self.folder.write_status(state="running", round=server_round, last_round=self.last_round,
                                 phase="train (secure aggregation)", done=0, total=0)
        self.observer.on_phase(server_round, TRAIN, 0, 0)
        # journaled ahead: the coordinator sees the unmasked sum inside the workflow, whatever follows
        self.central.spend(server_round, self.run_dir.name, stage="before secure aggregation")
        res, new_arrays, train_agg = secure_phase(self.grid, self.strategy, server_round, self.arrays,
                                                  ConfigRecord(dict(self.train_cfg)), self.cfg,
                                                  acks=self.witness.acks_for)
        self.central.note(server_round, self.run_dir.name, str(res.outcome))
        return res, new_arrays, train_agg

    def _train_plain(self, server_round: int) -> PhaseResult:
        messages = self.strategy.configure_train(server_round, self.arrays, ConfigRecord(dict(self.train_cfg)),
                                                 self.grid)
        res = self._phase(server_round, TRAIN, self.witness.with_acks(messages))
        res.ok, rejected = check_replies(res.ok, self.arrays, self.cfg.strategy.max_update_norm)
        res.failures.update({node: f"rejected, {why}" for node, why in rejected.items()})
        return res

    def journal(self, server_round: int) -> None:
        """The round's client-level release, journaled before the model leaves for evaluation (under
        SecAgg+ it was journaled ahead of the workflow, in :meth:`_train_secure`)."""
        if not self.secure:
            self.central.spend(server_round, self.run_dir.name)

    def evaluate(self, server_round: int) -> tuple[dict[str, Any], dict[str, str]]:
        """The global model scored by the sampled nodes: (the round's evaluate record, failures)."""
        messages = self.strategy.configure_evaluate(server_round, self.arrays, ConfigRecord(dict(self.eval_cfg)),
                                                    self.grid)
        res = self._phase(server_round, EVALUATE, self.witness.with_acks(messages))
        self.witness.observe(res.node_info())
        # nodes whose policy releases no metrics reply with their count only; a weighted mean
        # over every reply would pull the score towards 0
        scored = [m for m in res.ok if wire.score(dict(m.content[wire.METRICS])) is not None]
        agg = self.strategy.aggregate_evaluate(server_round, scored) if scored else None
        dp_released = bool(scored) and all(m.content[wire.METRICS].get(wire.METRICS_DP) == 1.0 for m in scored)
        # per-node quantities have no meaningful average: they stay in the per-node record
        aggregate = {k: v for k, v in (agg or {}).items() if k not in (wire.METRICS_DP, wire.EPSILON_RECORD)}
        return {"aggregate": aggregate, "nodes": res.per_node(), "dp_released": dp_released}, res.failures

    def evaluate_initial(self) -> None:
        """The starting model's evaluation, recorded as round ``first_round - 1``."""
        t0 = time.perf_counter()
        ev, failures = self.evaluate(self.first_round - 1)
        self._record({"round": self.first_round - 1, "evaluate": ev, "failures": failures,
                      "seconds": time.perf_counter() - t0, "initial": True})

    def commit(self, server_round: int, res: PhaseResult, train_agg: dict[str, float], ev: dict[str, Any],
               eval_failures: dict[str, str], t0: float) -> None:
        """The round's version (weights, strategy state, manifest) committed on the chain, mirrored,
        and its record appended to the run folder."""
        trained = res.per_node()
        record: dict[str, Any] = {
            "round": server_round,
            "train": {"aggregate": train_agg, "nodes": trained},
            "evaluate": ev,
            "failures": _round_failures(server_round, res, getattr(self.strategy, "excluded", {}), eval_failures),
            "privacy": privacy_record(self.central, trained, ev["nodes"]),
        }
        t_commit = time.perf_counter()
        version = self.registry.commit(
            self.cfg.model_name,
            weights=encode_weights(self.arrays),
            state=encode_state(self.strategy),
            fields=manifest_fields(self.cfg, run_id=self.run_dir.name, record=record, node_info=res.node_info(),
                                   resumed_from=self.resumed_from, lineage=self.lineage,
                                   flower_run=int(self.grid.run.run_id)),
            expected_parent=self.parent,
        )
        self.parent = version.hash
        self.versions.append(version.ref())
        if self.mirror is not None:
            _publish(self.mirror, version)
        record.update(version=version.ref(), commit_seconds=time.perf_counter() - t_commit,
                      seconds=time.perf_counter() - t0)
        self._record(record)

    # ----- end ---------------------------------------------------------------------------------
    def finish(self) -> dict[str, Any]:
        """The run's summary, the last weights and the summary file written; the run folder closed."""
        if not self.versions:
            raise FederationError(f"no round ran ({self.stopped})")
        summary = _summary(self.cfg, self.history, wall=time.perf_counter() - self.started)
        summary.update(first_round=self.first_round, last_round=self.history[-1]["round"], versions=self.versions,
                       registry=str(self.registry.root), resumed_from=self.resumed_from, stopped=self.stopped,
                       privacy=self.history[-1].get("privacy"))
        self.folder.save_weights(self.arrays.to_torch_state_dict(),
                                 {"task": self.cfg.task_label, "version": self.versions[-1]})
        self.folder.write_summary(summary)
        self.folder.write_status(state="finished", round=self.history[-1]["round"], last_round=self.last_round,
                                 phase="stopped" if self.stopped else "done", stopped=self.stopped, done=0, total=0)
        self.folder.close()
        return summary

    def _phase(self, server_round: int, name: str, messages: Iterable[Message]) -> PhaseResult:
        def report(done: int, total: int) -> None:
            self.folder.write_status(state="running", round=server_round, last_round=self.last_round, phase=name,
                                     done=done, total=total)
            self.observer.on_phase(server_round, name, done, total)

        return exchange(self.grid, messages, timeout=self.cfg.strategy.timeout, report=report)

    def _record(self, record: dict[str, Any]) -> None:
        self.folder.append_round(record)
        self.history.append(record)
        self.observer.on_round(record)


def run_federation(grid: Grid, cfg: Config, run_dir: Path, observer: Observer) -> dict[str, Any]:
    """Run ``cfg.rounds`` rounds, committing a registry version after each; return the summary."""
    return Federation(grid, cfg, run_dir, observer).run()


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
