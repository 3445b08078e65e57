"""Step latency of a legitimate split client alone and while another node floods the split service.

``python -m pollinate.simulations.split_flood_bench [--config run.toml] [--set section.key=value ...]`` starts the
split service on 127.0.0.1 with the run's body and limits (as ``SFPrompt.prepare`` does), times ``--steps``
split steps (Forward + Backward of one ``train.batch_size`` x ``model.max_seq_len + num_prompt_tokens`` batch)
of one node alone, then again while a second process holding another node's token sends Forwards of the
largest admitted shape from ``--flood-threads`` threads without pause. Prints one JSON line: latency
percentiles of both phases, how the flood's calls were answered, and the server's resident memory before,
under flood and after the sessions expired.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import grpc
import psutil
import torch

from pollinate.client import runtime
from pollinate.common.config import RunConfig
from pollinate.common.config_io import build_config
from pollinate.common.models import load_model
from pollinate.methods.sfprompt.channel import NODE_ID_METADATA, SplitChannel
from pollinate.methods.sfprompt.server import split_limits
from pollinate.methods.sfprompt.service import TokenRegistry, start_split_server
from pollinate.methods.sfprompt.split import encode_tensor, split_model
from pollinate.protos import split_pb2, split_pb2_grpc

_LEGIT, _FLOODER = "1", "2"
_SESSION_TTL_S = 20.0  # short, so that the expiry of the flood's sessions is seen within the run


def timed_steps(channel: SplitChannel, shape: tuple[int, int, int], steps: int) -> list[float]:
    """Seconds of each Forward + Backward through the channel (the client's own compute excluded)."""
    mask = torch.ones(shape[:2], dtype=torch.long)
    seconds = []
    for _ in range(steps):
        hidden = torch.randn(shape, requires_grad=True)
        start = time.perf_counter()
        channel.body(hidden, mask).backward(torch.randn(shape))
        seconds.append(time.perf_counter() - start)
    return seconds


def flood(address: str, token: str, shape: tuple[int, int, int], threads: int, started: Any, stop: Any,
          answers: Any) -> None:
    """Forwards of ``shape`` from ``threads`` threads until ``stop`` is set; counts the status codes and sets
    ``started`` at the first answer. Runs at the lowest CPU priority: an attacker's own client-side work is on
    its machine, not the server's, and this one shares the server's CPUs."""
    os.nice(19)
    counts: Counter[str] = Counter()
    lock = threading.Lock()
    hidden = encode_tensor(torch.randn(shape))
    mask = encode_tensor(torch.ones(shape[:2], dtype=torch.bool))

    def run(index: int) -> None:
        stub, step = split_pb2_grpc.SplitBodyStub(grpc.insecure_channel(address)), 0
        while not stop.is_set():
            step += 1
            request = split_pb2.ForwardRequest(session_id=f"flood-{index % 2}", step_id=step, token=token,
                                               keep_graph=True, hidden=hidden, attention_mask=mask)
            try:
                stub.Forward(request, metadata=((NODE_ID_METADATA, _FLOODER),), timeout=30)
                code = "OK"
            except grpc.RpcError as exc:
                code = exc.code().name
            with lock:
                counts[code] += 1
            started.set()

    workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    answers.update(counts)


def percentiles(seconds: list[float]) -> dict[str, float]:
    cuts = statistics.quantiles(seconds, n=20)
    return {"p50_ms": round(statistics.median(seconds) * 1e3, 1), "p95_ms": round(cuts[18] * 1e3, 1)}


def legit_steps(address: str, tokens: TokenRegistry, shape: tuple[int, int, int], steps: int) -> list[float]:
    """A fresh session of the legitimate node: two warm-up steps, then ``steps`` timed ones."""
    with SplitChannel(address, tokens.issue(_LEGIT, 1, 3600), node_id=_LEGIT, timeout_s=120) as channel:
        timed_steps(channel, shape, 2)
        return timed_steps(channel, shape, steps)


@contextlib.contextmanager
def flooding(address: str, token: str, shape: tuple[int, int, int], threads: int) -> Iterator[dict]:
    """A flooding process for the duration of the block; yields the tally of its answers (filled at the end)."""
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager:
        started, stop, answers = context.Event(), context.Event(), manager.dict()
        process = context.Process(target=flood, args=(address, token, shape, threads, started, stop, answers))
        process.start()
        tally: dict[str, int] = {}
        try:
            if not started.wait(timeout=300):
                raise RuntimeError("the flooding process got no answer within 300 s")
            yield tally
        finally:
            stop.set()
            process.join(timeout=120)
            if process.is_alive():
                process.terminate()
            tally.update(answers)


def bench(cfg: RunConfig, steps: int, flood_threads: int) -> dict[str, Any]:
    """Start the service with the run's body and limits, time the legitimate node alone and under flood."""
    sf = cfg.sfprompt
    path, task = runtime.model_task(cfg)
    parts = split_model(load_model(path, task, 2), sf.head_layers, sf.tail_layers, sf.num_prompt_tokens)
    limits = split_limits(cfg)
    tokens = TokenRegistry()
    server, port = start_split_server(parts.body, tokens=tokens, limits=limits, session_ttl_s=_SESSION_TTL_S,
                                      max_concurrent_rpcs=sf.max_concurrent_rpcs, compute_slots=sf.compute_slots,
                                      hidden_size=parts.architecture.hidden_size)
    service, address, process = server.split_service, f"127.0.0.1:{port}", psutil.Process()
    shape = (limits.max_batch, limits.max_seq_len, parts.architecture.hidden_size)
    rss = {"start": process.memory_info().rss}
    try:
        alone = legit_steps(address, tokens, shape, steps)
        print(f"alone: median {statistics.median(alone):.3f} s; starting the flood", file=sys.stderr, flush=True)
        with flooding(address, tokens.issue(_FLOODER, 1, 3600), shape, flood_threads) as answers:
            flooded = legit_steps(address, tokens, shape, steps)
            rss["under_flood"] = process.memory_info().rss
        deadline = time.monotonic() + 3 * _SESSION_TTL_S
        while service.num_sessions and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(_SESSION_TTL_S / 2 + 1)  # one more sweep: the one that finds no session returns free memory
        rss["after_expiry"] = process.memory_info().rss
    finally:
        server.stop(None)
    return {
        "model": cfg.model.name, "batch": shape[0], "seq": shape[1], "steps": steps, "flood_threads": flood_threads,
        "compute_slots": sf.compute_slots,
        "alone": percentiles(alone), "flooded": percentiles(flooded),
        "p50_ratio": round(statistics.median(flooded) / statistics.median(alone), 2),
        "flood_answers": answers, "rss_mib": {k: round(v / 2**20) for k, v in rss.items()},
        "sessions_left": service.num_sessions, "graph_bytes_left": service.graph_bytes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="run TOML (default: built-in defaults)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per phase")
    parser.add_argument("--flood-threads", type=int, default=8, help="threads of the flooding node")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(json.dumps(bench(build_config(args.config, args.set), args.steps, args.flood_threads)))


if __name__ == "__main__":
    main()
