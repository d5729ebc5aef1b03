"""Hostile virtual nodes for robustness experiments in simulation (never used in deployment).

`simulation.adversaries = k` makes virtual nodes 0..k-1 run this ClientApp: it trains
honestly, then corrupts its reply as `simulation.attack` says: ``scale`` sends the update
times 100, ``nan`` sends NaN weights, ``scale-then-nan`` does the first in round 1 and the
second afterwards; ``cycle`` sends, round after round, the update x1000, NaN, Inf, arrays
of the wrong shape and a reply missing an array; ``drop-round-1`` dies in round 1 (its ClientApp crashes, the server gets
no update) and rejoins honestly from round 2. Evaluation stays honest. Tests and benchmarks use it to show that
validation and robust aggregation keep the global model sound.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from fl import wire
from fl.packing import packed_content_mod
from nodes import client_app as honest

ATTACKS = ("scale", "nan", "scale-then-nan", "drop-round-1", "cycle")
CYCLE = ("scale1000", "nan", "inf", "shape", "missing")
SCALE = 100.0

app = ClientApp(mods=[packed_content_mod])


def _is_adversary(context: Context) -> bool:
    partition = context.node_config.get(wire.NODE_PARTITION_ID)
    return partition is not None and int(partition) < int(context.run_config.get("simulation.adversaries", 0))


def corrupt(reply: Message, sent: ArrayRecord, attack: str, server_round: int) -> None:
    """Replace the reply's weights in place according to ``attack`` (``sent``: the global weights)."""
    trained = reply.content[wire.ARRAYS]
    mode = attack
    if attack == "scale-then-nan":
        mode = "scale" if server_round == 1 else "nan"
    elif attack == "cycle":
        mode = CYCLE[(server_round - 1) % len(CYCLE)]
    out = {}
    for key in trained.keys():
        local, global_ = trained[key].numpy(), sent[key].numpy()
        if mode in ("nan", "inf"):
            bad = np.full_like(local, np.nan if mode == "nan" else np.inf)
        elif mode == "shape":
            bad = np.zeros((*local.shape, 2), dtype=local.dtype)
        else:
            bad = global_ + (1000.0 if mode == "scale1000" else SCALE) * (local - global_)
        out[key] = Array(np.asarray(bad, dtype=local.dtype))
    if mode == "missing":
        out.pop(next(iter(out)))
    reply.content[wire.ARRAYS] = ArrayRecord(out)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train honestly, then corrupt the reply if this virtual node is an adversary."""
    attack = str(context.run_config.get("simulation.attack", "scale"))
    server_round = int(msg.content[wire.CONFIG][wire.SERVER_ROUND])
    if _is_adversary(context) and attack == "drop-round-1":
        if server_round == 1:
            raise RuntimeError("simulated node failure in round 1")
        return honest.train(msg, context)
    sent = ArrayRecord({k: Array(v.numpy().copy()) for k, v in msg.content[wire.ARRAYS].items()})
    reply = honest.train(msg, context)
    if _is_adversary(context) and not reply.has_error():
        corrupt(reply, sent, attack, server_round)
    return reply


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return honest.evaluate(msg, context)
