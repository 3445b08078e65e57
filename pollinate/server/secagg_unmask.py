"""The unmask arithmetic of SecAgg+ on the server: from the sum of the masked vectors and the secrets rebuilt from
the survivors' shares to the equal-weight mean of the clients' updates. A port of the last half of Flower's
``SecAggPlusWorkflow.unmask_stage`` onto Flower's primitives (Shamir, ECDH, the dequantizer) and the shared mask
generator (``common.secagg.mask_stream``), with a dropped client's pairwise masks removed only for the neighbours
whose vectors are in the sum.
"""

from __future__ import annotations

import numpy as np
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.common.secure_aggregation.quantization import dequantize
from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key, public_key_to_bytes

from pollinate.common.secagg import add_masks, mask_stream


class SecureAggregationFailed(RuntimeError):
    """The round's secure aggregation cannot finish (too few clients or shares); the global model stays."""


def masked_sum(vectors: list[dict[str, np.ndarray]], layout: list[tuple[str, tuple[int, ...]]]) -> list[np.ndarray]:
    """The sum of the clients' masked vectors modulo 2^32, in mask order."""
    total = [np.zeros(shape, dtype=np.uint32) for _, shape in layout]
    for vector in vectors:
        total = add_masks(total, [vector[name] for name, _ in layout], 1)
    return total


def rebuild_secret(owner: int, shares: list[bytes], threshold: int, what: str) -> bytes:
    """``owner``'s secret from at least ``threshold`` Shamir shares (Flower's ``combine_shares``)."""
    if len(shares) < threshold:
        raise SecureAggregationFailed(f"only {len(shares)} shares of node {owner}'s {what} came back, "
                                      f"privacy.secagg_reconstruction_threshold needs {threshold}")
    try:
        return combine_shares(shares)
    except Exception as exc:  # noqa: BLE001  (well-formed but wrong shares: PyCryptodome raises several types)
        raise SecureAggregationFailed(f"node {owner}'s {what} cannot be rebuilt from its shares "
                                      f"({type(exc).__name__})") from None


def checked_private_key(owner: int, secret: bytes, public_key: bytes) -> bytes:
    """A dropped client's rebuilt private key, checked against the public key it sent at setup."""
    try:
        rebuilt = public_key_to_bytes(bytes_to_private_key(secret).public_key())
    except Exception as exc:  # noqa: BLE001  (a wrong rebuild is not a PEM key: several types)
        raise SecureAggregationFailed(f"node {owner}'s rebuilt key is not a private key "
                                      f"({type(exc).__name__})") from None
    if rebuilt != public_key:
        raise SecureAggregationFailed(f"node {owner}'s rebuilt key does not match the public key it sent: a share "
                                      "was wrong")
    return secret


def remove_masks(total: list[np.ndarray], layout: list[tuple[str, tuple[int, ...]]], seeds: dict[int, bytes],
                 dropped: dict[int, tuple[bytes, list[tuple[int, bytes]]]]) -> list[np.ndarray]:
    """``total`` minus the private mask of every survivor (``seeds``: node -> mask seed) and minus the pairwise
    masks that each dropped client's neighbours added for it (``dropped``: node -> (its private key, its
    surviving neighbours as (node, pk1) pairs)), modulo 2^32."""
    shapes = [shape for _, shape in layout]
    for seed in seeds.values():
        total = add_masks(total, mask_stream(seed, shapes), -1)
    for node, (private_key, neighbours) in dropped.items():
        for neighbour, public_key in neighbours:
            shared = generate_shared_key(bytes_to_private_key(private_key), bytes_to_public_key(public_key))
            # The survivor added the mask when its id is the larger one, subtracted it otherwise.
            total = add_masks(total, mask_stream(shared, shapes), -1 if neighbour > node else 1)
    return total


def dequantized_mean(unmasked: list[np.ndarray], layout: list[tuple[str, tuple[int, ...]]], survivors: int,
                     clipping_range: float, quantization_range: int) -> dict[str, np.ndarray]:
    """The mean update from the unmasked sum of ``survivors`` quantized updates: Flower's dequantization (the sum
    carries ``survivors`` offsets of ``clipping_range``), divided by ``survivors``, which the unmasked count must
    equal (else a vector or a share was not what it claimed)."""
    count, vectors = int(unmasked[0][0]), unmasked[1:]
    if count != survivors:
        raise SecureAggregationFailed(f"the unmasked vectors count {count} clients, expected {survivors}: a client's "
                                      "masked vector or shares were inconsistent")
    summed = dequantize(vectors, clipping_range, quantization_range)
    offset = -(survivors - 1) * clipping_range
    return {name: (vector + offset) / survivors for (name, _), vector in zip(layout[1:], summed, strict=True)}
