"""Flower 1.41's SecAgg+ cryptographic primitives, which OncoFed's benchmarks use to play a
deviating coordinator against Flower's own ``secaggplus_mod`` (:mod:`fl.bench.attacks`): the
key agreement, the symmetric encryption of key shares, Shamir's secret sharing, the masks'
pseudo-random generator and the quantisation.

None of this is Flower's public API (``flwr.common.secure_aggregation.*``,
``flwr.supercore.primitives.asymmetric``). If Flower changes it the attacks stop reproducing
the mod's masks (they would report an attack failing that would succeed): the canaries check
each name and signature.
"""

from __future__ import annotations

from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt, generate_shared_key
from flwr.common.secure_aggregation.ndarrays_arithmetic import factor_extract
from flwr.common.secure_aggregation.quantization import dequantize
from flwr.common.secure_aggregation.secaggplus_utils import (
    pseudo_rand_gen,
    share_keys_plaintext_concat,
    share_keys_plaintext_separate,
)
from flwr.supercore.primitives.asymmetric import (
    bytes_to_private_key,
    bytes_to_public_key,
    generate_key_pairs,
    private_key_to_bytes,
    public_key_to_bytes,
)

__all__ = ["bytes_to_private_key", "bytes_to_public_key", "combine_shares", "decrypt", "dequantize", "encrypt",
           "factor_extract", "generate_key_pairs", "generate_shared_key", "private_key_to_bytes", "pseudo_rand_gen",
           "public_key_to_bytes", "share_keys_plaintext_concat", "share_keys_plaintext_separate"]
