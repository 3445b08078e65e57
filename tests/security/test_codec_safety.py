"""FedPipe's update codec against hostile payloads: bounded decoding, and UpdateRejected as the only failure."""

import tracemalloc

import numpy as np
import pytest

from pollinate.methods.fedpipe.codec import (
    ENCODINGS,
    MAX_DECODED_BYTES,
    DecodedBundle,
    UpdateRejected,
    decode_bundle,
    encode_bundle,
)
from pollinate.protos import update_pb2 as pb

SHAPES = {"layers.0.q_proj.lora_A": (4, 24), "layers.0.q_proj.lora_B": (16, 4), "bias": (7,)}


def _tensors(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.normal(size=shape).astype(np.float32) for name, shape in SHAPES.items()}


def _huge(encoding: int, shape: list[int]) -> bytes:
    """A bundle of one tensor that declares ``shape`` and carries (almost) nothing."""
    bundle = pb.UpdateBundle(format_version=1)
    t = bundle.tensors.add(name="x", shape=shape, original_dtype="float32", encoding=encoding)
    if encoding == pb.ENCODING_TOPK:
        t.sparse.numel, t.sparse.value_dtype = int(np.prod(shape, dtype=object)), pb.FLOAT_DTYPE_FP32
    elif encoding == pb.ENCODING_LOWRANK:
        t.lowrank.rank, t.lowrank.dtype = 1, pb.FLOAT_DTYPE_FP32
    else:
        t.dense.dtype = pb.FLOAT_DTYPE_FP32
    return bundle.SerializeToString()


def _peak_bytes(fn) -> int:
    tracemalloc.start()
    try:
        fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


@pytest.mark.parametrize("encoding", [pb.ENCODING_TOPK, pb.ENCODING_LOWRANK, pb.ENCODING_DENSE_FP32])
def test_tiny_payload_declaring_gibibytes_is_rejected_before_allocation(encoding):
    payload = _huge(encoding, [2**15, 2**16])  # 2^31 float32 elements: 8 GiB
    assert len(payload) <= 40

    def decode():
        with pytest.raises(UpdateRejected, match="more than the 268435456 allowed") as info:
            decode_bundle(payload)
        assert info.value.reason == "size"

    assert _peak_bytes(decode) < 2**20


def _sparse_zeros(count: int, numel: int) -> bytes:
    """``count`` top-k tensors of ``numel`` elements that carry no entries."""
    bundle = pb.UpdateBundle(format_version=1)
    for i in range(count):
        t = bundle.tensors.add(name=f"t{i}", shape=[numel], original_dtype="float32", encoding=pb.ENCODING_TOPK)
        t.sparse.numel, t.sparse.value_dtype = numel, pb.FLOAT_DTYPE_FP32
    return bundle.SerializeToString()


def test_decoded_size_counts_every_tensor_before_decoding_any():
    assert 3 * 4 * 2**25 > MAX_DECODED_BYTES > 4 * 2**25  # each alone under the default bound, together over it
    payload = _sparse_zeros(3, 2**25)

    def decode():
        with pytest.raises(UpdateRejected, match="tensor 't2' brings the decoded bundle to"):
            decode_bundle(payload)

    assert _peak_bytes(decode) < 2**20
    small = _sparse_zeros(3, 2**10)
    assert len(decode_bundle(small, max_decoded_bytes=3 * 4 * 2**10).tensors) == 3
    with pytest.raises(UpdateRejected, match="tensor 't2' brings"):
        decode_bundle(small, max_decoded_bytes=3 * 4 * 2**10 - 1)


def test_expected_shapes_and_an_explicit_bound_limit_decoding_too():
    payload = encode_bundle(_tensors(0), "dense-fp32")
    with pytest.raises(UpdateRejected, match=r"tensor 'x' has shape \(32768, 65536\), expected \(2, 2\)"):
        decode_bundle(_huge(pb.ENCODING_TOPK, [2**15, 2**16]), expected_shapes={"x": (2, 2)})
    with pytest.raises(UpdateRejected, match="more than the 100 allowed"):
        decode_bundle(payload, max_decoded_bytes=100)
    assert set(decode_bundle(payload, expected_shapes=SHAPES).tensors) == set(SHAPES)


def test_zero_size_tensor_with_an_impossible_dimension_is_rejected():
    # numel 0 passes any size bound, but numpy cannot make an array with a dimension beyond ssize_t.
    with pytest.raises(UpdateRejected, match="more than 4294967295") as info:
        decode_bundle(_huge(pb.ENCODING_DENSE_FP32, [0, 2**64 - 1]))
    assert info.value.reason == "shape"


def _poison(encoding: str, value: float):
    """An edit that writes ``value`` into the first number the encoding carries."""
    def edit(t):
        case = ENCODINGS[encoding].payload
        field = {"dense": "data", "blockwise": "scales", "sparse": "values", "lowrank": "u"}[case]
        holder = getattr(t, case)
        dtype = np.float16 if encoding == "dense-fp16" else np.float32
        data = bytearray(getattr(holder, field))
        data[: np.dtype(dtype).itemsize] = np.array(value, dtype=dtype).tobytes()
        setattr(holder, field, bytes(data))

    return edit


@pytest.mark.parametrize("encoding", list(ENCODINGS))
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_numbers_are_rejected_in_every_encoding(encoding, value):
    x = np.random.default_rng(1).normal(size=(16, 64)).astype(np.float32)
    bundle = pb.UpdateBundle.FromString(encode_bundle({"w": x}, encoding))
    _poison(encoding, value)(bundle.tensors[0])
    with pytest.raises(UpdateRejected) as info:
        decode_bundle(bundle.SerializeToString(), expected_shapes={"w": x.shape})
    assert info.value.reason == "non-finite"


def test_finite_fields_that_overflow_when_decoded_are_rejected():
    x = np.ones((16, 64), np.float32)
    bundle = pb.UpdateBundle.FromString(encode_bundle({"w": x}, "int8"))
    scales = np.frombuffer(bundle.tensors[0].blockwise.scales, "<f4").copy()
    scales[0] = 3e38  # finite, but code 127 x 3e38 is not
    bundle.tensors[0].blockwise.scales = scales.tobytes()
    with pytest.raises(UpdateRejected, match="contains NaN or Inf"):
        decode_bundle(bundle.SerializeToString())


# ---- fuzzing: seeded, a few thousand payloads ----------------------------------------------------------


def _valid_payloads() -> list[bytes]:
    payloads = []
    for i, encoding in enumerate(ENCODINGS):
        for kwargs in ({}, {"value_dtype": "fp16", "block_size": 5, "topk_fraction": 0.3, "lowrank_rank": 2}):
            payloads.append(encode_bundle(_tensors(i), encoding, base_version=i, version=i + 1, round=i, **kwargs))
    return payloads


def _mutate(payload: bytes, rng: np.random.Generator) -> bytes:
    data = bytearray(payload)
    kind = rng.integers(6)
    if kind == 0:  # truncate
        return bytes(data[: rng.integers(len(data))])
    if kind == 1:  # flip a few bits
        for pos in rng.integers(len(data), size=rng.integers(1, 9)):
            data[pos] ^= 1 << int(rng.integers(8))
        return bytes(data)
    if kind == 2:  # overwrite a few bytes with random ones (varints, lengths and tags included)
        for pos in rng.integers(len(data), size=rng.integers(1, 5)):
            data[pos] = int(rng.integers(256))
        return bytes(data)
    if kind == 3:  # insert random bytes
        pos = int(rng.integers(len(data) + 1))
        return bytes(data[:pos] + rng.bytes(int(rng.integers(1, 16))) + data[pos:])
    if kind == 4:  # duplicate a slice (repeated fields, twice-named tensors)
        a, b = sorted(rng.integers(len(data) + 1, size=2).tolist())
        return bytes(data[:b] + data[a:b] + data[b:])
    return rng.bytes(int(rng.integers(0, 200)))  # garbage


def _mutate_fields(payload: bytes, rng: np.random.Generator) -> bytes:
    """Well-formed protobuf whose numbers lie: shapes, sizes, ranks, dtypes and enums set at random."""
    bundle = pb.UpdateBundle.FromString(payload)
    t = bundle.tensors[int(rng.integers(len(bundle.tensors)))]
    big = [0, 1, 2, 3, 7, 64, 2**31, 2**32 - 1, 2**32, 2**63, 2**64 - 1]
    choice = int(rng.integers(7))
    if choice == 0:
        t.shape[:] = [big[i] for i in rng.integers(len(big), size=rng.integers(0, 4))]
    elif choice == 1:
        t.encoding = int(rng.integers(-2, 9))
    elif choice == 2:
        t.blockwise.block_size = big[int(rng.integers(len(big)))] % 2**32
    elif choice == 3:
        t.lowrank.rank = big[int(rng.integers(len(big)))] % 2**32
    elif choice == 4:
        t.sparse.numel = big[int(rng.integers(len(big)))]
    elif choice == 5:
        t.original_dtype = ["", "int8", "float32", "object", "[/bold]"][int(rng.integers(5))]
    else:
        bundle.format_version = int(rng.integers(0, 3))
    return bundle.SerializeToString()


def _decode_or_reject(payload: bytes, rng: np.random.Generator) -> DecodedBundle | None:
    kwargs = [{}, {"expected_shapes": SHAPES}, {"expected_shapes": SHAPES, "require_all": True},
              {"norm_bound": 10.0}, {"max_decoded_bytes": 256}][int(rng.integers(5))]
    try:
        bundle = decode_bundle(payload, **kwargs)
    except UpdateRejected:
        return None
    limit = kwargs.get("max_decoded_bytes", MAX_DECODED_BYTES)
    assert sum(x.nbytes for x in bundle.tensors.values()) <= limit
    for name, x in bundle.tensors.items():
        assert x.dtype == np.float32 and np.all(np.isfinite(x)), name
        if "expected_shapes" in kwargs:
            assert x.shape == SHAPES[name]
    return bundle


def test_fuzzed_payloads_only_ever_raise_update_rejected():
    rng = np.random.default_rng(20240611)
    valid = _valid_payloads()
    accepted = 0
    for i in range(3000):
        base = valid[i % len(valid)]
        payload = _mutate_fields(base, rng) if i % 4 == 0 else _mutate(base, rng)
        accepted += _decode_or_reject(payload, rng) is not None
    # Some mutations leave a valid bundle (a flipped mantissa bit): the checks must not refuse everything.
    assert 0 < accepted < 3000


def test_non_bytes_payloads_are_rejected_too():
    for payload in (None, 7, "text", [1, 2]):
        with pytest.raises(UpdateRejected):
            decode_bundle(payload)  # type: ignore[arg-type]
