"""Throughput of FedPipe's update codec per encoding: ``encode_bundle`` and ``decode_bundle`` on one tensor.

``python -m pollinate.simulations.codec_bench [--mb 16] [--repeats 5] [--encodings int8,nf4] [--block-size 64]
[--value-dtype fp32]`` encodes a float32 tensor of about ``--mb`` MB (standard normal values, shape
``(rows, 2048)``) into a bundle and decodes it (with the receiver's shape check), ``--repeats`` times each in
this one process, and prints one JSON line per encoding: ``encode_MBps`` and ``decode_MBps`` (MB of float32
input per second of the best repeat), ``round_trip_MBps`` (both in sequence) and the payload's bytes. What is
timed is what a client or the server runs per update: the finite check, the encoding, protobuf serialization
and, on decode, parsing, every payload check and the final finite check.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from pollinate.methods.fedpipe.codec import ENCODINGS, decode_bundle, encode_bundle

COLUMNS = 2048


def best_seconds(run: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """The fastest of ``repeats`` calls (the others met a busier machine) and the last call's result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - start)
    return best, result


def measure(encoding: str, x: np.ndarray, repeats: int, block_size: int, value_dtype: str) -> dict[str, Any]:
    """One encoding's throughput on ``x``, as the JSON line prints it."""
    tensors, shapes = {"update": x}, {"update": x.shape}
    encode_s, payload = best_seconds(
        lambda: encode_bundle(tensors, encoding, block_size=block_size, value_dtype=value_dtype), repeats)
    decode_s, _ = best_seconds(lambda: decode_bundle(payload, expected_shapes=shapes, require_all=True), repeats)
    megabytes = x.nbytes / 1e6
    return {"encoding": encoding, "input_MB": round(megabytes, 3), "payload_bytes": len(payload),
            "block_size": block_size, "value_dtype": value_dtype, "repeats": repeats,
            "encode_MBps": round(megabytes / encode_s, 1), "decode_MBps": round(megabytes / decode_s, 1),
            "round_trip_MBps": round(megabytes / (encode_s + decode_s), 1)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=16.0, help="float32 input size in MB")
    parser.add_argument("--repeats", type=int, default=5, help="calls timed per direction (the best counts)")
    parser.add_argument("--encodings", default="int8,nf4", help=f"comma-separated, of {', '.join(ENCODINGS)}")
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--value-dtype", choices=("fp32", "fp16"), default="fp32")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rows = max(1, round(args.mb * 1e6 / 4 / COLUMNS))
    x = np.random.default_rng(args.seed).standard_normal((rows, COLUMNS)).astype(np.float32)
    for encoding in args.encodings.split(","):
        if encoding not in ENCODINGS:
            parser.error(f"--encodings: '{encoding}' is not one of {', '.join(ENCODINGS)}")
        print(json.dumps(measure(encoding, x, max(1, args.repeats), args.block_size, args.value_dtype)), flush=True)


if __name__ == "__main__":
    main()
