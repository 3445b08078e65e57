"""Step latency of a legitimate split client alone and while another node floods the split service.

``python -m pollinate.simulations.split_flood_bench [--config run.toml] [--set section.key=value ...]`` starts the
split service on 127.0.0.1 with the run's body and limits (as ``SFPrompt.prepare`` does) and times ``--steps``
pairs of split steps of one node (Forward + Backward of one ``train.batch_size`` x ``model.max_seq_len +
num_prompt_tokens`` batch): in each pair one step alone and one while a second process, holding another node's
token, sends Forwards of the largest admitted shape from ``--flood-threads`` threads without pause. Alternating
keeps a shared machine's changing load out of the comparison. Prints one JSON line: latency percentiles of both,
how the flood's calls were answered, and this process's resident memory at the start (service up, body warm),
at its peak under flood and after every session expired.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
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


def flood(address: str, token: str, shape: tuple[int, int, int], threads: int, active: Any, stop: Any,
          in_flight: Any, answers: Any) -> None:
    """Forwards of ``shape`` from ``threads`` threads while ``active`` is set, until ``stop``; counts the status
    codes. Runs at the lowest CPU priority: an attacker's client-side work is on its own machine, not the
    server's, and this one shares the server's CPUs."""
    os.nice(19)
    counts: Counter[str] = Counter()
    lock = threading.Lock()
    hidden = encode_tensor(torch.randn(shape))
    mask = encode_tensor(torch.ones(shape[:2], dtype=torch.bool))

    def run(index: int) -> None:
        stub, step = split_pb2_grpc.SplitBodyStub(grpc.insecure_channel(address)), 0
        while not stop.is_set():
            if not active.wait(timeout=0.1):
                continue
            step += 1
            request = split_pb2.ForwardRequest(session_id=f"flood-{index % 2}", step_id=step, token=token,
                                               keep_graph=True, hidden=hidden, attention_mask=mask)
            with in_flight.get_lock():
                in_flight.value += 1
            try:
                stub.Forward(request, metadata=((NODE_ID_METADATA, _FLOODER),), timeout=60)
                code = "OK"
            except grpc.RpcError as exc:
                code = exc.code().name
            finally:
                with in_flight.get_lock():
                    in_flight.value -= 1
            with lock:
                counts[code] += 1

    workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    answers.update(counts)


@contextlib.contextmanager
def flooder(address: str, token: str, shape: tuple[int, int, int], threads: int
            ) -> Iterator[tuple[Callable[[bool], None], dict[str, int]]]:
    """A flooding process for the block; yields ``switch(on)`` and the tally of its answers (filled at the end)."""
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager:
        active, stop, in_flight, answers = context.Event(), context.Event(), context.Value("i", 0), manager.dict()
        process = context.Process(target=flood, args=(address, token, shape, threads, active, stop, in_flight,
                                                      answers))
        process.start()

        def switch(on: bool) -> None:
            # On: return once a flood call is in flight. Off: once none is (its last computation is done).
            (active.set if on else active.clear)()
            deadline = time.monotonic() + 300
            while (in_flight.value > 0) != on and time.monotonic() < deadline:
                time.sleep(0.01)

        tally: dict[str, int] = {}
        try:
            yield switch, tally
        finally:
            stop.set()
            process.join(timeout=120)
            if process.is_alive():
                process.terminate()
            tally.update(answers)


def timed_step(channel: SplitChannel, shape: tuple[int, int, int]) -> float:
    """Seconds of one Forward + Backward through the channel (the client's own compute excluded)."""
    hidden = torch.randn(shape, requires_grad=True)
    start = time.perf_counter()
    channel.body(hidden, torch.ones(shape[:2], dtype=torch.long)).backward(torch.randn(shape))
    return time.perf_counter() - start


def percentiles(seconds: list[float]) -> dict[str, float]:
    cuts = statistics.quantiles(seconds, n=20)
    return {"p50_ms": round(statistics.median(seconds) * 1e3, 1), "p95_ms": round(cuts[18] * 1e3, 1)}


def bench(cfg: RunConfig, steps: int, flood_threads: int) -> dict[str, Any]:
    """Start the service with the run's body and limits, time the legitimate node alone and under flood."""
    sf = cfg.sfprompt
    path, task = runtime.model_task(cfg)
    parts = split_model(load_model(path, task, 2, pooling=cfg.model.pooling), sf.head_layers, sf.tail_layers,
                        sf.num_prompt_tokens)
    limits, tokens = split_limits(cfg), TokenRegistry()
    server, port = start_split_server(parts.body, tokens=tokens, limits=limits, session_ttl_s=_SESSION_TTL_S,
                                      max_concurrent_rpcs=sf.max_concurrent_rpcs, compute_slots=sf.compute_slots,
                                      hidden_size=parts.architecture.hidden_size)
    service, address, process = server.split_service, f"127.0.0.1:{port}", psutil.Process()
    shape = (limits.max_batch, limits.max_seq_len, parts.architecture.hidden_size)
    alone, flooded, rss = [], [], {}
    try:
        with SplitChannel(address, tokens.issue(_LEGIT, 1, 3600), node_id=_LEGIT, timeout_s=120) as channel, \
                flooder(address, tokens.issue(_FLOODER, 1, 3600), shape, flood_threads) as (switch, answers):
            timed_step(channel, shape)  # warm-up
            rss["start"] = rss["peak"] = process.memory_info().rss
            for _ in range(steps):
                switch(False)
                alone.append(timed_step(channel, shape))
                switch(True)
                flooded.append(timed_step(channel, shape))
                rss["peak"] = max(rss["peak"], process.memory_info().rss)
        deadline = time.monotonic() + 3 * _SESSION_TTL_S
        while service.num_sessions and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(_SESSION_TTL_S / 2 + 1)  # one more sweep: the one that finds no session returns free memory
        rss["after_expiry"] = process.memory_info().rss
    finally:
        server.stop(None)
    return {
        "model": cfg.model.name, "batch": shape[0], "seq": shape[1], "steps": steps, "flood_threads": flood_threads,
        "compute_slots": sf.compute_slots, "alone": percentiles(alone), "flooded": percentiles(flooded),
        "p50_ratio": round(statistics.median(flooded) / statistics.median(alone), 2),
        "flood_answers": answers, "rss_mib": {k: round(v / 2**20) for k, v in rss.items()},
        "sessions_left": service.num_sessions, "graph_bytes_left": service.graph_bytes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="run TOML (default: built-in defaults)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--steps", type=int, default=20, help="pairs of timed steps (one alone, one flooded)")
    parser.add_argument("--flood-threads", type=int, default=8, help="threads of the flooding node")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(json.dumps(bench(build_config(args.config, args.set), args.steps, args.flood_threads)))


if __name__ == "__main__":
    main()
