"""FedPipe's plan table: what each client was planned to train and what the planner expects it to cost.

Printed to the run's console when clients are planned (round 0, and a late joiner's round), so a user sees the
plan without opening metrics.jsonl. Built from the plan summaries the ``plans`` event records.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from pollinate.common.report import RunRecorder, peer_text
from pollinate.methods.fedpipe.planner import ClientPlan

LOG_WIDTH = 200  # off a terminal (a log file) the table keeps one line per client instead of wrapping at 80


def plan_summary(plan: ClientPlan) -> dict[str, Any]:
    """What the report and the table show of a plan: modules, a rank histogram, bits, batch, steps, estimates."""
    ranks = list(plan.ranks.values())
    return {"modules": len(ranks), "ranks": dict(sorted({r: ranks.count(r) for r in ranks}.items())),
            "bits": plan.bits, "batch_size": plan.batch_size, "local_steps": plan.local_steps,
            "est_memory_mib": round(plan.est_memory_bytes / 2**20, 1),
            "est_compute_s": round(plan.est_compute_s, 2), "est_comm_s": round(plan.est_comm_s, 2)}


def ranks_text(ranks: Mapping[Any, Any]) -> str:
    """A rank histogram as ``r2×14 r4×2`` (rank × modules), lowest rank first."""
    counts = sorted((int(rank), int(count)) for rank, count in ranks.items())
    return " ".join(f"r{rank}×{count}" for rank, count in counts) or "–"


def _client_key(client: str) -> tuple[int, int | str]:
    return (0, int(client)) if client.isdigit() else (1, client)


def _value(summary: Mapping[str, Any], key: str, digits: int = 0) -> str:
    value = summary.get(key)
    return "–" if value is None else f"{value:.{digits}f}"


def plan_table(plans: Mapping[str, Mapping[str, Any]], profiles: Mapping[str, str], title: str = "") -> Table:
    """One row per client: id, profile, modules, rank histogram, bits, batch, local steps and the estimates.

    Parameters
    ----------
    plans : mapping of client id to plan summary
        The ``plans`` event's entries: ``modules``, ``ranks`` (rank → modules), ``bits``, ``batch_size``,
        ``local_steps`` (0: the run's ``train.local_steps``), ``est_memory_mib``, ``est_compute_s``, ``est_comm_s``.
    profiles : mapping of client id to profile name
        The resource profile each client reported (peer text: shown cut, as plain text).
    title : str
        The table's title.
    """
    # on a narrow terminal the ranks wrap over several lines rather than being cut
    table = Table(title=title or None, box=box.SIMPLE_HEAD, title_justify="left", pad_edge=False,
                  collapse_padding=True)
    table.add_column("client", overflow="fold")
    table.add_column("profile", overflow="fold")
    for name in ("mods", "ranks", "bits", "batch", "steps", "MiB", "comp s", "comm s"):
        table.add_column(name, justify="left" if name == "ranks" else "right", overflow="fold")
    for client in sorted(plans, key=_client_key):
        summary = plans[client]
        steps = summary.get("local_steps")
        table.add_row(
            Text(peer_text(client, 40)), Text(peer_text(profiles.get(client) or "–", 40)),
            _value(summary, "modules"), ranks_text(summary.get("ranks") or {}), _value(summary, "bits"),
            _value(summary, "batch_size"), "default" if steps == 0 else _value(summary, "local_steps"),
            _value(summary, "est_memory_mib", 1), _value(summary, "est_compute_s", 2),
            _value(summary, "est_comm_s", 2))
    return table


def print_plan_table(recorder: RunRecorder, plans: Mapping[str, Mapping[str, Any]], profiles: Mapping[str, str],
                     server_round: int, replanned: bool = False) -> None:
    """Print the plan table to the run's console, unless the run is quiet or nothing was planned; ``replanned``:
    the plans of clients re-planned for ``server_round`` (their measured round missed its estimate)."""
    if recorder.quiet or not plans:
        return
    if replanned:
        which = f" of clients re-planned for round {server_round}"
    else:
        which = "" if server_round == 0 else f" of clients joining in round {server_round}"
    title = f"FedPipe plan{which} (estimated per round: memory MiB, compute and comm seconds)"
    table, console = plan_table(plans, profiles, title), recorder.console
    if console.is_terminal:
        console.print(table)
    else:  # a wider console on the same stream: a rich console never prints wider than its own width
        Console(file=console.file, width=LOG_WIDTH, color_system=None).print(table)
