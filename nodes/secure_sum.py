"""The node's side of OncoFed's malicious-secure aggregation (``secagg.protocol = "malicious"``).

Five stages, each a ``train`` message carrying the ConfigRecord ``wire.SECURE_SUM``; the node keeps
its secrets and its memory of the round in its own context (never sent) and checks everything a
guarantee rests on against its policy, its pinned roster (:mod:`nodes.roster`) and that memory:

1. ``advertise``: the round's counts (sample n, neighbourhood size s, threshold t, colluding sites c)
   and the pinned quantisation are checked as the SecAgg+ guard checks them, plus ``2t > s + c``
   against this node's own ``colluding_sites``; the node draws fresh X25519 keys and a self-mask
   seed and signs them, with the counts, the run, the round and the roster's digest, with its
   site key.
2. ``share-keys``: every advertisement must come from a distinct roster site, verify under that
   site's key and carry exactly the fields this node signed; its own must be there unchanged, and
   there must be n of them. The neighbourhoods follow from their hash (the coordinator does not
   choose them). The node Shamir-shares its seed and its mask key among its neighbours (t of s)
   and encrypts each pair of shares to its holder (AES-GCM under an X25519 agreement).
3. ``collect``: each ciphertext must come from a neighbour and authenticate; at least t - 1 of
   them. The node trains and sends its update quantised and masked (ChaCha20 masks under 256-bit
   keys: its self mask, and one per neighbour that sent it shares).
4. ``consistency``: the survivors the coordinator names must include this node and at least t of
   its neighbours, and every surviving neighbour must be one it masked with (it sent this node
   shares); the node signs that set with the round's seed, once per round. Every stage after
   advertise must be addressed to the node id it advertised under.
5. ``unmask``: at least t distinct roster sites, all survivors, and more than half of the round's
   sites plus the c colluding ones, must have signed the very set this node signed: two different
   sets can then not both be signed, since an honest node signs once. Only then does it reveal,
   for each neighbour that shared with it, the share of its self-mask seed if it survived, or of
   its mask key if it did not: never both, once per round.

A refusal is an error reply naming what was wrong; a refused stage reveals nothing.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict

from fl import wire
from fl.errors import ConfigError
from fl.privacy import secure_sum as crypto
from nodes.policy import Policy, Refusal, check_threshold
from nodes.roster import load_roster, own_site

STATE = "oncofed_secure_sum"  # the node's memory of the round, in its own context
log = logging.getLogger("flwr.oncofed.node")
Train = Callable[[Message], Message]  # the node's train handler: a legacy (FitRes-shaped) reply


def handle(msg: Message, context: Context, policy: Policy, folder: Path, train: Train) -> Message:
    """This node's answer to a stage message: the stage's reply, or an error naming the refusal."""
    try:
        return _stage(msg, context, policy, folder, train)
    except Refusal as refusal:
        reason = refusal.reason
    except crypto.ProtocolError as exc:
        reason = f"secure aggregation: {exc}"
    except ConfigError as exc:  # no roster or site key: the operator's set-up, named in the node's log
        log.error("node %s: %s", msg.metadata.dst_node_id, exc)
        reason = "secure aggregation: this node has no pinned roster or site key; details are in the node's log"
    except (KeyError, TypeError, ValueError) as exc:
        reason = f"secure aggregation: malformed stage message ({exc!r})"
    log.warning("node %s refused a secure-aggregation stage: %s", msg.metadata.dst_node_id, reason)
    return Message(Error(code=wire.ERROR_POLICY, reason=reason), reply_to=msg)


def threshold_and_range(context: Context) -> tuple[int, float, int]:
    """This round's verified threshold t, clipping range and quantisation range (for the node's
    distributed-noise share): what every roster site signed, not the coordinator's word."""
    memory = _memory(context)
    return int(memory["t"]), float(memory["clip"]), int(memory["target"])


def _refuse(why: str) -> Refusal:
    return Refusal(wire.ERROR_POLICY, f"secure aggregation: {why}")


def _memory(context: Context) -> dict[str, Any]:
    record = context.state.config_records.get(STATE)
    return json.loads(str(record["memory"])) if record is not None else {}


def _remember(context: Context, memory: dict[str, Any]) -> None:
    context.state.config_records[STATE] = ConfigRecord({"memory": json.dumps(memory)})


def _ints(record: ConfigRecord, key: str) -> list[int]:
    values = record[key]
    if not isinstance(values, list) or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**64
                                               for v in values):
        raise _refuse(f"'{key}' is not a list of node ids (unsigned 64-bit integers)")
    if len(set(values)) != len(values):
        raise _refuse(f"'{key}' repeats a node id")
    return list(values)


def _bytes_list(record: ConfigRecord, key: str, count: int) -> list[bytes]:
    values = record[key]
    if not isinstance(values, list) or len(values) != count or not all(isinstance(v, bytes) for v in values):
        raise _refuse(f"'{key}' is not {count} byte strings")
    return list(values)


def _stage(msg: Message, context: Context, policy: Policy, folder: Path, train: Train) -> Message:
    record = msg.content.config_records[wire.SECURE_SUM]
    stage = record["stage"]
    run, group, me = int(msg.metadata.run_id), str(msg.metadata.group_id), int(msg.metadata.dst_node_id)
    memory = _memory(context)
    if stage == "advertise":
        if memory.get("run") == run and memory.get("group") == group:
            raise _refuse(f"a second advertisement for round {group}; one per round")
        if memory.get("run") == run and memory.get("round", -1) >= int(group):
            raise _refuse(f"round {group} of this run after round {memory['round']}: rounds only move forward")
        memory, reply = _advertise(record, policy, folder, run, int(group), me)
    elif memory.get("run") != run or memory.get("group") != group:
        raise _refuse(f"stage {stage!r} for round {group} without this round's advertisement")
    elif memory["me"] != me:
        raise _refuse(f"stage {stage!r} addressed to node {me}; this node advertised as node {memory['me']}")
    elif stage in memory["done"]:
        raise _refuse(f"a second {stage!r} in round {group}")
    elif len(memory["done"]) >= 4 or stage != wire.SECURE_SUM_STAGES[len(memory["done"]) + 1]:
        raise _refuse(f"stage {stage!r} out of order after {memory['done'][-1] if memory['done'] else 'advertise'}")
    elif stage == "share-keys":
        reply = _share_keys(record, memory, folder, me)
    elif stage == "collect":
        reply, answer = _collect(msg, record, memory, context, train, me)
        if answer is not None:
            return answer
    elif stage == "consistency":
        reply = _consistency(record, memory, folder, me)
    else:
        reply = _unmask(record, memory, me)
    if stage != "advertise":
        memory["done"].append(stage)
    _remember(context, memory)
    return Message(reply, reply_to=msg)


# ----- 1. advertise -------------------------------------------------------------------------------

def _advertise(record: ConfigRecord, policy: Policy, folder: Path, run: int, server_round: int,
               me: int) -> tuple[dict[str, Any], RecordDict]:
    n, s, t, c = (record[k] for k in ("sample", "shares", "threshold", "colluders"))
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (n, s, t, c)):
        raise _refuse("advertise without integer sample, share, threshold and colluder counts")
    pinned = {"target-range": wire.SECAGG_TARGET_RANGE, "mod-range": wire.SECAGG_MOD_RANGE}
    for key, value in pinned.items():
        if type(record[key]) is not int or record[key] != value:
            raise _refuse(f"{key} {record[key]!r}, OncoFed pins {value!r}")
    clip = record["clipping-range"]
    if not (isinstance(clip, float) and 0 < clip < float("inf")):
        raise _refuse(f"clipping range {clip!r} is not a positive number")
    if n * wire.SECAGG_TARGET_RANGE >= wire.SECAGG_MOD_RANGE:
        raise _refuse(f"{n} contributions of range 2^22 overflow the 2^32 field")
    check_threshold(policy, t)
    if not t <= s <= n:
        raise _refuse(f"threshold {t}, neighbourhood {s} and sample {n} must satisfy t <= s <= n")
    if s < n and (s % 2 == 0 or s < 3):
        raise _refuse(f"a neighbourhood of {s} below the sample {n} must be odd and at least 3")
    if c < policy.colluding_sites:
        raise _refuse(f"the round assumes {c} colluding site(s); this node's policy assumes {policy.colluding_sites}")
    if 2 * t <= s + c:
        raise _refuse(f"threshold {t} with {s} neighbours and {c} colluding site(s): 2t must exceed s + c, or one "
                      "node's self mask and mask key could both be rebuilt")
    roster = load_roster(folder)
    site, key = own_site(folder, roster)
    sk_enc, pk_enc = crypto.new_x25519()
    sk_mask, pk_mask = crypto.new_x25519()
    fields = _advert_fields(run, server_round, me, site, roster.digest, n, s, t, c, clip, pk_enc, pk_mask)
    signature = crypto.sign(key, "advertise", fields)
    memory = {"run": run, "group": str(server_round), "round": server_round, "me": me, "n": n, "s": s, "t": t, "c": c,
              "clip": clip, "target": wire.SECAGG_TARGET_RANGE, "site": site, "roster": roster.digest,
              "sk_enc": sk_enc.hex(), "sk_mask": sk_mask.hex(), "seed": crypto.new_x25519()[0].hex(),
              "pk_enc": pk_enc.hex(), "pk_mask": pk_mask.hex(), "done": []}
    reply = ConfigRecord({"site": site, "pk-enc": pk_enc, "pk-mask": pk_mask, "signature": signature})
    return memory, RecordDict({wire.SECURE_SUM: reply})


def _advert_fields(run: int, server_round: int, node: int, site: str, roster: str, n: int, s: int, t: int, c: int,
                   clip: float, pk_enc: bytes, pk_mask: bytes) -> dict[str, Any]:
    return {"run": run, "round": server_round, "node": node, "site": site, "roster": roster, "sample": n,
            "shares": s, "threshold": t, "colluders": c, "clipping-range": clip,
            "target-range": wire.SECAGG_TARGET_RANGE, "mod-range": wire.SECAGG_MOD_RANGE, "pk-enc": pk_enc,
            "pk-mask": pk_mask}


# ----- 2. share keys ------------------------------------------------------------------------------

def _share_keys(record: ConfigRecord, memory: dict[str, Any], folder: Path, me: int) -> RecordDict:
    nodes = _ints(record, "nodes")
    count = len(nodes)
    sites = record["sites"]
    if not isinstance(sites, list) or len(sites) != count or not all(isinstance(v, str) for v in sites):
        raise _refuse(f"'sites' is not {count} site names")
    pk_enc, pk_mask = _bytes_list(record, "pk-enc", count), _bytes_list(record, "pk-mask", count)
    signatures = _bytes_list(record, "signatures", count)
    if not memory["t"] <= count <= memory["n"]:
        raise _refuse(f"{count} advertisements for a round of {memory['n']} nodes with threshold {memory['t']}")
    if len(set(sites)) != count:
        raise _refuse("one site advertised twice in the round")
    roster = load_roster(folder)
    if roster.digest != memory["roster"]:
        raise _refuse("this node's pinned roster changed during the round")
    adverts: dict[int, dict[str, Any]] = {}
    for node, site, enc, msk, signature in zip(nodes, sites, pk_enc, pk_mask, signatures, strict=True):
        public = roster.sites.get(site)
        if public is None:
            raise _refuse(f"node {node} advertises site {site!r}, which is not on this node's roster "
                          f"({roster.consortium})")
        fields = _advert_fields(memory["run"], memory["round"], node, site, memory["roster"], memory["n"],
                                memory["s"], memory["t"], memory["c"], memory["clip"], enc, msk)
        if not crypto.verifies(public, signature, "advertise", fields):
            raise _refuse(f"the advertisement of node {node} (site {site!r}) does not verify under that site's "
                          "roster key: keys substituted, or counts different from those this node signed")
        adverts[node] = {"site": site, "pk_enc": enc.hex(), "pk_mask": msk.hex(), "signature": signature.hex()}
    mine = adverts.get(me)
    if mine is None or (mine["site"], mine["pk_enc"], mine["pk_mask"]) != (memory["site"], memory["pk_enc"],
                                                                           memory["pk_mask"]):
        raise _refuse("this node's own advertisement is missing or altered")
    seed = crypto.graph_seed(memory["run"], memory["round"],
                             {n: {"signature": bytes.fromhex(a["signature"])} for n, a in adverts.items()})
    neighbours = crypto.neighbourhoods(seed, sorted(adverts), memory["s"])[me]
    for v in neighbours:  # a peer's unusable mask key fails here, not after training (and a charge)
        if v != me:
            try:
                crypto.agree(bytes.fromhex(memory["sk_mask"]), bytes.fromhex(adverts[v]["pk_mask"]), b"check")
            except crypto.ProtocolError:
                raise _refuse(f"node {v} (site {adverts[v]['site']!r}) advertised an unusable mask key") from None
    memory["graph"] = seed.hex()
    seed_shares = crypto.split(bytes.fromhex(memory["seed"]), memory["t"], len(neighbours))
    key_shares = crypto.split(bytes.fromhex(memory["sk_mask"]), memory["t"], len(neighbours))
    dsts, ctxts = [], []
    for x, holder in enumerate(neighbours):
        if holder == me:
            memory["own"] = [seed_shares[x].hex(), key_shares[x].hex()]
            continue
        key = _share_key(memory, me, holder, adverts[holder]["pk_enc"])
        dsts.append(holder)
        ctxts.append(crypto.seal(key, seed_shares[x] + key_shares[x], _shares_aad(memory, me, holder)))
    memory["adverts"] = {str(n): a for n, a in adverts.items()}
    memory["roster_keys"] = {a["site"]: roster.sites[a["site"]].hex() for a in adverts.values()}
    memory["neighbours"] = neighbours
    return RecordDict({wire.SECURE_SUM: ConfigRecord({"dsts": dsts, "ctxts": ctxts})})


def _share_key(memory: dict[str, Any], me: int, peer: int, peer_pk_enc: str) -> bytes:
    """The AES-GCM key this node and ``peer`` share for the round's share ciphertexts (either direction)."""
    return crypto.agree(bytes.fromhex(memory["sk_enc"]), bytes.fromhex(peer_pk_enc),
                        crypto.context(memory["run"], memory["round"], "share-key", min(me, peer), max(me, peer)))


def _shares_aad(memory: dict[str, Any], src: int, dst: int) -> bytes:
    """What a share ciphertext from ``src`` to ``dst`` is bound to: run, round, the round's seed, the pair."""
    return crypto.context(memory["run"], memory["round"], "shares", memory["graph"], src, dst)


# ----- 3. collect: train, quantise, mask ---------------------------------------------------------

def _collect(msg: Message, record: ConfigRecord, memory: dict[str, Any], context: Context, train: Train,
             me: int) -> tuple[RecordDict, Message | None]:
    sources = _ints(record, "srcs")
    ctxts = _bytes_list(record, "ctxts", len(sources))
    if not set(sources) <= set(memory["neighbours"]) - {me}:
        raise _refuse("shares from nodes that are not this round's neighbours")
    if len(sources) + 1 < memory["t"]:
        raise _refuse(f"{len(sources) + 1} contributors with this node, fewer than the threshold {memory['t']}")
    held = {}
    for src, ciphertext in zip(sources, ctxts, strict=True):
        key = _share_key(memory, me, src, memory["adverts"][str(src)]["pk_enc"])
        plain = crypto.open_sealed(key, ciphertext, _shares_aad(memory, src, me))
        if len(plain) != 2 * crypto.SHARE_BYTES:
            raise _refuse(f"the shares from node {src} have the wrong length")
        held[str(src)] = [plain[:crypto.SHARE_BYTES].hex(), plain[crypto.SHARE_BYTES:].hex()]
    memory["held"], memory["srcs"] = held, sources
    _remember(context, memory)  # the noise plan reads the verified threshold while the node trains
    staged = msg.content
    msg.content = RecordDict({k: v for k, v in staged.items() if k != wire.SECURE_SUM})  # the bare instruction
    try:
        reply = train(msg)
    finally:
        msg.content = staged
    if reply.has_error():  # refused by the policy or the ledger: that reason goes back as it is
        return RecordDict(), Message(Error(code=reply.error.code, reason=reply.error.reason), reply_to=msg)
    update, scalars = wire.legacy_reply_parts(reply.content)
    flat = np.concatenate([np.asarray(u, dtype=np.float64).ravel() for u in update])
    masked = crypto.quantise(flat, memory["clip"], memory["target"])
    run, server_round = memory["run"], memory["round"]
    masked += crypto.self_mask(bytes.fromhex(memory["seed"]), run, server_round, flat.size)
    for src in sources:
        masked += crypto.pair_mask(bytes.fromhex(memory["sk_mask"]), bytes.fromhex(memory["adverts"][str(src)]["pk_mask"]),
                                   run, server_round, me, src, flat.size)
    info = {k: v for k, v in scalars.items() if isinstance(v, str)}
    metrics = {k: v for k, v in scalars.items() if not isinstance(v, str)}
    content = RecordDict({wire.SECURE_SUM_MASKED: ArrayRecord({"vector": Array(masked)}),
                          wire.METRICS: MetricRecord(metrics), wire.NODE_INFO: ConfigRecord(info)})
    return content, None


# ----- 4. consistency -----------------------------------------------------------------------------

def _survivor_fields(memory: dict[str, Any], survivors: list[int]) -> dict[str, Any]:
    return {"run": memory["run"], "round": memory["round"], "roster": memory["roster"], "graph": memory["graph"],
            "survivors": sorted(survivors)}


def _consistency(record: ConfigRecord, memory: dict[str, Any], folder: Path, me: int) -> RecordDict:
    survivors = _ints(record, "survivors")
    if me not in survivors:
        raise _refuse("this node is not named a survivor (it sent its masked update)")
    if not set(survivors) <= {int(n) for n in memory["adverts"]}:
        raise _refuse("survivors that did not advertise in this round")
    if len(survivors) < memory["t"]:
        raise _refuse(f"{len(survivors)} survivors, fewer than the threshold {memory['t']}")
    near = set(survivors) & set(memory["neighbours"])
    unmasked = sorted(near - set(memory["srcs"]) - {me})
    if unmasked:  # Bonawitz's U3 within U2: else a peer's key could be revealed while its mask hides nothing
        raise _refuse(f"survivor(s) {unmasked} are neighbours that sent this node no shares, so its update carries "
                      "no mask shared with them")
    if len(near) < memory["t"]:
        raise _refuse(f"{len(near)} of this node's neighbours survive, fewer than the threshold {memory['t']}")
    _, key = own_site(folder, load_roster(folder))
    memory["survivors"] = sorted(survivors)
    return RecordDict({wire.SECURE_SUM: ConfigRecord(
        {"signature": crypto.sign(key, "survivors", _survivor_fields(memory, survivors))})})


# ----- 5. unmask ----------------------------------------------------------------------------------

def _unmask(record: ConfigRecord, memory: dict[str, Any], me: int) -> RecordDict:
    survivors = _ints(record, "survivors")
    if sorted(survivors) != memory["survivors"]:
        raise _refuse("the survivors named for unmasking differ from the set this node signed")
    signers = _ints(record, "signers")
    signatures = _bytes_list(record, "signatures", len(signers))
    fields = _survivor_fields(memory, survivors)
    valid = set()
    for node, signature in zip(signers, signatures, strict=True):
        advert = memory["adverts"].get(str(node))
        if node not in survivors or advert is None:
            continue
        public = bytes.fromhex(memory["roster_keys"][advert["site"]])
        if crypto.verifies(public, signature, "survivors", fields):
            valid.add(advert["site"])
    if len(valid) < memory["t"]:
        raise _refuse(f"{len(valid)} roster site(s) signed this set of {len(survivors)} survivors, fewer than the "
                      f"threshold {memory['t']}: the coordinator may be telling nodes different survivor sets")
    if 2 * len(valid) <= len(memory["adverts"]) + memory["c"]:  # two sets so signed share an honest signer
        raise _refuse(f"{len(valid)} roster site(s) signed this set, not more than half of the round's "
                      f"{len(memory['adverts'])} plus {memory['c']} colluding: another set could be signed as well")
    self_mask_of, self_mask_shares, key_of, key_shares = [], [], [], []
    for node in sorted({me, *memory["srcs"]}):
        seed_share, key_share = memory["own"] if node == me else memory["held"][str(node)]
        if node in survivors:
            self_mask_of.append(node)
            self_mask_shares.append(bytes.fromhex(seed_share))
        else:
            key_of.append(node)
            key_shares.append(bytes.fromhex(key_share))
    return RecordDict({wire.SECURE_SUM: ConfigRecord({"self-mask-of": self_mask_of, "self-mask-shares": self_mask_shares,
                                                      "mask-key-of": key_of, "mask-key-shares": key_shares})})

