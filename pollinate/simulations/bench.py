"""``pollinate bench``: the same run (model, data, partition, seeds, scenario) once per method, side by side.

Each method runs in its own ``pollinate simulate`` process (a fresh Ray cluster, so no method inherits another's
caches or memory), into ``<out>/<method>/``. The bench then writes ``<out>/bench.json``, ``<out>/bench.md`` (the
table) and plots (eval loss vs cumulative bytes; totals per method). With ``--centralized`` it also runs the
baseline method as one client on the union of the clients' data (``pollinate.simulations.centralized``) and relates
every method's final metric and eval loss to both references. Optionally it probes client peak memory per
base-weight precision in fresh processes (``--memory-probe``), since simulated clients share Ray actors.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

from pollinate.common.report import atomic_write_text, headline_metric, human_bytes
from pollinate.simulations.centralized import REFERENCES


def run_method(method: str, run_args: list[str], out: Path, resume: bool = False) -> dict[str, Any]:
    """One ``pollinate simulate`` in a subprocess; its report. With ``resume`` a run that finished (its
    ``report.json`` exists) is reused and one that stopped continues from its last checkpoint (``--resume``,
    which refuses a differing config)."""
    if resume and (out / "report.json").is_file():
        print(f"bench: reusing the finished run {out}", file=sys.stderr)
        return json.loads((out / "report.json").read_text())
    again = ["--resume", str(out)] if resume and any((out / "checkpoints").glob("round-*")) else []
    cmd = [sys.executable, "-m", "pollinate.cli", "simulate", *run_args, "--method", method, "--out", str(out),
           "--quiet", *again]
    proc = subprocess.run(cmd, text=True, capture_output=True)
    if proc.returncode != 0:
        raise RuntimeError(f"bench: '{method}' failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads((out / "report.json").read_text())


def bytes_to_reach(report: dict[str, Any], target_loss: float) -> int | None:
    """Cumulative bytes (both directions) until the eval loss first reaches ``target_loss``; None if never.
    Rounds without a server evaluation (``eval.every``) are passed over."""
    total = 0
    for r in report["rounds"]:
        total += r["bytes_up"] + r["bytes_down"]
        if r["eval_loss"] is not None and r["eval_loss"] <= target_loss:
            return total
    return None


def summarize(report: dict[str, Any], baseline_final_loss: float, name: str | None = None) -> dict[str, Any]:
    """One bench row of a run's report; ``name`` labels it (default the report's method)."""
    rounds = report["rounds"]
    last = rounds[-1]
    metric_name, metric = headline_metric(last["eval_metrics"])
    under = [r["under_training_rate"] for r in rounds if r.get("under_training_rate") is not None]
    clients = [c for r in rounds for c in r["clients"]]
    client_mean, client_worst = client_eval_stats(last, metric_name)
    return {
        "method": name or report["method"],
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
        "compute_estimate": compute_estimate(rounds),
        "train_rows": train_rows(report),
        "client_eval_mean": client_mean, "client_eval_worst": client_worst,
        "metric_per_round": [headline_metric(r["eval_metrics"])[1] for r in rounds],
        "eval_loss_per_round": [r["eval_loss"] for r in rounds],
    }


def compute_estimate(rounds: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Measured over planned compute per client round (methods that plan it, e.g. FedPipe): how many client rounds,
    the share within 15% of the estimate (all rounds, and from round 2 on, once round 1 has corrected the plans),
    the worst relative gap and the mean ratio; None without estimates."""
    ratios = [(r["round"], c["compute_seconds"] / c["estimated_compute_seconds"]) for r in rounds for c in r["clients"]
              if c.get("estimated_compute_seconds") and c.get("compute_seconds") is not None]
    if not ratios:
        return None
    later = [ratio for rnd, ratio in ratios if rnd >= 2]
    return {"client_rounds": len(ratios), "within_15": _within(ratio for _, ratio in ratios),
            "within_15_from_round_2": _within(later) if later else None,
            "worst_gap": max(abs(ratio - 1) for _, ratio in ratios),
            "mean_ratio": sum(ratio for _, ratio in ratios) / len(ratios)}


def _within(ratios: Any) -> float:
    ratios = list(ratios)
    return sum(abs(ratio - 1) <= 0.15 for ratio in ratios) / len(ratios)


def estimate_table(rows: list[dict[str, Any]]) -> list[str]:
    """Measured vs planned client compute of the runs whose method plans it (nothing when none does)."""
    planned = [row for row in rows if row.get("compute_estimate")]
    if not planned:
        return []
    lines = ["Client compute, measured vs the plan's estimate (per client round; from round 2: once round 1's "
             "measurements have corrected the plans):", "",
             "| method | client rounds | within 15% | from round 2 | worst gap | mean measured ÷ estimated |",
             "|---|---:|---:|---:|---:|---:|"]
    for row in planned:
        e = row["compute_estimate"]
        later = _num(e["within_15_from_round_2"], ".2f") or "-"
        lines.append(f"| {row['method']} | {e['client_rounds']} | {e['within_15']:.2f} | {later} | "
                     f"{e['worst_gap']:.2f} | {e['mean_ratio']:.2f} |")
    return ["", *lines]


def train_rows(report: dict[str, Any]) -> int | None:
    """Examples the run's clients trained on together: each client's stated count, once per client."""
    counts = {c["client_id"]: c["num_examples"] for r in report["rounds"] for c in r["clients"]
              if "client_id" in c and "num_examples" in c}
    return sum(counts.values()) if counts else None


def client_eval_stats(record: dict[str, Any], metric: str) -> tuple[float | None, float | None]:
    """Mean and worst client's ``metric`` in one round record's ``client_eval`` (``{mean: {...}, worst: {...}}``);
    None where the run did not evaluate on clients."""
    stats = record.get("client_eval")
    if not isinstance(stats, dict):
        return None, None
    return _stat(stats.get("mean"), metric), _stat(stats.get("worst"), metric)


def _stat(entry: Any, metric: str) -> float | None:
    value = entry.get(metric) if isinstance(entry, dict) else None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def relate_to_references(rows: list[dict[str, Any]]) -> None:
    """Add each row's final metric and eval loss divided by every centralized reference's (None if not defined)."""
    for ref in (r for r in rows if r["method"] in REFERENCES):
        key = ref["method"].replace("-", "_")
        for row in rows:
            row[f"metric_vs_{key}"] = _ratio(row["final_metric"], ref["final_metric"])
            row[f"eval_loss_vs_{key}"] = _ratio(row["final_eval_loss"], ref["final_eval_loss"])


def _ratio(value: float, reference: float) -> float | None:
    if not (math.isfinite(value) and math.isfinite(reference)) or reference == 0:
        return None
    return value / reference


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
                per_method: dict[str, list[str]] | None = None, compute_baseline: str | None = None,
                references: dict[str, list[str]] | None = None) -> None:
    """bench.md (header, cost table, learning-quality table, per-round curves), bench.json and the plot."""
    baseline = rows[0]
    lines = ["# Pollinate bench", "",
             f"Same model, data, partition, seeds and scenario for every method; baseline: `{baseline['method']}`.",
             *[f"Only for `{m}`: " + ", ".join(f"`{o}`" for o in overrides) + "."
               for m, overrides in (per_method or {}).items()],
             *(reference_note(baseline["method"], references) if references else []),
             "", *cost_table(rows, compute_baseline), *estimate_table(rows)]
    if memory:
        lines += ["", "Client peak training memory by base precision (fresh process each; MiB above the process "
                  "after imports):", "", "| bits | peak MiB | × fp32 |", "|---:|---:|---:|"]
        ref = memory.get(32, {}).get("peak_mib")
        for b, m in sorted(memory.items(), reverse=True):
            rel = f"{m['peak_mib'] / ref:.2f}" if ref else "-"
            lines.append(f"| {b} | {m['peak_mib']:.0f} | {rel} |")
    lines += ["", *quality_table(rows), "", *round_tables(rows)]
    lines += ["", "![eval loss vs bytes](bench_loss_vs_bytes.png)"]
    _plot(out, reports)
    atomic_write_text(out / "bench.md", "\n".join(lines) + "\n")
    atomic_write_text(out / "bench.json", json.dumps(
        {"rows": rows, "memory": memory, "per_method": per_method or {}, "references": references or {}},
        indent=2))


def reference_note(baseline: str, references: dict[str, list[str]]) -> list[str]:
    """The header's account of what the centralized references are, with their exact overrides."""
    return [
        "", f"Centralized references: `{baseline}` (with its own overrides) as ONE client holding every training row "
        "the federated clients hold together (same data source, `data.max_train_examples` cap, eval split, seed "
        "and batch size): `centralized-total` takes per round as many optimizer steps as all sampled clients "
        "together, `centralized-sequential` as many as one client. The federated clients each hold out "
        "`eval.client_fraction` of their rows (at most `eval.client_max_examples`) for client-side evaluation and "
        "do not train on them; the centralized client holds out none, so it trains on up to that many more rows "
        "(the `train rows` column). Federation-only mechanisms are off in the references (aggregator and server "
        "optimizer fedavg, no FedProx term, no update norm bounds, uniform scenario).",
        "", *[f"- `{name}`: " + ", ".join(f"`{o}`" for o in overrides) for name, overrides in references.items()],
    ]


def cost_table(rows: list[dict[str, Any]], compute_baseline: str | None) -> list[str]:
    baseline = rows[0]
    full = next((r for r in rows if r["method"] == compute_baseline), None)
    lines = ["| method | bytes up | bytes down | total | × baseline | bytes to baseline loss | final eval loss |"
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
    return lines


def quality_table(rows: list[dict[str, Any]]) -> list[str]:
    """Final metric and eval loss, each beside its ratio to both centralized references ('-' without them);
    the last round's client-side mean and worst metric; bytes relative to the baseline."""
    metric = rows[0]["metric"] or "metric"
    lines = ["Learning quality after the last round (÷: this run's value over the reference's; client: the last "
             "round's client-side evaluation, mean and worst client):", "",
             f"| method | train rows | {metric} | ÷ centralized-total | ÷ centralized-sequential | eval loss | "
             f"loss ÷ centralized-total | loss ÷ centralized-sequential | client mean {metric} | "
             f"client worst {metric} | bytes × baseline |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        cells = [row["train_rows"], _num(row["final_metric"], ".3f"),
                 _num(row.get("metric_vs_centralized_total"), ".3f"),
                 _num(row.get("metric_vs_centralized_sequential"), ".3f"), _num(row["final_eval_loss"], ".4f"),
                 _num(row.get("eval_loss_vs_centralized_total"), ".3f"),
                 _num(row.get("eval_loss_vs_centralized_sequential"), ".3f"),
                 _num(row["client_eval_mean"], ".3f"), _num(row["client_eval_worst"], ".3f"),
                 _num(row["bytes_total"] / rows[0]["bytes_total"], ".3f")]
        lines.append(f"| {row['method']} | " + " | ".join("-" if c is None else str(c) for c in cells) + " |")
    return lines


def round_tables(rows: list[dict[str, Any]]) -> list[str]:
    """Every run's headline metric, then eval loss, per round (a row per round, a column per run)."""
    metric = rows[0]["metric"] or "metric"
    rounds = max(len(r["metric_per_round"]) for r in rows)
    head = "| round | " + " | ".join(r["method"] for r in rows) + " |"
    rule = "|---:|" + "---:|" * len(rows)
    lines = []
    for title, key, spec in ((metric, "metric_per_round", ".3f"), ("eval loss", "eval_loss_per_round", ".4f")):
        lines += [f"Per round, {title}:", "", head, rule]
        for i in range(rounds):
            values = [r[key][i] if i < len(r[key]) else None for r in rows]
            lines.append(f"| {i + 1} | " + " | ".join(_num(v, spec) or "-" for v in values) + " |")
        lines.append("")
    return lines[:-1]


def _num(value: float | None, spec: str) -> str | None:
    return None if value is None or not math.isfinite(value) else format(value, spec)


def _plot(out: Path, reports: dict[str, dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, report in reports.items():
        total, xs, ys = 0, [0.0], [report["initial_eval"]["eval_loss"]]
        for r in report["rounds"]:
            total += r["bytes_up"] + r["bytes_down"]
            if r["eval_loss"] is not None:  # a round eval.every skips: no point
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
          per_method: dict[str, list[str]] | None = None, compute_baseline: str | None = None,
          references: dict[str, list[str]] | None = None, resume: bool = False) -> list[dict]:
    """Run every method (``per_method``: extra ``--set`` overrides for one method), then each reference
    (``references``: name -> overrides on top of the baseline method's, see ``centralized.reference_overrides``),
    and write the comparison. ``resume``: see :func:`run_method`."""
    out.mkdir(parents=True, exist_ok=True)
    per_method = per_method or {}
    references = references or {}
    reports = {m: run_method(m, [*run_args, *_sets(per_method.get(m, []))], out / m, resume) for m in methods}
    baseline_args = [*run_args, *_sets(per_method.get(methods[0], []))]
    reports.update({name: run_method(methods[0], [*baseline_args, *_sets(overrides)], out / name, resume)
                    for name, overrides in references.items()})
    baseline_loss = reports[methods[0]]["rounds"][-1]["eval_loss"]
    rows = [summarize(report, baseline_loss, name) for name, report in reports.items()]
    relate_to_references(rows)
    memory = probe_memory(**memory_probe) if memory_probe else None
    write_bench(out, rows, reports, memory, per_method, compute_baseline, references)
    return rows


def _sets(overrides: list[str]) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]
