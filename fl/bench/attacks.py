"""Four attacks of a coordinator that deviates from secure aggregation, each run against the nodes'
real code (:class:`fl.bench.inprocess.InProcessGrid`) under Flower's SecAgg+ (``protocol =
"flower"``, OncoFed's node guard included) and under OncoFed's malicious-secure stages
(``"malicious"``):

- **fake peers**: the coordinator makes up the victim's peers (Sybil nodes it plays itself);
- **key substitution**: it replaces real peers' advertised keys with its own and reads the share
  ciphertexts meant for them;
- **inconsistent views**: with one consortium site colluding, it tells some of the victim's
  neighbours that the victim survived and others that it dropped, and collects the share of its
  self mask from the first and of its mask key from the second;
- **mask brute force**: Flower draws each mask from numpy's MT19937 seeded with a 32-bit fold of
  the shared secret; a search over seeds recognises the right one by the masked vector alone.

Each ``attack_*`` function returns an :class:`Outcome`: whether the coordinator recovered the
victim's own update (compared with the update the victim trained, recorded on the node for the
comparison only), or the refusals that stopped it. ``python bench/secagg_attacks.py`` prints the table.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict

from fl import wire
from fl.bench.inprocess import InProcessGrid, error_reasons

FLOWER, MALICIOUS = "flower", "malicious"
CLIP = 8.0  # the clipping range both protocols quantise with here


@dataclass
class Outcome:
    attack: str
    protocol: str
    recovered: bool  # the coordinator holds the victim's own update
    error: float | None = None  # max |recovered - trained| over coordinates
    refusals: list[str] = field(default_factory=list)  # the nodes' named reasons
    released: bool = False  # some sum or secret left a node
    detail: str = ""


# ----- the federation ------------------------------------------------------------------------------

def federation(root: Path, sites: int, *, image_size: int = 32) -> list[Path]:
    """``sites`` seg2d hospitals with site keys and one pinned roster, in ``root``."""
    from fl.learn import get_task
    from fl.learn.synth import node_dir, synthesize
    from nodes.policy import state_dir
    from nodes.roster import pin_local_consortium

    if not root.exists():
        synthesize(root, nodes=sites, task=get_task("seg2d"), seed=5, image_size=image_size)
    folders = [node_dir(root, i) for i in range(sites)]
    pin_local_consortium([state_dir(f) for f in folders], consortium="attack bench")
    return folders


def fresh(folders: list[Path], out: Path) -> list[Path]:
    """Copies of the sites with empty ledgers (keys and roster kept): one attack each."""
    copies = []
    for i, folder in enumerate(folders):
        dst = out / f"site-{i}"
        shutil.copytree(folder, dst, ignore=shutil.ignore_patterns("*.jsonl", "*.lock"))
        copies.append(dst)
    return copies


def _cfg(root: Path, nodes: int, **extra: Any) -> Any:
    from fl import config

    return config.from_flat({"data.root": str(root), "data.nodes": nodes, "data.image_size": 32, "rounds": 1,
                             "strategy.evaluate_initial": False, "secagg.enabled": True,
                             "secagg.clipping_range": CLIP, **extra})


def _instruction(cfg: Any, server_round: int = 1) -> tuple[dict[str, np.ndarray], ConfigRecord]:
    """The training instruction an honest round sends: the initial model and the run's train config."""
    from fl.server.rounds import _instructions, initial_arrays

    arrays = initial_arrays(cfg)
    config = ConfigRecord(dict(_instructions(cfg)[0]))
    config[wire.SERVER_ROUND] = server_round
    config[wire.SECAGG_ARRAY_KEYS] = json.dumps(list(arrays.keys()))
    return {k: arrays[k].numpy() for k in arrays.keys()}, config


@contextlib.contextmanager
def recorded_updates() -> Iterator[list[np.ndarray]]:
    """Every update a node hands to masking, flattened: the ground truth the attacks are scored on."""
    trained: list[np.ndarray] = []
    original = wire.legacy_reply

    def spy(update: dict[str, np.ndarray], keys: list[str], metrics: dict[str, Any]) -> RecordDict:
        trained.append(np.concatenate([np.asarray(update[k], dtype=np.float64).ravel() for k in keys]))
        return original(update, keys, metrics)

    wire.legacy_reply = spy
    try:
        yield trained
    finally:
        wire.legacy_reply = original


def _send(grid: InProcessGrid, node: int, content: RecordDict, group: str = "1") -> Message:
    (reply,) = grid.send_and_receive([grid.create_message(content, "train", node, group)])
    return reply


# ----- Flower's SecAgg+, driven stage by stage by a deviating coordinator ---------------------------

def _flower_stage(stage: str, **configs: Any) -> RecordDict:
    from fl.flower_compat.secagg import RECORD_KEY_CONFIGS, Key

    return RecordDict({RECORD_KEY_CONFIGS: ConfigRecord({Key.STAGE: stage, **configs})})


def _flower_setup(grid: InProcessGrid, nodes: list[int], n: int, s: int, t: int) -> dict[int, tuple[bytes, bytes]]:
    from fl.flower_compat.secagg import RECORD_KEY_CONFIGS, Key, Stage

    keys = {}
    for node in nodes:
        reply = _send(grid, node, _flower_stage(
            Stage.SETUP, **{Key.SAMPLE_NUMBER: n, Key.SHARE_NUMBER: s, Key.THRESHOLD: t, Key.CLIPPING_RANGE: CLIP,
                            Key.TARGET_RANGE: wire.SECAGG_TARGET_RANGE, Key.MOD_RANGE: wire.SECAGG_MOD_RANGE,
                            Key.MAX_WEIGHT: wire.SECAGG_MAX_WEIGHT}))
        if reply.has_error():
            raise RuntimeError(reply.error.reason)
        record = reply.content.config_records[RECORD_KEY_CONFIGS]
        keys[node] = (record[Key.PUBLIC_KEY_1], record[Key.PUBLIC_KEY_2])
    return keys


def _flower_collect(grid: InProcessGrid, node: int, srcs: list[int], ctxts: list[bytes],
                    instruction: tuple[dict[str, np.ndarray], ConfigRecord]) -> Message:
    from flwr.common import FitIns, ndarrays_to_parameters

    from fl.flower_compat.legacy import fitins_to_recorddict
    from fl.flower_compat.secagg import Key, Stage

    weights, config = instruction
    keys = json.loads(str(config[wire.SECAGG_ARRAY_KEYS]))
    content = fitins_to_recorddict(FitIns(ndarrays_to_parameters([weights[k] for k in keys]), dict(config)), True)
    content.config_records.update(_flower_stage(Stage.COLLECT_MASKED_VECTORS, **{
        Key.CIPHERTEXT_LIST: ctxts, Key.SOURCE_LIST: srcs}).config_records)
    return _send(grid, node, content)


def _flower_unmask_vector(masked: list[np.ndarray], seed: bytes, own_mask_key: bytes | None, victim: int,
                          peer_mask_keys: dict[int, Any], victim_pk1: bytes) -> np.ndarray:
    """The victim's update from its masked vector, its self-mask seed and every pairwise mask."""
    from fl.flower_compat.secagg_crypto import (
        bytes_to_private_key,
        bytes_to_public_key,
        dequantize,
        factor_extract,
        generate_shared_key,
        pseudo_rand_gen,
    )

    shapes = [a.shape for a in masked]
    modulus = wire.SECAGG_MOD_RANGE
    vec = [a.astype(np.int64) - m for a, m in zip(masked, pseudo_rand_gen(seed, modulus, shapes), strict=True)]
    for peer, key in peer_mask_keys.items():  # (private key of the peer's side, or the victim's own)
        shared = generate_shared_key(bytes_to_private_key(key[0]), bytes_to_public_key(key[1]))
        pair = pseudo_rand_gen(shared, modulus, shapes)
        sign = 1 if victim > peer else -1  # what the victim added
        vec = [a - sign * m for a, m in zip(vec, pair, strict=True)]
    vec = [np.mod(a, modulus) for a in vec]
    q_ratio, values = factor_extract(vec)
    out = dequantize(values, CLIP, wire.SECAGG_TARGET_RANGE)
    return np.concatenate([a.ravel() * (wire.SECAGG_TARGET_RANGE / q_ratio) for a in out])


def _flower_isolate(grid: InProcessGrid, victim: int, peers: list[int], real_keys: dict[int, tuple[bytes, bytes]],
                    instruction: tuple[dict[str, np.ndarray], ConfigRecord]) -> np.ndarray:
    """Play every peer of ``victim`` with keys the coordinator holds: the victim's update."""
    from fl.flower_compat.secagg import RECORD_KEY_CONFIGS, Key, Stage
    from fl.flower_compat.secagg_crypto import (
        bytes_to_public_key,
        combine_shares,
        decrypt,
        encrypt,
        generate_key_pairs,
        generate_shared_key,
        private_key_to_bytes,
        public_key_to_bytes,
        share_keys_plaintext_concat,
        share_keys_plaintext_separate,
    )

    mine = {p: (generate_key_pairs(), generate_key_pairs()) for p in peers}  # the coordinator's own pairs
    table = {str(victim): list(real_keys[victim])}
    table.update({str(p): [public_key_to_bytes(k1[1]), public_key_to_bytes(k2[1])] for p, (k1, k2) in mine.items()})
    reply = _send(grid, victim, _flower_stage(Stage.SHARE_KEYS, **table))
    if reply.has_error():
        raise RuntimeError(reply.error.reason)
    record = reply.content.config_records[RECORD_KEY_CONFIGS]
    pk1_v, pk2_v = real_keys[victim]
    seed_shares = []
    for dst, ciphertext in zip(record[Key.DESTINATION_LIST], record[Key.CIPHERTEXT_LIST], strict=True):
        key = generate_shared_key(mine[dst][1][0], bytes_to_public_key(pk2_v))  # meant for dst: read by us
        _, _, b_share, _ = share_keys_plaintext_separate(decrypt(key, ciphertext))
        seed_shares.append(b_share)
    ctxts = []
    for p in peers:  # shares "from" each peer, made up, so the victim accepts the round
        key = generate_shared_key(mine[p][1][0], bytes_to_public_key(pk2_v))
        ctxts.append(encrypt(key, share_keys_plaintext_concat(p, victim, os.urandom(32), os.urandom(32))))
    masked_reply = _flower_collect(grid, victim, peers, ctxts, instruction)
    if masked_reply.has_error():
        raise RuntimeError(masked_reply.error.reason)
    from flwr.common import bytes_to_ndarray

    masked = [bytes_to_ndarray(b) for b in masked_reply.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]]
    reply = _send(grid, victim, _flower_stage(Stage.UNMASK, **{Key.ACTIVE_NODE_ID_LIST: [victim, *peers],
                                                               Key.DEAD_NODE_ID_LIST: []}))
    if reply.has_error():
        raise RuntimeError(reply.error.reason)
    record = reply.content.config_records[RECORD_KEY_CONFIGS]
    seed_shares.append(dict(zip(record[Key.NODE_ID_LIST], record[Key.SHARE_LIST], strict=True))[victim])
    seed = combine_shares(seed_shares)
    pairs = {p: (private_key_to_bytes(mine[p][0][0]), pk1_v) for p in peers}
    return _flower_unmask_vector(masked, seed, None, victim, pairs, pk1_v)


# ----- the four attacks --------------------------------------------------------------------------

def _score(outcome: Outcome, recovered: np.ndarray | None, trained: list[np.ndarray]) -> Outcome:
    if recovered is not None and trained:
        truth = trained[0]
        outcome.error = float(np.max(np.abs(recovered - truth)))
        outcome.recovered = outcome.error < 1e-4 and float(np.max(np.abs(truth))) > 1e-3
    return outcome


def attack_fake_peers(folders: list[Path], protocol: str) -> Outcome:
    """One real hospital and two peers the coordinator made up: the "sum" is the victim's update."""
    out = Outcome("fake peers", protocol, False)
    cfg = _cfg(folders[0].parent, 3, **{"secagg.protocol": protocol})
    if protocol == FLOWER:
        grid = InProcessGrid({1: folders[0]})
        with recorded_updates() as trained:
            keys = _flower_setup(grid, [1], n=3, s=3, t=3)
            recovered = _flower_isolate(grid, 1, [101, 102], keys, _instruction(cfg))
        out.released = True
        return _score(out, recovered, trained)
    # the Sybils run OncoFed's own node code, with site keys the coordinator made and a roster of its own
    from fl.files import atomic_write
    from fl.privacy.secure_sum import public_bytes
    from nodes.policy import state_dir
    from nodes.roster import ROSTER_FILE, create_site_key, roster_text, site_key

    sybils = [folders[0].parent / f"sybil-{i}" for i in range(2)]
    sites = {"site-0": public_bytes(site_key(state_dir(folders[0])))}  # the Sybils accept the victim
    for i, sybil in enumerate(sybils):
        shutil.copytree(folders[i + 1], sybil, ignore=shutil.ignore_patterns(".oncofed"))
        sites[f"sybil-{i}"] = create_site_key(state_dir(sybil))
    for sybil in sybils:  # the coordinator's own roster, on its own nodes only
        atomic_write(state_dir(sybil) / ROSTER_FILE, roster_text("attack bench", sites).encode())
    grid = InProcessGrid({1: folders[0], 101: sybils[0], 102: sybils[1]})
    result = _malicious(grid, cfg)
    out.refusals = error_reasons(grid)
    out.released = result.update_sum is not None
    return out


def attack_key_substitution(folders: list[Path], protocol: str) -> Outcome:
    """Three real hospitals; in the victim's view, both peers' keys are the coordinator's own."""
    out = Outcome("key substitution", protocol, False)
    cfg = _cfg(folders[0].parent, 3, **{"secagg.protocol": protocol})
    grid_folders = {1: folders[0], 2: folders[1], 3: folders[2]}
    if protocol == FLOWER:
        grid = InProcessGrid(grid_folders)
        with recorded_updates() as trained:
            keys = _flower_setup(grid, [1, 2, 3], n=3, s=3, t=3)  # the real peers advertise their keys
            recovered = _flower_isolate(grid, 1, [2, 3], keys, _instruction(cfg))
        out.released = True
        return _score(out, recovered, trained)
    from fl.privacy import secure_sum as crypto

    def substitute(msg: Message) -> Message:
        record = msg.content.config_records.get(wire.SECURE_SUM)
        if record is not None and record["stage"] == "share-keys" and msg.metadata.dst_node_id == 1:
            nodes = list(record["nodes"])
            enc, msk = list(record["pk-enc"]), list(record["pk-mask"])
            for peer in (2, 3):
                enc[nodes.index(peer)], msk[nodes.index(peer)] = crypto.new_x25519()[1], crypto.new_x25519()[1]
            record["pk-enc"], record["pk-mask"] = enc, msk
        return msg

    grid = InProcessGrid(grid_folders, tamper=substitute)
    result = _malicious(grid, cfg)
    out.refusals = error_reasons(grid)
    out.released = result.update_sum is not None
    return out


def attack_inconsistent_views(folders: list[Path], protocol: str, *, colluders: int = 1) -> Outcome:
    """Five hospitals, site 5 colluding with the coordinator: hospitals 1 and 2 are told that 1
    survived, 3 and 4 that it dropped; with the colluder's own shares, both secrets of 1 are rebuilt."""
    out = Outcome("inconsistent views", protocol, False)
    grid_folders = {i + 1: folders[i] for i in range(5)}
    if protocol == FLOWER:
        cfg = _cfg(folders[0].parent, 5)
        grid = InProcessGrid(grid_folders)
        with recorded_updates() as trained:
            recovered = _flower_split_views(grid, _instruction(cfg))
        out.released = True
        return _score(out, recovered, trained[:1])
    cfg = _cfg(folders[0].parent, 5, **{"secagg.protocol": MALICIOUS, "secagg.colluders": colluders,
                                        "secagg.threshold": 0.5})
    from fl.privacy import secure_sum as crypto
    from nodes.policy import state_dir
    from nodes.roster import site_key

    colluder_key = site_key(state_dir(folders[4]))  # the colluding site hands the coordinator its key
    told_dropped = {3, 4}
    signed: dict[int, bytes] = {}

    def split(msg: Message) -> Message:
        record = msg.content.config_records.get(wire.SECURE_SUM)
        node = int(msg.metadata.dst_node_id)
        if record is None:
            return msg
        if record["stage"] == "consistency" and node in told_dropped:
            record["survivors"] = [u for u in record["survivors"] if u != 1]
        if record["stage"] == "unmask":
            survivors = [u for u in record["survivors"] if not (node in told_dropped and u == 1)]
            for sent, reply in grid.answers:  # the signatures each node gave for its own view
                stage = sent.content.config_records.get(wire.SECURE_SUM)
                if stage is not None and stage["stage"] == "consistency" and not reply.has_error():
                    signed[int(sent.metadata.dst_node_id)] = reply.content.config_records[wire.SECURE_SUM]["signature"]
            same_view = [u for u in signed if (u in told_dropped) == (node in told_dropped) and u != 5]
            from nodes.secure_sum import _memory

            graph = _memory(grid.contexts[5])["graph"]  # the colluding site's node knows the round's seed
            fields = {"run": grid.run.run_id, "round": 1, "roster": _roster_digest(folders[0]), "graph": graph,
                      "survivors": sorted(survivors)}
            forged = crypto.sign(colluder_key, "survivors", fields)  # the colluder signs every view
            record["survivors"] = survivors
            record["signers"] = [*same_view, 5]
            record["signatures"] = [signed[u] for u in same_view] + [forged]
        return msg

    grid = InProcessGrid(grid_folders, tamper=split)
    result = _malicious(grid, cfg)
    out.refusals = error_reasons(grid)
    out.released = result.update_sum is not None
    return out


def _roster_digest(folder: Path) -> str:
    from nodes.policy import state_dir
    from nodes.roster import load_roster

    return load_roster(state_dir(folder)).digest


def _flower_split_views(grid: InProcessGrid, instruction: tuple[dict[str, np.ndarray], ConfigRecord]) -> np.ndarray:
    from flwr.common import bytes_to_ndarray

    from fl.flower_compat.secagg import RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Key, Stage
    from fl.flower_compat.secagg_crypto import combine_shares

    nodes = [1, 2, 3, 4, 5]
    keys = _flower_setup(grid, nodes, n=5, s=5, t=3)  # 2t > s: the guard admits it
    table = {str(u): list(keys[u]) for u in nodes}
    inbox: dict[int, tuple[list[int], list[bytes]]] = {u: ([], []) for u in nodes}
    for u in nodes:
        record = _send(grid, u, _flower_stage(Stage.SHARE_KEYS, **table)).content.config_records[RECORD_KEY_CONFIGS]
        for dst, ciphertext in zip(record[Key.DESTINATION_LIST], record[Key.CIPHERTEXT_LIST], strict=True):
            inbox[dst][0].append(u)
            inbox[dst][1].append(ciphertext)
    masked = {}
    for u in nodes:
        reply = _flower_collect(grid, u, *inbox[u], instruction)
        masked[u] = [bytes_to_ndarray(b) for b in reply.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]]
    seed_shares, key_shares = [], []
    for u, view in ((1, "alive"), (2, "alive"), (3, "dropped"), (4, "dropped")):
        active = nodes if view == "alive" else [2, 3, 4, 5]
        record = _send(grid, u, _flower_stage(Stage.UNMASK, **{
            Key.ACTIVE_NODE_ID_LIST: active, Key.DEAD_NODE_ID_LIST: [] if view == "alive" else [1]}))
        if record.has_error():
            raise RuntimeError(record.error.reason)
        shares = dict(zip(record.content.config_records[RECORD_KEY_CONFIGS][Key.NODE_ID_LIST],
                          record.content.config_records[RECORD_KEY_CONFIGS][Key.SHARE_LIST], strict=True))
        (seed_shares if view == "alive" else key_shares).append(shares[1])
    colluder = grid.contexts[5].state.config_records[RECORD_KEY_STATE]  # site 5 hands over what it holds
    held = dict(zip(colluder["rd_seed_share_dict:K"], colluder["rd_seed_share_dict:V"], strict=True))
    held_sk = dict(zip(colluder["sk1_share_dict:K"], colluder["sk1_share_dict:V"], strict=True))
    seed = combine_shares([*seed_shares, held[1]])
    sk1 = combine_shares([*key_shares, held_sk[1]])
    pairs = {u: (sk1, keys[u][0]) for u in nodes if u != 1}
    return _flower_unmask_vector(masked[1], seed, None, 1, pairs, keys[1][0])


def _malicious(grid: InProcessGrid, cfg: Any, timeout: float = 60.0) -> Any:
    from fl.server.rounds import _instructions, initial_arrays
    from strategies.factory import build_strategy
    from strategies.secure_sum import malicious_round

    arrays = initial_arrays(cfg)
    config = ConfigRecord(dict(_instructions(cfg)[0]))
    return malicious_round(grid, build_strategy(cfg), 1, arrays, config, shares=cfg.secagg.shares,
                           threshold=cfg.secagg.threshold, colluders=cfg.secagg.colluders, clipping_range=CLIP,
                           timeout=timeout)


# ----- mask brute force ---------------------------------------------------------------------------

@dataclass
class BruteForce:
    protocol: str
    found: bool  # a seed in the window reproduced the mask
    candidates: int
    seconds_per_candidate: float
    full_search_hours: float  # 2^32 candidates on one core, extrapolated (Flower's seed space)


def attack_mask_brute_force(protocol: str, *, window: int = 2**14, dim: int = 4096) -> BruteForce:
    """A masked vector ``q + m mod 2^32`` with ``q`` a quantised update (below 2^22): a candidate seed is
    right when ``y - m'`` falls in ``[0, 2^22]`` on 64 coordinates (a wrong one passes with probability
    2^-640). The window of 32-bit seeds searched holds the true XOR fold of the secret at a random place;
    under Flower that fold is the whole seed, under OncoFed it is not a seed at all."""
    from fl.flower_compat.secagg_crypto import pseudo_rand_gen
    from fl.privacy import secure_sum as crypto

    secret = secrets.token_bytes(32)
    fold = 0
    for i in range(0, 32, 4):
        fold ^= int.from_bytes(secret[i:i + 4], "little")
    q = np.random.default_rng(0).integers(0, wire.SECAGG_TARGET_RANGE, dim, dtype=np.int64)
    if protocol == FLOWER:
        m = pseudo_rand_gen(secret, wire.SECAGG_MOD_RANGE, [(dim,)])[0]
    else:
        m = crypto.mask(crypto.derive(secret, b"mask"), dim).astype(np.int64)
    y = np.mod(q + m, wire.SECAGG_MOD_RANGE)
    start = (fold - secrets.randbelow(window)) % 2**32
    t0 = time.perf_counter()
    found = False
    for offset in range(window):
        gen = np.random.RandomState((start + offset) % 2**32)
        guess = gen.randint(0, wire.SECAGG_MOD_RANGE - 1, 64, dtype=np.int64)
        if np.all(np.mod(y[:64] - guess, wire.SECAGG_MOD_RANGE) <= wire.SECAGG_TARGET_RANGE):
            full = pseudo_rand_gen((start + offset).to_bytes(4, "little"), wire.SECAGG_MOD_RANGE, [(dim,)])[0]
            found = bool(np.array_equal(np.mod(y - full, wire.SECAGG_MOD_RANGE), q))
            break
    per = (time.perf_counter() - t0) / (offset + 1)
    return BruteForce(protocol, found, offset + 1, per, per * 2**32 / 3600)


def all_attacks(root: Path) -> list[Outcome]:
    """Every attack on both protocols, each on fresh copies of five sites (keys and roster pinned)."""
    base = federation(root / "sites", 5)
    outcomes = []
    for name, attack in (("fake-peers", attack_fake_peers), ("key-substitution", attack_key_substitution),
                         ("inconsistent-views", attack_inconsistent_views)):
        for protocol in (FLOWER, MALICIOUS):
            folders = fresh(base, root / f"{name}-{protocol}")
            outcomes.append(attack(folders, protocol))
    return outcomes
