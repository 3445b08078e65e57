"""Wire format of the tensors that cross the cut (``split_pb2.Tensor``), shared by the split service and its
client so that neither imports the other."""

from __future__ import annotations

import math
from typing import Literal

import torch

from pollinate.protos import split_pb2

WireDType = Literal["fp32", "fp16", "bf16"]

WIRE_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_TORCH_TO_PROTO = {
    torch.float32: split_pb2.FLOAT32,
    torch.float16: split_pb2.FLOAT16,
    torch.bfloat16: split_pb2.BFLOAT16,
    torch.int64: split_pb2.INT64,
    torch.bool: split_pb2.BOOL,
}
_PROTO_TO_TORCH = {v: k for k, v in _TORCH_TO_PROTO.items()}


class TensorDecodeError(ValueError):
    """A tensor message whose dtype, shape or byte size is inconsistent."""


def encode_tensor(tensor: torch.Tensor, dtype: torch.dtype | None = None) -> split_pb2.Tensor:
    """Tensor -> ``split_pb2.Tensor`` (dtype, shape, raw little-endian bytes), cast to ``dtype`` first."""
    tensor = tensor.detach()
    if dtype is not None and tensor.dtype != dtype:
        tensor = tensor.to(dtype)
    if tensor.dtype not in _TORCH_TO_PROTO:
        supported = sorted(map(str, _TORCH_TO_PROTO))
        raise ValueError(f"tensor dtype {tensor.dtype} cannot travel; supported: {supported}")
    # Viewing as uint8 covers bf16, which numpy has no dtype for.
    data = tensor.cpu().contiguous().view(torch.uint8).numpy().tobytes()
    return split_pb2.Tensor(dtype=_TORCH_TO_PROTO[tensor.dtype], shape=list(tensor.shape), data=data)


def declared_dtype(message: split_pb2.Tensor, *, name: str = "tensor") -> torch.dtype:
    """The torch dtype a tensor message declares (read without decoding its data)."""
    if message.dtype not in _PROTO_TO_TORCH:
        raise TensorDecodeError(f"{name}: unknown dtype code {message.dtype}")
    return _PROTO_TO_TORCH[message.dtype]


def decode_tensor(message: split_pb2.Tensor, *, name: str = "tensor") -> torch.Tensor:
    """``split_pb2.Tensor`` -> torch tensor; raises ``TensorDecodeError`` naming ``name`` on inconsistency."""
    dtype = declared_dtype(message, name=name)
    shape = tuple(int(d) for d in message.shape)
    if any(d < 0 for d in shape):
        raise TensorDecodeError(f"{name}: negative dimension in shape {shape}")
    itemsize = torch.empty((), dtype=dtype).element_size()
    expected = math.prod(shape) * itemsize
    if len(message.data) != expected:
        raise TensorDecodeError(
            f"{name}: {len(message.data)} bytes of data, expected {expected} for shape {shape} of {dtype}"
        )
    if expected == 0:
        try:
            return torch.empty(shape, dtype=dtype)
        except RuntimeError as exc:  # e.g. (0, 2**62, 2**62): torch refuses sizes whose product overflows
            raise TensorDecodeError(f"{name}: shape {shape} cannot be a tensor ({exc})") from None
    # bytearray: torch.frombuffer needs a writable buffer to avoid a warning and aliasing the message.
    return torch.frombuffer(bytearray(message.data), dtype=dtype).reshape(shape)
