"""The encodings a tensor can travel in, one class each, and the table that chooses among them by name."""

from __future__ import annotations

import numpy as np

from pollinate.common.checks import UpdateRejected
from pollinate.methods.fedpipe.codec.base import (
    WIRE_DTYPE,
    EncodeParams,
    Encoding,
    check_fp16_range,
    check_length,
    wire_dtype,
)
from pollinate.methods.fedpipe.codec.blockwise import Int8, Nf4
from pollinate.methods.fedpipe.config import ENCODING_CHOICES
from pollinate.methods.fedpipe.lowrank import factorize_delta
from pollinate.protos import update_pb2 as pb

__all__ = ["ENCODINGS", "ENCODINGS_BY_ENUM", "WIRE_BYTES_PER_PARAM"]


class _Dense(Encoding):
    """Every element at one float dtype."""

    payload = "dense"
    dtype: int

    def encode(self, msg: pb.TensorUpdate, x: np.ndarray, params: EncodeParams) -> None:
        if self.dtype == pb.FLOAT_DTYPE_FP16:
            check_fp16_range(msg.name, x, "values")
        msg.encoding = self.enum
        msg.dense.CopyFrom(pb.Dense(dtype=self.dtype, data=x.astype(WIRE_DTYPE[self.dtype]).tobytes()))

    def decode(self, t: pb.TensorUpdate, shape: tuple[int, ...], numel: int) -> np.ndarray:
        if t.dense.dtype != self.dtype:
            raise UpdateRejected(
                f"tensor '{t.name}' is {self.name} but its Dense.dtype is {t.dense.dtype}, expected {self.dtype}",
                reason="dtype",
                tensor=t.name,
            )
        dt = WIRE_DTYPE[self.dtype]
        check_length(t.name, "Dense.data", t.dense.data, numel * dt.itemsize)
        return np.frombuffer(t.dense.data, dtype=dt).astype(np.float32).reshape(shape)


class DenseFp32(_Dense):
    """Lossless float32."""

    name, enum, dtype, wire_bytes_per_param = "dense-fp32", pb.ENCODING_DENSE_FP32, pb.FLOAT_DTYPE_FP32, 4.0


class DenseFp16(_Dense):
    """float16 (values beyond its range are refused on the sender)."""

    name, enum, dtype, wire_bytes_per_param = "dense-fp16", pb.ENCODING_DENSE_FP16, pb.FLOAT_DTYPE_FP16, 2.0


def _topk_count(numel: int, fraction: float) -> int:
    # round(), not ceil(): 0.1 * 30 is 3.0000000000000004 in floating point.
    return max(1, min(numel, int(round(fraction * numel))))


class TopK(Encoding):
    """The ``topk_fraction`` largest-magnitude entries (at least one) as uint32 flat indices and values."""

    # A uint32 index and an fp32 value per kept entry, at the default fraction 0.1.
    name, enum, payload, wire_bytes_per_param = "topk", pb.ENCODING_TOPK, "sparse", 0.8

    def encode(self, msg: pb.TensorUpdate, x: np.ndarray, params: EncodeParams) -> None:
        flat = x.reshape(-1)
        k = _topk_count(flat.size, params.topk_fraction) if flat.size else 0
        idx = np.sort(np.argpartition(np.abs(flat), flat.size - k)[flat.size - k :]) if k else np.zeros(0, int)
        values = flat[idx]
        if params.value_dtype == pb.FLOAT_DTYPE_FP16:
            check_fp16_range(msg.name, values, "values")
        msg.encoding = self.enum
        msg.sparse.CopyFrom(pb.Sparse(indices=idx.astype("<u4").tobytes(), value_dtype=params.value_dtype,
                                      values=values.astype(WIRE_DTYPE[params.value_dtype]).tobytes(),
                                      numel=flat.size))

    def decode(self, t: pb.TensorUpdate, shape: tuple[int, ...], numel: int) -> np.ndarray:
        name, sp = t.name, t.sparse
        if sp.numel != numel:
            raise UpdateRejected(f"tensor '{name}' has Sparse.numel {sp.numel}, expected {numel} for shape {shape}",
                                 reason="payload-length", tensor=name)
        vdt = wire_dtype(name, sp.value_dtype, "Sparse.value_dtype")
        if len(sp.indices) % 4:
            raise UpdateRejected(f"tensor '{name}': Sparse.indices holds {len(sp.indices)} bytes, "
                                 "expected a multiple of 4 (uint32)", reason="payload-length", tensor=name)
        k = len(sp.indices) // 4
        check_length(name, "Sparse.values", sp.values, k * vdt.itemsize)
        idx = np.frombuffer(sp.indices, dtype="<u4").astype(np.int64)
        if k and (idx[-1] >= numel or np.any(np.diff(idx) <= 0)):
            raise UpdateRejected(f"tensor '{name}' has sparse indices that are not strictly increasing below {numel}",
                                 reason="index", tensor=name)
        dense = np.zeros(numel, dtype=np.float32)
        dense[idx] = np.frombuffer(sp.values, dtype=vdt)
        return dense.reshape(shape)


class LowRank(Encoding):
    """Truncated SVD ``x.reshape(shape[0], -1) ≈ u @ v`` at ``lowrank_rank``; dense where that saves nothing."""

    name, enum, payload, wire_bytes_per_param = "lowrank", pb.ENCODING_LOWRANK, "lowrank", 2.0

    def encode(self, msg: pb.TensorUpdate, x: np.ndarray, params: EncodeParams) -> None:
        matrix = x.reshape(x.shape[0], -1) if x.ndim >= 2 else None
        rank = min(params.lowrank_rank, *matrix.shape) if matrix is not None and matrix.size else 0
        # A rank-r factorisation stores r·(m+n) numbers; where that is not below m·n (or the tensor is
        # 1-D) it saves nothing, so the tensor goes dense at the same value dtype.
        if matrix is None or rank < 1 or rank * sum(matrix.shape) >= matrix.size:
            dense = DenseFp16 if params.value_dtype == pb.FLOAT_DTYPE_FP16 else DenseFp32
            dense().encode(msg, x, params)
            return
        factors, _ = factorize_delta(matrix, rank, alpha=float(rank))  # scaling 1: ΔW = B @ A
        if params.value_dtype == pb.FLOAT_DTYPE_FP16:
            check_fp16_range(msg.name, np.concatenate([factors.b.ravel(), factors.a.ravel()]), "factors")
        wire = WIRE_DTYPE[params.value_dtype]
        msg.encoding = self.enum
        msg.lowrank.CopyFrom(pb.LowRank(rank=rank, dtype=params.value_dtype, u=factors.b.astype(wire).tobytes(),
                                        v=factors.a.astype(wire).tobytes()))

    def decode(self, t: pb.TensorUpdate, shape: tuple[int, ...], numel: int) -> np.ndarray:
        name, lr = t.name, t.lowrank
        if len(shape) < 2 or numel == 0:
            raise UpdateRejected(
                f"tensor '{name}' has shape {shape}; low-rank payloads need a non-empty tensor of >= 2 dims",
                reason="encoding", tensor=name)
        rows = shape[0]
        cols = numel // rows
        if not 1 <= lr.rank <= min(rows, cols):
            raise UpdateRejected(
                f"tensor '{name}' has LowRank.rank {lr.rank}, expected 1..{min(rows, cols)} for shape {shape}",
                reason="encoding", tensor=name)
        vdt = wire_dtype(name, lr.dtype, "LowRank.dtype")
        check_length(name, "LowRank.u", lr.u, rows * lr.rank * vdt.itemsize)
        check_length(name, "LowRank.v", lr.v, lr.rank * cols * vdt.itemsize)
        u = np.frombuffer(lr.u, dtype=vdt).astype(np.float32).reshape(rows, lr.rank)
        v = np.frombuffer(lr.v, dtype=vdt).astype(np.float32).reshape(lr.rank, cols)
        if not (np.all(np.isfinite(u)) and np.all(np.isfinite(v))):
            raise UpdateRejected(f"tensor '{name}' has NaN or Inf factors", reason="non-finite", tensor=name)
        return (u @ v).reshape(shape)


ENCODINGS: dict[str, Encoding] = {e.name: e for e in (DenseFp32(), DenseFp16(), Int8(), Nf4(), TopK(), LowRank())}
ENCODINGS_BY_ENUM: dict[int, Encoding] = {e.enum: e for e in ENCODINGS.values()}
# Bytes per adapter parameter on the wire, per encoding (what the planner's time model charges).
WIRE_BYTES_PER_PARAM: dict[str, float] = {name: e.wire_bytes_per_param for name, e in ENCODINGS.items()}
if tuple(ENCODINGS) != ENCODING_CHOICES:  # the config validates names the codec must be able to send
    raise RuntimeError(f"the codec's encodings {tuple(ENCODINGS)} differ from fedpipe.config's {ENCODING_CHOICES}")
