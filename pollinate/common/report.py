"""Run outputs: ``metrics.jsonl`` (one line per round and per client event), ``report.json``, ``report.md`` + PNGs.

report.json schema (every method writes the same keys; methods may add their own):
  method, model, task, num_clients, initial_eval {eval_loss, eval_metrics},
  rounds: [{round, train_loss, eval_loss (null in a round eval.every skips), eval_metrics, bytes_up, bytes_down,
            seconds, timing {train_seconds, eval_seconds, client_eval_seconds, aggregate_seconds,
            checkpoint_seconds, other_seconds} (server.round_timing),
            clients: [{client_id, bytes_up, bytes_down, train_seconds, num_examples, peak_rss_bytes, ...}],
            with client-side evaluation also bytes_eval_up, bytes_eval_down and
            client_eval {clients: [{client_id, num_examples, eval_loss, <metric>}], mean, worst}}],
  rejected: [{round, client_id, reason}], totals {bytes_up, bytes_down, seconds[, bytes_eval_up, bytes_eval_down]},
  adapter_dir, config.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from pollinate.common.trackers import Tracker, round_scalars, round_texts

PEER_TEXT_LIMIT = 200  # characters of peer-supplied text kept in metrics, reports and the console


def atomic_write_text(path: Path, text: str) -> None:
    """Write + fsync + rename: a reader never sees half a file, a crash never leaves one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def peer_text(value: Any, limit: int = PEER_TEXT_LIMIT) -> str:
    """Text a peer controls (an error it sent, a name in its update), made safe to store and show: control
    characters replaced, cut to ``limit`` characters (an ellipsis marks the cut). Print it as plain ``Text``,
    never as markup."""
    text = "".join(ch if ch.isprintable() else "?" for ch in str(value))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} GB"


class RunRecorder:
    """Collects per-round records, appends them to metrics.jsonl as they happen and prints progress."""

    def __init__(self, run_dir: Path, header: dict[str, Any], console: Console | None = None, quiet: bool = False,
                 trackers: Sequence[Tracker] = ()):
        self.trackers = list(trackers)  # output.loggers: they receive every round too
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.header = header
        self.rounds: list[dict[str, Any]] = []
        self.rejected: list[dict[str, Any]] = []
        self.initial_eval: dict[str, Any] | None = None
        self.console = console or Console(stderr=True, soft_wrap=True)  # a log line stays one line in files
        self.quiet = quiet
        self.started = time.time()
        self._metrics = open(self.run_dir / "metrics.jsonl", "a")

    def event(self, kind: str, **fields: Any) -> None:
        """One line of metrics.jsonl; flushed so a crash keeps everything up to here."""
        self._metrics.write(json.dumps({"type": kind, "time": round(time.time(), 3), **fields}) + "\n")
        self._metrics.flush()

    def client_event(self, server_round: int, **fields: Any) -> None:
        self.event("client", round=server_round, **fields)

    def reject(self, server_round: int, client_id: Any, reason: str) -> None:
        """Record a rejected reply; ``reason`` may quote the peer, so it is cut and shown as plain text."""
        client_id = client_id if isinstance(client_id, int) else peer_text(client_id)
        reason = peer_text(reason)
        self.rejected.append({"round": server_round, "client_id": client_id, "reason": reason})
        self.event("rejected", round=server_round, client_id=client_id, reason=reason)
        self.console.print(Text(f"round {server_round}: rejected reply from client {client_id}: {reason}",
                                style="yellow"))

    def initial(self, evaluation: dict[str, Any]) -> None:
        self.initial_eval = evaluation
        self.event("initial_eval", **evaluation)
        for tracker in self.trackers:
            tracker.log(0, round_scalars(evaluation), {})
        if not self.quiet:
            self.console.print(f"round 0 (before training): eval_loss {evaluation['eval_loss']:.4f} "
                               f"{_headline(evaluation['eval_metrics'])}")

    def round_done(self, record: dict[str, Any]) -> None:
        self.rounds.append(record)
        self.event("round", **{k: v for k, v in record.items() if k != "clients"})
        if self.trackers:
            totals = {key: sum(r[key] for r in self.rounds) for key in ("bytes_up", "bytes_down")}
            scalars, texts = round_scalars(record, totals), round_texts(record)
            for tracker in self.trackers:
                tracker.log(record["round"], scalars, texts)
        if not self.quiet:
            up = sum(r["bytes_up"] for r in self.rounds)
            down = sum(r["bytes_down"] for r in self.rounds)
            self.console.print(
                f"round {record['round']}/{self.header['rounds_planned']}: train_loss {_num(record['train_loss'])} "
                f"eval_loss {_num(record['eval_loss'])} {_headline(record['eval_metrics'])} | "
                f"up {human_bytes(record['bytes_up'])} down {human_bytes(record['bytes_down'])} "
                f"(total {human_bytes(up + down)}) | {record['seconds']:.1f}s{_timing_text(record.get('timing'))} | "
                f"{len(record['clients'])} clients"
                f"{_client_eval_text(record.get('client_eval'))}"
            )

    def history(self, pending: dict[str, Any] | None = None) -> dict[str, Any]:
        """What a checkpoint keeps so that a resumed run's report continues this one; ``pending``: the round
        being checkpointed, recorded (``round_done``) only once its checkpoint is written."""
        rounds = self.rounds if pending is None else [*self.rounds, pending]
        return {"initial_eval": self.initial_eval, "rounds": rounds, "rejected": self.rejected,
                "elapsed_s": round(time.time() - self.started, 3)}

    def restore(self, history: dict[str, Any], from_round: int) -> None:
        """Continue the report of a resumed run: earlier rounds, rejections and elapsed time count."""
        self.initial_eval = history["initial_eval"]
        self.rounds = list(history["rounds"])
        self.rejected = list(history["rejected"])
        self.started = time.time() - float(history["elapsed_s"])
        self.event("resumed", from_round=from_round)
        if not self.quiet:
            self.console.print(f"resuming after round {from_round}/{self.header['rounds_planned']}")

    def report(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        totals = {
            "bytes_up": sum(r["bytes_up"] for r in self.rounds),
            "bytes_down": sum(r["bytes_down"] for r in self.rounds),
            "seconds": round(time.time() - self.started, 3),
        }
        if any("bytes_eval_up" in r for r in self.rounds):
            totals.update({key: sum(r.get(key, 0) for r in self.rounds)
                           for key in ("bytes_eval_up", "bytes_eval_down")})
        return {**{k: v for k, v in self.header.items() if k != "rounds_planned"},
                "initial_eval": self.initial_eval, "rounds": self.rounds, "rejected": self.rejected,
                "totals": totals, **(extra or {})}

    def write(self, extra: dict[str, Any] | None = None, plots: bool = True) -> dict[str, Any]:
        report = self.report(extra)
        atomic_write_text(self.run_dir / "report.json", json.dumps(report, indent=2))
        if plots:
            write_markdown(self.run_dir, report)
        self.close()
        return report

    def close(self) -> None:
        """Close metrics.jsonl and the trackers, once: after the report, or when the run fails before it."""
        self._metrics.close()
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            tracker.close()


def summary_table(report: dict[str, Any]) -> Table:
    """Per-round summary for the terminal; narrow enough for 80 columns."""
    table = Table(title=f"{report['method']} on {report['task']} ({report['model']})")
    metric = headline_metric(report["rounds"][-1]["eval_metrics"])[0] if report["rounds"] else ""
    for col in ("round", "train loss", "eval loss", metric.replace("_", " ") or "metric", "up", "down", "s"):
        table.add_column(col, justify="right", no_wrap=True)
    for r in report["rounds"]:
        value = r["eval_metrics"].get(metric)
        table.add_row(str(r["round"]), _num(r["train_loss"]), _num(r["eval_loss"]),
                      "-" if value is None else f"{value:.3f}", human_bytes(r["bytes_up"]),
                      human_bytes(r["bytes_down"]), f"{r['seconds']:.1f}")
    return table


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _timing_text(timing: dict[str, Any] | None) -> str:
    """`` (train ..s, eval ..s)`` for the console: the round's client training and server evaluation."""
    if not timing:
        return ""
    return f" (train {timing['train_seconds']:.1f}s, eval {timing['eval_seconds']:.1f}s)"


def _timing_lines(rounds: list[dict[str, Any]]) -> list[str]:
    """report.md's table of where each round's wall time went (nothing when no round has a timing)."""
    rows = [r for r in rounds if r.get("timing")]
    if not rows:
        return []
    phases = ("train", "aggregate", "client_eval", "eval", "checkpoint", "other")
    lines = ["", "## Round time (seconds)", "",
             "Training: messages out to the last reply in. Evaluation: the server's (0 in a round it skips).", "",
             "| round | wall | training | aggregation | client evaluation | evaluation | checkpoint | other |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        cells = " | ".join(_seconds(r["timing"].get(f"{phase}_seconds")) for phase in phases)
        lines.append(f"| {r['round']} | {r['seconds']:.1f} | {cells} |")
    return lines


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _headline(metrics: dict[str, float]) -> str:
    for key in ("exact_match", "accuracy"):
        if key in metrics:
            return f"{key} {metrics[key]:.3f}"
    return ""


def _client_eval_text(client_eval: dict[str, Any] | None) -> str:
    """`` | client eval <metric> mean .. worst .. (client ..)`` for the console, or nothing."""
    if not client_eval:
        return ""
    name, mean = headline_metric(client_eval["mean"])
    worst = client_eval["worst"]
    return f" | client eval {name} mean {mean:.3f}, worst {worst[name]:.3f} (client {worst['client_id']})"


def _client_eval_lines(rounds: list[dict[str, Any]]) -> list[str]:
    """report.md's table of client-side evaluation per round (nothing when no round has one)."""
    rows = [r for r in rounds if r.get("client_eval")]
    if not rows:
        return []
    lines = ["", "## Client-side evaluation (each client's held-out examples)", "",
             "| round | clients | mean loss | mean metric | worst client | its loss | its metric | eval bytes up | "
             "eval bytes down |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ce = r["client_eval"]
        name, mean = headline_metric(ce["mean"])
        worst = ce["worst"]
        lines.append(f"| {r['round']} | {len(ce['clients'])} | {ce['mean']['eval_loss']:.4f} | {name} {mean:.3f} | "
                     f"{worst['client_id']} | {worst['eval_loss']:.4f} | {worst[name]:.3f} | {r['bytes_eval_up']} | "
                     f"{r['bytes_eval_down']} |")
    return lines


def headline_metric(metrics: dict[str, float]) -> tuple[str, float]:
    for key in ("exact_match", "accuracy"):
        if key in metrics:
            return key, metrics[key]
    return "", float("nan")


def write_plots(run_dir: Path, report: dict[str, Any]) -> list[str]:
    """Loss and metric vs round, cumulative bytes vs round, as PNGs; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rounds = [0] + [r["round"] for r in report["rounds"]]
    run_name = f"{report.get('method', '')} on {report.get('task', '')}"
    initial = report.get("initial_eval") or {"eval_loss": float("nan"), "eval_metrics": {}}
    # Rounds eval.every skips have no evaluation: the eval curves join the evaluated ones.
    evals = [(n, e) for n, e in zip(rounds, [initial] + report["rounds"], strict=True) if e["eval_loss"] is not None]
    eval_rounds = [n for n, _ in evals]
    files = []

    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax_loss.plot(eval_rounds, [e["eval_loss"] for _, e in evals], marker="o", label="eval loss")
    train_losses = [float("nan") if r["train_loss"] is None else r["train_loss"] for r in report["rounds"]]
    ax_loss.plot(rounds[1:], train_losses, marker="s", label="train loss")
    ax_loss.set_xlabel("round")
    ax_loss.legend()
    name, _ = headline_metric(report["rounds"][-1]["eval_metrics"]) if report["rounds"] else ("", 0)
    if name:
        ax_metric.plot(eval_rounds, [e["eval_metrics"].get(name, float("nan")) for _, e in evals], marker="o")
        ax_metric.set_ylabel(name)
    ax_metric.set_xlabel("round")
    ax_loss.set_title(f"{run_name}: loss")
    ax_metric.set_title(f"{run_name}: {name or 'metric'}")
    for axis in (ax_loss, ax_metric):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
    fig.tight_layout()
    fig.savefig(run_dir / "loss_metric.png", dpi=110)
    plt.close(fig)
    files.append("loss_metric.png")

    fig, ax = plt.subplots(figsize=(5, 3.6))
    up = down = 0
    ups, downs = [0], [0]
    for r in report["rounds"]:
        up, down = up + r["bytes_up"], down + r["bytes_down"]
        ups.append(up / 1e6)
        downs.append(down / 1e6)
    ax.plot(rounds, ups, marker="o", label="up (client→server)")
    ax.plot(rounds, downs, marker="s", label="down (server→client)")
    ax.set_xlabel("round")
    ax.set_ylabel("cumulative MB")
    ax.set_title(f"{run_name}: bytes sent")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend()
    fig.tight_layout()
    fig.savefig(run_dir / "bytes.png", dpi=110)
    plt.close(fig)
    files.append("bytes.png")
    return files


def write_markdown(run_dir: Path, report: dict[str, Any]) -> None:
    plots = write_plots(run_dir, report)
    lines = [
        f"# {report['method']} — {report['task']} on {report['model']}",
        "",
        f"{report['num_clients']} clients, {len(report['rounds'])} rounds, "
        f"{human_bytes(report['totals']['bytes_up'])} up, {human_bytes(report['totals']['bytes_down'])} down, "
        f"{report['totals']['seconds']:.1f} s.",
        "",
        "| round | train loss | eval loss | metric | bytes up | bytes down | seconds |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    if report.get("initial_eval"):
        ie = report["initial_eval"]
        lines.append(f"| 0 | | {ie['eval_loss']:.4f} | {_headline(ie['eval_metrics'])} | | | |")
    for r in report["rounds"]:
        lines.append(f"| {r['round']} | {_num(r['train_loss'])} | {_num(r['eval_loss'])} | "
                     f"{_headline(r['eval_metrics'])} | {r['bytes_up']} | {r['bytes_down']} | {r['seconds']:.1f} |")
    lines += _timing_lines(report["rounds"])
    lines += _client_eval_lines(report["rounds"])
    if report["rounds"]:
        last = report["rounds"][-1]["eval_metrics"]
        per_group = {k.split("/", 1)[1]: v for k, v in last.items() if "/" in k}
        if per_group:
            lines += ["", "Final metric per group: " + ", ".join(f"{k} {v:.2f}" for k, v in per_group.items())]
    if report.get("rejected"):
        lines += ["", "## Rejected updates", ""] + [f"- round {r['round']}, client {r['client_id']}: {r['reason']}"
                                                    for r in report["rejected"]]
    lines += [""] + [f"![{p}]({p})" for p in plots]
    atomic_write_text(run_dir / "report.md", "\n".join(lines) + "\n")
