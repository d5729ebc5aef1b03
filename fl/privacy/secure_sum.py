"""The cryptography of OncoFed's malicious-secure aggregation (``secagg.protocol = "malicious"``),
shared by the nodes (:mod:`nodes.secure_sum`) and the coordinator (:mod:`strategies.secure_sum`).

Bonawitz et al. (CCS 2017), in its malicious-secure form, with Bell et al.'s (CCS 2020) sparse
neighbourhoods, on ``cryptography``'s primitives:

- **roster signatures**: Ed25519. Every site holds a long-term key made on its node; every node pins
  the consortium's list of sites and public keys (the roster, :mod:`nodes.roster`). Each message
  a site signs starts with a domain tag and is a canonical JSON document, so that no signature
  made for one purpose can be replayed for another;
- **key agreement**: X25519, fresh per round, one pair to encrypt share ciphertexts and one to
  agree pairwise masks; HKDF-SHA256 turns each shared point into a key bound to the run, the
  round and the pair;
- **share ciphertexts**: AES-256-GCM with the run, round, sender and recipient as associated data;
- **masks**: ChaCha20 key streams under 256-bit keys (never a 32-bit seed), read as uint32 words:
  the field is 2^32, so each word is a uniform field element;
- **Shamir sharing** over the prime field of 2^521 - 1 (secrets are 256-bit);
- **neighbourhoods** from a public seed: the hash of every signed advertisement of the round, which
  no one knows before every node has drawn its fresh keys.

Quantisation keeps Flower's semantics (clip to ``[-r, r]``, map onto ``[0, T]`` with stochastic
rounding, equal weights), so :mod:`fl.privacy.distributed`'s exact grid encoding holds unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

PROTOCOL = "oncofed-secure-sum-v1"
PRIME = 2**521 - 1  # a Mersenne prime above every 256-bit secret
SECRET_BYTES = 32
SHARE_BYTES = 66  # an element of the field, big-endian
NONCE_BYTES = 12


class ProtocolError(ValueError):
    """A message of the protocol that fails a check: its text names what was wrong."""


# ----- canonical messages and roster signatures ------------------------------------------------

def canonical(kind: str, fields: dict[str, Any]) -> bytes:
    """The bytes a site signs: the protocol's name, the message's kind and its fields, as JSON with
    sorted keys (bytes as hex), so that equal content always gives equal bytes."""
    def plain(value: Any) -> Any:
        if isinstance(value, bytes):
            return value.hex()
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    body = {k: plain(v) for k, v in fields.items()}
    return json.dumps({"protocol": PROTOCOL, "kind": kind, **body}, sort_keys=True,
                      separators=(",", ":")).encode()


def sign(key: Ed25519PrivateKey, kind: str, fields: dict[str, Any]) -> bytes:
    return key.sign(canonical(kind, fields))


def verifies(public: bytes, signature: bytes, kind: str, fields: dict[str, Any]) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, canonical(kind, fields))
    except (InvalidSignature, ValueError):
        return False
    return True


def public_bytes(key: Ed25519PrivateKey | X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


# ----- per-round keys, agreement, encryption -----------------------------------------------------

def new_x25519() -> tuple[bytes, bytes]:
    """A fresh X25519 pair: (private, public), raw 32 bytes each, from the OS CSPRNG."""
    key = X25519PrivateKey.generate()
    raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                            serialization.NoEncryption())
    return raw, public_bytes(key)


def agree(private: bytes, public: bytes, info: bytes) -> bytes:
    """A 256-bit key from the X25519 agreement of ``private`` with a peer's ``public``, bound to ``info``."""
    try:
        point = X25519PrivateKey.from_private_bytes(private).exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError as exc:  # a low-order point: the agreement is all zeros
        raise ProtocolError(f"key agreement failed ({exc})") from None
    return derive(point, info)


def derive(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


def seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def open_sealed(key: bytes, ciphertext: bytes, aad: bytes) -> bytes:
    try:
        return AESGCM(key).decrypt(ciphertext[:NONCE_BYTES], ciphertext[NONCE_BYTES:], aad)
    except (InvalidTag, ValueError):
        raise ProtocolError("a share ciphertext does not authenticate") from None


def context(run: int, server_round: int, *parts: Any) -> bytes:
    """HKDF ``info`` and AEAD associated data: the protocol, run, round and the parts, unambiguously."""
    return canonical("context", {"run": run, "round": server_round, "parts": [str(p) for p in parts]})


# ----- masks -------------------------------------------------------------------------------------

def mask(key: bytes, size: int) -> np.ndarray:
    """``size`` uniform elements of Z_{2^32} (uint32): the ChaCha20 key stream under a 256-bit key."""
    if len(key) != 32:
        raise ProtocolError("a mask key must be 256 bits")
    stream = Cipher(algorithms.ChaCha20(key, b"\x00" * 16), mode=None).encryptor()
    return np.frombuffer(stream.update(b"\x00" * (4 * size)), dtype="<u4").astype(np.uint32)


def self_mask(seed: bytes, run: int, server_round: int, size: int) -> np.ndarray:
    return mask(derive(seed, context(run, server_round, "self-mask")), size)


def pair_mask(private: bytes, public: bytes, run: int, server_round: int, u: int, v: int,
              size: int) -> np.ndarray:
    """The mask node ``u`` adds for its pair with ``v`` (``v`` subtracts it when ``u < v``)."""
    low, high = min(u, v), max(u, v)
    m = mask(agree(private, public, context(run, server_round, "pair-mask", low, high)), size)
    return m if u < v else (np.uint32(0) - m)


# ----- Shamir sharing over GF(2^521 - 1) ---------------------------------------------------------

def split(secret: bytes, threshold: int, holders: int) -> list[bytes]:
    """``holders`` shares of ``secret`` (x = 1..holders); any ``threshold`` rebuild it, fewer reveal nothing."""
    if not 1 < threshold <= holders:
        raise ProtocolError(f"Shamir sharing needs 1 < threshold <= holders, got {threshold} of {holders}")
    coefficients = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = []
    for x in range(1, holders + 1):
        y = 0
        for c in reversed(coefficients):
            y = (y * x + c) % PRIME
        shares.append(y.to_bytes(SHARE_BYTES, "big"))
    return shares


def combine(shares: dict[int, bytes], threshold: int) -> bytes:
    """The secret from at least ``threshold`` shares ``{x: share}`` (Lagrange at 0)."""
    if len(shares) < threshold:
        raise ProtocolError(f"{len(shares)} shares, fewer than the threshold {threshold}")
    points = sorted(shares.items())[:threshold]
    secret = 0
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                num = num * (-xj) % PRIME
                den = den * (xi - xj) % PRIME
        secret = (secret + int.from_bytes(yi, "big") * num * pow(den, -1, PRIME)) % PRIME
    if secret >= 2 ** (8 * SECRET_BYTES):
        raise ProtocolError("shares that rebuild no 256-bit secret")
    return secret.to_bytes(SECRET_BYTES, "big")


# ----- neighbourhoods from a public seed (Bell et al.) ------------------------------------------

def graph_seed(run: int, server_round: int, adverts: dict[int, dict[str, Any]]) -> bytes:
    """The round's public seed: a hash over every signed advertisement (its fresh keys included)."""
    ordered = [adverts[n]["signature"] for n in sorted(adverts)]
    return hashlib.sha256(canonical("graph-seed", {"run": run, "round": server_round, "adverts": ordered})).digest()


def neighbourhoods(seed: bytes, nodes: list[int], size: int) -> dict[int, list[int]]:
    """Each node's neighbourhood (itself included, sorted by id): the ``size`` nodes around it on a ring
    ordered by ``sha256(seed, node)``; all nodes when ``size`` is the count. ``size`` is odd below it."""
    n = len(nodes)
    if size >= n:
        return {u: sorted(nodes) for u in nodes}
    if size % 2 == 0 or size < 3:
        raise ProtocolError(f"a neighbourhood of {size} of {n} nodes: it must be odd and at least 3")
    ring = sorted(nodes, key=lambda u: hashlib.sha256(seed + u.to_bytes(8, "big", signed=False)).digest())
    half = size // 2
    return {u: sorted(ring[(i + d) % n] for d in range(-half, half + 1)) for i, u in enumerate(ring)}


def holder_index(neighbourhood: list[int], holder: int) -> int:
    """The Shamir x-coordinate of ``holder`` among a node's neighbours (1-based, by sorted id)."""
    return sorted(neighbourhood).index(holder) + 1


# ----- quantisation (Flower's semantics: clip, map onto [0, T], stochastic rounding) ------------

def quantise(values: np.ndarray, clipping_range: float, target_range: int) -> np.ndarray:
    scaled = (np.clip(values, -clipping_range, clipping_range) + clipping_range) * (target_range / (2 * clipping_range))
    floor = np.floor(scaled)
    rng = np.random.default_rng(int.from_bytes(os.urandom(16), "big"))
    return (floor + (rng.random(scaled.shape) < scaled - floor)).astype(np.uint32)


def dequantise_sum(total: np.ndarray, contributors: int, clipping_range: float, target_range: int) -> np.ndarray:
    """The sum of ``contributors`` clipped updates from the sum of their quantised vectors."""
    return total.astype(np.float64) * (2 * clipping_range / target_range) - contributors * clipping_range
