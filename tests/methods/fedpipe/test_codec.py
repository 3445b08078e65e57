"""Update-bundle codec: round trips per encoding, sizes, validation of untrusted payloads, error feedback."""

import numpy as np
import pytest

from pollinate.methods.fedpipe.codec import (
    ENCODINGS,
    NF4_CODEBOOK,
    ErrorFeedback,
    UpdateRejected,
    decode_bundle,
    encode_bundle,
)
from pollinate.methods.fedpipe.codec.encodings import ENCODINGS_BY_ENUM
from pollinate.protos import update_pb2 as pb

NAME = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


def _x(shape=(8, 64), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _round_trip(x: np.ndarray, encoding: str, **kw) -> np.ndarray:
    payload = encode_bundle({NAME: x}, encoding, **kw)
    return decode_bundle(payload, expected_shapes={NAME: x.shape}).tensors[NAME]


def _rel(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.linalg.norm(x - y) / np.linalg.norm(y))


def _wire_encodings(payload: bytes) -> dict[str, str]:
    """Each tensor's encoding as the sender wrote it."""
    return {t.name: ENCODINGS_BY_ENUM[t.encoding].name for t in pb.UpdateBundle.FromString(payload).tensors}


def _tamper(payload: bytes, edit) -> bytes:
    """Parse, let `edit` change the first TensorUpdate (or the bundle), re-serialize."""
    bundle = pb.UpdateBundle.FromString(payload)
    edit(bundle)
    return bundle.SerializeToString()


# --------------------------------------------------------------------------------------- round trips


def test_dense_fp32_round_trip_is_exact_and_keeps_metadata():
    x = _x()
    payload = encode_bundle(
        {NAME: x, "bias": x[0]}, "dense-fp32", base_version=3, version=4, sender="n7", round=2
    )
    out = decode_bundle(payload)
    np.testing.assert_array_equal(out.tensors[NAME], x)
    np.testing.assert_array_equal(out.tensors["bias"], x[0])
    assert out.tensors[NAME].dtype == np.float32
    assert (out.base_version, out.version) == (3, 4)
    wire = pb.UpdateBundle.FromString(payload)
    assert (wire.sender, wire.round) == ("n7", 2)
    assert _wire_encodings(payload) == {NAME: "dense-fp32", "bias": "dense-fp32"}
    bare = pb.UpdateBundle.FromString(encode_bundle({NAME: x}, "dense-fp32"))
    assert not bare.HasField("sender") and not bare.HasField("round")


def test_dense_fp16_round_trip_within_fp16_precision():
    x = _x()
    out = _round_trip(x, "dense-fp16")
    assert np.max(np.abs(out - x) / np.abs(x)) <= 1e-3
    wire = pb.UpdateBundle.FromString(encode_bundle({NAME: x.astype(np.float16)}, "dense-fp16"))
    assert wire.tensors[0].original_dtype == "float16"


def test_int8_error_is_below_one_percent_of_each_block_absmax():
    x = _x((16, 100)) * np.geomspace(1e-3, 1e3, 16)[:, None].astype(
        np.float32
    )  # blocks of very different scale
    out = _round_trip(x, "int8", block_size=64)
    flat_x, flat_out = x.ravel(), out.ravel()
    for start in range(0, flat_x.size, 64):
        block, got = flat_x[start : start + 64], flat_out[start : start + 64]
        assert np.max(np.abs(got - block)) <= 0.01 * np.max(np.abs(block))


def test_nf4_matches_codebook_bound_and_qlora_accuracy():
    x = _x((32, 64))
    out = _round_trip(x, "nf4", block_size=64)
    half_gap = np.max(np.diff(NF4_CODEBOOK)) / 2
    absmax = np.abs(x).max(axis=1, keepdims=True)  # each row is one 64-element block here
    assert np.all(np.abs(out - x) <= half_gap * absmax * (1 + 1e-6))
    assert _rel(out, x) <= 0.11  # NF4 on Gaussian data: ~0.09 relative error
    # Every decoded value is a codebook level times its block's absmax.
    levels = out / absmax
    assert np.all(np.min(np.abs(levels[..., None] - NF4_CODEBOOK), axis=-1) <= 1e-6)


def test_blockwise_handles_odd_sizes_and_zero_blocks():
    x = _x((3, 7))
    x[0] = 0.0
    for encoding in ("int8", "nf4"):
        out = _round_trip(x, encoding, block_size=5)
        assert np.all(out[0] == 0.0)
        assert _rel(out, x) <= (0.01 if encoding == "int8" else 0.12)


def test_topk_keeps_exactly_the_k_largest_magnitudes():
    x = _x((10, 30))
    out = _round_trip(x, "topk", topk_fraction=0.1)
    kept = np.flatnonzero(out.ravel())
    assert kept.size == 30
    expected = np.argsort(-np.abs(x.ravel()))[:30]
    assert set(kept) == set(expected)
    np.testing.assert_array_equal(out.ravel()[kept], x.ravel()[kept])
    assert np.count_nonzero(_round_trip(x, "topk", topk_fraction=1e-9)) == 1  # at least one entry


def test_lowrank_equals_truncated_svd():
    x = _x((32, 48))
    out = _round_trip(x, "lowrank", lowrank_rank=4)
    u, s, vt = np.linalg.svd(x.astype(np.float64), full_matrices=False)
    np.testing.assert_allclose(out, (u[:, :4] * s[:4]) @ vt[:4], atol=1e-5)


def test_lowrank_falls_back_to_dense_for_vectors_and_tiny_matrices():
    for shape in ((64,), (4, 4)):
        x = _x(shape)
        payload = encode_bundle({NAME: x}, "lowrank", lowrank_rank=4)
        assert _wire_encodings(payload) == {NAME: "dense-fp32"}
        np.testing.assert_array_equal(decode_bundle(payload).tensors[NAME], x)


def test_per_tensor_encodings_and_missing_mapping():
    x = _x()
    payload = encode_bundle({"a": x, "b": x}, {"a": "nf4", "b": "topk"})
    assert _wire_encodings(payload) == {"a": "nf4", "b": "topk"}
    assert decode_bundle(payload).tensors.keys() == {"a", "b"}
    with pytest.raises(ValueError, match=r"no encoding given for tensors \['b'\]"):
        encode_bundle({"a": x, "b": x}, {"a": "nf4"})
    with pytest.raises(ValueError, match="unknown encoding 'zip'"):
        encode_bundle({"a": x}, "zip")


def test_payload_sizes_shrink_as_expected():
    x = _x((64, 1024))
    size = {e: len(encode_bundle({NAME: x}, e, block_size=64, topk_fraction=0.01)) for e in ENCODINGS}
    fp32 = size["dense-fp32"]
    assert fp32 == pytest.approx(x.nbytes, rel=0.01)
    assert size["dense-fp16"] / fp32 == pytest.approx(0.5, abs=0.01)
    # NF4: 4 bits per value + one fp32 scale per 64 values = 4.5 / 32 of fp32.
    assert size["nf4"] / fp32 == pytest.approx(4.5 / 32, abs=0.005)
    assert size["int8"] / fp32 == pytest.approx(8.5 / 32, abs=0.005)
    assert size["topk"] / fp32 == pytest.approx(0.01 * 8 / 4, abs=0.005)  # uint32 index + fp32 value
    assert size["lowrank"] / fp32 == pytest.approx(4 * (64 + 1024) / x.size, abs=0.005)
    fp16_scales = len(encode_bundle({NAME: x}, "nf4", value_dtype="fp16"))
    assert fp16_scales / fp32 == pytest.approx(4.25 / 32, abs=0.005)


def test_wire_bytes_per_param_prices_every_encoding_as_sent_at_the_defaults():
    from pollinate.methods.fedpipe.codec import WIRE_BYTES_PER_PARAM
    from pollinate.methods.fedpipe.config import ENCODING_CHOICES

    assert tuple(WIRE_BYTES_PER_PARAM) == tuple(ENCODINGS) == ENCODING_CHOICES
    x = _x((64, 1024))
    for encoding in set(ENCODINGS) - {"lowrank"}:  # a low-rank payload's size depends on the shape, not numel
        per_param = len(encode_bundle({NAME: x}, encoding)) / x.size
        assert per_param == pytest.approx(WIRE_BYTES_PER_PARAM[encoding], rel=0.02), encoding


def test_encoder_refuses_non_finite_and_fp16_overflow():
    x = _x()
    x[0, 0] = np.nan
    with pytest.raises(ValueError, match=f"tensor '{NAME}' contains NaN or Inf"):
        encode_bundle({NAME: x}, "dense-fp32")
    with pytest.raises(ValueError, match="beyond float16's range"):
        encode_bundle({NAME: np.full((2, 2), 1e5, np.float32)}, "dense-fp16")
    with pytest.raises(ValueError, match="only floating-point"):
        encode_bundle({NAME: np.ones(3, np.int64)}, "dense-fp32")


# --------------------------------------------------------------------------------------- rejections


def _rejected(payload: bytes, reason: str, match: str, **kw) -> UpdateRejected:
    with pytest.raises(UpdateRejected, match=match) as info:
        decode_bundle(payload, **kw)
    assert info.value.reason == reason
    return info.value


def test_rejects_payload_over_max_bytes_before_parsing():
    payload = encode_bundle({NAME: _x()}, "dense-fp32")
    _rejected(payload, "size", f"payload of {len(payload)} bytes exceeds max_bytes=1000", max_bytes=1000)
    decode_bundle(payload, max_bytes=len(payload))


def test_rejects_truncated_and_garbled_protobuf():
    payload = encode_bundle({NAME: _x()}, "dense-fp32")
    _rejected(payload[:-7], "garbled", "is not a valid UpdateBundle")
    _rejected(b"\xff" * 64, "garbled", "is not a valid UpdateBundle")
    # Parses, but as nothing this build writes.
    _rejected(b"\x08\x07", "version", "format_version is 7, this build reads 1")


def test_rejects_unknown_tensor_name():
    payload = encode_bundle({"layers.9.q_proj.lora_A": _x()}, "dense-fp32")
    _rejected(
        payload, "unknown-tensor", "unknown tensor 'layers.9.q_proj.lora_A'", expected_shapes={NAME: (8, 64)}
    )


def test_rejects_wrong_shape_with_both_shapes_named():
    payload = encode_bundle({"X": _x((8, 64))}, "dense-fp32")
    err = _rejected(
        payload,
        "shape",
        r"tensor 'X' has shape \(8, 64\), expected \(4, 64\)",
        expected_shapes={"X": (4, 64)},
    )
    assert err.tensor == "X"


def test_rejects_missing_tensors_only_when_all_are_required():
    payload = encode_bundle({"a": _x()}, "dense-fp32")
    shapes = {"a": (8, 64), "b": (8, 64)}
    decode_bundle(payload, expected_shapes=shapes)
    _rejected(
        payload,
        "unknown-tensor",
        "lacks 1 expected tensors, e.g. 'b'",
        expected_shapes=shapes,
        require_all=True,
    )


@pytest.mark.parametrize(
    ("encoding", "edit", "field"),
    [
        ("dense-fp32", lambda t: setattr(t.dense, "data", t.dense.data[:-4]), "Dense.data"),
        ("int8", lambda t: setattr(t.blockwise, "codes", t.blockwise.codes + b"\0"), "Blockwise.codes"),
        ("nf4", lambda t: setattr(t.blockwise, "scales", t.blockwise.scales[:-4]), "Blockwise.scales"),
        ("topk", lambda t: setattr(t.sparse, "values", t.sparse.values[:-4]), "Sparse.values"),
        ("lowrank", lambda t: setattr(t.lowrank, "v", t.lowrank.v + b"\0" * 4), "LowRank.v"),
    ],
)
def test_rejects_payload_bytes_inconsistent_with_shape(encoding, edit, field):
    payload = encode_bundle({NAME: _x((16, 64))}, encoding)
    payload = _tamper(payload, lambda b: edit(b.tensors[0]))
    _rejected(payload, "payload-length", f"{field} holds .* bytes, expected")


def test_rejects_unknown_encoding_dtype_and_mismatched_payload():
    payload = encode_bundle({NAME: _x()}, "dense-fp32")
    _rejected(
        _tamper(payload, lambda b: setattr(b.tensors[0], "encoding", 42)), "encoding", "unknown encoding 42"
    )
    _rejected(
        _tamper(payload, lambda b: setattr(b.tensors[0], "encoding", pb.ENCODING_TOPK)),
        "encoding",
        "is encoded as topk but carries a 'dense' payload",
    )
    _rejected(
        _tamper(payload, lambda b: setattr(b.tensors[0].dense, "dtype", 9)), "dtype", "Dense.dtype is 9"
    )
    _rejected(
        _tamper(payload, lambda b: setattr(b.tensors[0], "original_dtype", "int32")),
        "dtype",
        "original_dtype 'int32'",
    )
    nf4 = encode_bundle({NAME: _x()}, "nf4")
    _rejected(
        _tamper(nf4, lambda b: setattr(b.tensors[0].blockwise, "scale_dtype", 5)), "dtype", "scale_dtype 5"
    )


def test_rejects_bad_sparse_indices_and_duplicate_names():
    payload = encode_bundle({NAME: _x()}, "topk")

    def reverse_indices(b):
        sp = b.tensors[0].sparse
        sp.indices = np.frombuffer(sp.indices, "<u4")[::-1].tobytes()

    _rejected(_tamper(payload, reverse_indices), "index", "not strictly increasing")
    twice = _tamper(payload, lambda b: b.tensors.append(b.tensors[0]))
    _rejected(twice, "duplicate", f"tensor '{NAME}' appears twice")


def test_rejects_nan_and_inf_values():
    payload = encode_bundle({NAME: _x()}, "dense-fp32")

    def poison(value):
        def edit(b):
            data = bytearray(b.tensors[0].dense.data)
            data[8:12] = np.float32(value).tobytes()
            b.tensors[0].dense.data = bytes(data)

        return edit

    _rejected(_tamper(payload, poison(np.nan)), "non-finite", f"tensor '{NAME}' contains NaN or Inf")
    _rejected(_tamper(payload, poison(np.inf)), "non-finite", "contains NaN or Inf")


def test_rejects_norm_beyond_bound():
    x = np.zeros((4, 4), np.float32)
    x[1, 2] = 1.2e6
    payload = encode_bundle({NAME: x, "other": np.zeros(3, np.float32)}, "dense-fp32")
    _rejected(payload, "norm", r"^L2 norm 1.2e6 exceeds the bound 1e3$", norm_bound=1e3)
    decode_bundle(payload, norm_bound=1.3e6)


# --------------------------------------------------------------------------------------- error feedback


def test_error_feedback_stores_what_the_encoder_dropped():
    ef = ErrorFeedback()
    x = _x()
    first = decode_bundle(ef.encode({NAME: x}, "topk", topk_fraction=0.1)).tensors[NAME]
    np.testing.assert_allclose(ef.residuals[NAME], x - first, atol=1e-7)
    second = decode_bundle(ef.encode({NAME: x}, "topk", topk_fraction=0.1)).tensors[NAME]
    # What was sent over both calls plus what is still owed equals everything that was asked for.
    np.testing.assert_allclose(first + second + ef.residuals[NAME], 2 * x, atol=1e-5)
    lossless = ErrorFeedback()
    lossless.encode({NAME: x}, "dense-fp32")
    assert lossless.residual_norm() == 0.0


def test_error_feedback_makes_topk_one_percent_gradient_descent_converge():
    """GD on f(x) = ½ Σ h_j (x_j − c_j)² sending top-1% steps: with EF it reaches the minimum, without it
    99% of every step is thrown away and it barely moves."""
    rng = np.random.default_rng(1)
    d, lr, steps = 200, 0.02, 400  # EF delays coordinates ~1/fraction steps, so it needs lr ≲ fraction / L
    c = rng.normal(size=d)
    h = rng.uniform(0.5, 1.5, size=d)

    def descend(feedback: ErrorFeedback | None) -> float:
        x = np.zeros(d)
        for _ in range(steps):
            step = {"x": (-lr * h * (x - c)).astype(np.float32)}
            payload = (
                feedback.encode(step, "topk", topk_fraction=0.01)
                if feedback
                else encode_bundle(step, "topk", topk_fraction=0.01)
            )
            x += decode_bundle(payload).tensors["x"]
        return float(np.linalg.norm(x - c) / np.linalg.norm(c))

    with_ef, without_ef = descend(ErrorFeedback()), descend(None)
    assert with_ef < 0.05
    assert without_ef > 0.5


@pytest.mark.slow
def test_nf4_codes_match_bitsandbytes():
    """Same codebook and the same codes as bitsandbytes' NF4 (nibble order included) on CPU."""
    import bitsandbytes.functional as bnbf
    import torch

    np.testing.assert_allclose(NF4_CODEBOOK, bnbf.get_4bit_type("nf4", device="cpu").numpy(), atol=1e-7)
    x = _x((16, 64))
    packed, state = bnbf.quantize_4bit(torch.from_numpy(x), blocksize=64, quant_type="nf4")
    ours = pb.UpdateBundle.FromString(encode_bundle({NAME: x}, "nf4", block_size=64)).tensors[0].blockwise
    np.testing.assert_allclose(np.frombuffer(ours.scales, "<f4"), state.absmax.numpy(), rtol=1e-6)
    assert ours.codes == packed.numpy().tobytes()
