"""Blockwise absmax quantisation: int8 and NF4 codes with one scale per block of elements.

Written in numpy rather than through ``bitsandbytes.functional``: the coordinator decodes and validates
payloads without torch tensors, bitsandbytes' CPU kernels accept only some block sizes and its packed
layout/QuantState is not a wire format. The NF4 codebook and nibble order are bitsandbytes' (a test pins the
codes to ``bitsandbytes.functional.quantize_4bit``).
"""

from __future__ import annotations

import numpy as np

from pollinate.common.checks import UpdateRejected
from pollinate.methods.fedpipe.codec import base
from pollinate.protos import update_pb2 as pb

MAX_BLOCK_SIZE = 1 << 20

# QLoRA's NormalFloat4 levels (Dettmers et al. 2023), as bitsandbytes.functional.get_4bit_type("nf4").
NF4_CODEBOOK = np.array(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=np.float32,
)  # fmt: skip
_NF4_MIDPOINTS = (NF4_CODEBOOK[1:] + NF4_CODEBOOK[:-1]) / 2


class _Blockwise(base.Encoding):
    """Shared by int8 and NF4: blocks of ``block_size`` elements, each scaled by its absmax."""

    payload = "blockwise"
    kind: int
    scale_divisor: float  # scale = absmax / scale_divisor

    def quantise(self, normed: np.ndarray, numel: int) -> bytes:
        """Codes of the block-normalised values (in [-1, 1] x scale_divisor), flattened to ``numel``."""
        raise NotImplementedError

    def dequantise(self, name: str, codes: bytes, numel: int) -> np.ndarray:
        """Normalised float32 values of ``numel`` elements from the received codes."""
        raise NotImplementedError

    def encode(self, msg: pb.TensorUpdate, x: np.ndarray, params: base.EncodeParams) -> None:
        flat = x.reshape(-1).astype(np.float64)
        numel, block_size = flat.size, params.block_size
        n_blocks = -(-numel // block_size)
        blocks = np.zeros(n_blocks * block_size)
        blocks[:numel] = flat
        blocks = blocks.reshape(n_blocks, block_size)
        absmax = np.max(np.abs(blocks), axis=1) if n_blocks else np.zeros(0)
        scales = absmax / self.scale_divisor
        if params.value_dtype == pb.FLOAT_DTYPE_FP16:
            base.check_fp16_range(msg.name, scales, "block scales")
        # Quantise against the scales as they will arrive, so fp16 rounding of a scale costs no extra error.
        wire_scales = scales.astype(base.WIRE_DTYPE[params.value_dtype])
        s = wire_scales.astype(np.float64)[:, None]
        normed = np.divide(blocks, s, out=np.zeros_like(blocks), where=s > 0)
        msg.encoding = self.enum
        msg.blockwise.CopyFrom(pb.Blockwise(kind=self.kind, block_size=block_size, scale_dtype=params.value_dtype,
                                            scales=wire_scales.tobytes(), codes=self.quantise(normed, numel)))

    def decode(self, t: pb.TensorUpdate, shape: tuple[int, ...], numel: int) -> np.ndarray:
        name, bw = t.name, t.blockwise
        if bw.kind != self.kind:
            raise UpdateRejected(
                f"tensor '{name}' is {self.name} but its Blockwise.kind is {bw.kind}, expected {self.kind}",
                reason="encoding",
                tensor=name,
            )
        if not 1 <= bw.block_size <= MAX_BLOCK_SIZE:
            raise UpdateRejected(
                f"tensor '{name}' has block_size {bw.block_size}, expected 1..{MAX_BLOCK_SIZE}",
                reason="encoding",
                tensor=name,
            )
        sdt = base.wire_dtype(name, bw.scale_dtype, "Blockwise.scale_dtype")
        n_blocks = -(-numel // bw.block_size)
        base.check_length(name, "Blockwise.scales", bw.scales, n_blocks * sdt.itemsize)
        scales = np.frombuffer(bw.scales, dtype=sdt).astype(np.float32)
        if not np.all(np.isfinite(scales)) or np.any(scales < 0):
            raise UpdateRejected(
                f"tensor '{name}' has negative or non-finite block scales", reason="non-finite", tensor=name
            )
        values = self.dequantise(name, bw.codes, numel)
        return (values * np.repeat(scales, bw.block_size)[:numel]).reshape(shape)


class Int8(_Blockwise):
    """Symmetric absmax int8: ``x ≈ code x absmax / 127`` with codes in [-127, 127]."""

    name, enum, kind, scale_divisor, wire_bytes_per_param = "int8", pb.ENCODING_INT8, pb.BLOCK_KIND_INT8, 127.0, 1.07

    def quantise(self, normed: np.ndarray, numel: int) -> bytes:
        return np.clip(np.rint(normed), -127, 127).astype(np.int8).reshape(-1)[:numel].tobytes()

    def dequantise(self, name: str, codes: bytes, numel: int) -> np.ndarray:
        base.check_length(name, "Blockwise.codes", codes, numel)
        values = np.frombuffer(codes, dtype=np.int8).astype(np.float32)
        if np.any(values == -128):
            raise UpdateRejected(
                f"tensor '{name}' has int8 code -128, outside the symmetric range [-127, 127]",
                reason="encoding",
                tensor=name,
            )
        return values


class Nf4(_Blockwise):
    """QLoRA NormalFloat4: ``x ≈ NF4[code] x absmax``, two codes per byte, the first in the high nibble."""

    name, enum, kind, scale_divisor, wire_bytes_per_param = "nf4", pb.ENCODING_NF4, pb.BLOCK_KIND_NF4, 1.0, 0.57

    def quantise(self, normed: np.ndarray, numel: int) -> bytes:
        idx = np.searchsorted(_NF4_MIDPOINTS, np.clip(normed, -1.0, 1.0)).astype(np.uint8).reshape(-1)[:numel]
        if numel % 2:
            idx = np.append(idx, np.uint8(0))
        return ((idx[0::2] << 4) | idx[1::2]).astype(np.uint8).tobytes()

    def dequantise(self, name: str, codes: bytes, numel: int) -> np.ndarray:
        base.check_length(name, "Blockwise.codes", codes, -(-numel // 2))
        packed = np.frombuffer(codes, dtype=np.uint8)
        idx = np.empty(packed.size * 2, dtype=np.uint8)
        idx[0::2], idx[1::2] = packed >> 4, packed & 0x0F
        return NF4_CODEBOOK[idx[:numel]]
