"""One training round under Flower's SecAgg+ (``secagg.enabled``): the server learns only the
sum of the nodes' updates, never one of them.

Flower 1.41 runs SecAgg+ only through its legacy workflow (``SecAggPlusWorkflow`` on the
server, ``secaggplus_mod`` on the node), so this module drives that workflow for a single
round from OncoFed's own loop:

- the round's strategy still samples the nodes and writes their instructions
  (``configure_train``: central DP's sampling and client-side clipping norm included);
- each sampled node trains, clips its update itself when central DP asks, and hands its
  update (``w_i - w``, not the model) with weight 1 to ``secaggplus_mod``, which quantises,
  masks and sends it;
- the workflow unmasks the sum; :func:`secure_round` returns the summed update, and the
  caller adds central DP noise to that sum or applies the mean update.

With ``secagg.protocol = "malicious"`` :func:`secure_train` runs OncoFed's malicious-secure stages
instead (:mod:`strategies.secure_sum`: roster-signed keys, a consistency round), with the same
sampling, quantisation, equal weights and DP handling of the sum.

Equal weights: SecAgg+ quantises ``weight * update``, and example-count weights would both
cost precision and, under DP, let one node's influence pass the clipping norm.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server import ClientManager, LegacyContext, ServerConfig, SimpleClientManager
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fl import wire
from fl.config import Config
from fl.flower_compat.legacy import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, ClientProxy, GridClientProxy
from fl.flower_compat.legacy import WorkflowKey as Key
from fl.packing import PackingGrid
from fl.privacy.distributed import clipping_range as clipping_range_for
from strategies.central_dp import CentralDP
from strategies.secure_round import RecordingGrid, SecureRoundResult, min_contributors, share_count
from strategies.secure_sum import malicious_round
from strategies.updates import apply_update


class _OneRound(LegacyStrategy):  # type: ignore[misc]
    """Hands the SecAgg+ workflow the instructions OncoFed's strategy wrote and keeps the
    unmasked aggregate it gives back."""

    def __init__(self, instructions: dict[int, FitIns], grid: Grid) -> None:
        self.instructions = instructions
        self.grid = grid
        self.aggregate: list[np.ndarray] | None = None
        self.results: list[tuple[ClientProxy, FitRes]] = []
        self.failures: list[Any] = []

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return None

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        run_id = self.grid.run.run_id
        return [(GridClientProxy(node, self.grid, run_id), ins) for node, ins in self.instructions.items()]

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[Any]) -> tuple[Parameters | None, dict[str, Scalar]]:
        self.results, self.failures = results, failures
        if results:  # every FitRes carries the same unmasked aggregate
            self.aggregate = parameters_to_ndarrays(results[0][1].parameters)
        return (results[0][1].parameters if results else None), {}

    def configure_evaluate(self, server_round: int, parameters: Parameters,
                           client_manager: ClientManager) -> list[tuple[ClientProxy, EvaluateIns]]:
        return []

    def aggregate_evaluate(self, server_round: int, results: list[tuple[ClientProxy, EvaluateRes]],
                           failures: list[Any]) -> tuple[float | None, dict[str, Scalar]]:
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        return None


def secure_round(grid: Grid, strategy: Strategy, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                 *, shares: float, threshold: float, clipping_range: float, timeout: float,
                 distributed_noise: float | None = None, acks: Callable[[int], str] | None = None,
                 ) -> SecureRoundResult:
    """Sample and instruct through ``strategy``, then train and sum the updates with SecAgg+.

    ``distributed_noise``: the central noise multiplier z; each node adds its share for
    :func:`min_contributors` contributors (:mod:`fl.privacy.distributed`), the threshold Flower
    enforces, so no sum of fewer is unmasked. ``clipping_range`` is then ignored: the range must hold
    the noise."""
    messages = list(strategy.configure_train(server_round, arrays, config, grid))
    keys = list(arrays.keys())
    if len(messages) < wire.SECAGG_MIN_NODES:  # checked every round: sampling can pick fewer
        return SecureRoundResult(None, 0, skipped=f"{len(messages)} node(s) sampled, fewer than the "
                                                  f"{wire.SECAGG_MIN_NODES} SecAgg+ needs; nothing aggregated",
                                 outcome="skipped")
    floor = min_contributors(len(messages), threshold, shares)
    if distributed_noise is not None:
        clip = float(messages[0].content[wire.CONFIG][wire.CLIENT_CLIP_NORM])
        clipping_range = clipping_range_for(clip, distributed_noise, floor)
    instructions = {}
    for message in messages:
        node_config = dict(message.content[wire.CONFIG])
        node_config[wire.SECAGG_ARRAY_KEYS] = json.dumps(keys)
        if distributed_noise is not None:
            node_config[wire.DDP_NOISE_MULTIPLIER] = distributed_noise
            node_config[wire.DDP_MIN_CONTRIBUTORS] = floor
        if acks is not None:  # the node's own acknowledged ledger head (fl.server.witness)
            node_config[wire.LEDGER_ACKS] = acks(message.metadata.dst_node_id)
        global_arrays = message.content[wire.ARRAYS]
        instructions[message.metadata.dst_node_id] = FitIns(
            ndarrays_to_parameters([global_arrays[k].numpy() for k in keys]), node_config)
    grid = RecordingGrid(grid.inner if isinstance(grid, PackingGrid) else grid)
    shim = _OneRound(instructions, grid)
    context = LegacyContext(Context(run_id=grid.run.run_id, node_id=0, node_config={}, state=RecordDict(),
                                    run_config={}),
                            config=ServerConfig(num_rounds=1), strategy=shim, client_manager=SimpleClientManager())
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: server_round})
    context.state.array_records[MAIN_PARAMS_RECORD] = arrays
    # the share count as the fraction that gives exactly share_count(), the threshold as the integer t:
    # Flower's nodes then refuse, and its workflow halts, before any sum of fewer than t is unmasked
    workflow = SecAggPlusWorkflow(num_shares=share_count(len(messages), shares) / len(messages),
                                  reconstruction_threshold=floor, max_weight=wire.SECAGG_MAX_WEIGHT,
                                  clipping_range=clipping_range, quantization_range=wire.SECAGG_TARGET_RANGE,
                                  modulus_range=wire.SECAGG_MOD_RANGE, timeout=timeout)
    workflow(grid, context)
    failures = dict(grid.errors)  # each node's own reason (a refusal names what it refused)
    if shim.aggregate is None:
        return SecureRoundResult(None, 0, failures={**failures, "secagg": "secure aggregation halted"},
                                 outcome="halted")
    n = len(shim.results)
    if n < floor:  # dropouts left too few: their sum would expose them, or carry too little noise
        return SecureRoundResult(None, 0, failures=failures,
                                 skipped=f"{n} contributor(s) survived, fewer than the {floor} this round "
                                         "needs; their sum is discarded", outcome="discarded")
    update_sum = {k: np.asarray(a, dtype=np.float64) * n for k, a in zip(keys, shim.aggregate, strict=True)}
    metrics = [dict(res.metrics) for _, res in shim.results]
    nodes = [proxy.node_id for proxy, _ in shim.results]
    return SecureRoundResult(update_sum, n, metrics, nodes, failures)


@dataclass
class SecureTrainResult:
    """A SecAgg+ training round as the round loop sees it."""

    arrays: ArrayRecord | None  # the round's new global model (None: nothing to aggregate)
    train_aggregate: dict[str, float] | None
    scalars: dict[str, dict[str, Any]]  # by node: the scalars it sent beside its masked update
    failures: dict[str, str]
    skipped: str | None
    outcome: str  # SecureRoundResult.outcome


def secure_train(grid: Grid, strategy: Strategy, server_round: int, arrays: ArrayRecord, train_cfg: ConfigRecord,
                 cfg: Config, acks: Callable[[int], str] | None = None) -> SecureTrainResult:
    """One training round under SecAgg+: only the sum of the updates reaches this process.

    Under central DP the sum gets the round's noise (:meth:`CentralDP.release`), unless the nodes
    already put it in (distributed noise); without DP the mean update is applied through the
    strategy (FedAdam then steps from it)."""
    c = cfg.secagg
    distributed = c.noise == "distributed"
    clipping_range = c.clipping_range or (cfg.central_dp.clipping_norm if cfg.central_dp.enabled else 8.0)
    noise = cfg.central_dp.noise_multiplier if distributed else None
    if c.protocol == "malicious":
        result = malicious_round(grid, strategy, server_round, arrays, ConfigRecord(dict(train_cfg)), shares=c.shares,
                                 threshold=c.threshold, colluders=c.colluders, clipping_range=clipping_range,
                                 timeout=cfg.strategy.timeout, distributed_noise=noise, acks=acks)
    else:
        result = secure_round(grid, strategy, server_round, arrays, ConfigRecord(dict(train_cfg)), shares=c.shares,
                              threshold=c.threshold, clipping_range=clipping_range, timeout=cfg.strategy.timeout,
                              distributed_noise=noise, acks=acks)
    losses = [m[wire.TRAIN_LOSS] for m in result.metrics if wire.TRAIN_LOSS in m]
    train_agg = {wire.TRAIN_LOSS: sum(losses) / len(losses)} if losses else None

    def done(new: ArrayRecord | None) -> SecureTrainResult:
        scalars = {str(n): m for n, m in zip(result.node_ids, result.metrics, strict=True)}
        return SecureTrainResult(new, train_agg, scalars, dict(result.failures), result.skipped, result.outcome)

    if isinstance(strategy, CentralDP):
        if distributed:  # the nodes' noise is in the sum; a discarded sum releases nothing new
            if result.update_sum is None:
                return done(arrays)
            return done(strategy.release(server_round, result.update_sum, below=0.0, add_noise=False))
        # below the minimum: the server's noise alone, accounted as any round
        total = result.update_sum if result.update_sum is not None else strategy.zero_sum()
        return done(strategy.release(server_round, total, below=0.0))
    if result.skipped:
        return done(arrays)
    if result.update_sum is None:
        return done(None)
    mean = {k: v / result.contributors for k, v in result.update_sum.items()}
    return done(apply_update(strategy, server_round, arrays, mean))
