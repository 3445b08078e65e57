"""A run directory as the export, generate and eval commands read it: config, report, checkpointed rounds, labels."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pollinate.common.config import RunConfig
from pollinate.common.config_io import build_config
from pollinate.common.data import load_task, resolve_task_type
from pollinate.common.models import ModelInfo, resolve_model
from pollinate.server.checkpoint import GLOBAL_FILE, STATE_FILE, load_round, round_dir


class ExportError(ValueError):
    """A run directory cannot be used as asked; the message names it and what to do."""


def checkpointed_rounds(run_dir: Path) -> list[int]:
    """Rounds of ``run_dir`` with a complete checkpoint, in order."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(int(p.name.split("-")[1]) for p in root.glob("round-[0-9][0-9][0-9][0-9]")
                  if (p / GLOBAL_FILE).is_file() and (p / STATE_FILE).is_file())


@dataclass
class FinishedRun:
    """A run directory and what it was run with.

    Parameters
    ----------
    run_dir : Path
        The run directory.
    cfg : RunConfig
        Its ``config.toml``.
    model : ModelInfo
        The base model, resolved (a preset's cache is built if missing).
    task_type : str
        ``generation`` or ``classification``.
    report : dict
        ``report.json`` (empty for a run that stopped before writing it).
    """

    run_dir: Path
    cfg: RunConfig
    model: ModelInfo
    task_type: str
    report: dict[str, Any] = field(default_factory=dict)
    _labels: list[str] | None = field(default=None, repr=False)

    @property
    def rounds(self) -> list[int]:
        return checkpointed_rounds(self.run_dir)

    def pick_round(self, server_round: int | None) -> int:
        """``server_round``, or the last checkpointed one; ``ExportError`` when it has no checkpoint."""
        rounds = self.rounds
        if not rounds:
            raise ExportError(f"run '{self.run_dir}' has no checkpointed round under checkpoints/ (it stopped "
                              "before round 1 finished)")
        if server_round is None:
            return rounds[-1]
        if server_round not in rounds:
            raise ExportError(f"--round {server_round}: run '{self.run_dir}' has no checkpoint for it; its "
                              f"checkpointed rounds are {rounds}")
        return server_round

    def global_state(self, server_round: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """(the global arrays, ``state.json``) after ``server_round``."""
        return load_round(self.run_dir, server_round)

    def history(self, server_round: int) -> list[dict[str, Any]]:
        """The per-round records up to ``server_round`` (from that round's checkpoint)."""
        state = json.loads((round_dir(self.run_dir, server_round) / STATE_FILE).read_text())
        return [r for r in state.get("history", {}).get("rounds", []) if r["round"] <= server_round]

    def labels(self) -> list[str]:
        """Classification: the class names in index order, read from the run's data source (as training did)."""
        if self._labels is None:
            try:
                self._labels = load_task(self.cfg.data, self.task_type, self.cfg.federation.seed).labels
            except (OSError, ValueError) as exc:
                raise ExportError(f"the class names of run '{self.run_dir}' come from its data source "
                                  f"'{self.cfg.data.source}', which cannot be read here: {exc}") from exc
        return self._labels


def open_run(run_dir: str | Path) -> FinishedRun:
    """The run in ``run_dir``."""
    run_dir = Path(run_dir).expanduser()
    if not (run_dir / "config.toml").is_file():
        raise ExportError(f"'{run_dir}' is not a Pollinate run directory (no config.toml)")
    cfg = build_config(run_dir / "config.toml")
    info = resolve_model(cfg.model.name)
    report_path = run_dir / "report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    return FinishedRun(run_dir, cfg, info, resolve_task_type(cfg.data, info.default_task), report)


def config_for_file(run: FinishedRun, source: str, overrides: list[str]) -> RunConfig:
    """The run's config reading ``source`` in full (one partition, every row) with the run's fields, changed by
    ``overrides`` (``data.key=value`` / ``eval.key=value``)."""
    allowed = ("data.", "eval.")
    for item in overrides:
        if not item.strip().startswith(allowed):
            raise ExportError(f"--set {item!r}: only data.* and eval.* keys apply here (the run's other settings "
                              "are fixed)")
    cfg = build_config(run.run_dir / "config.toml", overrides)
    return cfg.with_section("data", replace(cfg.data, source=source, partition="iid", max_train_examples=0))
