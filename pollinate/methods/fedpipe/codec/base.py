"""What every encoding shares: the interface, the wire dtypes, and the checks of untrusted payload fields."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from pollinate.common.checks import UpdateRejected
from pollinate.protos import update_pb2 as pb

WIRE_DTYPE = {pb.FLOAT_DTYPE_FP32: np.dtype("<f4"), pb.FLOAT_DTYPE_FP16: np.dtype("<f2")}
WIRE_DTYPE_BY_NAME = {"fp32": pb.FLOAT_DTYPE_FP32, "fp16": pb.FLOAT_DTYPE_FP16}
_FP16_MAX = float(np.finfo(np.float16).max)


@dataclass(frozen=True)
class EncodeParams:
    """Sender-side knobs of the lossy encodings (see ``encode_bundle`` for their meaning)."""

    value_dtype: int
    topk_fraction: float
    block_size: int
    lowrank_rank: int


class Encoding:
    """One way a tensor travels.

    Subclasses set ``name`` (the config and error-message name), ``enum`` (``TensorUpdate.encoding``),
    ``payload`` (the ``TensorUpdate.payload`` oneof case it carries) and ``wire_bytes_per_param`` (bytes per
    element on the wire at the default block size and top-k fraction: what the planner charges), and implement
    ``encode`` (fill ``msg``'s encoding and payload from a finite float tensor) and ``decode`` (a float32 tensor
    of ``shape`` from a payload whose case is already checked; any inconsistency raises ``UpdateRejected``).
    """

    name: ClassVar[str]
    enum: ClassVar[int]
    payload: ClassVar[str]
    wire_bytes_per_param: ClassVar[float]

    def encode(self, msg: pb.TensorUpdate, x: np.ndarray, params: EncodeParams) -> None:
        raise NotImplementedError

    def decode(self, t: pb.TensorUpdate, shape: tuple[int, ...], numel: int) -> np.ndarray:
        raise NotImplementedError


def fmt(x: float) -> str:
    """Short number for messages: 1.2e6 rather than 1.2e+06."""
    return re.sub(r"e\+?(-?)0*(\d)", r"e\1\2", f"{x:.3g}")


def check_fp16_range(name: str, x: np.ndarray, what: str) -> None:
    peak = float(np.max(np.abs(x))) if x.size else 0.0
    if peak > _FP16_MAX:
        raise ValueError(
            f"tensor '{name}' has {what} up to {fmt(peak)}, beyond float16's range {_FP16_MAX:.0f}; "
            "use value_dtype='fp32' or a dense-fp32 encoding"
        )


def wire_dtype(name: str, value: int, field_name: str) -> np.dtype:
    """The numpy dtype of a received ``FloatDtype`` field."""
    if value not in WIRE_DTYPE:
        raise UpdateRejected(
            f"tensor '{name}' has {field_name} {value}, expected FLOAT_DTYPE_FP32 (1) or _FP16 (2)",
            reason="dtype",
            tensor=name,
        )
    return WIRE_DTYPE[value]


def check_length(name: str, field_name: str, data: bytes, expected: int) -> None:
    """A received ``bytes`` field holds exactly what the shape and encoding imply."""
    if len(data) != expected:
        raise UpdateRejected(
            f"tensor '{name}': {field_name} holds {len(data)} bytes, expected {expected} "
            "for its shape and encoding",
            reason="payload-length",
            tensor=name,
        )
