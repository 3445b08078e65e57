"""``pollinate bench``: the same run (model, data, partition, seeds, scenario) once per method, side by side.

Each method runs in its own ``pollinate simulate`` process (a fresh Ray cluster, so no method inherits another's
caches or memory), into ``<out>/<method>/``. The bench then writes ``<out>/bench.json``, ``<out>/bench.md`` (the
table) and plots (eval loss vs cumulative bytes; totals per method). Optionally it probes client peak memory per
base-weight precision in fresh processes (``--memory-probe``), since simulated clients share Ray actors.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from pollinate.common.report import atomic_write_text, headline_metric, human_bytes


def run_method(method: str, run_args: list[str], out: Path) -> dict[str, Any]:
    """One ``pollinate simulate`` in a subprocess; its report."""
    cmd = [sys.executable, "-m", "pollinate.cli", "simulate", *run_args, "--method", method, "--out", str(out),
           "--quiet"]
    proc = subprocess.run(cmd, text=True, capture_output=True)
    if proc.returncode != 0:
        raise RuntimeError(f"bench: '{method}' failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads((out / "report.json").read_text())


def bytes_to_reach(report: dict[str, Any], target_loss: float) -> int | None:
    """Cumulative bytes (both directions) until the eval loss first reaches ``target_loss``; None if never."""
    total = 0
    for r in report["rounds"]:
        total += r["bytes_up"] + r["bytes_down"]
        if r["eval_loss"] <= target_loss:
            return total
    return None


def summarize(report: dict[str, Any], baseline_final_loss: float) -> dict[str, Any]:
    rounds = report["rounds"]
    last = rounds[-1]
    metric_name, metric = headline_metric(last["eval_metrics"])
    under = [r["under_training_rate"] for r in rounds if r.get("under_training_rate") is not None]
    clients = [c for r in rounds for c in r["clients"]]
    return {
        "method": report["method"],
        "bytes_up": report["totals"]["bytes_up"], "bytes_down": report["totals"]["bytes_down"],
        "bytes_total": report["totals"]["bytes_up"] + report["totals"]["bytes_down"],
        "bytes_to_baseline_loss": bytes_to_reach(report, baseline_final_loss),
        "final_eval_loss": last["eval_loss"], "metric": metric_name, "final_metric": metric,
        "mean_round_seconds": sum(r["seconds"] for r in rounds) / len(rounds),
        "mean_client_round_seconds": _mean([c["round_seconds"] for c in clients if "round_seconds" in c]),
        "max_client_peak_rss_bytes": max((c.get("peak_rss_bytes", 0) for c in clients), default=0),
        # What the devices computed, summed over clients and rounds (split methods: without the server's body).
        "client_compute_seconds": sum(c.get("client_compute_seconds", c.get("train_seconds", 0.0)) for c in clients),
        "under_training_rate": _mean(under),
    }


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def probe_memory(model: str, bits: list[int], rank: int, batch_size: int, seq_len: int) -> dict[int, dict]:
    """Peak training memory of one client per base precision, each in a fresh process."""
    results = {}
    for b in bits:
        cmd = [sys.executable, "-m", "pollinate.simulations.memory_probe", "--model", model, "--bits", str(b),
               "--rank", str(rank), "--batch-size", str(batch_size), "--seq-len", str(seq_len)]
        proc = subprocess.run(cmd, text=True, capture_output=True)
        if proc.returncode != 0:
            raise RuntimeError(f"memory probe for {b}-bit failed:\n{proc.stderr[-3000:]}")
        results[b] = json.loads(proc.stdout.strip().splitlines()[-1])
    return results


def write_bench(out: Path, rows: list[dict[str, Any]], reports: dict[str, dict], memory: dict | None,
                per_method: dict[str, list[str]] | None = None, compute_baseline: str | None = None) -> None:
    baseline = rows[0]
    full = next((r for r in rows if r["method"] == compute_baseline), None)
    lines = ["# Pollinate bench", "",
             f"Same model, data, partition, seeds and scenario for every method; baseline: `{baseline['method']}`.",
             *[f"Only for `{m}`: " + ", ".join(f"`{o}`" for o in overrides) + "."
               for m, overrides in (per_method or {}).items()],
             "", "| method | bytes up | bytes down | total | × baseline | bytes to baseline loss | final eval loss |"
             f" metric | round s | client round s | client compute s | × {compute_baseline or '-'} | peak RSS |"
             " under-training |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        ratio = row["bytes_total"] / baseline["bytes_total"]
        reach = "not reached" if row["bytes_to_baseline_loss"] is None else human_bytes(row["bytes_to_baseline_loss"])
        under = "-" if row["under_training_rate"] is None else f"{row['under_training_rate']:.2f}"
        client_s = "-" if row["mean_client_round_seconds"] is None else f"{row['mean_client_round_seconds']:.1f}"
        compute_rel = (f"{row['client_compute_seconds'] / full['client_compute_seconds']:.3f}"
                       if full and full["client_compute_seconds"] else "-")
        lines.append(
            f"| {row['method']} | {human_bytes(row['bytes_up'])} | {human_bytes(row['bytes_down'])} | "
            f"{human_bytes(row['bytes_total'])} | {ratio:.3f} | {reach} | {row['final_eval_loss']:.4f} | "
            f"{row['metric']} {row['final_metric']:.3f} | {row['mean_round_seconds']:.1f} | {client_s} | "
            f"{row['client_compute_seconds']:.1f} | {compute_rel} | "
            f"{row['max_client_peak_rss_bytes'] / 2**20:.0f} MiB | {under} |")
    if memory:
        lines += ["", "Client peak training memory by base precision (fresh process each; MiB above the process "
                  "after imports):", "", "| bits | peak MiB | × fp32 |", "|---:|---:|---:|"]
        ref = memory.get(32, {}).get("peak_mib")
        for b, m in sorted(memory.items(), reverse=True):
            rel = f"{m['peak_mib'] / ref:.2f}" if ref else "-"
            lines.append(f"| {b} | {m['peak_mib']:.0f} | {rel} |")
    lines += ["", "![eval loss vs bytes](bench_loss_vs_bytes.png)"]
    _plot(out, reports)
    atomic_write_text(out / "bench.md", "\n".join(lines) + "\n")
    atomic_write_text(out / "bench.json", json.dumps({"rows": rows, "memory": memory, "per_method": per_method or {}},
                                                     indent=2))


def _plot(out: Path, reports: dict[str, dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, report in reports.items():
        total, xs, ys = 0, [0.0], [report["initial_eval"]["eval_loss"]]
        for r in report["rounds"]:
            total += r["bytes_up"] + r["bytes_down"]
            xs.append(total / 1e6)
            ys.append(r["eval_loss"])
        ax.plot(xs, ys, marker="o", label=method)
    ax.set_xscale("symlog", linthresh=0.1)
    ax.set_xlabel("cumulative MB on the wire (up + down)")
    ax.set_ylabel("eval loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "bench_loss_vs_bytes.png", dpi=110)
    plt.close(fig)


def bench(methods: list[str], run_args: list[str], out: Path, memory_probe: dict | None = None,
          per_method: dict[str, list[str]] | None = None, compute_baseline: str | None = None) -> list[dict]:
    """Run every method (``per_method``: extra ``--set`` overrides for one method) and write the comparison."""
    out.mkdir(parents=True, exist_ok=True)
    per_method = per_method or {}
    reports = {m: run_method(m, [*run_args, *sum((["--set", o] for o in per_method.get(m, [])), [])], out / m)
               for m in methods}
    baseline_loss = reports[methods[0]]["rounds"][-1]["eval_loss"]
    rows = [summarize(reports[m], baseline_loss) for m in methods]
    memory = probe_memory(**memory_probe) if memory_probe else None
    write_bench(out, rows, reports, memory, per_method, compute_baseline)
    return rows
