"""What both sides of secure aggregation (SecAgg+, ``privacy.secure_aggregation``; docs/privacy.md) agree on: the
record names of the stage messages, the masked vector's layout, the modulus and the mask generator.

Every stage message is a TRAIN message holding a ``ConfigRecord`` under ``SECAGG_RECORD`` with Flower's stage keys
(``flwr.common.secure_aggregation.secaggplus_constants.Key``) plus ``ROUND_KEY``; the setup, share-keys and unmask
stages carry nothing else, the collect stage is the round's train message itself. A client answers the collect
stage with its masked update under ``MASKED_RECORD`` (no ``arrays``): one uint32 array per tensor of the global
state and ``COUNT_TENSOR``, a 1 that every client adds, so the unmasked sum says how many vectors are in it.

Masks are uniform on [0, 2^32) and arithmetic is uint32's own wrap-around (mod 2^32). They come from ChaCha20
keyed by SHA-256 of the seed (``mask_stream``), not from Flower's ``pseudo_rand_gen``, which folds the 32-byte seed
into 32 bits for NumPy's Mersenne Twister: a mask then has only 2^32 candidates, few enough for a server to search
(a client's quantized update sits near the middle of its range, which tells a right guess from a wrong one).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

# The ConfigRecord of every stage message and reply.
SECAGG_RECORD = "secagg"
# The round a stage message belongs to (a client refuses a stage of another round than its setup's).
ROUND_KEY = "server-round"
# The ArrayRecord of a collect-stage reply: the masked, quantized update.
MASKED_RECORD = "secagg-masked"
# The masked vector's first array: each client's 1 (the unmasked sum counts the vectors in it).
COUNT_TENSOR = "secagg-count"
# Masked entries are uint32: every sum is modulo 2^32.
MOD_RANGE = 2**32
# Every client's weight (Flower's max_weight scales updates by weight / max_weight): an equal-weight mean.
MAX_WEIGHT = 1.0
# Every key seeds one stream per round (keys and seeds are drawn afresh at each setup): a fixed nonce is safe.
_NONCE = bytes(16)


def masked_layout(shapes: Mapping[str, tuple[int, ...]]) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of the masked vector's arrays in the order masks are drawn: the count, then the state's
    tensors by name."""
    return [(COUNT_TENSOR, (1,)), *((name, tuple(shapes[name])) for name in sorted(shapes))]


def mask_stream(seed: bytes, shapes: list[tuple[int, ...]]) -> list[np.ndarray]:
    """Uniform uint32 masks of ``shapes`` from ``seed`` (a mask seed or a pairwise shared key): the ChaCha20
    keystream (``cryptography``) under SHA-256(seed), read as little-endian uint32, tensor after tensor."""
    encryptor = Cipher(algorithms.ChaCha20(hashlib.sha256(seed).digest(), _NONCE), mode=None).encryptor()
    return [np.frombuffer(encryptor.update(bytes(4 * math.prod(shape))), dtype="<u4").astype(np.uint32).reshape(shape)
            for shape in shapes]


def add_masks(vector: list[np.ndarray], masks: list[np.ndarray], sign: int) -> list[np.ndarray]:
    """``vector`` plus (``sign`` 1) or minus (``sign`` -1) ``masks``, modulo 2^32."""
    return [np.add(v, m) if sign > 0 else np.subtract(v, m) for v, m in zip(vector, masks, strict=True)]
