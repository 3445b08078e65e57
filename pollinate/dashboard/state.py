"""What the dashboard shows of one run, folded from its metrics.jsonl events: bounded, sanitized, JSON-ready.

Every value is copied field by field from a known list: numbers must be finite, text is cut and stripped of
control characters (``peer_text``), anything else is dropped. Rounds, clients, rejections and heat-map rows
are capped, the oldest going first, so a long or hostile file cannot grow the server's memory without bound.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict, deque
from typing import Any

from pollinate.common.report import peer_text

MAX_ROUNDS = 5_000
MAX_CLIENTS = 1_000
MAX_REJECTIONS = 200
MAX_MODULES = 4_096
MAX_HEAT_CLIENTS = 256
NAME_LIMIT = 60  # characters of a client name or profile shown
REASON_LIMIT = 200  # characters of a rejection reason shown

ROUND_FIELDS = ("train_loss", "eval_loss", "bytes_up", "bytes_down", "seconds", "bytes_eval_up", "bytes_eval_down",
                "under_training_rate")
CLIENT_FIELDS = ("bytes_up", "bytes_down", "compute_seconds", "comm_seconds", "round_seconds", "train_seconds",
                 "train_loss", "num_examples", "est_round_seconds", "estimated_compute_seconds", "split_bytes_up",
                 "split_bytes_down", "kept_examples", "split_steps", "local_steps")
PLAN_FIELDS = ("modules", "bits", "batch_size", "local_steps", "est_memory_mib", "est_compute_s", "est_comm_s")
SPLIT_FIELDS = ("split_bytes_up", "split_bytes_down", "kept_examples")
HEADLINE_METRICS = ("exact_match", "accuracy")
PRIVACY_RANGES = {"delta": 1.0, "noise_multiplier": math.inf, "clip_norm": math.inf, "clipped_fraction": 1.0}


def number(value: Any) -> float | int | None:
    """``value`` if it is a finite int or float (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        return value if math.isfinite(value) else None
    except OverflowError:  # an int beyond float range (JSON allows any number of digits)
        return None


def label(value: Any, limit: int = NAME_LIMIT) -> str:
    """Peer-controlled text as a short, printable string."""
    return peer_text(value, limit)


def headline(metrics: Any) -> tuple[str, float | int | None]:
    """The metric a round is judged by (exact match or accuracy), as (name, value)."""
    if not isinstance(metrics, dict):
        return "", None
    for name in HEADLINE_METRICS:
        if name in metrics:
            return name, number(metrics[name])
    return "", None


def pick(source: dict[str, Any], fields: tuple[str, ...]) -> dict[str, Any]:
    return {key: value for key in fields if (value := number(source.get(key))) is not None}


def privacy_record(record: Any) -> dict[str, Any] | None:
    """A round's ``privacy`` field: δ, σ, clip norm and clipped fraction when finite and in range; ε a finite
    non-negative number, or None when the run recorded no guarantee (null or infinity). Malformed values are left
    out."""
    if not isinstance(record, dict):
        return None
    picked = {key: value for key, top in PRIVACY_RANGES.items()
              if (value := number(record.get(key))) is not None and 0 <= value <= top}
    epsilon = record.get("epsilon")
    if epsilon is None or epsilon == math.inf:
        picked["epsilon"] = None
    elif (value := number(epsilon)) is not None and value >= 0:
        picked["epsilon"] = value
    return picked


def round_number(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 10**9 else None


class RunView:
    """The dashboard's picture of one run, updated one metrics.jsonl event at a time.

    Parameters
    ----------
    max_rounds, max_clients, max_rejections : int
        How many rounds, clients (most recently heard from) and rejections are kept.
    """

    def __init__(self, max_rounds: int = MAX_ROUNDS, max_clients: int = MAX_CLIENTS,
                 max_rejections: int = MAX_REJECTIONS):
        self.max_rounds = max_rounds
        self.max_clients = max_clients
        self.rounds: OrderedDict[int, dict[str, Any]] = OrderedDict()
        self.clients: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.rejections: deque[dict[str, Any]] = deque(maxlen=max_rejections)
        self.module_ranks: OrderedDict[str, dict[str, int]] = OrderedDict()
        self.modules: dict[str, None] = {}  # module names in first-seen order
        self.metric_name = ""
        self.waiting: dict[str, Any] | None = None
        self.events = 0
        self.last_event_time: float | None = None

    def apply(self, event: dict[str, Any]) -> None:
        """Fold one event in; unknown types and malformed fields are ignored."""
        handler = getattr(self, f"_on_{event.get('type')}", None) if isinstance(event.get("type"), str) else None
        self.events += 1
        when = number(event.get("time"))
        if when is not None:
            self.last_event_time = when
        if handler is not None:
            handler(event)

    # --- events ------------------------------------------------------------------------------------------
    def _on_initial_eval(self, event: dict[str, Any]) -> None:
        self._eval_row(0, event)

    def _on_round(self, event: dict[str, Any]) -> None:
        if (rnd := round_number(event.get("round"))) is not None:
            row = self._eval_row(rnd, event)
            row.update(pick(event, ROUND_FIELDS))
            row["done"] = True
            if (privacy := privacy_record(event.get("privacy"))) is not None:
                row["privacy"] = privacy
            self._client_eval(row, event.get("client_eval"))
            self.waiting = None

    def _on_round_skipped(self, event: dict[str, Any]) -> None:
        if (rnd := round_number(event.get("round"))) is not None:
            self._row(rnd).update(done=True, skipped=label(event.get("reason", "too few accepted updates"),
                                                             REASON_LIMIT))

    def _on_waiting_for_clients(self, event: dict[str, Any]) -> None:
        self.waiting = {"joined": number(event.get("joined")), "needed": number(event.get("needed"))}

    def _on_client(self, event: dict[str, Any]) -> None:
        rnd = round_number(event.get("round"))
        client = self._client(event.get("client_id"))
        if client is None or rnd is None:
            return
        values = pick(event, CLIENT_FIELDS)
        client.update(round=rnd, status="ok", reason="", **values)
        for key in ("bytes_up", "bytes_down"):
            client[f"total_{key}"] = client.get(f"total_{key}", 0) + values.get(key, 0)
        if isinstance(event.get("met_deadline"), bool):
            client["met_deadline"] = event["met_deadline"]
            client["status"] = "ok" if event["met_deadline"] else "missed"
        if "profile" in event:
            client["profile"] = label(event["profile"])
        if isinstance(event.get("plan"), dict):
            client["plan"] = self._plan(event["plan"])
        row = self._row(rnd)
        row["replied"] = row.get("replied", 0) + 1
        if event.get("met_deadline") is False:
            row["missed"] = row.get("missed", 0) + 1
        for key in SPLIT_FIELDS:
            if key in values:
                row[key] = row.get(key, 0) + values[key]

    def _on_rejected(self, event: dict[str, Any]) -> None:
        rnd = round_number(event.get("round"))
        reason = label(event.get("reason", ""), REASON_LIMIT)
        name = label(event.get("client_id", "?"))
        self.rejections.append({"round": rnd, "client": name, "reason": reason})
        client = self._client(event.get("client_id"))
        if client is not None:
            client.update(status="rejected", reason=reason, round=rnd)
        if rnd is not None:
            row = self._row(rnd)
            row["rejected"] = row.get("rejected", 0) + 1

    def _on_plans(self, event: dict[str, Any]) -> None:
        plans = event.get("plans")
        if not isinstance(plans, dict):
            return
        for client_id, plan in list(plans.items())[: self.max_clients]:
            client = self._client(client_id)
            if client is None or not isinstance(plan, dict):
                continue
            client["plan"] = self._plan(plan)
            client.setdefault("status", "planned")
            self._heat_row(client["id"], plan.get("module_ranks"))

    # --- helpers -----------------------------------------------------------------------------------------
    def _row(self, rnd: int) -> dict[str, Any]:
        if rnd not in self.rounds:
            self.rounds[rnd] = {"round": rnd}
            if len(self.rounds) > self.max_rounds:
                self.rounds.popitem(last=False)
        return self.rounds[rnd]

    def _eval_row(self, rnd: int, event: dict[str, Any]) -> dict[str, Any]:
        row = self._row(rnd)
        if (loss := number(event.get("eval_loss"))) is not None:
            row["eval_loss"] = loss
        name, value = headline(event.get("eval_metrics"))
        if name:
            self.metric_name = name
            if value is not None:
                row["metric"] = value
        return row

    def _client_eval(self, row: dict[str, Any], client_eval: Any) -> None:
        if not isinstance(client_eval, dict):
            return
        for side in ("mean", "worst"):
            part = client_eval.get(side)
            if isinstance(part, dict):
                name, value = headline(part)
                row[f"client_{side}_loss"] = number(part.get("eval_loss"))
                row[f"client_{side}_metric"] = value if name else None
        worst = client_eval.get("worst")
        if isinstance(worst, dict) and "client_id" in worst:
            row["client_worst_id"] = label(worst["client_id"])

    def _client(self, client_id: Any) -> dict[str, Any] | None:
        if client_id is None or isinstance(client_id, dict | list):
            return None
        key = label(client_id)
        if key not in self.clients:
            self.clients[key] = {"id": key}
            if len(self.clients) > self.max_clients:
                self.clients.popitem(last=False)
        self.clients.move_to_end(key)
        return self.clients[key]

    def _plan(self, plan: dict[str, Any]) -> dict[str, Any]:
        ranks = plan.get("ranks") if isinstance(plan.get("ranks"), dict) else {}
        histogram = {label(rank, 8): modules for rank, count in list(ranks.items())[:64]
                     if (modules := number(count)) is not None}
        return {**pick(plan, PLAN_FIELDS), "ranks": histogram}

    def _heat_row(self, client: str, module_ranks: Any) -> None:
        if not isinstance(module_ranks, dict):
            return
        row = {}
        for module, rank in list(module_ranks.items())[:MAX_MODULES]:
            name = label(module, 120)
            if (value := number(rank)) is None or (name not in self.modules and len(self.modules) >= MAX_MODULES):
                continue
            self.modules.setdefault(name, None)
            row[name] = int(value)
        self.module_ranks[client] = row
        self.module_ranks.move_to_end(client)
        if len(self.module_ranks) > MAX_HEAT_CLIENTS:
            self.module_ranks.popitem(last=False)

    # --- output ------------------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """A JSON-ready picture: rounds with cumulative bytes, clients, rejections, the rank heat map, and the
        latest round's privacy record (None without DP)."""
        rounds, cumulative = [], 0
        for rnd in sorted(self.rounds):
            row = dict(self.rounds[rnd])
            cumulative += row.get("bytes_up", 0) + row.get("bytes_down", 0)
            row["cum_bytes"] = cumulative
            rounds.append(row)
        return {"metric_name": self.metric_name, "rounds": rounds, "clients": list(self.clients.values()),
                "rejections": list(self.rejections), "heatmap": self._heatmap(), "waiting": self.waiting,
                "privacy": next(({"round": row["round"], **row["privacy"]} for row in reversed(rounds)
                                 if "privacy" in row), None),
                "events": self.events, "last_event_time": self.last_event_time}

    def _heatmap(self) -> dict[str, Any] | None:
        """Clients x modules of planned LoRA ranks (0: module not adapted), or None without per-module plans."""
        if not self.module_ranks:
            return None
        modules = sorted(self.modules, key=natural_key)
        clients = sorted(self.module_ranks, key=natural_key)
        return {"modules": modules, "clients": clients,
                "ranks": [[self.module_ranks[c].get(m, 0) for m in modules] for c in clients]}


def natural_key(name: str) -> list[tuple[int, int | str]]:
    """Sorts "layers.2" before "layers.10" and client "2" before "10"."""
    return [(0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", name) if part]
