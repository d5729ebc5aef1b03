"""The node's Flower ClientApp: train and evaluate on this node's data only.

The data folder comes from the node config: ``data-dir`` in deployment
(``--node-config "data-dir='/data/site'"``); in simulation, virtual node ``partition-id``
reads ``<data.root>/node-<partition-id>`` from the run config. A reply carries weights,
the example count and aggregate metrics, nothing else. A dataset that fails validation is
reported to the server as a bare error code: the details (file names included) stay in the
node's own log. A task that fails (a bundle's transform, network or loss raising) is reported
by its stage, the bundle's component and the exception's type (:mod:`nodes.failure`), never by
the exception's message, which may carry the case's file names, shapes or values; the node's log
keeps the traceback.
"""

from __future__ import annotations

import contextvars
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp

from fl import schema, wire
from fl.errors import ConfigError, DataError
from fl.learn import PrivateSettings, Task, TrainSettings, resolve_task
from fl.learn.data import CACHE_DIR, LocalData
from fl.learn.device import describe
from fl.learn.synth import node_dir
from fl.packing import packed_content_mod
from fl.privacy.accounting import GaussianEvent, local_event
from fl.privacy.clipping import clip
from fl.privacy.noise import SecureGaussian, noisy_mean
from nodes import requests_log
from nodes.ledger import Ledger, LedgerError
from nodes.policy import (
    EXACT,
    NOISY,
    NONE,
    Contribution,
    LocalDpRequest,
    Policy,
    Refusal,
    admit,
    charge,
    check_distributed,
    check_threshold,
    count_request,
    keyed_fingerprint,
    load_policy,
    plan_contribution,
    state_dir,
)
from nodes.provenance import index_local_data
from nodes.witness import check_acknowledged, head
from nodes.working_set import SETS

log = logging.getLogger("flwr.oncofed.node")  # lands in the SuperNode's own log

app = ClientApp(mods=[packed_content_mod])  # a message's content travels as one array (fl.packing)
# "flower" while Flower's secaggplus_mod runs this node's training (its masking stage), "malicious"
# while OncoFed's collect stage does (nodes.secure_sum): the paths where the update leaves masked
_UNDER_SECAGG: contextvars.ContextVar[str] = contextvars.ContextVar("oncofed_under_secagg", default="")


def resolve_data_dir(context: Context) -> Path:
    """This node's data folder, from the node config (deployment) or partition (simulation)."""
    node_config = context.node_config
    if wire.NODE_DATA_DIR in node_config:
        return Path(str(node_config[wire.NODE_DATA_DIR]))
    if wire.NODE_PARTITION_ID in node_config:
        return node_dir(str(context.run_config["data.root"]), int(node_config[wire.NODE_PARTITION_ID]))
    raise DataError(f"node config has no '{wire.NODE_DATA_DIR}': start the node with --node-config \"data-dir='/path'\"")


def node_device(config: ConfigRecord, context: Context) -> torch.device:
    """This node's own ``device`` setting, else the run's ``train.device``, else auto."""
    from fl.learn import device

    spec = context.node_config.get(wire.NODE_DEVICE, config.get(wire.DEVICE, device.AUTO))
    return device.resolve(str(spec))


def instructed_task(config: ConfigRecord, context: Context) -> Any:
    """The task the server names: a catalogue task, or a bundle whose digest matches the server's,
    found in this node's approved app (a deployed node: nothing outside it) or, for a virtual
    node, at the path the simulation gives."""
    bundle = str(config.get(wire.BUNDLE, ""))
    digest = str(config[wire.BUNDLE_DIGEST]) if wire.BUNDLE_DIGEST in config else None
    if bundle and digest is None:  # a catalogue task's bundle is the node's own approved copy
        raise ConfigError("bundle task without its digest: the node cannot check which bundle it would run")
    lr = float(config[wire.LR]) if wire.LR in config else None
    batch_size = int(config[wire.BATCH_SIZE]) if wire.BATCH_SIZE in config else None
    return resolve_task(str(config[wire.TASK]), bundle, private=wire.LOCAL_NOISE_MULTIPLIER in config, digest=digest,
                        lr=lr, batch_size=batch_size, inside_app=wire.NODE_PARTITION_ID not in context.node_config)


def node_workers(config: ConfigRecord, context: Context, task: Task) -> int:
    """DataLoader workers: the run's ``train.workers``, or (-1) the bundle's own on a deployed node
    (at most its cores - 1) and none on a virtual node, which shares the machine."""
    import os

    asked = int(config.get(wire.WORKERS, -1))
    if asked >= 0:
        return asked
    if wire.NODE_PARTITION_ID in context.node_config:
        return 0
    return max(0, min(task.loader_workers, (os.cpu_count() or 1) - 1))


def _own_batchnorm(msg: Message, config: ConfigRecord, folder: Path, task: Task, net: torch.nn.Module) -> Path | None:
    """FedBN: this node's own BatchNorm layers of this run swapped into ``net``; where it keeps them,
    or None when the run shares every layer."""
    from nodes import fedbn

    if config.get(wire.BATCHNORM, "fedavg") != "local":
        return None
    path = fedbn.local_path(folder, f"{msg.metadata.run_id}:{task.digest}")
    fedbn.swap_in(net, path)
    return path


def _prepare(content: RecordDict, context: Context, run_id: int) -> tuple[Task, torch.nn.Module, LocalData, Path]:
    """The task, the global model and the node's data for this message, from the run's working set
    (:mod:`nodes.working_set`): found, parsed and loaded at the run's first message, then reused."""
    if wire.NODE_PARTITION_ID in context.node_config:  # a virtual node shares the machine
        torch.set_num_threads(int(context.run_config.get("simulation.threads_per_node", 1)))
    config = content[wire.CONFIG]
    task = SETS.task(run_id, _task_key(config, context), lambda: instructed_task(config, context))
    data_dir = resolve_data_dir(context)
    kept = SETS.get(run_id, task, data_dir, node_state_dir(context, data_dir) / CACHE_DIR)
    net = kept.network(content[wire.ARRAYS].to_torch_state_dict())
    return task, net, kept.data, data_dir


def _task_key(config: ConfigRecord, context: Context) -> tuple[Any, ...]:
    """Everything of the instruction that :func:`instructed_task` reads: a message that differs in
    any of it gets its own task, found and checked anew."""
    return (str(config[wire.TASK]), str(config.get(wire.BUNDLE, "")), str(config.get(wire.BUNDLE_DIGEST, "")),
            wire.LOCAL_NOISE_MULTIPLIER in config, config.get(wire.LR), config.get(wire.BATCH_SIZE),
            wire.NODE_PARTITION_ID not in context.node_config)


def _secagg_when_asked(msg: Message, context: Context, call_next: Any) -> Message:
    """Route secure-aggregation stages: Flower's SecAgg+ through the guard and ``secaggplus_mod`` (it
    masks the update this node's ``train`` returns), OncoFed's malicious-secure stages through
    :mod:`nodes.secure_sum`; every other instruction goes straight to ``train``."""
    flower, ours = wire.is_secagg_message(msg.content), wire.is_secure_sum_message(msg.content)
    if not (flower or ours):
        return call_next(msg, context)
    logging.getLogger("flwr").setLevel(logging.INFO)  # the mod logs every stage at DEBUG
    from nodes.secagg_guard import guard_stage

    try:
        data_dir = resolve_data_dir(context)
        folder = node_state_dir(context, data_dir)
        policy = load_policy(folder)
    except (DataError, ConfigError) as exc:
        return _refuse(msg, exc)
    protocol = "malicious" if ours else "flower"

    def train_under_secagg(inner: Message, ctx: Context) -> Message:
        token = _UNDER_SECAGG.set(protocol)
        try:
            return call_next(inner, ctx)
        finally:
            _UNDER_SECAGG.reset(token)

    if ours:
        from nodes import secure_sum

        return secure_sum.handle(msg, context, policy, folder, lambda inner: train_under_secagg(inner, context))
    refused = guard_stage(msg, context, policy)  # Flower's mod checks none of what the node's secrets rest on
    if refused is not None:
        log.warning("node %s refused a SecAgg+ stage: %s", msg.metadata.dst_node_id, refused.error.reason)
        return refused

    def train_or_raise(inner: Message, ctx: Context) -> Message:
        reply = train_under_secagg(inner, ctx)
        if reply.has_error():  # the mod cannot mask an error: fail the stage with its reason
            raise RuntimeError(f"error {reply.error.code}: {reply.error.reason}")
        return reply

    return secaggplus_mod(msg, context, train_or_raise)


def _local_generator(seed: int, server_round: int, data_digest: str) -> torch.Generator:
    """Shuffling order and random transforms for this node and round without DP: reproducible,
    different across nodes. Seeded by the dataset's content digest, not its folder, so that the same
    cases train the same way wherever they lie (a run does not depend on where a hospital mounts its data)."""
    mixed = (seed * 1_000_003 + server_round * 7919 + int(data_digest[:15], 16)) % 2**63
    return torch.Generator().manual_seed(mixed)


def _private_generator() -> torch.Generator:
    """Random transforms and augmented views under DP, seeded from the OS CSPRNG: a seed drawn from
    the data (its digest) would let one added or removed case re-draw every other case's views and
    crops, so neighbouring datasets would differ by more than the clipping norm."""
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "big") >> 1)


def _refuse(msg: Message, exc: Exception) -> Message:
    from nodes.failure import full_traceback

    if isinstance(exc, (DataError, ConfigError)) and exc.__context__ is None:
        log.error("node %s: %s", msg.metadata.dst_node_id, exc)
    else:  # the whole chain: a DataError or ConfigError raised from None hides what the bundle raised
        log.error("node %s: local task failed\n%s", msg.metadata.dst_node_id, full_traceback(exc))
    if isinstance(exc, schema.NewerFormatError):  # before DataError: it is one too
        return Message(Error(code=wire.ERROR_TRAINING_FAILED, reason="a file in this node's state was written by a "
                             "newer OncoFed; the node refuses until its operator upgrades it"), reply_to=msg)
    code = wire.ERROR_DATASET_INVALID if isinstance(exc, DataError) else wire.ERROR_TRAINING_FAILED
    reason = {
        DataError: "local dataset failed validation",
        ConfigError: "the request or this node's own configuration (privacy policy, bundle) was refused",
    }.get(type(exc), f"local {_KIND.get(msg.metadata.message_type, 'task')} failed")
    return Message(Error(code=code, reason=f"{reason}{_where(exc)}; details are in the node's log"), reply_to=msg)


_KIND = {MessageType.TRAIN: "training", MessageType.EVALUATE: "evaluation"}


def _where(exc: Exception) -> str:
    """Where the task failed, for the coordinator: the stage, the bundle's component and the exception's
    type (:func:`nodes.failure.classify`), never the message, which may carry the case's file names,
    shapes or values; nothing for an error of the node's own checks that names no component."""
    from nodes.failure import classify

    try:
        failure = classify(exc, stage="parse" if isinstance(exc, ConfigError) else None)  # building the bundle
        if not failure.component and isinstance(exc, (DataError, ConfigError)):
            return ""
        return f" at {failure.reason()}" if failure.stage else f" ({failure.reason()})"
    except Exception:  # noqa: BLE001 - the reply must go out whatever the traceback holds; the log has it
        log.exception("node: the failure could not be classified")
        return ""


def node_state_dir(context: Context, data_dir: Path) -> Path:
    """Where this node keeps its privacy policy and ledger (``state-dir`` node config, or
    ``<data-dir>/.oncofed``): on the node, beside the data, surviving restarts."""
    if wire.NODE_STATE_DIR in context.node_config:
        return Path(str(context.node_config[wire.NODE_STATE_DIR]))
    return state_dir(data_dir)


def _local_dp_request(config: ConfigRecord) -> LocalDpRequest | None:
    if wire.LOCAL_NOISE_MULTIPLIER not in config:
        return None
    return LocalDpRequest(float(config[wire.LOCAL_NOISE_MULTIPLIER]), float(config[wire.LOCAL_MAX_GRAD_NORM]))


def _clip_update(net: torch.nn.Module, global_state: dict[str, torch.Tensor], bound: float) -> float:
    """Clip this node's update to ``bound`` in place (client-side clipping); 1.0 if it was below."""
    state = net.state_dict()
    clipped, norm = clip({k: (state[k].double() - global_state[k].double()).numpy() for k in state}, bound)
    net.load_state_dict({k: global_state[k] + torch.from_numpy(clipped[k]).to(state[k].dtype) for k in state})
    return 1.0 if norm <= bound else 0.0


def _guarded(msg: Message, work: Any, context: Context | None = None) -> Message:
    """Run ``work()``; a refusal, a broken ledger or bad data becomes a named error reply. Either way
    the outcome goes into the operator's request log (:mod:`nodes.requests_log`)."""
    try:
        reply = _reply(msg, work)
    finally:
        SETS.release()  # the run's kept network is free for this node's next message
    if context is not None:
        _log_request(msg, reply, context)
    return reply


def _log_request(msg: Message, reply: Message, context: Context) -> None:
    try:
        config = msg.content.config_records.get(wire.CONFIG) if msg.has_content() else None
        server_round = int(config.get(wire.SERVER_ROUND)) if config and wire.SERVER_ROUND in config else None
        error = reply.error if reply.has_error() else None
        requests_log.record(node_state_dir(context, resolve_data_dir(context)), kind=str(msg.metadata.message_type),
                            run=int(msg.metadata.run_id), server_round=server_round, served=error is None,
                            code=int(error.code) if error is not None else None,
                            reason=str(error.reason) if error is not None else "")
    except Exception:  # noqa: BLE001 - the operator's log must never change the reply
        log.exception("node: the request could not be logged")


def _reply(msg: Message, work: Any) -> Message:
    try:
        return work()
    except Refusal as refusal:
        log.warning("node %s refused round %s: %s", msg.metadata.dst_node_id,
                    msg.content[wire.CONFIG].get(wire.SERVER_ROUND) if wire.CONFIG in msg.content.config_records
                    else "?", refusal.reason)
        return Message(Error(code=refusal.code, reason=refusal.reason), reply_to=msg)
    except schema.NewerFormatError as exc:  # a newer ledger too: not a broken checksum
        return _refuse(msg, exc)
    except LedgerError as exc:
        log.error("node %s: %s", msg.metadata.dst_node_id, exc)
        return Message(Error(code=wire.ERROR_LEDGER, reason="privacy ledger failed its checksum; node refuses to train"),
                       reply_to=msg)
    except Exception as exc:  # noqa: BLE001 - any failure is a named error reply; its message stays here
        return _refuse(msg, exc)


@app.train(mods=[_secagg_when_asked])
def train(msg: Message, context: Context) -> Message:
    """Check the request against this node's policy and budget, train, reply weights and metrics
    (under SecAgg+: the update alone, for ``secaggplus_mod`` to mask)."""
    content, legacy, protocol = msg.content, wire.legacy_instruction(msg.content), _UNDER_SECAGG.get()
    if legacy is not None:
        weights, secure_config = legacy
        content = RecordDict({wire.ARRAYS: ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in weights.items()}),
                              wire.CONFIG: secure_config})
    # masked only on the two paths that mask it, whatever the server's message looks like
    secure = (protocol == "flower" and legacy is not None) or (protocol == "malicious" and legacy is None)
    return _guarded(msg, lambda: _train(msg, content, context, secure), context)


def _train(msg: Message, content: RecordDict, context: Context, secure: bool) -> Message:
    task, net, data, data_dir = _prepare(content, context, int(msg.metadata.run_id))
    config = content[wire.CONFIG]
    folder = node_state_dir(context, data_dir)
    policy, ledger = load_policy(folder), Ledger.in_dir(folder)
    request = _local_dp_request(config)
    options = _dp_options(config) if request else None
    if options is not None and options != type(options)():
        task.check_private_options(options, net)  # a choice this task cannot honour fails before any spend
    epochs = int(config[wire.EPOCHS])
    batch_size = task.batch_size
    event = (
        local_event(len(data.train), epochs=epochs, batch_size=batch_size, noise_multiplier=request.noise_multiplier)
        if request else None
    )
    fingerprint = keyed_fingerprint(folder, data.digest)
    index_local_data(folder, fingerprint, data)  # the series it trains on, as tokens, before any spend
    contribution, entry = _admit_training(msg, config, context, folder, policy, ledger, request, event,
                                          num_records=len(data.train), secure=secure, net=net, dataset=fingerprint)
    global_state = {k: v.clone() for k, v in net.state_dict().items()}
    device = node_device(config, context)
    fedbn_path = _own_batchnorm(msg, config, folder, task, net)
    result = _local_training(net, task, data, config, context, request, options, device, epochs)
    if fedbn_path is not None:
        from nodes import fedbn

        fedbn.keep_and_hide(net, global_state, fedbn_path)
    values = _train_metrics(result, config, policy, request, entry, net, global_state, num_examples=len(data.train))
    info = {wire.DATASET_FINGERPRINT: fingerprint, wire.DEVICE_NAME: describe(device), wire.LEDGER_HEAD: head(folder)}
    if secure:
        return _masked_reply(msg, net, global_state, values, info, config, context, contribution)
    content = RecordDict({wire.ARRAYS: ArrayRecord(net.state_dict()), wire.METRICS: MetricRecord(values),
                          wire.NODE_INFO: ConfigRecord(info)})
    return Message(content=content, reply_to=msg)


def _admit_training(msg: Message, config: ConfigRecord, context: Context, folder: Path, policy: Policy,
                    ledger: Ledger, request: LocalDpRequest | None, event: Any, *, num_records: int, secure: bool,
                    net: torch.nn.Module, dataset: str) -> tuple[Contribution, dict[str, Any] | None]:
    """Every check of the request (acknowledged ledger heads, contribution, budgets), then both ledger
    entries, before any training: (this node's contribution, its record-level ledger entry or None).
    The contribution names the ``dataset`` it was trained on (keyed fingerprint; it stays here)."""
    run, server_round = int(msg.metadata.run_id), int(config[wire.SERVER_ROUND])
    check_acknowledged(folder, config)
    contribution = _contribution(policy, config, context, run, server_round, secure, net)
    contributions = Ledger.contributions_in(folder)
    with ledger.locked(), contributions.locked():  # every check first, then both entries, before training
        client_event, client_fields = plan_contribution(policy, contributions, contribution)
        entry = admit(policy, ledger, request, event, secure=secure, num_records=num_records,
                      distributed_noise=contribution.noise_multiplier is not None,
                      server_round=server_round, run=run, time=time.time())
        contributions.append(client_event, **client_fields, dataset=dataset, time=time.time())
    return contribution, entry


def _train_metrics(result: Any, config: ConfigRecord, policy: Policy, request: LocalDpRequest | None,
                   entry: dict[str, Any] | None, net: torch.nn.Module, global_state: dict[str, torch.Tensor], *,
                   num_examples: int) -> dict[str, float]:
    """The reply's metrics: the example count; the loss and timing where the policy releases exact
    metrics; whether the update was below the clipping norm (client-side clipping: ``net`` is
    clipped here); the record-level budget spent."""
    values: dict[str, float] = {wire.NUM_EXAMPLES: num_examples}
    if policy.metrics_mode(request is not None) == EXACT:  # otherwise the loss and timing stay here
        values.update({wire.TRAIN_LOSS: result.loss, wire.TRAIN_SECONDS: result.seconds})
    if wire.CLIENT_CLIP_NORM in config:
        values[wire.UPDATE_NORM_BELOW_CLIP] = _clip_update(net, global_state, float(config[wire.CLIENT_CLIP_NORM]))
    if entry is not None:
        values[wire.EPSILON_RECORD] = float(entry["epsilon_after"])
        values[wire.DELTA_RECORD] = float(entry["delta"])
    return values


def _masked_reply(msg: Message, net: torch.nn.Module, global_state: dict[str, torch.Tensor], values: dict[str, float],
                  info: dict[str, Any], config: ConfigRecord, context: Context, contribution: Contribution) -> Message:
    """The reply under secure aggregation: the update alone (with this node's share of the noise under
    distributed noise) for the masking stage, and its scalars."""
    keys = json.loads(str(config[wire.SECAGG_ARRAY_KEYS]))
    state = net.state_dict()
    update = {k: (state[k].double() - global_state[k].double()).numpy() for k in keys}
    if contribution.noise_multiplier is not None:
        update = _with_noise_share(update, config, context, net)
    values.pop(wire.UPDATE_NORM_BELOW_CLIP, None)  # scalars travel unmasked: this bit would describe the update
    return Message(wire.legacy_reply(update, keys, {**values, **info}), reply_to=msg)


def _secure_setup(context: Context) -> tuple[int, float, int]:
    """This round's threshold t, clipping range and quantisation range, from this node's own protocol
    state (the set-up the guard admitted, or the one every roster site signed): t is the fewest
    contributors a sum may have when it is unmasked."""
    if _UNDER_SECAGG.get() == "malicious":
        from nodes.secure_sum import threshold_and_range

        return threshold_and_range(context)
    from fl.flower_compat.secagg import RECORD_KEY_STATE

    state = context.state.config_records[RECORD_KEY_STATE]
    return int(state["threshold"]), float(state["clipping_range"]), int(state["target_range"])


def _contribution(policy: Policy, config: ConfigRecord, context: Context, run: int, server_round: int,
                  secure: bool, net: torch.nn.Module) -> Contribution:
    """This request's contribution as the node will make it, checked before anything is written: the
    policy's floors for SecAgg+ and distributed noise (the multiplier on the sum z, the clipping norm,
    the threshold), and an encoding the node can honour on this round's SecAgg+ grid."""
    if not secure:
        return Contribution(run, server_round, secure=False)
    threshold = _secure_setup(context)[0]
    check_threshold(policy, threshold)
    if wire.DDP_NOISE_MULTIPLIER not in config:
        return Contribution(run, server_round, secure=True)
    if wire.CLIENT_CLIP_NORM not in config or wire.DDP_MIN_CONTRIBUTORS not in config:
        raise Refusal(wire.ERROR_POLICY, "distributed noise needs the clipping norm and the contributor count; "
                                         "the request lacks one")
    z, clip = float(config[wire.DDP_NOISE_MULTIPLIER]), float(config[wire.CLIENT_CLIP_NORM])
    check_distributed(policy, noise_multiplier=z, clip=clip)
    _noise_plan(config, context, net)  # a setting the node cannot honour is refused now, not after the charge
    # this node's own share: std z B / sqrt(t) on sensitivity B, whoever the other contributors are
    return Contribution(run, server_round, secure=True, noise_multiplier=z / math.sqrt(threshold), sum_noise=z)


def _noise_plan(config: ConfigRecord, context: Context, net: torch.nn.Module) -> Any:
    """The distributed-noise encoding of this round (:func:`fl.privacy.distributed.plan`), sized for
    exactly the threshold t of this node's own SecAgg+ state (the guard admitted it; Flower unmasks
    no sum of fewer), not for the server's word; a :class:`Refusal` naming what cannot be honoured."""
    from fl.privacy import distributed as distributed_dp

    threshold, range_, target_range = _secure_setup(context)
    contributors = int(config[wire.DDP_MIN_CONTRIBUTORS])
    if contributors != threshold:
        raise Refusal(wire.ERROR_POLICY, f"distributed noise: the request sizes the noise for {contributors} "
                                         f"contributors, this SecAgg+ round's threshold is {threshold}")
    state = net.state_dict()
    try:
        keys = json.loads(str(config[wire.SECAGG_ARRAY_KEYS]))
        dim = sum(state[k].numel() for k in keys)
        return distributed_dp.plan(clip=float(config[wire.CLIENT_CLIP_NORM]),
                                   noise_multiplier=float(config[wire.DDP_NOISE_MULTIPLIER]),
                                   min_contributors=threshold, dim=dim, range_=range_, target_range=target_range)
    except ValueError as exc:  # plan() names what it cannot honour
        raise Refusal(wire.ERROR_POLICY, str(exc)) from None
    except (KeyError, TypeError) as exc:
        raise Refusal(wire.ERROR_POLICY, f"distributed noise: malformed request ({exc!r})") from None


def _local_training(net: torch.nn.Module, task: Task, data: LocalData, config: ConfigRecord, context: Context,
                    request: LocalDpRequest | None, options: Any, device: torch.device, epochs: int) -> Any:
    """Train ``net`` on this node's training cases: DP-SGD when the request asks for it (sampling
    from a fresh generator, noise from the node's CSPRNG), else the task's plain training."""
    if request:
        return task.train_private(net, data.train, PrivateSettings(
            epochs=epochs, noise_multiplier=request.noise_multiplier, max_grad_norm=request.max_grad_norm,
            device=device, options=options, generator=_private_generator()))
    generator = _local_generator(int(config[wire.SEED]), int(config[wire.SERVER_ROUND]), data.digest)
    return task.train(net, data.train, TrainSettings(
        epochs=epochs, device=device, amp=bool(config.get(wire.AMP, False)),
        proximal_mu=float(config.get(wire.PROXIMAL_MU, 0.0)), generator=generator,
        workers=node_workers(config, context, task)))


def _dp_options(config: ConfigRecord) -> Any:
    """The run's DP-SGD options (trained parameters, views, weight average); a server that sends
    none gets the plain mechanism."""
    from fl.learn.dp_train import DpOptions

    return DpOptions(**wire.local_dp_options(config))


def _with_noise_share(update: dict[str, np.ndarray], config: ConfigRecord, context: Context,
                      net: torch.nn.Module) -> dict[str, np.ndarray]:
    """This node's update clipped, on SecAgg+'s integer grid, plus its discrete Gaussian share
    (:mod:`fl.privacy.distributed`), by the plan :func:`_contribution` checked before the charge."""
    from fl.privacy import distributed as distributed_dp

    plan = _noise_plan(config, context, net)
    flat = np.concatenate([v.ravel() for v in update.values()])
    encoded = distributed_dp.encode(flat, plan, SecureGaussian())
    out, start = {}, 0
    for key, value in update.items():
        out[key] = encoded[start:start + value.size].reshape(value.shape)
        start += value.size
    return out


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global weights on the node's held-out cases and release what the node's policy
    allows: exact metrics, metrics with DP noise (charged to the ledger first), or none."""
    return _guarded(msg, lambda: _evaluate(msg, context), context)


def _evaluate(msg: Message, context: Context) -> Message:
    task, net, data, data_dir = _prepare(msg.content, context, int(msg.metadata.run_id))
    config = msg.content[wire.CONFIG]
    folder = node_state_dir(context, data_dir)
    policy, ledger = load_policy(folder), Ledger.in_dir(folder)
    server_round = int(config.get(wire.SERVER_ROUND, 0))
    check_acknowledged(folder, config)
    count_request(policy, Ledger.contributions_in(folder), run=int(msg.metadata.run_id), server_round=server_round,
                  kind="evaluate", time=time.time())
    mode = policy.metrics_mode(wire.LOCAL_NOISE_MULTIPLIER in config)
    values: dict[str, float] = {wire.NUM_EXAMPLES: len(data.val)}
    if mode == NONE:
        ledger.entries()  # a tampered ledger stops the node here too
    else:
        values.update(_released_scores(msg, context, task, net, data, config, policy, ledger, mode, folder))
    records: dict[str, Any] = {wire.METRICS: MetricRecord(values)}
    info: dict[str, Any] = {}
    if wire.VALIDATE in config:  # fl validate: the site's pseudonymous identity, and its descriptors if asked
        info, described = _validation(folder, data_dir, data, task, policy, ledger, config, server_round)
        if described is not None:
            records[wire.DESCRIPTORS] = described
    info[wire.LEDGER_HEAD] = head(folder)  # after every charge of this request
    return Message(content=RecordDict({**records, wire.NODE_INFO: ConfigRecord(info)}), reply_to=msg)


def _validation(folder: Path, data_dir: Path, data: LocalData, task: Task, policy: Policy, ledger: Ledger,
                config: ConfigRecord, server_round: int) -> tuple[dict[str, Any], ConfigRecord | None]:
    """``fl validate`` (federated validation of a version) at this site: its pseudonymous identity and
    dataset fingerprint, and its descriptors when asked; (node info, the descriptors record or None).
    The site's interval and per-class scores travel with the released scores (:func:`_intervals`)."""
    from nodes.site_scores import site_id

    info = {wire.SITE_ID: site_id(folder), wire.DATASET_FINGERPRINT: keyed_fingerprint(folder, data.digest)}
    if not config.get(wire.DESCRIBE):
        return info, None
    return info, _descriptors(info, folder, data_dir, data, task, policy, ledger, config, server_round)


def _descriptors(info: dict[str, Any], folder: Path, data_dir: Path, data: LocalData, task: Task, policy: Policy,
                 ledger: Ledger, config: ConfigRecord, server_round: int) -> ConfigRecord | None:
    """The dataset descriptors this site releases under their own policy, whatever metrics release
    (charged to the ledger when noisy); None, with the reason in ``info``, when it declines."""
    from nodes.descriptors import release_for

    described, why = release_for(folder, data_dir, data, policy, ledger,
                                 dp_requested=wire.LOCAL_NOISE_MULTIPLIER in config,
                                 server_round=server_round, labels=lambda: task.record_labels(data))
    if described is None:
        info[wire.DESCRIPTORS_DECLINED] = str(why)
        return None
    return ConfigRecord({k: v for k, v in described.items() if v not in (None, [])})


def _released_scores(msg: Message, context: Context, task: Task, net: torch.nn.Module, data: LocalData,
                     config: ConfigRecord, policy: Policy, ledger: Ledger, mode: str, folder: Path) -> dict[str, float]:
    """The scores this node's policy releases (``exact``, or ``noisy``: charged to the ledger first),
    with the site's interval and per-class scores when ``fl validate`` asks."""
    entry = None
    # fl validate of a multi-class task also releases each class's score: under noisy, one more mechanism
    per_class = wire.VALIDATE in config and len(task.class_labels()) > 1
    if mode == NOISY:  # written ahead: charged before the records' scores are computed
        entry = _charge_metrics(msg, config, policy, ledger, data, per_class=per_class)
    result = _score(msg, context, task, net, data, config, folder)
    values = _release_metrics(result, task, policy, entry)
    if wire.VALIDATE in config:
        values.update(_intervals(result, values, task, data, config, policy, noisy=entry is not None,
                                 per_class=per_class))
    return values


def _charge_metrics(msg: Message, config: ConfigRecord, policy: Policy, ledger: Ledger, data: LocalData, *,
                    per_class: bool) -> dict[str, Any]:
    """The noisy release's charge, written to the ledger before any score is computed: one Gaussian
    mechanism on the metrics, one more on the per-class scores; the ledger entry."""
    event = GaussianEvent(policy.metrics_noise_multiplier, 1.0, 2 if per_class else 1)
    with ledger.locked():
        return charge(policy, ledger, event, num_records=len(data.train) + len(data.val),
                      release="metrics+classes" if per_class else "metrics",
                      server_round=int(config.get(wire.SERVER_ROUND, 0)), run=int(msg.metadata.run_id),
                      time=time.time())


def _score(msg: Message, context: Context, task: Task, net: torch.nn.Module, data: LocalData, config: ConfigRecord,
           folder: Path) -> Any:
    """The global model (with this node's own BatchNorm layers under FedBN) on the held-out cases."""
    device = node_device(config, context)
    _own_batchnorm(msg, config, folder, task, net)
    return task.evaluate(net, data.val, device=device, workers=node_workers(config, context, task),
                         amp=bool(config.get(wire.AMP, False)))


def _release_metrics(result: Any, task: Task, policy: Policy, entry: dict[str, Any] | None) -> dict[str, float]:
    """What leaves the node: the exact loss and score, or (``entry``: the charge made for it) the mean
    record score with DP noise, the record-level epsilon after it and the DP flag."""
    values: dict[str, float] = {}
    if entry is None:
        values.update({wire.VAL_LOSS: result.loss, task.metric: result.score})
    else:
        values[task.record_metric] = noisy_mean(result.record_scores, policy.metrics_noise_multiplier, SecureGaussian())
        values[wire.EPSILON_RECORD] = float(entry["epsilon_after"])
        values[wire.METRICS_DP] = 1.0
    return values


def _intervals(result: Any, values: dict[str, float], task: Task, data: LocalData, config: ConfigRecord,
               policy: Policy, *, noisy: bool, per_class: bool) -> dict[str, float]:
    """``fl validate``: the site's interval around its score and, for a multi-class task, each class's."""
    from nodes.site_scores import bootstrap_interval, noisy_interval

    confidence = float(config[wire.CONFIDENCE])
    if not noisy:
        low, high = bootstrap_interval(result.record_scores, resamples=int(config[wire.VALIDATE]),
                                       confidence=confidence, digest=data.digest)
    else:
        low, high = noisy_interval(values[task.record_metric], len(data.val), policy.metrics_noise_multiplier,
                                   confidence)
    out = {wire.SCORE_LOW: low, wire.SCORE_HIGH: high}
    classes = result.class_scores
    if per_class and classes is not None:  # multi-class: each class's own score
        from nodes.site_scores import class_intervals, noisy_class_scores

        released = class_intervals(classes, resamples=int(config[wire.VALIDATE]), confidence=confidence,
                                   digest=data.digest) if not noisy else noisy_class_scores(
            classes, policy.metrics_noise_multiplier, SecureGaussian(), confidence)
        for c, (score, c_low, c_high, cases) in enumerate(released):
            if noisy or cases:
                out.update({f"{wire.CLASS_PREFIX}{c}": score, f"{wire.CLASS_PREFIX}{c}-low": c_low,
                            f"{wire.CLASS_PREFIX}{c}-high": c_high, f"{wire.CLASS_PREFIX}{c}-cases": cases})
    return out
