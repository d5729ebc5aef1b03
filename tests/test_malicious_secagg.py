"""OncoFed's malicious-secure aggregation (secagg.protocol = "malicious") against a coordinator that
deviates, on the nodes' real code (fl.bench.inprocess): each attack that recovers a hospital's update
under Flower's SecAgg+ is refused under the new stages, names what was wrong and releases nothing;
an honest round, with dropouts after masking, gives the sum of the survivors' updates."""

from __future__ import annotations

import json
import math
import secrets
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message

from fl import config, wire
from fl.bench import attacks
from fl.bench.inprocess import InProcessGrid, error_reasons
from fl.cli import main
from fl.errors import ConfigError
from fl.privacy import secure_sum as crypto
from nodes.ledger import Ledger
from nodes.policy import Policy, save_policy, state_dir
from nodes.roster import load_roster, parse_roster, pin_roster, roster_text


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Five seg2d hospitals with site keys and one pinned roster (copy before use: attacks.fresh)."""
    return attacks.federation(tmp_path_factory.mktemp("malicious") / "sites", 5)


def _fresh(sites: list[Path], tmp: Path) -> list[Path]:
    return attacks.fresh(sites, tmp / secrets.token_hex(4))


# ----- the primitives ----------------------------------------------------------------------------

def test_shamir_rebuilds_from_t_shares_and_not_from_fewer() -> None:
    secret = secrets.token_bytes(32)
    shares = crypto.split(secret, 3, 5)
    assert crypto.combine({1: shares[0], 3: shares[2], 5: shares[4]}, 3) == secret
    assert crypto.combine({2: shares[1], 4: shares[3], 5: shares[4]}, 3) == secret
    with pytest.raises(crypto.ProtocolError, match="fewer than the threshold"):
        crypto.combine({1: shares[0], 2: shares[1]}, 3)
    # two shares and a guessed third rebuild some other value (or none): t - 1 shares fix nothing
    guessed = crypto.split(secrets.token_bytes(32), 3, 5)[2]
    try:
        assert crypto.combine({1: shares[0], 2: shares[1], 3: guessed}, 3) != secret
    except crypto.ProtocolError:
        pass


def test_pair_masks_cancel_and_masks_rest_on_the_whole_secret() -> None:
    (sk_u, pk_u), (sk_v, pk_v) = crypto.new_x25519(), crypto.new_x25519()
    m_u = crypto.pair_mask(sk_u, pk_v, 7, 1, 3, 9, 1000)
    m_v = crypto.pair_mask(sk_v, pk_u, 7, 1, 9, 3, 1000)
    assert not np.any(m_u + m_v) and np.any(m_u)  # u adds what v subtracts, mod 2^32
    assert not np.array_equal(m_u, crypto.pair_mask(sk_u, pk_v, 7, 2, 3, 9, 1000))  # bound to the round
    # two secrets with the same 32-bit XOR fold: Flower's generator draws the same mask from both
    from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen

    a = bytearray(secrets.token_bytes(32))
    b = bytearray(a)
    b[0] ^= 0xFF
    b[4] ^= 0xFF  # the fold XORs 4-byte words: flipping the same bits in two words keeps it
    flower = [pseudo_rand_gen(bytes(s), wire.SECAGG_MOD_RANGE, [(64,)])[0] for s in (a, b)]
    assert np.array_equal(*flower)
    ours = [crypto.self_mask(bytes(s), 7, 1, 64) for s in (a, b)]
    assert not np.array_equal(*ours)


def test_neighbourhoods_follow_the_public_seed_and_are_symmetric() -> None:
    nodes = list(range(10, 21))
    seed = secrets.token_bytes(32)
    graph = crypto.neighbourhoods(seed, nodes, 5)
    assert graph == crypto.neighbourhoods(seed, list(reversed(nodes)), 5)  # the order given does not matter
    assert all(len(n) == 5 and u in n for u, n in graph.items())
    assert all(u in graph[v] for u in nodes for v in graph[u])  # shares go both ways
    assert graph != crypto.neighbourhoods(secrets.token_bytes(32), nodes, 5)
    with pytest.raises(crypto.ProtocolError, match="odd"):
        crypto.neighbourhoods(seed, nodes, 4)


# ----- the roster --------------------------------------------------------------------------------

def _roster(sites: dict[str, bytes]) -> str:
    return roster_text("EU consortium", sites)


@pytest.mark.parametrize("mutate, message", [
    (lambda r: {**r, "sites": r["sites"][:2]}, "at least 3"),
    (lambda r: {**r, "sites": r["sites"] + [r["sites"][0]]}, "listed twice"),
    (lambda r: {**r, "sites": [{**r["sites"][0], "key": "00" * 31}] + r["sites"][1:]}, "32-byte Ed25519"),
    (lambda r: {**r, "sites": [{**r["sites"][0], "site": "a b"}] + r["sites"][1:]}, "site name"),
    (lambda r: {**r, "sites": [{**r["sites"][1], "site": "other"}] + r["sites"][1:]}, "already another site's"),
    (lambda r: {k: v for k, v in r.items() if k != "consortium"}, "'consortium'"),
])
def test_a_bad_roster_is_refused_naming_the_field(mutate: Any, message: str) -> None:
    raw = json.loads(_roster({f"h{i}": secrets.token_bytes(32) for i in range(3)}))
    with pytest.raises(ConfigError, match=message):
        parse_roster(json.dumps(mutate(raw)), "roster.json")


def test_roster_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "site"
    data.mkdir()
    assert main(["node", "roster", "key", "--data", str(data), "--site", "hospital-a"]) == 0
    line = json.loads(capsys.readouterr().out)
    assert line["site"] == "hospital-a" and len(bytes.fromhex(line["key"])) == 32
    assert (state_dir(data) / "site-key.pem").stat().st_mode & 0o077 == 0  # the key stays the node's
    assert main(["node", "roster", "key", "--data", str(data), "--site", "hospital-a"]) == 0  # never replaced
    assert json.loads(capsys.readouterr().out)["key"] == line["key"]
    others = {"hospital-b": secrets.token_bytes(32), "hospital-c": secrets.token_bytes(32)}
    without = tmp_path / "without.json"
    without.write_text(_roster({**others, "hospital-d": secrets.token_bytes(32)}))
    assert main(["node", "roster", "pin", str(without), "--data", str(data)]) == 2
    assert "is not on the roster" in capsys.readouterr().err
    assert not (state_dir(data) / "roster.json").exists()
    good = tmp_path / "roster.json"
    good.write_text(_roster({**others, "hospital-a": bytes.fromhex(line["key"])}))
    assert main(["node", "roster", "pin", str(good), "--data", str(data)]) == 0
    digest = load_roster(state_dir(data)).digest
    assert digest in capsys.readouterr().out
    assert main(["node", "roster", "show", "--data", str(data)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["this_site"] == "hospital-a" and shown["digest"] == digest
    with pytest.raises(ConfigError, match="not on the roster"):
        pin_roster(state_dir(data), without)


# ----- an honest round ---------------------------------------------------------------------------

def _cfg(root: Path, nodes: int, **extra: Any) -> config.Config:
    return attacks._cfg(root, nodes, **{"secagg.protocol": "malicious", **extra})


def _round(grid: InProcessGrid, cfg: config.Config, timeout: float = 60.0) -> Any:
    return attacks._malicious(grid, cfg, timeout)


def _assert_sum(result: Any, trained: list[np.ndarray], contributors: int) -> None:
    flat = np.concatenate([v.ravel() for v in result.update_sum.values()])
    assert result.contributors == contributors and result.outcome == "released"
    step = 2 * attacks.CLIP / wire.SECAGG_TARGET_RANGE
    assert float(np.max(np.abs(flat - sum(trained)))) <= contributors * step + 1e-9
    assert float(np.max(np.abs(sum(trained)))) > 1e-3


def test_honest_round_sums_every_update(sites: list[Path], tmp_path: Path) -> None:
    folders = _fresh(sites, tmp_path)
    grid = InProcessGrid({i + 1: f for i, f in enumerate(folders[:4])})
    with attacks.recorded_updates() as trained:
        result = _round(grid, _cfg(folders[0].parent, 4))
    assert error_reasons(grid) == [] and len(trained) == 4
    _assert_sum(result, trained, 4)


@pytest.mark.parametrize("stage, node", [("collect", 4), ("unmask", 3)])
def test_dropouts_after_masking(sites: list[Path], tmp_path: Path, stage: str, node: int) -> None:
    """A node lost before it sends its masked update (its mask key is rebuilt) or after (its self mask is):
    the sum of the updates that arrived, as with Flower's SecAgg+."""
    folders = _fresh(sites, tmp_path)

    def drop(msg: Message) -> Message | None:
        record = msg.content.config_records.get(wire.SECURE_SUM)
        return None if record is not None and record["stage"] == stage and msg.metadata.dst_node_id == node else msg

    grid = InProcessGrid({i + 1: f for i, f in enumerate(folders[:4])}, tamper=drop)
    with attacks.recorded_updates() as trained:  # in process every reply is there at once: a short wait
        result = _round(grid, _cfg(folders[0].parent, 4), timeout=3.0)
    assert len(trained) == (3 if stage == "collect" else 4)
    _assert_sum(result, trained, len(trained))


def test_distributed_noise_is_sized_for_the_threshold_every_site_signed(sites: list[Path], tmp_path: Path) -> None:
    from fl.server.observer import LogObserver
    from fl.server.rounds import run_federation

    folders = _fresh(sites, tmp_path)
    extra = {"central_dp.enabled": True, "central_dp.clip_on": "client", "central_dp.noise_multiplier": 2.0,
             "secagg.noise": "distributed", "secagg.clipping_range": 0.0, "registry.root": str(tmp_path / "reg"),
             "model_name": "m", "train.lr": 1e-12}

    def inflate(msg: Message) -> Message:  # the coordinator announces more contributors than the nodes signed
        if msg.content.config_records.get(wire.SECURE_SUM, {}).get("stage") == "collect":
            msg.content.config_records[wire.CONFIG][wire.DDP_MIN_CONTRIBUTORS] = 10
        return msg

    grid = InProcessGrid({i + 1: f for i, f in enumerate(folders[:3])}, tamper=inflate)
    with pytest.raises(Exception):
        run_federation(grid, _cfg(folders[0].parent, 3, **extra), tmp_path / "runs" / "a", LogObserver())
    assert sum("sizes the noise for 10 contributors" in r for r in error_reasons(grid)) == 3
    grid = InProcessGrid({i + 1: f for i, f in enumerate(folders[:3])})
    run_federation(grid, _cfg(folders[0].parent, 3, **extra), tmp_path / "runs" / "b", LogObserver())
    for folder in folders[:3]:
        (entry,) = [e for e in Ledger.contributions_in(state_dir(folder)).entries() if e.get("kind") == "train"]
        assert entry["noise_multiplier"] == pytest.approx(2.0 / math.sqrt(3))  # t = 3, as signed


# ----- the four attacks, on both protocols ------------------------------------------------------

def test_fake_peers(sites: list[Path], tmp_path: Path) -> None:
    flower = attacks.attack_fake_peers(_fresh(sites, tmp_path), attacks.FLOWER)
    assert flower.recovered and flower.error is not None and flower.error < 1e-5
    ours = attacks.attack_fake_peers(_fresh(sites, tmp_path), attacks.MALICIOUS)
    assert not ours.recovered and not ours.released
    assert any("advertises site 'sybil-0', which is not on this node's roster" in r for r in ours.refusals)


def test_key_substitution(sites: list[Path], tmp_path: Path) -> None:
    flower = attacks.attack_key_substitution(_fresh(sites, tmp_path), attacks.FLOWER)
    assert flower.recovered and flower.error is not None and flower.error < 1e-5
    ours = attacks.attack_key_substitution(_fresh(sites, tmp_path), attacks.MALICIOUS)
    assert not ours.recovered and not ours.released
    assert ours.refusals == ["secure aggregation: the advertisement of node 2 (site 'site-1') does not verify "
                             "under that site's roster key: keys substituted, or counts different from those this "
                             "node signed"]


def test_inconsistent_views(sites: list[Path], tmp_path: Path) -> None:
    flower = attacks.attack_inconsistent_views(_fresh(sites, tmp_path), attacks.FLOWER)
    assert flower.recovered and flower.error is not None and flower.error < 1e-5
    ours = attacks.attack_inconsistent_views(_fresh(sites, tmp_path), attacks.MALICIOUS)
    assert not ours.recovered and not ours.released
    assert len(ours.refusals) == 5 and all("signed this set" in r and "fewer than the threshold 4" in r
                                           for r in ours.refusals)
    # a coordinator that assumes no colluder, for a threshold of 3 of 5, is refused before any key is drawn
    weak = attacks.attack_inconsistent_views(_fresh(sites, tmp_path), attacks.MALICIOUS, colluders=0)
    assert not weak.released and len(weak.refusals) == 5
    assert all("the round assumes 0 colluding site(s); this node's policy assumes 1" in r for r in weak.refusals)


def test_a_node_masked_with_few_peers_refuses_a_set_that_drops_them(sites: list[Path], tmp_path: Path) -> None:
    """Four sites, threshold 3: the coordinator withholds site 2's shares from node 1 (it masks with 3 and 4
    only), then names 3 dropped. Unmasking {1, 2, 4} would reveal 3's mask key and 1's self mask, with 4
    colluding: node 1's update alone. Node 1 refuses to sign, and nobody unmasks."""
    folders = _fresh(sites, tmp_path)

    def isolate(msg: Message) -> Message:
        record = msg.content.config_records.get(wire.SECURE_SUM)
        if record is not None and record["stage"] == "collect" and msg.metadata.dst_node_id == 1:
            kept = [(u, c) for u, c in zip(record["srcs"], record["ctxts"], strict=True) if u != 2]
            record["srcs"], record["ctxts"] = [u for u, _ in kept], [c for _, c in kept]
        if record is not None and record["stage"] in ("consistency", "unmask"):
            record["survivors"] = [1, 2, 4]
        return msg

    grid = InProcessGrid({i + 1: f for i, f in enumerate(folders[:4])}, tamper=isolate)
    result = _round(grid, _cfg(folders[0].parent, 4))
    reasons = error_reasons(grid)
    assert result.update_sum is None
    assert any("survivor(s) [2] are neighbours that sent this node no shares" in r for r in reasons)
    assert sum("fewer than the threshold 3" in r for r in reasons) == 2  # nodes 2 and 4 at unmask: 2 signers


def test_mask_brute_force() -> None:
    flower = attacks.attack_mask_brute_force(attacks.FLOWER, window=2**11)
    assert flower.found  # the fold is the seed: the whole mask, and the update, follow
    ours = attacks.attack_mask_brute_force(attacks.MALICIOUS, window=2**11)
    assert not ours.found and ours.candidates == 2**11


# ----- the node's policy and stage order ----------------------------------------------------------

def test_a_node_requiring_the_malicious_protocol_refuses_flowers(sites: list[Path], tmp_path: Path) -> None:
    folders = _fresh(sites, tmp_path)
    save_policy(state_dir(folders[0]), Policy(secagg_protocol="malicious"))
    grid = InProcessGrid({1: folders[0], 2: folders[1], 3: folders[2]})
    with pytest.raises(RuntimeError, match="only in OncoFed's malicious-secure aggregation"):
        attacks._flower_setup(grid, [1], n=3, s=3, t=3)
    cfg = attacks._cfg(folders[0].parent, 3)
    from flwr.app import RecordDict

    from fl.server.rounds import _instructions, initial_arrays

    arrays, train_cfg = initial_arrays(cfg), ConfigRecord(dict(_instructions(cfg)[0]))
    train_cfg[wire.SERVER_ROUND] = 1
    plain = attacks._send(grid, 1, RecordDict({wire.ARRAYS: arrays, wire.CONFIG: train_cfg}))
    assert plain.has_error() and "only under secure aggregation" in plain.error.reason
    result = _round(grid, _cfg(folders[0].parent, 3))
    assert result.outcome == "released" and result.contributors == 3


def test_stages_out_of_order_or_repeated_are_refused(sites: list[Path], tmp_path: Path) -> None:
    folders = _fresh(sites, tmp_path)
    seen: list[str] = []

    def replay(msg: Message) -> Message:
        record = msg.content.config_records.get(wire.SECURE_SUM)
        if record is not None and msg.metadata.dst_node_id == 1:
            seen.append(str(record["stage"]))
            if record["stage"] == "collect":  # the coordinator skips the consistency round for node 1
                record["stage"] = "unmask"
        return msg

    grid = InProcessGrid({i + 1: f for i, f in enumerate(folders[:3])}, tamper=replay)
    result = _round(grid, _cfg(folders[0].parent, 3))
    assert result.update_sum is None
    assert "secure aggregation: stage 'unmask' out of order after share-keys" in error_reasons(grid)
    shutil.rmtree(folders[0].parent)
