"""The node's guard in front of Flower's ``secaggplus_mod``: every SecAgg+ stage message is checked
against this node's policy and its own memory of the round before the mod acts on it.

Flower 1.41's mod checks types and stage order only. A coordinator that sends a threshold of 1,
lists this node as both active and dead, or asks for shares of nodes it never shared keys with,
gets this node's own secrets back from it (read in Flower's source and shown against the real mod).
The guard refuses, with a named reason and before the mod runs:

- ``setup``: a quantisation range, field or weight other than OncoFed's pinned ones; a field too
  small for the sum (``sample_num x target_range >= mod_range`` wraps it); a threshold ``t`` outside
  this node's bounds (:func:`nodes.policy.check_threshold`), above the share count ``s``, or with
  ``2t <= s`` (then the shares of one node's self mask and of its key could both reach ``t``); an
  even ``s`` below the sample; a second set-up in the same round;
- ``share_keys``: fewer than ``t`` or more than ``s`` neighbours;
- ``collect_masked_vectors``: sources that are not this round's neighbours, repeated, or fewer
  than ``t - 1``; a second collection in the round;
- ``unmask``: repeated ids, an id both active and dead, this node not active or declared dead, an
  id that did not send this node a share, fewer than ``t`` active; a second unmask in the round.

What a guard on one node cannot see (peers the coordinator made up, keys it substituted,
different lists told to different nodes) is outside it: SECURITY.md says what holds where.
"""

from __future__ import annotations

import json
from typing import Any

from flwr.app import ConfigRecord, Context, Error, Message

from fl import wire
from fl.flower_compat.secagg import RECORD_KEY_CONFIGS, Key, Stage
from nodes.policy import Policy, Refusal, check_threshold

GUARD_STATE = "oncofed_secagg_guard"  # this guard's memory in the node's context, apart from the mod's
TARGET_RANGE, MOD_RANGE, MAX_WEIGHT = wire.SECAGG_TARGET_RANGE, wire.SECAGG_MOD_RANGE, wire.SECAGG_MAX_WEIGHT


def guard_stage(msg: Message, context: Context, policy: Policy) -> Message | None:
    """None when the stage may go on to ``secaggplus_mod``; otherwise the error reply that refuses it."""
    try:
        _check(msg, context, policy)
    except Refusal as refusal:
        return Message(Error(code=refusal.code, reason=refusal.reason), reply_to=msg)
    except (KeyError, TypeError, ValueError) as exc:  # a stage message of the wrong shape: refused all the same
        return Message(Error(code=wire.ERROR_POLICY, reason=f"secure aggregation: malformed stage message ({exc!r})"),
                       reply_to=msg)
    return None


def _refuse(why: str) -> Refusal:
    return Refusal(wire.ERROR_POLICY, f"secure aggregation: {why}")


def _memory(context: Context) -> dict[str, Any]:
    record = context.state.config_records.get(GUARD_STATE)
    return json.loads(str(record["memory"])) if record is not None else {}


def _remember(context: Context, memory: dict[str, Any]) -> None:
    context.state.config_records[GUARD_STATE] = ConfigRecord({"memory": json.dumps(memory)})


def _ints(configs: ConfigRecord, key: str) -> list[int]:
    values = configs.get(key, [])
    if not isinstance(values, list) or not all(isinstance(v, int) for v in values):
        raise _refuse(f"'{key}' is not a list of node ids")
    if len(set(values)) != len(values):
        raise _refuse(f"'{key}' repeats a node id")
    return list(values)


def _check(msg: Message, context: Context, policy: Policy) -> None:
    configs = msg.content.config_records[RECORD_KEY_CONFIGS]
    stage = configs.get(Key.STAGE)
    me, group = int(msg.metadata.dst_node_id), f"{msg.metadata.run_id}:{msg.metadata.group_id}"
    memory = _memory(context)
    if stage == Stage.SETUP:
        if policy.secagg_protocol == "malicious":
            raise _refuse("this node's policy takes part only in OncoFed's malicious-secure aggregation "
                          "(secagg.protocol = 'malicious'), not in Flower's SecAgg+")
        if memory.get("group") == group:
            raise _refuse(f"a second set-up for round {msg.metadata.group_id}; one per round")
        memory = {"group": group, **_check_setup(configs, policy), "done": []}
    elif memory.get("group") != group:
        raise _refuse(f"stage {stage!r} for round {msg.metadata.group_id} without this round's set-up")
    elif stage in memory["done"]:
        raise _refuse(f"a second {stage!r} in round {msg.metadata.group_id}")
    elif stage == Stage.SHARE_KEYS:
        peers = [int(k) for k in configs if k != Key.STAGE]  # a key that is no node id: ValueError, refused
        if not memory["t"] <= len(peers) <= memory["s"]:
            raise _refuse(f"{len(peers)} neighbours, outside [t, s] = [{memory['t']}, {memory['s']}]")
        memory["neighbours"] = peers
    elif stage == Stage.COLLECT_MASKED_VECTORS:
        sources = _ints(configs, Key.SOURCE_LIST)
        if "neighbours" not in memory or not set(sources) <= set(memory["neighbours"]) - {me}:
            raise _refuse("shares from nodes that are not this round's neighbours")
        if len(sources) + 1 < memory["t"]:
            raise _refuse(f"{len(sources) + 1} contributors with this node, fewer than the threshold {memory['t']}")
        memory["sources"] = sources
    elif stage == Stage.UNMASK:
        _check_unmask(configs, memory, me)
    else:
        raise _refuse(f"unknown stage {stage!r}")
    if stage != Stage.SETUP:
        memory["done"].append(stage)
    _remember(context, memory)


def _check_setup(configs: ConfigRecord, policy: Policy) -> dict[str, Any]:
    n, s, t = (configs.get(k) for k in (Key.SAMPLE_NUMBER, Key.SHARE_NUMBER, Key.THRESHOLD))
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (n, s, t)):
        raise _refuse("set-up without integer sample, share and threshold counts")
    pinned = {Key.TARGET_RANGE: TARGET_RANGE, Key.MOD_RANGE: MOD_RANGE, Key.MAX_WEIGHT: MAX_WEIGHT}
    for key, value in pinned.items():
        if type(configs.get(key)) is not type(value) or configs.get(key) != value:
            raise _refuse(f"{key} {configs.get(key)!r}, OncoFed pins {value!r}")
    clipping = configs.get(Key.CLIPPING_RANGE)
    if not (isinstance(clipping, float) and 0 < clipping < float("inf")):
        raise _refuse(f"clipping range {clipping!r} is not a positive number")
    if n * TARGET_RANGE >= MOD_RANGE:
        raise _refuse(f"{n} contributions of range 2^22 overflow the 2^32 field; at most {MOD_RANGE // TARGET_RANGE - 1}")
    check_threshold(policy, t)
    if not t <= s <= n:
        raise _refuse(f"threshold {t}, shares {s} and sample {n} must satisfy t <= s <= n")
    if 2 * t <= s:
        raise _refuse(f"threshold {t} is not above half of the {s} shares: both secrets of one node could be rebuilt")
    if s < n and s % 2 == 0:
        raise _refuse(f"an even share count {s} below the sample {n}")
    return {"t": t, "s": s, "n": n}


def _check_unmask(configs: ConfigRecord, memory: dict[str, Any], me: int) -> None:
    active, dead = _ints(configs, Key.ACTIVE_NODE_ID_LIST), _ints(configs, Key.DEAD_NODE_ID_LIST)
    if set(active) & set(dead):
        raise _refuse("a node listed both active and dead; its self mask and its key would both be revealed")
    if me not in active:
        raise _refuse("this node is not listed active (it sent its masked update)")
    if "sources" not in memory or not set(active) | set(dead) <= set(memory["sources"]) | {me}:
        raise _refuse("shares asked for nodes that did not share with this node this round")
    if len(active) < memory["t"]:
        raise _refuse(f"{len(active)} active nodes, fewer than the threshold {memory['t']}")
