"""The run directories a dashboard reads: one run, or a bench directory holding one run per subdirectory.

Read-only: files are opened for reading and nothing is ever written beside them. A run's state is its
metrics.jsonl (followed as it grows), its config.toml (method, model, task, rounds, deadline) and whether its
report.json exists yet (written when the run finishes).
"""

from __future__ import annotations

import json
import threading
import time
import tomllib
from pathlib import Path
from typing import Any

from pollinate.dashboard.state import RunView, label, number
from pollinate.dashboard.tail import MetricsTail

MAX_RUNS = 16  # subdirectories of a bench directory shown side by side
MAX_CONFIG_BYTES = 1 << 20


class RunSource:
    """One run directory, followed: its events folded into a ``RunView``, plus its config and status.

    Parameters
    ----------
    run_dir : Path
        The run's directory (it may not exist yet: a run that is about to start).
    name : str
        How the page names this run (a bench shows several).
    """

    def __init__(self, run_dir: Path, name: str):
        self.run_dir = Path(run_dir)
        self.name = label(name)
        self.tail = MetricsTail(self.run_dir / "metrics.jsonl")
        self.view = RunView()
        self.header: dict[str, Any] = {}
        self.finished = False
        self._restarts = 0

    def refresh(self) -> bool:
        """Read what the run wrote since the last call; True when anything the page shows changed."""
        events = self.tail.read()
        if self.tail.restarts != self._restarts:  # metrics.jsonl was replaced: start the picture over
            self._restarts, self.view = self.tail.restarts, RunView()
        for event in events:
            self.view.apply(event)
        changed = bool(events)
        if not self.header and (header := read_header(self.run_dir / "config.toml")):
            self.header, changed = header, True
        finished = self._report_written()
        changed |= finished != self.finished
        self.finished = finished
        return changed

    def _report_written(self) -> bool:
        """report.json exists and is not older than the last event (a resumed run writes a new one at its end)."""
        try:
            report = (self.run_dir / "report.json").stat().st_mtime
        except FileNotFoundError:
            return False
        try:
            return report >= (self.run_dir / "metrics.jsonl").stat().st_mtime - 1.0
        except FileNotFoundError:
            return True

    def snapshot(self) -> dict[str, Any]:
        view = self.view.snapshot()
        done = [row["round"] for row in view["rounds"] if row.get("done")]
        last_done = max(done, default=0)
        planned = self.header.get("rounds")
        in_progress = None
        if not self.finished and (planned is None or last_done < planned) and view["events"]:
            in_progress = last_done + 1
        replied = next((row.get("replied", 0) for row in view["rounds"] if row["round"] == in_progress), 0)
        status = {"finished": self.finished, "last_done": last_done, "in_progress": in_progress,
                  "replied": replied, "skipped_lines": self.tail.skipped}
        return {"name": self.name, "header": self.header, "status": status, **view}


def read_header(path: Path) -> dict[str, Any]:
    """What the page's title and deadline column need from a run's config.toml ({} until it is readable)."""
    try:
        with open(path, "rb") as fh:
            text = fh.read(MAX_CONFIG_BYTES)
        config = tomllib.loads(text.decode("utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return {}
    federation = _table(config, "federation")
    return {"method": label(config.get("method", "")), "model": label(_table(config, "model").get("name", "")),
            "task": label(_table(config, "data").get("source", "")), "clients": number(federation.get("clients")),
            "rounds": number(federation.get("rounds")), "deadline_s": number(federation.get("deadline_s"))}


def _table(config: dict[str, Any], name: str) -> dict[str, Any]:
    section = config.get(name)
    return section if isinstance(section, dict) else {}


def find_runs(root: Path) -> list[Path]:
    """``root`` itself when it is a run (or empty: a run about to start), else its subdirectories that are runs."""
    if (root / "metrics.jsonl").exists() or (root / "config.toml").exists() or not root.is_dir():
        return [root]
    runs = sorted(p for p in root.iterdir() if p.is_dir() and (p / "metrics.jsonl").exists())
    return runs[:MAX_RUNS] or [root]


class DashboardData:
    """Everything a dashboard serves, refreshed at most every ``poll_s`` and serialized once per change.

    Parameters
    ----------
    root : Path
        A run directory or a bench directory (``pollinate bench --out``).
    poll_s : float, default 0.25
        Readers asking more often than this get the cached state.
    """

    def __init__(self, root: Path, poll_s: float = 0.25):
        self.root = Path(root)
        self.poll_s = poll_s
        self.sources: dict[Path, RunSource] = {}
        self.version = 0
        self._text = ""
        self._checked = 0.0
        self._lock = threading.Lock()

    def poll(self, force: bool = False) -> tuple[int, str]:
        """(version, state as JSON text), reading the files first when the last read is older than ``poll_s``."""
        with self._lock:
            now = time.monotonic()
            if force or not self._text or now - self._checked >= self.poll_s:
                self._checked = now
                if self._refresh() or not self._text:
                    self.version += 1
                    self._text = json.dumps(self._snapshot(), allow_nan=False, separators=(",", ":"))
            return self.version, self._text

    def _refresh(self) -> bool:
        changed = False
        runs = find_runs(self.root)
        if set(runs) != set(self.sources):
            known = self.sources
            self.sources = {path: known.get(path) or RunSource(path, self._name(path)) for path in runs}
            changed = True
        for source in self.sources.values():
            changed |= source.refresh()
        return changed

    def _name(self, path: Path) -> str:
        return path.resolve().name if path == self.root else path.name

    def _snapshot(self) -> dict[str, Any]:
        return {"version": self.version, "root": label(self.root.resolve().name),
                "runs": [source.snapshot() for source in self.sources.values()]}
