"""Experiment trackers (``output.loggers``): every round's metrics also go to TensorBoard, MLflow, trackio or W&B.

A tracker receives, per round (step = round number; round 0 is the evaluation before training), the global
model's eval loss and metrics, the train loss, the round's and the cumulative bytes, client-side evaluation
(mean and worst), every client's numeric record fields (``client/<id>/...``: bytes, examples, train loss,
seconds, deadline), and as text each client's plan (FedPipe). Each tracker is an optional extra
(``pip install 'pollinate[tensorboard]'``); a missing package is a one-line ``ConfigError`` before the run starts.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from pollinate.common.config import LOGGERS, ConfigError

# Tracker name (``output.loggers``) -> the module it imports; the pip extra has the tracker's name.
TRACKER_MODULES = {name: name for name in LOGGERS}


class Tracker(Protocol):
    """One experiment tracker, opened for one run."""

    def log(self, step: int, scalars: dict[str, float], texts: dict[str, str]) -> None:
        """Record one round's numbers and texts at ``step``."""

    def close(self) -> None:
        """Flush and finish the tracker's run."""


# Tracker name -> ``factory(run_dir, run_name, config)`` that opens it (filled at the end of this module).
FACTORIES: dict[str, Callable[[Path, str, dict[str, Any]], Tracker]] = {}


def check_trackers(names: Sequence[str]) -> None:
    """Raise ``ConfigError`` naming the pip extra when a tracker's package is not installed."""
    for name in names:
        module = TRACKER_MODULES.get(name)
        if module is None:
            raise ConfigError(f"output.loggers: unknown logger {name!r}; expected some of {sorted(TRACKER_MODULES)}")
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"output.loggers = {list(names)}: {name!r} needs the package {module!r}; install it "
                              f"with: pip install 'pollinate[{name}]'")


def open_trackers(names: Sequence[str], run_dir: Path, config: dict[str, Any]) -> list[Tracker]:
    """The configured trackers, each opened for this run (its name: the run directory's)."""
    check_trackers(names)
    return [FACTORIES[name](Path(run_dir), Path(run_dir).resolve().name, config) for name in names]


# --- what a tracker receives ------------------------------------------------------------------------------
def _numbers(prefix: str, value: Any) -> dict[str, float]:
    """Numeric leaves of ``value`` under ``prefix/…`` (booleans as 0/1; text, lists and None left out)."""
    if isinstance(value, bool):
        return {prefix: float(value)}
    if isinstance(value, (int, float)):
        return {prefix: float(value)}
    if isinstance(value, dict):
        out: dict[str, float] = {}
        for key, item in value.items():
            out.update(_numbers(f"{prefix}/{key}", item))
        return out
    return {}


def round_scalars(record: dict[str, Any], totals: dict[str, int] | None = None) -> dict[str, float]:
    """A round record (``RunRecorder.round_done``; or the initial evaluation) as tracker scalars."""
    scalars = {} if record["eval_loss"] is None else {"eval/loss": float(record["eval_loss"])}  # eval.every
    scalars.update(_numbers("eval", record.get("eval_metrics", {})))
    if record.get("train_loss") is not None:
        scalars["train/loss"] = float(record["train_loss"])
    skip = {"round", "eval_loss", "eval_metrics", "train_loss", "clients", "client_eval"}
    for key, value in record.items():
        if key not in skip:
            scalars.update(_numbers(f"round/{key}", value))
    scalars.update(_numbers("total", totals or {}))
    client_eval = record.get("client_eval") or {}
    scalars.update(_numbers("client_eval/mean", client_eval.get("mean", {})))
    scalars.update(_numbers("client_eval/worst", client_eval.get("worst", {})))
    for client in record.get("clients", []):
        fields = {k: v for k, v in client.items() if k not in ("client_id", "plan")}
        scalars.update(_numbers(f"client/{client.get('client_id')}", fields))
    return scalars


def round_texts(record: dict[str, Any]) -> dict[str, str]:
    """Each client's plan (FedPipe) as JSON text, ``client/<id>/plan``."""
    return {f"client/{c.get('client_id')}/plan": json.dumps(c["plan"], sort_keys=True)
            for c in record.get("clients", []) if c.get("plan") is not None}


# --- the trackers ---------------------------------------------------------------------------------------------
class TensorBoardTracker:
    """Event files in ``RUN_DIR/tensorboard`` (``tensorboard --logdir RUN_DIR/tensorboard``)."""

    def __init__(self, run_dir: Path, run_name: str, config: dict[str, Any]):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2, sort_keys=True) + "\n```")

    def log(self, step: int, scalars: dict[str, float], texts: dict[str, str]) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)
        for key, value in texts.items():
            self.writer.add_text(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _flat_params(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flat_params(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = json.dumps(value)[:500]  # MLflow's limit on a parameter value
    return out


class MLflowTracker:
    """An MLflow run (experiment ``$MLFLOW_EXPERIMENT_NAME`` or ``pollinate``); without ``MLFLOW_TRACKING_URI``
    the store is the SQLite database ``RUN_DIR/mlflow.db`` (MLflow 3 refuses a new file store by default) with the
    artifacts in ``RUN_DIR/mlartifacts``."""

    def __init__(self, run_dir: Path, run_name: str, config: dict[str, Any]):
        import mlflow

        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "pollinate")
        if os.environ.get("MLFLOW_TRACKING_URI"):
            mlflow.set_experiment(name)
        else:  # our own store: the database and the artifacts both inside the run directory
            mlflow.set_tracking_uri(f"sqlite:///{(run_dir / 'mlflow.db').resolve()}")
            if mlflow.get_experiment_by_name(name) is None:
                mlflow.create_experiment(name, artifact_location=(run_dir / "mlartifacts").resolve().as_uri())
            mlflow.set_experiment(name)
        self.mlflow = mlflow
        mlflow.start_run(run_name=run_name)
        params = _flat_params(config)
        keys = sorted(params)
        for start in range(0, len(keys), 100):  # MLflow takes at most 100 parameters per call
            mlflow.log_params({k: params[k] for k in keys[start: start + 100]})

    def log(self, step: int, scalars: dict[str, float], texts: dict[str, str]) -> None:
        self.mlflow.log_metrics(scalars, step=step)
        for key, value in texts.items():
            self.mlflow.log_text(value, f"{key}/round-{step:04d}.json")

    def close(self) -> None:
        self.mlflow.end_run()


class TrackioTracker:
    """A trackio run in project ``$TRACKIO_PROJECT`` or ``pollinate`` (local unless trackio is told otherwise)."""

    def __init__(self, run_dir: Path, run_name: str, config: dict[str, Any]):
        import trackio

        self.trackio = trackio
        trackio.init(project=os.environ.get("TRACKIO_PROJECT", "pollinate"), name=run_name, config=config)

    def log(self, step: int, scalars: dict[str, float], texts: dict[str, str]) -> None:
        self.trackio.log({**scalars, **texts}, step=step)

    def close(self) -> None:
        self.trackio.finish()


class WandbTracker:
    """A W&B run in project ``$WANDB_PROJECT`` or ``pollinate`` (``WANDB_MODE=offline`` keeps it local)."""

    def __init__(self, run_dir: Path, run_name: str, config: dict[str, Any]):
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "pollinate"), name=run_name, config=config,
                              dir=str(run_dir))

    def log(self, step: int, scalars: dict[str, float], texts: dict[str, str]) -> None:
        self.run.log({**scalars, **texts}, step=step)

    def close(self) -> None:
        self.run.finish()


FACTORIES.update(tensorboard=TensorBoardTracker, mlflow=MLflowTracker, trackio=TrackioTracker, wandb=WandbTracker)
