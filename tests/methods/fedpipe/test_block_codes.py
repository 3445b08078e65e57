"""The vectorized int8/NF4 block codes are bit for bit the float64 reference the wire format was defined with."""

import numpy as np
import pytest

from pollinate.methods.fedpipe.codec import NF4_CODEBOOK, decode_bundle, encode_bundle
from pollinate.methods.fedpipe.codec.block_codes import NF4_MIDPOINTS, block_absmax, int8_codes, nf4_codes
from pollinate.protos import update_pb2 as pb


def _reference(x: np.ndarray, encoding: str, block_size: int, wire: type) -> tuple[bytes, bytes]:
    """(scales, codes) as the codec computed them before vectorizing: every step in float64."""
    flat = x.reshape(-1).astype(np.float64)
    numel, n_blocks = flat.size, -(-flat.size // block_size)
    blocks = np.zeros(n_blocks * block_size)
    blocks[:numel] = flat
    blocks = blocks.reshape(n_blocks, block_size)
    absmax = np.max(np.abs(blocks), axis=1) if n_blocks else np.zeros(0)
    wire_scales = (absmax / (127.0 if encoding == "int8" else 1.0)).astype(wire)
    s = wire_scales.astype(np.float64)[:, None]
    normed = np.divide(blocks, s, out=np.zeros_like(blocks), where=s > 0)
    if encoding == "int8":
        return wire_scales.tobytes(), np.clip(np.rint(normed), -127, 127).astype(np.int8).reshape(-1)[:numel].tobytes()
    idx = np.searchsorted(NF4_MIDPOINTS, np.clip(normed, -1.0, 1.0)).astype(np.uint8).reshape(-1)[:numel]
    if numel % 2:
        idx = np.append(idx, np.uint8(0))
    return wire_scales.tobytes(), ((idx[0::2] << 4) | idx[1::2]).astype(np.uint8).tobytes()


def _wire(x: np.ndarray, encoding: str, block_size: int, value_dtype: str) -> tuple[bytes, bytes]:
    payload = encode_bundle({"w": x}, encoding, block_size=block_size, value_dtype=value_dtype)
    blockwise = pb.UpdateBundle.FromString(payload).tensors[0].blockwise
    return blockwise.scales, blockwise.codes


def _on_the_edges(encoding: str, rng: np.random.Generator) -> np.ndarray:
    """Blocks of 64 whose elements sit a few float32 steps from where a code changes (half-integers of the int8
    step, NF4 midpoints): where a float32 quotient can land exactly on the edge while the float64 one does not."""
    rows = []
    for _ in range(64):
        peak = np.float32(rng.uniform(0.1, 10.0))
        scale = np.float32(peak / 127) if encoding == "int8" else peak
        edges = (rng.integers(-127, 127, 63) + 0.5) if encoding == "int8" else rng.choice(NF4_MIDPOINTS, 63)
        near = (edges * np.float64(scale)).astype(np.float32)
        steps = rng.integers(-3, 4, 63)
        near = np.array([_step(v, k) for v, k in zip(near, steps, strict=True)], dtype=np.float32)
        rows.append(np.concatenate([[peak], np.clip(near, -peak, peak)]).astype(np.float32))
    return np.stack(rows)


def _step(value: np.float32, k: int) -> np.float32:
    for _ in range(abs(k)):
        value = np.nextafter(value, np.float32(np.inf if k > 0 else -np.inf), dtype=np.float32)
    return value


@pytest.mark.parametrize("encoding", ["int8", "nf4"])
def test_vectorized_codes_equal_the_float64_reference(encoding):
    rng = np.random.default_rng(7)
    cases = [
        (rng.standard_normal((512, 512)).astype(np.float32), 64),  # random: a few quotients land on an edge
        (_on_the_edges(encoding, rng), 64),  # many do
        (rng.standard_normal(1001).astype(np.float32) * 10.0 ** rng.uniform(-44, 30, 1001).astype(np.float32), 7),
        (np.where(rng.random(999) < 0.4, 0.0, rng.standard_normal(999)).astype(np.float32) * 1e-7, 10),
        (np.array([-0.0, 0.0, -0.0], dtype=np.float32), 2),  # signed zeros, a partial block, an odd length
        (rng.standard_normal((3, 5)), 4),  # a float64 tensor
        (np.zeros(0, dtype=np.float32), 64),
    ]
    for x, block_size in cases:
        for value_dtype, wire in (("fp32", np.float32), ("fp16", np.float16)):
            if value_dtype == "fp16" and np.max(np.abs(x), initial=0) > 6e4:
                continue  # beyond fp16's range the sender refuses
            assert _wire(x, encoding, block_size, value_dtype) == _reference(x, encoding, block_size, wire), (
                encoding, x.shape, block_size, value_dtype)


def test_edge_data_needs_the_float64_second_look():
    """The edge cases above do reach the float64 fallback: a float32-only coder would get some codes wrong."""
    rng = np.random.default_rng(7)
    for encoding, codes in (("int8", int8_codes), ("nf4", nf4_codes)):
        blocks = _on_the_edges(encoding, rng)
        scales = (block_absmax(blocks) / (127.0 if encoding == "int8" else 1.0)).astype(np.float32)
        quotients = blocks / scales[:, None]
        if encoding == "int8":
            float32_only = np.clip(np.rint(quotients), -127, 127).astype(np.int8)
        else:
            float32_only = np.searchsorted(NF4_MIDPOINTS, quotients.reshape(-1)).astype(np.uint8)
        got = codes(blocks, scales)
        assert not np.array_equal(got.reshape(-1), float32_only.reshape(-1))


def test_block_absmax_is_the_rowwise_max_of_abs_for_any_width():
    rng = np.random.default_rng(3)
    for width in (1, 2, 3, 7, 64, 100, 4097):
        blocks = rng.standard_normal((5, width)).astype(np.float32)
        np.testing.assert_array_equal(block_absmax(blocks), np.max(np.abs(blocks), axis=1).astype(np.float64))


def _reference_decode(scales: np.ndarray, codes: bytes, encoding: str, block_size: int, numel: int) -> np.ndarray:
    """The float32 tensor as the codec decoded it before vectorizing: codes to levels, times repeated scales."""
    if encoding == "int8":
        values = np.frombuffer(codes, dtype=np.int8).astype(np.float32)
    else:
        packed = np.frombuffer(codes, dtype=np.uint8)
        idx = np.empty(packed.size * 2, dtype=np.uint8)
        idx[0::2], idx[1::2] = packed >> 4, packed & 0x0F
        values = NF4_CODEBOOK[idx[:numel]]
    return values * np.repeat(scales.astype(np.float32), block_size)[:numel]


@pytest.mark.parametrize("encoding", ["int8", "nf4"])
@pytest.mark.parametrize(("numel", "block_size"), [(4096, 64), (1001, 7), (3, 2), (0, 64)])
def test_decoding_equals_the_reference(encoding, numel, block_size):
    x = np.random.default_rng(numel).standard_normal(numel).astype(np.float32)
    for value_dtype in ("fp32", "fp16"):
        payload = encode_bundle({"w": x}, encoding, block_size=block_size, value_dtype=value_dtype)
        blockwise = pb.UpdateBundle.FromString(payload).tensors[0].blockwise
        scales = np.frombuffer(blockwise.scales, dtype=np.float32 if value_dtype == "fp32" else np.float16)
        got = decode_bundle(payload, expected_shapes={"w": x.shape}).tensors["w"]
        expected = _reference_decode(scales, blockwise.codes, encoding, block_size, numel)
        assert got.dtype == np.float32 and got.tobytes() == expected.tobytes()
