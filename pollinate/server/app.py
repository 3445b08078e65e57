"""The Flower ServerApp: builds the method's strategy and runs Flower's round loop; writes the run report.

``run_server`` is shared by simulation (called in-process) and deployment (``main``, run by the SuperLink's
ServerApp process with the coordinator's run config). With ``resume`` it continues a run directory from its
last complete checkpoint: same global state, report history, server optimizer and RNG state (a method prepares
again), with the strategy's round numbers continuing where they stopped.
"""

from __future__ import annotations

import random
import time
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from pollinate.common.config import ConfigError, RunConfig
from pollinate.common.config_io import to_toml
from pollinate.common.models import resolve_model
from pollinate.common.report import RunRecorder, atomic_write_text
from pollinate.common.trackers import open_trackers
from pollinate.common.wire import arrays_to_record
from pollinate.methods import get_method
from pollinate.server.checkpoint import find_resume_point, restore_rng_state
from pollinate.server.deployment import Deployment
from pollinate.server.run_end import announce_run_end


def server_half(method: str):
    return get_method(method).server_half()


def run_server(grid: Grid, cfg: RunConfig, run_dir: Path, quiet: bool = False, resume: bool = False,
               deployment: Deployment | None = None, data: dict[str, Any] | None = None) -> dict[str, Any]:
    """One complete federated run on ``grid``; returns the report (also written to ``run_dir``).

    Parameters
    ----------
    grid : Grid
        Flower's grid (simulation or deployment).
    cfg : RunConfig
        The run's config; with ``resume`` it must equal the checkpoint's (``[output]`` aside).
    run_dir : Path
        Where the report, metrics, checkpoints and adapter go.
    quiet : bool, default False
        No per-round progress lines.
    resume : bool, default False
        Continue ``run_dir`` after its last complete round; raises ``ResumeError`` before writing anything
        when it cannot (no checkpoint, a differing config).
    deployment : Deployment or None, default None
        Real SuperNodes (the coordinator's network facts): wait until ``federation.clients`` have joined, then
        let later rounds go on with the nodes still connected (at least ``min_clients``), so a client that left
        does not stall the run.
    data : dict or None, default None
        What the run's header reports of the data (simulation: examples in training, eval and per client).
    """
    run_dir = Path(run_dir)
    point = find_resume_point(run_dir, cfg) if resume else None
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.toml", to_toml(cfg))
    header = {
        "method": cfg.method, "model": cfg.model.name, "model_path": resolve_model(cfg.model.name).path,
        "task": cfg.data.source, "num_clients": cfg.federation.clients, "rounds_planned": cfg.federation.rounds,
        "seed": cfg.federation.seed, **({"data": data} if data else {}),
    }
    recorder = RunRecorder(run_dir, header, quiet=quiet,
                           trackers=open_trackers(cfg.output.loggers, run_dir, cfg.to_dict()))
    if point is None:
        # Node sampling (python random) and any numpy use on the server follow the run seed.
        random.seed(cfg.federation.seed)
        np.random.seed(cfg.federation.seed % 2**32)
    strategy = None
    try:
        strategy = server_half(cfg.method).make_strategy(cfg, recorder, run_dir, deployment)
        initial = strategy.initial_arrays()
        if point is not None:
            strategy.round_offset = point.server_round
            recorder.restore(point.history, point.server_round)
            point.restore_optimizer(strategy.server_optimizer)
            initial = arrays_to_record(point.arrays)
        if deployment is not None:
            wait_for_clients(grid, cfg.federation.clients, recorder)
            # From here on a round samples the connected nodes; one that left is not waited for.
            strategy.min_available_nodes = strategy.min_train_nodes = max(1, cfg.federation.min_clients)
        strategy.prepare(grid)
        if point is not None:
            # After prepare, so the next round draws exactly what it would have drawn without the stop.
            restore_rng_state(point.state["rng"])
        result = strategy.start(
            grid=grid, initial_arrays=initial, num_rounds=cfg.federation.rounds - strategy.round_offset,
            timeout=cfg.federation.round_timeout_s, train_config=ConfigRecord(), evaluate_fn=strategy.end_round,
        )
        extra = strategy.save_final(result.arrays if len(result.arrays) else initial)
    except BaseException:
        recorder.close()  # a failed or stopped run still ends its tracker runs
        raise
    finally:
        if strategy is not None:
            strategy.close()
    return recorder.write({**extra, "config": cfg.to_dict()}, plots=cfg.output.plots)


def wait_for_clients(grid: Grid, needed: int, recorder: RunRecorder, poll_s: float = 1.0) -> None:
    """Block until ``needed`` SuperNodes are connected, saying how many have joined whenever that changes."""
    shown = -1
    while (joined := len(list(grid.get_node_ids()))) < needed:
        if joined != shown:
            recorder.console.print(f"waiting for clients: {joined}/{needed} joined")
            recorder.event("waiting_for_clients", joined=joined, needed=needed)
            shown = joined
        time.sleep(poll_s)
    recorder.console.print(f"{joined} clients joined; starting")


def config_from_run_config(run_config: dict[str, Any]) -> RunConfig:
    """The RunConfig the coordinator sent: its effective config as TOML text under ``config-toml``."""
    text = run_config.get("config-toml")
    if not isinstance(text, str) or not text.strip():
        raise ConfigError("the Flower run config has no 'config-toml' entry; start runs with `pollinate coordinator`")
    try:
        return RunConfig.from_dict(tomllib.loads(text))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"the run config's 'config-toml' is not valid TOML: {exc}") from exc


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Deployment entry: the coordinator passes ``config-toml`` (the effective config), ``run-dir`` and
    ``resume`` in the Flower run config."""
    run_config = dict(context.run_config)
    if "run-dir" not in run_config:
        raise ConfigError("the Flower run config has no 'run-dir' entry; start runs with `pollinate coordinator`")
    cfg = config_from_run_config(run_config)
    run_server(grid, cfg, Path(str(run_config["run-dir"])), resume=bool(run_config.get("resume", False)),
               deployment=Deployment.from_run_config(run_config) or Deployment("127.0.0.1", "127.0.0.1"))
    announce_run_end(grid, cfg.federation.rounds)  # the clients' `pollinate join` exit instead of rejoining
