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
from pollinate.methods.fedpipe.codec.block_codes import NF4_CODEBOOK, block_absmax, int8_codes, nf4_codes, nf4_levels
from pollinate.protos import update_pb2 as pb

__all__ = ["MAX_BLOCK_SIZE", "NF4_CODEBOOK", "Int8", "Nf4"]

MAX_BLOCK_SIZE = 1 << 20


class _Blockwise(base.Encoding):
    """Shared by int8 and NF4: blocks of ``block_size`` elements, each scaled by its absmax."""

    payload = "blockwise"
    kind: int
    scale_divisor: float  # scale = absmax / scale_divisor

    def quantise(self, blocks: np.ndarray, wire_scales: np.ndarray, numel: int) -> bytes:
        """Codes of the first ``numel`` elements of ``blocks`` (a block per row) divided by their block's scale."""
        raise NotImplementedError

    def dequantise(self, name: str, codes: bytes, numel: int) -> np.ndarray:
        """Normalised float32 values of ``numel`` elements from the received codes."""
        raise NotImplementedError

    def encode(self, msg: pb.TensorUpdate, x: np.ndarray, params: base.EncodeParams) -> None:
        flat = x.reshape(-1)  # float32 (float64 only where the sender's tensor is)
        numel, block_size = flat.size, params.block_size
        n_blocks = -(-numel // block_size)
        if numel % block_size:
            flat = np.concatenate([flat, np.zeros(n_blocks * block_size - numel, dtype=flat.dtype)])
        blocks = flat.reshape(n_blocks, block_size)
        scales = block_absmax(blocks) / self.scale_divisor
        if params.value_dtype == pb.FLOAT_DTYPE_FP16:
            base.check_fp16_range(msg.name, scales, "block scales")
        # Quantise against the scales as they will arrive, so fp16 rounding of a scale costs no extra error.
        wire_scales = scales.astype(base.WIRE_DTYPE[params.value_dtype])
        msg.encoding = self.enum
        wire = msg.blockwise  # filled in place: a Blockwise built apart would be copied in whole
        wire.kind, wire.block_size, wire.scale_dtype = self.kind, block_size, params.value_dtype
        wire.scales, wire.codes = wire_scales.tobytes(), self.quantise(blocks, wire_scales, numel)

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
        if numel % bw.block_size == 0:  # whole blocks: scale each row, without a per-element copy of the scales
            return (values.reshape(n_blocks, bw.block_size) * scales[:, None]).reshape(shape)
        return (values * np.repeat(scales, bw.block_size)[:numel]).reshape(shape)


class Int8(_Blockwise):
    """Symmetric absmax int8: ``x ≈ code x absmax / 127`` with codes in [-127, 127]."""

    name, enum, kind, scale_divisor, wire_bytes_per_param = "int8", pb.ENCODING_INT8, pb.BLOCK_KIND_INT8, 127.0, 1.07

    def quantise(self, blocks: np.ndarray, wire_scales: np.ndarray, numel: int) -> bytes:
        return int8_codes(blocks, wire_scales).reshape(-1)[:numel].tobytes()

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

    def quantise(self, blocks: np.ndarray, wire_scales: np.ndarray, numel: int) -> bytes:
        idx = nf4_codes(blocks, wire_scales)[:numel]
        if numel % 2:
            idx = np.append(idx, np.uint8(0))
        return ((idx[0::2] << 4) | idx[1::2]).tobytes()

    def dequantise(self, name: str, codes: bytes, numel: int) -> np.ndarray:
        base.check_length(name, "Blockwise.codes", codes, -(-numel // 2))
        return nf4_levels(np.frombuffer(codes, dtype=np.uint8), numel)
