"""One client's reply to a SecAgg+ stage, checked before the protocol uses any of it (``server.secagg``).

Everything in a stage reply is peer-supplied: each reader returns what the stage needs or raises
``StageReplyError`` with a one-line reason, and the caller drops that client from the protocol. Sizes are bounded
before anything is parsed, node ids must be the ones the server asked about, lists must pair up, keys must be
public keys on Flower's curve, and a secret share must carry the index its owner gave that holder.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.app import ConfigRecord, RecordDict
from flwr.common.secure_aggregation.crypto.shamir import create_shares
from flwr.common.secure_aggregation.secaggplus_constants import Key
from flwr.supercore.primitives.asymmetric import bytes_to_public_key, generate_key_pairs, private_key_to_bytes

from pollinate.common.checks import UpdateRejected
from pollinate.common.secagg import MASKED_RECORD, SECAGG_RECORD, masked_layout
from pollinate.common.wire import record_to_arrays

# Flower's key pairs (flwr.supercore.primitives.asymmetric) are on this curve; a PEM public key is ~215 bytes.
CURVE = ec.SECP384R1
MAX_PUBLIC_KEY_BYTES = 1024
# A Fernet token of one (src, dst, seed share, key share) plaintext is ~700 bytes.
MAX_CIPHERTEXT_BYTES = 4096
# Flower's mask seed is 32 random bytes.
SEED_BYTES = 32


class StageReplyError(ValueError):
    """A client's stage reply that the protocol cannot use; the message says why in one line."""


def stage_record(content: RecordDict) -> ConfigRecord:
    """The reply's SecAgg ConfigRecord."""
    record = content.config_records.get(SECAGG_RECORD)
    if not isinstance(record, ConfigRecord):
        raise StageReplyError(f"reply has no '{SECAGG_RECORD}' ConfigRecord")
    return record


def public_keys(record: ConfigRecord) -> tuple[bytes, bytes]:
    """Setup: the client's two public keys (pk1 for pairwise masks, pk2 for encrypting shares), distinct and on
    Flower's curve."""
    pk1, pk2 = (_bytes_value(record, key, MAX_PUBLIC_KEY_BYTES) for key in (Key.PUBLIC_KEY_1, Key.PUBLIC_KEY_2))
    if pk1 == pk2:
        raise StageReplyError("setup reply sends the same public key twice")
    for name, raw in ((Key.PUBLIC_KEY_1, pk1), (Key.PUBLIC_KEY_2, pk2)):
        try:
            key = bytes_to_public_key(raw)
        except Exception as exc:  # noqa: BLE001  (peer bytes: cryptography raises several types)
            raise StageReplyError(f"setup reply's '{name}' is not a PEM public key ({type(exc).__name__})") from None
        if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, CURVE):
            raise StageReplyError(f"setup reply's '{name}' is not an EC public key on {CURVE.name}")
    return pk1, pk2


def encrypted_shares(record: ConfigRecord, expected: set[int]) -> dict[int, bytes]:
    """Share keys: destination node -> the ciphertext of the client's shares for it; exactly one per node of
    ``expected`` (the client's neighbours that completed setup, itself excluded)."""
    destinations = _int_list(record, Key.DESTINATION_LIST, len(expected))
    ciphertexts = _bytes_list(record, Key.CIPHERTEXT_LIST, len(expected), MAX_CIPHERTEXT_BYTES)
    if len(destinations) != len(ciphertexts):
        raise StageReplyError(f"share-keys reply pairs {len(destinations)} destinations with {len(ciphertexts)} "
                              "ciphertexts")
    _same_nodes(destinations, expected, "share-keys reply")
    return dict(zip(destinations, ciphertexts, strict=True))


def secret_shares(record: ConfigRecord, asked: list[int], index_of: dict[int, int],
                  lengths: dict[int, int]) -> dict[int, bytes]:
    """Unmask: owner node -> the client's share of that owner's secret, for exactly the nodes ``asked``; the share
    starts with its Shamir index (``index_of[owner]``, what the owner gave this holder) and is ``lengths[owner]``
    bytes long (a mask seed's or a private key's share)."""
    owners = _int_list(record, Key.NODE_ID_LIST, len(asked))
    shares = _bytes_list(record, Key.SHARE_LIST, len(asked), max(lengths.values(), default=0))
    if len(owners) != len(shares):
        raise StageReplyError(f"unmask reply pairs {len(owners)} node ids with {len(shares)} shares")
    _same_nodes(owners, set(asked), "unmask reply")
    for owner, share in zip(owners, shares, strict=True):
        if len(share) != lengths[owner]:
            raise StageReplyError(f"unmask reply's share for node {owner} has {len(share)} bytes, expected "
                                  f"{lengths[owner]}")
        if int.from_bytes(share[:4], "little") != index_of[owner]:
            raise StageReplyError(f"unmask reply's share for node {owner} has index "
                                  f"{int.from_bytes(share[:4], 'little')}, expected {index_of[owner]}")
    return dict(zip(owners, shares, strict=True))


def masked_update(content: RecordDict, shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Collect: the masked vector of a training reply, its names and shapes checked before loading, uint32."""
    if MASKED_RECORD not in content.array_records:
        raise UpdateRejected(f"reply has no '{MASKED_RECORD}' ArrayRecord (secure aggregation)", reason="garbled")
    if "arrays" in content.array_records:
        raise UpdateRejected("reply sends its state in the clear under secure aggregation", reason="garbled")
    arrays = record_to_arrays(content.array_records[MASKED_RECORD], dict(masked_layout(shapes)))
    for name, value in arrays.items():
        if value.dtype != np.uint32:
            raise UpdateRejected(f"masked tensor '{name}' has dtype {value.dtype}, expected uint32", reason="dtype",
                                 tensor=name)
    return arrays


@functools.cache
def share_length(secret_bytes: int) -> int:
    """Bytes of one Flower Shamir share of a ``secret_bytes``-long secret (index + 16 per padded block)."""
    return len(create_shares(b"\0" * secret_bytes, 2, 2)[0])


@functools.cache
def private_key_share_length() -> int:
    """Bytes of one share of a Flower private key (PEM PKCS8 on ``CURVE``: a fixed length)."""
    return share_length(len(private_key_to_bytes(generate_key_pairs()[0])))


def _same_nodes(named: list[int], expected: set[int], what: str) -> None:
    if len(set(named)) != len(named):
        raise StageReplyError(f"{what} names a node id twice")
    if set(named) != expected:
        extra, missing = sorted(set(named) - expected), sorted(expected - set(named))
        raise StageReplyError(f"{what} names node ids {extra[:3]} outside the ones asked about" if extra else
                              f"{what} leaves out node ids {missing[:3]}")


def _value(record: ConfigRecord, key: str) -> Any:
    if key not in record:
        raise StageReplyError(f"reply has no '{key}'")
    return record[key]


def _bytes_value(record: ConfigRecord, key: str, limit: int) -> bytes:
    value = _value(record, key)
    if not isinstance(value, bytes) or not 0 < len(value) <= limit:
        raise StageReplyError(f"reply's '{key}' is not 1 to {limit} bytes")
    return value


def _int_list(record: ConfigRecord, key: str, max_items: int) -> list[int]:
    value = _list(record, key, max_items)
    if any(isinstance(item, bool) or not isinstance(item, int) for item in value):
        raise StageReplyError(f"reply's '{key}' is not a list of node ids")
    return list(value)


def _bytes_list(record: ConfigRecord, key: str, max_items: int, limit: int) -> list[bytes]:
    value = _list(record, key, max_items)
    if any(not isinstance(item, bytes) or not 0 < len(item) <= limit for item in value):
        raise StageReplyError(f"reply's '{key}' is not a list of 1 to {limit} byte strings")
    return list(value)


def _list(record: ConfigRecord, key: str, max_items: int) -> Iterable[Any]:
    value = _value(record, key)
    if not isinstance(value, list) or len(value) > max_items:
        raise StageReplyError(f"reply's '{key}' is not a list of at most {max_items} items")
    return value
