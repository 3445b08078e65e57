"""FedPipe update bundles from the real encoder, then mutated; the ``codec`` target (``decode_bundle`` as the FedPipe
server calls it)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from google.protobuf.message import DecodeError

from pollinate.common.checks import UpdateRejected
from pollinate.methods.fedpipe.codec import ENCODINGS, decode_bundle, encode_bundle
from pollinate.protos import update_pb2 as pb
from pollinate.simulations.fuzz.mutations import Mutator


def mutated_bundle(m: Mutator, shapes: dict[str, tuple[int, ...]], base_version: int) -> bytes:
    """A valid ``encode_bundle`` payload of random deltas of ``shapes`` in random encodings, then 0-3 edits."""
    scale = float(m.pick((1e-3, 1e-2, 1.0, 100.0)))
    tensors = {k: m.rng.normal(0.0, scale, s).astype(np.float32) for k, s in shapes.items()}
    encodings = {k: m.pick(tuple(ENCODINGS)) for k in tensors}
    m.log.append(f"encodings:{','.join(encodings.values())}")
    payload = encode_bundle(tensors, encodings, base_version=base_version, version=base_version + 1,
                            value_dtype=m.pick(("fp32", "fp16")), block_size=int(m.pick((1, 7, 64, 4096))),
                            topk_fraction=float(m.pick((0.01, 0.1, 1.0))), lowrank_rank=int(m.pick((1, 2, 4))))
    for _ in range(0 if m.chance(0.1) else int(m.rng.integers(1, 4))):
        kind = m.pick(("field",) * 6 + ("bytes",) * 3 + ("swap",))
        bundle = pb.UpdateBundle()
        try:
            bundle.ParseFromString(payload)
        except DecodeError:
            kind = "bytes"  # an earlier edit left no bundle to edit by field
        if kind == "bytes":
            payload = m.blob(payload)
            continue
        if kind == "swap" and len(bundle.tensors) > 1:  # another tensor's name, or its payload under this header
            dst, src = (bundle.tensors[int(i)] for i in m.rng.choice(len(bundle.tensors), 2, replace=False))
            m.log.append("swap")
            if m.chance(0.5) or src.WhichOneof("payload") is None:
                dst.name = src.name
            else:
                dst.encoding = src.encoding
                getattr(dst, src.WhichOneof("payload")).CopyFrom(getattr(src, src.WhichOneof("payload")))
        else:
            m.edit(bundle)
        payload = bundle.SerializeToString()
    return payload


def tensor_problems(tensors: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """Why ``tensors`` is not exactly ``shapes`` of finite float32 values (empty when it is)."""
    if set(tensors) != set(shapes):
        return [f"tensors {sorted(set(tensors) ^ set(shapes))[:3]} differ from the expected ones"]
    problems = []
    for key, x in tensors.items():
        x = np.asarray(x)
        if x.shape != tuple(shapes[key]) or x.dtype != np.float32:
            problems.append(f"'{key}' is {x.dtype}{x.shape}, expected float32{tuple(shapes[key])}")
        elif not np.isfinite(x).all():
            problems.append(f"'{key}' holds NaN or Inf")
    return problems


class CodecTarget:
    """FedPipe's ``decode_bundle`` as its server calls it: the client's planned shapes, all required, the configured
    byte and norm bounds."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], max_update_bytes: int, norm_bound: float) -> None:
        self.shapes, self.max_bytes, self.norm_bound = shapes, max_update_bytes, norm_bound
        self.payload = b""

    def case(self, m: Mutator) -> tuple[str, str]:
        self.payload = mutated_bundle(m, self.shapes, base_version=int(m.rng.integers(0, 4)))
        try:
            bundle = decode_bundle(self.payload, expected_shapes=self.shapes, require_all=True,
                                   max_bytes=self.max_bytes, norm_bound=self.norm_bound)
        except UpdateRejected as exc:
            return "rejected", f"UpdateRejected({exc.reason})"
        problems = tensor_problems(bundle.tensors, self.shapes)
        norm = math.sqrt(sum(float(np.sum(np.square(x, dtype=np.float64))) for x in bundle.tensors.values()))
        if not problems and not norm <= self.norm_bound:
            problems.append(f"L2 norm {norm:.3g} over the bound {self.norm_bound:g}")
        again = decode_bundle(self.payload, expected_shapes=self.shapes, require_all=True)
        if not problems and any(not np.array_equal(again.tensors[k], x) for k, x in bundle.tensors.items()):
            problems.append("a second decode of the same payload differs")
        return ("bad-accept", "; ".join(problems)[:300]) if problems else ("accepted", "valid")

    def repro(self) -> dict[str, Any]:
        return {"payload_hex": self.payload.hex()} if len(self.payload) <= 4096 else {}
