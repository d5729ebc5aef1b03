"""The coordinator's side of OncoFed's malicious-secure aggregation (``secagg.protocol = "malicious"``).

The coordinator relays; it decides nothing a node's secrets rest on. Each stage is one exchange of
``train`` messages on Flower's message API (the nodes' side and the checks they make:
:mod:`nodes.secure_sum`):

1. ``advertise``: the round's counts go to the sampled nodes; each answers with fresh keys signed
   by its roster site. The counts are OncoFed's (:func:`strategies.secagg.min_contributors`, raised
   so that ``2t > s + colluders``); each node checks them against its own policy.
2. ``share-keys``: every advertisement goes to every advertiser; each answers one ciphertext per
   neighbour (neighbourhoods follow from the advertisements' hash).
3. ``collect``: each node receives the ciphertexts addressed to it with its training instruction,
   trains, and answers its update quantised and masked.
4. ``consistency``: the survivors (who sent a masked update) are named to each of them; each signs
   the set.
5. ``unmask``: the signatures go to every signer; each node that sees at least t identical signed
   sets reveals, per neighbour, one share: of the self-mask seed (survivor) or of the mask key (not).

The coordinator rebuilds the survivors' self masks and the dropped nodes' mask keys, removes the
masks and dequantises: it learns the sum of the survivors' clipped updates and nothing else.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fl import wire
from fl.packing import PackingGrid
from fl.privacy import secure_sum as crypto
from fl.privacy.distributed import clipping_range as clipping_range_for
from strategies.secagg import RecordingGrid, SecureRoundResult, share_count


def malicious_threshold(sampled: int, threshold: float, shares: float, colluders: int) -> int:
    """The threshold t of a round of ``sampled`` nodes: ``round(threshold * s)``, at least 3, and with
    ``2t > s + colluders`` (each node refuses less); ValueError when no t <= s satisfies that."""
    s = share_count(sampled, shares)
    t = max(wire.SECAGG_MIN_NODES, round(threshold * s), (s + colluders) // 2 + 1)
    if t > s:
        raise ValueError(f"{colluders} colluding site(s) leave no threshold for neighbourhoods of {s}: "
                         f"2t > s + colluders needs t = {t} > s")
    return t


def _halted(failures: dict[str, str], why: str) -> SecureRoundResult:
    return SecureRoundResult(None, 0, failures={**failures, "secagg": why}, outcome="halted")


def _exchange(grid: RecordingGrid, contents: dict[int, RecordDict], group: str,
              timeout: float) -> dict[int, Message]:
    messages = [grid.create_message(content, "train", node, group) for node, content in contents.items()]
    replies = grid.send_and_receive(messages, timeout=timeout)
    return {int(r.metadata.src_node_id): r for r in replies if not r.has_error()}


def _stage(name: str, **fields: Any) -> RecordDict:
    return RecordDict({wire.SECURE_SUM: ConfigRecord({"stage": name, **fields})})


def malicious_round(grid: Grid, strategy: Strategy, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                    *, shares: float, threshold: float, colluders: int, clipping_range: float, timeout: float,
                    distributed_noise: float | None = None, acks: Callable[[int], str] | None = None,
                    ) -> SecureRoundResult:
    """Sample and instruct through ``strategy``, then train and sum the updates with the five stages."""
    messages = list(strategy.configure_train(server_round, arrays, config, grid))
    keys = list(arrays.keys())
    n = len(messages)
    if n < wire.SECAGG_MIN_NODES:
        return SecureRoundResult(None, 0, skipped=f"{n} node(s) sampled, fewer than the {wire.SECAGG_MIN_NODES} "
                                                  "secure aggregation needs; nothing aggregated", outcome="skipped")
    s = share_count(n, shares)
    try:
        t = malicious_threshold(n, threshold, shares, colluders)
    except ValueError as exc:
        return SecureRoundResult(None, 0, skipped=f"{exc}; nothing aggregated", outcome="skipped")
    if distributed_noise is not None:
        clip = float(messages[0].content[wire.CONFIG][wire.CLIENT_CLIP_NORM])
        clipping_range = clipping_range_for(clip, distributed_noise, t)
    rec = RecordingGrid(grid.inner if isinstance(grid, PackingGrid) else grid)
    run, group = int(rec.run.run_id), str(server_round)
    instructions = {int(m.metadata.dst_node_id): m for m in messages}

    # 1. advertise
    counts = {"sample": n, "shares": s, "threshold": t, "colluders": colluders, "clipping-range": float(clipping_range),
              "target-range": wire.SECAGG_TARGET_RANGE, "mod-range": wire.SECAGG_MOD_RANGE}
    replies = _exchange(rec, {node: _stage("advertise", **counts) for node in instructions}, group, timeout)
    adverts = {node: r.content.config_records[wire.SECURE_SUM] for node, r in replies.items()}
    if len(adverts) < t:
        return _halted(rec.errors, f"{len(adverts)} node(s) advertised keys, fewer than the threshold {t}")
    order = sorted(adverts)
    table = {"nodes": order, "sites": [str(adverts[u]["site"]) for u in order],
             "pk-enc": [adverts[u]["pk-enc"] for u in order], "pk-mask": [adverts[u]["pk-mask"] for u in order],
             "signatures": [adverts[u]["signature"] for u in order]}
    seed = crypto.graph_seed(run, server_round, {u: {"signature": adverts[u]["signature"]} for u in order})
    graph = crypto.neighbourhoods(seed, order, s)

    # 2. share keys
    replies = _exchange(rec, {node: _stage("share-keys", **table) for node in order}, group, timeout)
    inbox: dict[int, dict[int, bytes]] = {u: {} for u in replies}
    for src, reply in replies.items():
        record = reply.content.config_records[wire.SECURE_SUM]
        for dst, ciphertext in zip(record["dsts"], record["ctxts"], strict=True):
            if dst in inbox and dst in graph[src]:
                inbox[dst][src] = ciphertext
    if len(inbox) < t:
        return _halted(rec.errors, f"{len(inbox)} node(s) shared keys, fewer than the threshold {t}")

    # 3. collect: train, quantise, mask
    contents = {}
    for node, sources in inbox.items():
        content = instructions[node].content
        node_config = dict(content[wire.CONFIG])
        node_config[wire.SECAGG_ARRAY_KEYS] = json.dumps(keys)
        if distributed_noise is not None:
            node_config[wire.DDP_NOISE_MULTIPLIER] = distributed_noise
            node_config[wire.DDP_MIN_CONTRIBUTORS] = t
        if acks is not None:
            node_config[wire.LEDGER_ACKS] = acks(node)
        srcs = sorted(sources)
        contents[node] = RecordDict({wire.ARRAYS: content[wire.ARRAYS], wire.CONFIG: ConfigRecord(node_config),
                                     wire.SECURE_SUM: ConfigRecord({"stage": "collect", "srcs": srcs,
                                                                    "ctxts": [sources[v] for v in srcs]})})
    replies = _exchange(rec, contents, group, timeout)
    survivors = sorted(replies)
    if len(survivors) < t:
        return _halted(rec.errors, f"{len(survivors)} node(s) sent a masked update, fewer than the threshold {t}")
    masked = {u: replies[u].content.array_records[wire.SECURE_SUM_MASKED]["vector"].numpy() for u in survivors}
    metrics = {u: dict(replies[u].content[wire.METRICS]) for u in survivors}
    info = {u: dict(replies[u].content.config_records.get(wire.NODE_INFO, ConfigRecord())) for u in survivors}

    # 4. consistency
    replies = _exchange(rec, {u: _stage("consistency", survivors=survivors) for u in survivors}, group, timeout)
    signers = sorted(replies)
    signatures = [replies[u].content.config_records[wire.SECURE_SUM]["signature"] for u in signers]

    # 5. unmask
    replies = _exchange(rec, {u: _stage("unmask", survivors=survivors, signers=signers, signatures=signatures)
                              for u in signers}, group, timeout)
    seed_shares: dict[int, dict[int, bytes]] = {}
    key_shares: dict[int, dict[int, bytes]] = {}
    for holder, reply in replies.items():
        record = reply.content.config_records[wire.SECURE_SUM]
        for kind, store in (("self-mask", seed_shares), ("mask-key", key_shares)):
            for node, share in zip(record[f"{kind}-of"], record[f"{kind}-shares"], strict=True):
                if node in graph and holder in graph[node]:
                    store.setdefault(node, {})[crypto.holder_index(graph[node], holder)] = share
    dropped = sorted(set(inbox) - set(survivors))
    try:
        seeds = {u: crypto.combine(seed_shares.get(u, {}), t) for u in survivors}
        mask_keys = {v: crypto.combine(key_shares.get(v, {}), t) for v in dropped}
    except crypto.ProtocolError as exc:
        return _halted(rec.errors, f"unmasking failed: {exc} ({len(replies)} node(s) revealed shares)")
    size = int(next(iter(masked.values())).size)
    total = np.zeros(size, dtype=np.uint32)
    for u in survivors:
        total += masked[u]
        total -= crypto.self_mask(seeds[u], run, server_round, size)
        for v in dropped:  # u masked with v when v's shares reached it; v's own vector never came
            if v in inbox[u]:
                total -= crypto.pair_mask(mask_keys[v], adverts[u]["pk-mask"], run, server_round, u, v, size)
    flat = crypto.dequantise_sum(total, len(survivors), clipping_range, wire.SECAGG_TARGET_RANGE)
    update_sum, start = {}, 0
    for k in keys:
        shape = arrays[k].numpy().shape
        count = int(np.prod(shape))
        update_sum[k] = flat[start:start + count].reshape(shape)
        start += count
    node_metrics = [{**metrics[u], **info[u]} for u in survivors]
    return SecureRoundResult(update_sum, len(survivors), node_metrics, survivors, dict(rec.errors))
