"""Simulation at scale: does a round cost the same with 10, 100 or 1,000 registered clients?

``python -m pollinate.simulations.scale_probe --registered 10,100,1000 --out runs/scale`` runs, one after the other
and each in its own process (so each driver starts from nothing), ``pollinate simulate`` with tiny-llama on the
built-in task, ``--sampled`` clients trained per round out of N registered (``federation.fraction_train`` =
sampled / N), ``--examples-per-client`` examples each, client-side evaluation off. ``--from-runs`` only reads
finished runs. Per N it prints one JSON line and a Markdown row:

- the round's wall seconds (median, mean and max over the rounds after the first, which pays for the workers'
  start), the same without the server's evaluation (which does not depend on N), and the median ``train_seconds``
  (messages out to the last reply in);
- the driver's resident memory (``server_rss_bytes``: the simulation driver runs the ServerApp) at the second and
  last round, and its least-squares slope in bytes per round over rounds 2..R (flat = a few KiB per round);

and, with ``--plot``, a PNG of both against the round.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from statistics import mean, median
from typing import Any

import numpy as np

MIB = 2**20


def simulate_argv(registered: int, args: argparse.Namespace, out: Path) -> list[str]:
    """``pollinate simulate`` with ``args.sampled`` of ``registered`` clients trained per round."""
    sets = {"federation.fraction_train": args.sampled / registered,
            "data.builtin_examples": args.examples_per_client * registered,
            "eval.client_fraction": 0, "output.plots": "false", "federation.seed": args.seed}
    argv = [sys.executable, "-m", "pollinate.cli", "simulate", "--model", args.model, "--method", args.method,
            "--clients", str(registered), "--rounds", str(args.rounds), "--out", str(out), "--quiet"]
    for key, value in sets.items():
        argv += ["--set", f"{key}={value}"]
    return argv


def round_records(run_dir: Path) -> list[dict[str, Any]]:
    """The run's round records from metrics.jsonl, in round order, each with ``trained``: its client records."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    trained: dict[int, int] = {}
    for record in records:
        if record.get("type") == "client":
            trained[record["round"]] = trained.get(record["round"], 0) + 1
    rounds = sorted((r for r in records if r.get("type") == "round"), key=lambda r: r["round"])
    return [{**r, "trained": trained.get(r["round"], 0)} for r in rounds]


def summarize(registered: int, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Round seconds and driver memory of one run (rounds after the first)."""
    if len(rounds) < 3:
        raise ValueError(f"{registered} registered clients: need at least 3 rounds to summarize, got {len(rounds)}")
    later = rounds[1:]
    seconds = [r["seconds"] for r in later]
    without_eval = [r["seconds"] - (r["timing"].get("eval_seconds") or 0.0) for r in later]
    rss = np.array([r["server_rss_bytes"] for r in later], dtype=float)
    slope = float(np.polyfit([r["round"] for r in later], rss, 1)[0])
    return {"registered": registered, "trained_per_round": round(mean(r["trained"] for r in later), 1),
            "rounds": len(rounds), "round_seconds_median": round(median(seconds), 3),
            "round_seconds_mean": round(mean(seconds), 3), "round_seconds_max": round(max(seconds), 3),
            "round_seconds_without_eval_median": round(median(without_eval), 3),
            "round_seconds_without_eval_max": round(max(without_eval), 3),
            "train_seconds_median": round(median(r["timing"]["train_seconds"] for r in later), 3),
            "driver_rss_mib_round2": round(rss[0] / MIB, 1), "driver_rss_mib_last": round(rss[-1] / MIB, 1),
            "driver_rss_slope_kib_per_round": round(slope / 1024, 1)}


def markdown(rows: list[dict[str, Any]]) -> str:
    """The summary rows as a Markdown table."""
    lines = ["| registered | round s (median / mean / max) | without server eval (median / max) | train s (median) "
             "| driver RSS MiB (round 2 → last) | RSS slope KiB/round |",
             "|---:|---|---|---:|---|---:|"]
    lines += [f"| {r['registered']} | {r['round_seconds_median']:.2f} / {r['round_seconds_mean']:.2f} / "
              f"{r['round_seconds_max']:.2f} | {r['round_seconds_without_eval_median']:.2f} / "
              f"{r['round_seconds_without_eval_max']:.2f} | {r['train_seconds_median']:.2f} | "
              f"{r['driver_rss_mib_round2']:.0f} → {r['driver_rss_mib_last']:.0f} | "
              f"{r['driver_rss_slope_kib_per_round']:.1f} |" for r in rows]
    return "\n".join(lines)


def plot(runs: dict[int, list[dict[str, Any]]], path: Path) -> None:
    """Round seconds and driver RSS against the round, one line per number of registered clients."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for registered, rounds in sorted(runs.items()):
        x = [r["round"] for r in rounds]
        left.plot(x, [r["seconds"] for r in rounds], marker=".", label=f"{registered} registered")
        right.plot(x, [r["server_rss_bytes"] / MIB for r in rounds], marker=".", label=f"{registered} registered")
    left.set(xlabel="round", ylabel="round wall seconds", yscale="log", title="Round time")
    right.set(xlabel="round", ylabel="driver RSS (MiB)", title="Driver memory")
    for axis in (left, right):
        axis.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--registered", default="10,100,1000", help="comma-separated numbers of registered clients")
    parser.add_argument("--sampled", type=int, default=10, help="clients trained per round")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--examples-per-client", type=int, default=20)
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--method", default="fedavg-lora")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/scale"))
    parser.add_argument("--from-runs", action="store_true", help="only summarize the runs already under --out")
    parser.add_argument("--plot", type=Path, default=None, help="write the figure to this PNG")
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.registered.split(",")]
    bad = [n for n in counts if n < args.sampled]
    if bad:
        parser.error(f"--registered {bad}: each must be >= --sampled ({args.sampled})")
    runs = {}
    for registered in counts:
        run_dir = args.out / f"registered-{registered}"
        if not args.from_runs:
            subprocess.run(simulate_argv(registered, args, run_dir), check=True)
        runs[registered] = round_records(run_dir)
    rows = [summarize(n, rounds) for n, rounds in runs.items()]
    for row in rows:
        print(json.dumps(row))
    print(markdown(rows))
    if args.plot is not None:
        plot(runs, args.plot)


if __name__ == "__main__":
    main()
