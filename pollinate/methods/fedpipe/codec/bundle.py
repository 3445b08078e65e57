"""Update bundles ↔ protobuf bytes: named tensors, each in the encoding the table names, plus versions.

``encode_bundle`` turns named tensors (numpy, as Flower ``ArrayRecord``s hold them) into a serialized
``UpdateBundle``; ``len()`` of the result is what Pollinate counts on the wire. ``decode_bundle`` treats the
payload as untrusted: every field is checked before any tensor is materialised, the decoded size is bounded
even when the caller names no shapes, and anything inconsistent raises ``UpdateRejected`` naming the tensor,
the field and what was expected; no other exception leaves it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from pollinate.common.checks import UpdateRejected
from pollinate.methods.fedpipe.codec.base import WIRE_DTYPE_BY_NAME, EncodeParams, fmt
from pollinate.methods.fedpipe.codec.blockwise import MAX_BLOCK_SIZE
from pollinate.methods.fedpipe.codec.encodings import ENCODINGS, ENCODINGS_BY_ENUM
from pollinate.protos import update_pb2 as pb

__all__ = ["FORMAT_VERSION", "MAX_DECODED_BYTES", "DecodedBundle", "decode_bundle", "encode_bundle"]

FORMAT_VERSION = 1
# Flat uint32 sparse indices bound a tensor's size; larger tensors are not LoRA-scale updates.
MAX_TENSOR_ELEMENTS = 2**32 - 1
# Decoded float32 bytes a bundle may expand into when the caller names no shapes: LoRA-scale updates, not
# whatever a few bytes of sparse or low-rank payload can declare.
MAX_DECODED_BYTES = 256 * 2**20
# Sender-side dtypes a float update may come from (bf16 travels as its numpy/ml_dtypes name).
_ORIGINAL_DTYPES = frozenset({"float16", "bfloat16", "float32", "float64"})


@dataclass
class DecodedBundle:
    """A validated bundle: float32 tensors and the versions they connect."""

    tensors: dict[str, np.ndarray]
    base_version: int
    version: int


# ---------------------------------------------------------------------------------------------- encode


def _encode_tensor(bundle: pb.UpdateBundle, name: str, x: np.ndarray, encoding: str, params: EncodeParams) -> None:
    """Append ``x`` to ``bundle`` in ``encoding`` (built in place: an appended message would be copied)."""
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown encoding '{encoding}' for tensor '{name}'; expected one of {tuple(ENCODINGS)}")
    if not np.issubdtype(x.dtype, np.floating) and str(x.dtype) != "bfloat16":
        raise ValueError(f"tensor '{name}' has dtype {x.dtype}; only floating-point updates can be encoded")
    if x.size > MAX_TENSOR_ELEMENTS:
        raise ValueError(f"tensor '{name}' has {x.size} elements, more than {MAX_TENSOR_ELEMENTS}")
    original_dtype = str(x.dtype)
    x = np.asarray(x, dtype=np.float32 if original_dtype != "float64" else np.float64)
    if not np.all(np.isfinite(x)):
        raise ValueError(f"tensor '{name}' contains NaN or Inf; refusing to send it")
    msg = bundle.tensors.add(name=name, shape=list(x.shape), original_dtype=original_dtype)
    ENCODINGS[encoding].encode(msg, x, params)


def _encode_params(topk_fraction: float, block_size: int, lowrank_rank: int, value_dtype: str) -> EncodeParams:
    if not 0.0 < topk_fraction <= 1.0:
        raise ValueError(f"topk_fraction must be in (0, 1], got {topk_fraction}")
    if not 1 <= block_size <= MAX_BLOCK_SIZE:
        raise ValueError(f"block_size must be in [1, {MAX_BLOCK_SIZE}], got {block_size}")
    if lowrank_rank < 1:
        raise ValueError(f"lowrank_rank must be >= 1, got {lowrank_rank}")
    if value_dtype not in WIRE_DTYPE_BY_NAME:
        raise ValueError(f"value_dtype must be one of {tuple(WIRE_DTYPE_BY_NAME)}, got '{value_dtype}'")
    return EncodeParams(WIRE_DTYPE_BY_NAME[value_dtype], topk_fraction, block_size, lowrank_rank)


def encode_bundle(
    tensors: Mapping[str, np.ndarray],
    encoding: str | Mapping[str, str],
    *,
    base_version: int = 0,
    version: int = 0,
    sender: str | None = None,
    round: int | None = None,
    topk_fraction: float = 0.1,
    block_size: int = 64,
    lowrank_rank: int = 4,
    value_dtype: str = "fp32",
) -> bytes:
    """Serialize named tensors as an ``UpdateBundle``.

    Parameters
    ----------
    tensors : Mapping[str, np.ndarray]
        Named floating-point tensors (usually deltas against ``base_version``).
    encoding : str or Mapping[str, str]
        One of ``ENCODINGS`` for all tensors, or one per tensor name (every name must be present).
    base_version, version : int, default 0
        The version the tensors are a delta against, and the version applying them yields.
    sender, round : optional
        Who sent the bundle and in which round, for logs.
    topk_fraction : float, default 0.1
        ``topk``: fraction of entries (largest ``|x|``) kept, at least one.
    block_size : int, default 64
        ``int8``/``nf4``: elements sharing one absmax scale.
    lowrank_rank : int, default 4
        ``lowrank``: rank of the truncated SVD of ``x.reshape(shape[0], -1)``; 1-D tensors, and tensors
        where the factors would not be smaller than the tensor, are sent dense.
    value_dtype : {"fp32", "fp16"}, default "fp32"
        Wire dtype of top-k values, low-rank factors and int8/NF4 block scales.

    Returns
    -------
    bytes
        The serialized bundle; its length is the byte count on the wire.
    """
    params = _encode_params(topk_fraction, block_size, lowrank_rank, value_dtype)
    if base_version < 0 or version < 0:
        raise ValueError(f"versions must be >= 0, got base_version={base_version}, version={version}")
    if isinstance(encoding, str):
        per_tensor = dict.fromkeys(tensors, encoding)
    else:
        missing = [name for name in tensors if name not in encoding]
        if missing:
            raise ValueError(f"no encoding given for tensors {missing}")
        per_tensor = {name: encoding[name] for name in tensors}
    bundle = pb.UpdateBundle(format_version=FORMAT_VERSION, base_version=base_version, version=version)
    if sender is not None:
        bundle.sender = sender
    if round is not None:
        bundle.round = round
    for name, x in tensors.items():
        if not name:
            raise ValueError("tensor names must be non-empty")
        _encode_tensor(bundle, name, np.asarray(x), per_tensor[name], params)
    return bundle.SerializeToString()


# ---------------------------------------------------------------------------------------------- decode


def _parse(payload: bytes, max_bytes: int | None) -> pb.UpdateBundle:
    if max_bytes is not None and len(payload) > max_bytes:
        raise UpdateRejected(f"payload of {len(payload)} bytes exceeds max_bytes={max_bytes}", reason="size")
    bundle = pb.UpdateBundle()
    try:
        bundle.ParseFromString(bytes(payload))
    except Exception as exc:  # upb reports truncation and bad UTF-8 as DecodeError; bytes() raises TypeError
        raise UpdateRejected(
            f"payload of {len(payload)} bytes is not a valid UpdateBundle ({str(exc)[:200]})", reason="garbled"
        ) from exc
    if bundle.format_version != FORMAT_VERSION:
        raise UpdateRejected(
            f"UpdateBundle.format_version is {bundle.format_version}, this build reads {FORMAT_VERSION} "
            "(a garbled payload or a sender from another release)",
            reason="version",
        )
    return bundle


def _checked_shape(t: pb.TensorUpdate, seen: Mapping[str, object],
                   expected_shapes: Mapping[str, tuple[int, ...]] | None) -> tuple[tuple[int, ...], int]:
    """(shape, elements) of a tensor whose header is acceptable: named, new, expected, sized, float."""
    name = t.name
    if not name:
        raise UpdateRejected("a TensorUpdate has an empty name", reason="unknown-tensor")
    if name in seen:
        raise UpdateRejected(f"tensor '{name}' appears twice in the bundle", reason="duplicate", tensor=name)
    shape = tuple(int(d) for d in t.shape)
    if expected_shapes is not None:
        if name not in expected_shapes:
            raise UpdateRejected(f"unknown tensor '{name}': not among the {len(expected_shapes)} expected tensors",
                                 reason="unknown-tensor", tensor=name)
        expected = tuple(int(d) for d in expected_shapes[name])
        if shape != expected:
            raise UpdateRejected(f"tensor '{name}' has shape {shape}, expected {expected}", reason="shape",
                                 tensor=name)
    numel = math.prod(shape)
    # A zero-size tensor may still name a dimension numpy cannot hold; every dimension is bounded too.
    if numel > MAX_TENSOR_ELEMENTS or any(d > MAX_TENSOR_ELEMENTS for d in shape):
        raise UpdateRejected(f"tensor '{name}' has shape {shape} ({numel} elements), more than {MAX_TENSOR_ELEMENTS}",
                             reason="shape", tensor=name)
    if t.original_dtype not in _ORIGINAL_DTYPES:
        raise UpdateRejected(
            f"tensor '{name}' has original_dtype '{t.original_dtype}', expected one of {sorted(_ORIGINAL_DTYPES)}",
            reason="dtype", tensor=name)
    return shape, numel


def _decode_tensor(t: pb.TensorUpdate, shape: tuple[int, ...], numel: int) -> np.ndarray:
    name = t.name
    encoding = ENCODINGS_BY_ENUM.get(t.encoding)
    if encoding is None:
        raise UpdateRejected(f"tensor '{name}' has unknown encoding {t.encoding}; expected one of {tuple(ENCODINGS)}",
                             reason="encoding", tensor=name)
    case = t.WhichOneof("payload")
    if case != encoding.payload:
        raise UpdateRejected(f"tensor '{name}' is encoded as {encoding.name} but carries a '{case}' payload, "
                             f"expected '{encoding.payload}'", reason="encoding", tensor=name)
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow becomes Inf, which is rejected next
        x = encoding.decode(t, shape, numel)
    if not np.all(np.isfinite(x)):
        raise UpdateRejected(f"tensor '{name}' contains NaN or Inf", reason="non-finite", tensor=name)
    return x


def _decoded_limit(expected_shapes: Mapping[str, tuple[int, ...]] | None, max_decoded_bytes: int | None) -> int:
    if max_decoded_bytes is not None:
        return max_decoded_bytes
    if expected_shapes is not None:  # shapes are checked exactly, so what they total is all that can arrive
        return 4 * sum(math.prod(int(d) for d in shape) for shape in expected_shapes.values())
    return MAX_DECODED_BYTES


def _decode(payload: bytes, expected_shapes: Mapping[str, tuple[int, ...]] | None, max_bytes: int | None,
            max_decoded_bytes: int | None, norm_bound: float | None, require_all: bool) -> DecodedBundle:
    bundle = _parse(payload, max_bytes)
    limit = _decoded_limit(expected_shapes, max_decoded_bytes)
    headers: dict[str, tuple[tuple[int, ...], int]] = {}
    decoded_bytes = 0
    for t in bundle.tensors:  # every header first: a few payload bytes can declare gigabytes
        headers[t.name] = _checked_shape(t, headers, expected_shapes)
        decoded_bytes += 4 * headers[t.name][1]
        if decoded_bytes > limit:
            raise UpdateRejected(f"tensor '{t.name}' brings the decoded bundle to {decoded_bytes} bytes, more than "
                                 f"the {limit} allowed", reason="size", tensor=t.name)
    tensors = {t.name: _decode_tensor(t, *headers[t.name]) for t in bundle.tensors}
    if require_all and expected_shapes is not None:
        missing = sorted(set(expected_shapes) - tensors.keys())
        if missing:
            raise UpdateRejected(f"bundle lacks {len(missing)} expected tensors, e.g. '{missing[0]}'",
                                 reason="unknown-tensor", tensor=missing[0])
    if norm_bound is not None:
        norm = math.sqrt(sum(float(np.sum(np.square(x, dtype=np.float64))) for x in tensors.values()))
        if norm > norm_bound:
            raise UpdateRejected(f"L2 norm {fmt(norm)} exceeds the bound {fmt(norm_bound)}", reason="norm")
    return DecodedBundle(tensors=tensors, base_version=bundle.base_version, version=bundle.version)


def decode_bundle(
    payload: bytes,
    *,
    expected_shapes: Mapping[str, tuple[int, ...]] | None = None,
    max_bytes: int | None = None,
    max_decoded_bytes: int | None = None,
    norm_bound: float | None = None,
    require_all: bool = False,
) -> DecodedBundle:
    """Parse and validate a serialized ``UpdateBundle``.

    Parameters
    ----------
    payload : bytes
        What arrived on the wire.
    expected_shapes : Mapping[str, tuple[int, ...]], optional
        Tensors the receiver accepts and their shapes; any other name is rejected. Servers should always
        pass it.
    max_bytes : int, optional
        Reject payloads larger than this before parsing.
    max_decoded_bytes : int, optional
        Reject bundles whose tensors total more float32 bytes than this, before allocating them. Default: what
        ``expected_shapes`` total, or ``MAX_DECODED_BYTES`` without them.
    norm_bound : float, optional
        Reject bundles whose global L2 norm (over all tensors) exceeds this.
    require_all : bool, default False
        With ``expected_shapes``, also reject bundles that lack one of its tensors.

    Raises
    ------
    UpdateRejected
        The only exception it raises: a message naming the tensor and field, and ``reason`` for metrics
        (``"garbled"`` for a failure no check anticipated).
    """
    try:
        return _decode(payload, expected_shapes, max_bytes, max_decoded_bytes, norm_bound, require_all)
    except UpdateRejected:
        raise
    except Exception as exc:  # MemoryError, OverflowError, a numpy error on a payload no check anticipated
        raise UpdateRejected(f"payload could not be decoded ({type(exc).__name__}: {str(exc)[:200]})",
                             reason="garbled") from exc
