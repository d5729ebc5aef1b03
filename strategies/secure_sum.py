"""The coordinator's side of OncoFed's malicious-secure aggregation (``secagg.protocol = "malicious"``).

The coordinator relays; it decides nothing a node's secrets rest on. Each stage is one exchange of
``train`` messages on Flower's message API (the nodes' side and the checks they make:
:mod:`nodes.secure_sum`):

1. ``advertise``: the round's counts go to the sampled nodes; each answers with fresh keys signed
   by its roster site. The counts are OncoFed's (:func:`strategies.secure_round.min_contributors`, raised
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
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fl import wire
from fl.packing import PackingGrid
from fl.privacy import secure_sum as crypto
from fl.privacy.distributed import clipping_range as clipping_range_for
from strategies.secure_round import RecordingGrid, SecureRoundResult, share_count


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


class _Halt(Exception):
    """A stage the round cannot get past: the round halts, with this reason."""


@dataclass(frozen=True)
class _Round:
    """What every stage of one round shares: the recording grid, the round's ids and its threshold t."""

    grid: RecordingGrid
    run: int
    server_round: int
    timeout: float
    t: int

    def exchange(self, contents: dict[int, RecordDict]) -> dict[int, Message]:
        return _exchange(self.grid, contents, str(self.server_round), self.timeout)

    def need_threshold(self, count: int, what: str) -> None:
        if count < self.t:
            raise _Halt(f"{count} node(s) {what}, fewer than the threshold {self.t}")


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
    r = _Round(rec, int(rec.run.run_id), server_round, timeout, t)
    instructions = {int(m.metadata.dst_node_id): m for m in messages}
    counts = {"sample": n, "shares": s, "threshold": t, "colluders": colluders, "clipping-range": float(clipping_range),
              "target-range": wire.SECAGG_TARGET_RANGE, "mod-range": wire.SECAGG_MOD_RANGE}
    try:
        adverts, graph = _advertise(r, instructions, counts, s)
        inbox = _share_keys(r, adverts, graph)
        node_configs = _collect_configs(instructions, inbox, keys, t, distributed_noise, acks)
        survivors, masked, node_metrics = _collect(r, instructions, inbox, node_configs)
        seeds, mask_keys = _unmask(r, survivors, graph, dropped=sorted(set(inbox) - set(survivors)))
    except _Halt as halt:
        return _halted(rec.errors, str(halt))
    total = _unmasked_total(r, masked, seeds, mask_keys, adverts, inbox)
    flat = crypto.dequantise_sum(total, len(survivors), clipping_range, wire.SECAGG_TARGET_RANGE)
    update_sum, start = {}, 0
    for k in keys:
        shape = arrays[k].numpy().shape
        count = int(np.prod(shape))
        update_sum[k] = flat[start:start + count].reshape(shape)
        start += count
    return SecureRoundResult(update_sum, len(survivors), node_metrics, survivors, dict(rec.errors))


def _advertise(r: _Round, instructions: dict[int, Message], counts: dict[str, Any],
               s: int) -> tuple[dict[int, ConfigRecord], dict[int, list[int]]]:
    """Stage 1: the round's counts to the sampled nodes; (their signed advertisements, the neighbourhoods)."""
    replies = r.exchange({node: _stage("advertise", **counts) for node in instructions})
    adverts = {node: reply.content.config_records[wire.SECURE_SUM] for node, reply in replies.items()}
    r.need_threshold(len(adverts), "advertised keys")
    order = sorted(adverts)
    seed = crypto.graph_seed(r.run, r.server_round, {u: {"signature": adverts[u]["signature"]} for u in order})
    return adverts, crypto.neighbourhoods(seed, order, s)


def _share_keys(r: _Round, adverts: dict[int, ConfigRecord],
                graph: dict[int, list[int]]) -> dict[int, dict[int, bytes]]:
    """Stage 2: every advertisement to every advertiser; each node's inbox of its neighbours' ciphertexts."""
    order = sorted(adverts)
    table = {"nodes": order, "sites": [str(adverts[u]["site"]) for u in order],
             "pk-enc": [adverts[u]["pk-enc"] for u in order], "pk-mask": [adverts[u]["pk-mask"] for u in order],
             "signatures": [adverts[u]["signature"] for u in order]}
    replies = r.exchange({node: _stage("share-keys", **table) for node in order})
    inbox: dict[int, dict[int, bytes]] = {u: {} for u in replies}
    for src, reply in replies.items():
        record = reply.content.config_records[wire.SECURE_SUM]
        for dst, ciphertext in zip(record["dsts"], record["ctxts"], strict=True):
            if dst in inbox and dst in graph[src]:
                inbox[dst][src] = ciphertext
    r.need_threshold(len(inbox), "shared keys")
    return inbox


def _collect_configs(instructions: dict[int, Message], inbox: dict[int, dict[int, bytes]], keys: list[str], t: int,
                     distributed_noise: float | None, acks: Callable[[int], str] | None) -> dict[int, ConfigRecord]:
    """Each node's training instruction for the collect stage: the arrays it masks, the distributed
    noise asked and its acknowledged ledger head."""
    configs = {}
    for node in inbox:
        node_config = dict(instructions[node].content[wire.CONFIG])
        node_config[wire.SECAGG_ARRAY_KEYS] = json.dumps(keys)
        if distributed_noise is not None:
            node_config[wire.DDP_NOISE_MULTIPLIER] = distributed_noise
            node_config[wire.DDP_MIN_CONTRIBUTORS] = t
        if acks is not None:
            node_config[wire.LEDGER_ACKS] = acks(node)
        configs[node] = ConfigRecord(node_config)
    return configs


def _collect(r: _Round, instructions: dict[int, Message], inbox: dict[int, dict[int, bytes]],
             configs: dict[int, ConfigRecord]) -> tuple[list[int], dict[int, np.ndarray], list[dict[str, Any]]]:
    """Stage 3: train, quantise, mask; (the survivors, their masked vectors, their metrics and node info)."""
    contents = {}
    for node, sources in inbox.items():
        srcs = sorted(sources)
        contents[node] = RecordDict({wire.ARRAYS: instructions[node].content[wire.ARRAYS], wire.CONFIG: configs[node],
                                     wire.SECURE_SUM: ConfigRecord({"stage": "collect", "srcs": srcs,
                                                                    "ctxts": [sources[v] for v in srcs]})})
    replies = r.exchange(contents)
    survivors = sorted(replies)
    r.need_threshold(len(survivors), "sent a masked update")
    masked = {u: replies[u].content.array_records[wire.SECURE_SUM_MASKED]["vector"].numpy() for u in survivors}
    metrics = {u: dict(replies[u].content[wire.METRICS]) for u in survivors}
    info = {u: dict(replies[u].content.config_records.get(wire.NODE_INFO, ConfigRecord())) for u in survivors}
    return survivors, masked, [{**metrics[u], **info[u]} for u in survivors]


def _unmask(r: _Round, survivors: list[int], graph: dict[int, list[int]],
            dropped: list[int]) -> tuple[dict[int, bytes], dict[int, bytes]]:
    """Stages 4 and 5: the survivors sign the set, the signers reveal shares; (the survivors' self-mask
    seeds, the dropped nodes' mask keys)."""
    replies = r.exchange({u: _stage("consistency", survivors=survivors) for u in survivors})
    signers = sorted(replies)
    signatures = [replies[u].content.config_records[wire.SECURE_SUM]["signature"] for u in signers]
    replies = r.exchange({u: _stage("unmask", survivors=survivors, signers=signers, signatures=signatures)
                          for u in signers})
    seed_shares: dict[int, dict[int, bytes]] = {}
    key_shares: dict[int, dict[int, bytes]] = {}
    for holder, reply in replies.items():
        record = reply.content.config_records[wire.SECURE_SUM]
        for kind, store in (("self-mask", seed_shares), ("mask-key", key_shares)):
            for node, share in zip(record[f"{kind}-of"], record[f"{kind}-shares"], strict=True):
                if node in graph and holder in graph[node]:
                    store.setdefault(node, {})[crypto.holder_index(graph[node], holder)] = share
    try:
        seeds = {u: crypto.combine(seed_shares.get(u, {}), r.t) for u in survivors}
        mask_keys = {v: crypto.combine(key_shares.get(v, {}), r.t) for v in dropped}
    except crypto.ProtocolError as exc:
        raise _Halt(f"unmasking failed: {exc} ({len(replies)} node(s) revealed shares)") from None
    return seeds, mask_keys


def _unmasked_total(r: _Round, masked: dict[int, np.ndarray], seeds: dict[int, bytes], mask_keys: dict[int, bytes],
                    adverts: dict[int, ConfigRecord], inbox: dict[int, dict[int, bytes]]) -> np.ndarray:
    """The survivors' masked vectors summed, their self masks and the dropped nodes' pair masks removed."""
    size = int(next(iter(masked.values())).size)
    total = np.zeros(size, dtype=np.uint32)
    for u in masked:
        total += masked[u]
        total -= crypto.self_mask(seeds[u], r.run, r.server_round, size)
        for v in mask_keys:  # u masked with v when v's shares reached it; v's own vector never came
            if v in inbox[u]:
                total -= crypto.pair_mask(mask_keys[v], adverts[u]["pk-mask"], r.run, r.server_round, u, v, size)
    return total
