"""The fuzzing command: both fuzzers one after the other in this process, a table of outcomes, one JSON line."""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

import pollinate.simulations.fuzz as fuzz
from pollinate.simulations.fuzz.split import fuzz_split
from pollinate.simulations.fuzz.tally import OUTCOMES, Tally, peak_rss_mib, rss_mib
from pollinate.simulations.fuzz.updates import fuzz_updates


def outcome_table(tallies: list[Tally]) -> Table:
    table = Table(title="Fuzzed inputs by outcome")
    for column in ("target", "cases", *OUTCOMES, "slowest case ms", "seconds"):
        table.add_column(column, justify="left" if column == "target" else "right")
    for tally in tallies:
        row = tally.summary()
        table.add_row(row["target"], str(row["cases"]), *(str(row[o]) for o in OUTCOMES),
                      f"{row['slowest_case_ms']:.1f}", f"{row['seconds']:.1f}")
    return table


def bench(updates: int, split_requests: int, seed: int, timeout_s: float, max_request_bytes: int) -> dict[str, Any]:
    """Both fuzzers, one after the other in this process; the counts, findings and memory."""
    torch.set_num_threads(1)
    memory = {"rss_start_mib": rss_mib()}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="pollinate-fuzz-") as run_dir:
        tallies = fuzz_updates(updates, seed, timeout_s, Path(run_dir))
    memory.update(rss_after_updates_mib=rss_mib(), peak_rss_after_updates_mib=peak_rss_mib())
    if split_requests:
        split, split_memory = fuzz_split(split_requests, seed, timeout_s, max_request_bytes)
        tallies.append(split)
        memory.update(split_memory)
    memory["peak_rss_mib"] = peak_rss_mib()
    totals = {o: sum(t.counts[o] for t in tallies) for o in OUTCOMES}
    return {"seed": seed, "updates": updates, "split_requests": split_requests, "case_timeout_s": timeout_s,
            "max_request_bytes": max_request_bytes, "seconds": round(time.perf_counter() - started, 1),
            "totals": totals, "targets": [t.summary() for t in tallies], "memory": memory}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m pollinate.simulations.fuzz", description=fuzz.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--updates", type=int, default=10_000, help="fuzzed update replies (three targets)")
    parser.add_argument("--split-requests", type=int, default=10_000, help="fuzzed split-service requests")
    parser.add_argument("--seed", type=int, default=0, help="every case's randomness derives from it")
    parser.add_argument("--case-timeout-s", type=float, default=5.0, help="a case (a gRPC call) slower is a hang")
    parser.add_argument("--max-request-bytes", type=int, default=1 << 20, help="cap on a mutated bytes field")
    parser.add_argument("--json-out", default=None, help="also write the JSON result to this file")
    args = parser.parse_args()
    result = bench(args.updates, args.split_requests, args.seed, args.case_timeout_s, args.max_request_bytes)
    tallies = [Tally(t["target"], counts=Counter({o: t[o] for o in OUTCOMES}), slowest_s=t["slowest_case_ms"] / 1e3,
                     seconds=t["seconds"]) for t in result["targets"]]
    Console(stderr=True, width=120).print(outcome_table(tallies))
    line = json.dumps(result)
    if args.json_out:
        Path(args.json_out).write_text(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
