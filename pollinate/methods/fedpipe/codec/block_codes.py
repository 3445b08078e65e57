"""Block codes of a tensor cut into absmax-scaled blocks: int8 rounding and the NF4 codebook lookup (both ways),
vectorized.

Both codes are defined by the float64 reference (``x / scale`` in float64, then ``rint`` or the index of the
nearest NF4 level, i.e. ``searchsorted`` over the midpoints between levels); the wire format depends on it bit
for bit. A float32 tensor is coded in float32, chunk by chunk through the cache, and gives the same codes: a
float32 and a float64 quotient of two float32 numbers differ in which side of a half-integer (int8) or of a
midpoint (NF4) they fall only where the float32 quotient lands exactly on it, and those elements (rare, found
cheaply) are coded again in float64. A float64 tensor is coded by the reference itself.
NF4's lookup reads the upper 16 bits of each float32 quotient: a table gives the midpoints below that range of
values and the one midpoint inside it, if any, against which a single comparison settles the code.
"""

from __future__ import annotations

import sys

import numpy as np

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
NF4_MIDPOINTS = (NF4_CODEBOOK[1:] + NF4_CODEBOOK[:-1]) / 2
CHUNK_ELEMENTS = 1 << 16  # elements coded at a time: the chunk and its temporaries stay in a core's L2 cache
_HIGH_HALF = 1 if sys.byteorder == "little" else 0  # the uint16 holding a float32's sign, exponent, top mantissa


def _nf4_tables() -> tuple[np.ndarray, np.ndarray]:
    """Per upper-16-bit pattern of a float32: the midpoints below all its values, and the midpoint inside its
    range of values (+inf where none is)."""
    patterns = np.arange(1 << 16, dtype=np.uint32) << 16
    ends = (patterns.view(np.float32), (patterns | 0xFFFF).view(np.float32))
    low, high = np.fmin(*ends), np.fmax(*ends)  # negative values run backwards; NaN ends do not count
    below = np.searchsorted(NF4_MIDPOINTS, low)
    inside = np.searchsorted(NF4_MIDPOINTS, high) - below
    if inside.max() > 1:
        raise RuntimeError("an NF4 lookup range holds two midpoints; the table needs more bits")
    threshold = np.full(1 << 16, np.inf, dtype=np.float32)
    threshold[inside == 1] = NF4_MIDPOINTS[below[inside == 1]]
    return below.astype(np.uint8), threshold


_NF4_BELOW, _NF4_THRESHOLD = _nf4_tables()
# The two levels a packed byte stands for (high nibble first), as one 8-byte item: a byte decodes in one lookup.
_NF4_PAIRS = np.stack([NF4_CODEBOOK[np.arange(256) >> 4], NF4_CODEBOOK[np.arange(256) & 0x0F]], axis=1).view(
    np.uint64).reshape(256)


def block_absmax(blocks: np.ndarray) -> np.ndarray:
    """``max(abs(blocks), axis=1)`` in float64, by halving the rows chunk by chunk (numpy reduces short rows one
    at a time)."""
    absmax = np.empty(blocks.shape[0], dtype=np.float64)
    step = max(1, CHUNK_ELEMENTS // max(blocks.shape[1], 1))
    for start in range(0, blocks.shape[0], step):
        folded = np.abs(blocks[start : start + step])
        width = folded.shape[1]
        while width > 1:  # fold the last half onto the first; an odd middle column stays
            half = width // 2
            np.maximum(folded[:, :half], folded[:, width - half : width], out=folded[:, :half])
            width -= half
        absmax[start : start + step] = folded[:, 0]
    return absmax


def _quotient64(blocks: np.ndarray, divisors: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """The reference's float64 quotients of the elements at ``(rows, cols)``."""
    return blocks[rows, cols].astype(np.float64) / divisors[rows, 0].astype(np.float64)


def _divisors(blocks: np.ndarray, wire_scales: np.ndarray) -> np.ndarray:
    """Each block's scale as a column in the blocks' dtype; a zero scale divides by +inf (its codes are 0)."""
    scales = wire_scales.astype(blocks.dtype)
    return np.where(scales > 0, scales, np.inf).astype(blocks.dtype)[:, None]


def int8_codes(blocks: np.ndarray, wire_scales: np.ndarray) -> np.ndarray:
    """``clip(rint(blocks / scale), -127, 127)`` as int8, shaped like ``blocks`` (rows of one block each)."""
    divisors = _divisors(blocks, wire_scales)
    codes = np.empty(blocks.shape, dtype=np.int8)
    if blocks.dtype != np.float32:
        codes[...] = np.clip(np.rint(blocks / divisors), -127, 127)
        return codes
    step = max(1, CHUNK_ELEMENTS // max(blocks.shape[1], 1))
    for start in range(0, blocks.shape[0], step):
        part, d = blocks[start : start + step], divisors[start : start + step]
        q = np.divide(part, d)
        r = np.rint(q)
        np.subtract(q, r, out=q)
        if q.size and (q.max() == 0.5 or q.min() == -0.5):  # a float32 quotient exactly on a half-integer
            rows, cols = np.nonzero(np.abs(q) == 0.5)
            r[rows, cols] = np.rint(_quotient64(part, d, rows, cols))
        np.clip(r, -127, 127, out=r)
        np.copyto(codes[start : start + step], r, casting="unsafe")
    return codes


def nf4_codes(blocks: np.ndarray, wire_scales: np.ndarray) -> np.ndarray:
    """Index of the NF4 level nearest ``blocks / scale`` (midpoints go up), as uint8, flattened."""
    divisors = _divisors(blocks, wire_scales)
    if blocks.dtype != np.float32:
        return np.searchsorted(NF4_MIDPOINTS, blocks / divisors).astype(np.uint8).reshape(-1)
    codes = np.empty(blocks.size, dtype=np.uint8)
    width = max(blocks.shape[1], 1)
    step = max(1, CHUNK_ELEMENTS // width)
    for start in range(0, blocks.shape[0], step):
        part, d = blocks[start : start + step], divisors[start : start + step]
        q = np.divide(part, d).reshape(-1)
        keys = q.view(np.uint16)[_HIGH_HALF::2].astype(np.intp)
        out = codes[start * width : start * width + q.size]
        np.take(_NF4_BELOW, keys, out=out)
        threshold = np.take(_NF4_THRESHOLD, keys)
        out += q > threshold
        on_midpoint = q == threshold  # a float32 quotient exactly on a midpoint
        if on_midpoint.any():
            (flat,) = np.nonzero(on_midpoint)
            out[flat] = np.searchsorted(NF4_MIDPOINTS, _quotient64(part, d, flat // width, flat % width))
    return codes


def nf4_levels(packed: np.ndarray, numel: int) -> np.ndarray:
    """The float32 NF4 levels of ``numel`` codes packed two per byte, the first in the high nibble."""
    return np.take(_NF4_PAIRS, packed).view(np.float32)[:numel]
