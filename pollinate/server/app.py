"""The Flower ServerApp: builds the method's strategy and runs Flower's round loop; writes the run report."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from pollinate.common.config import RunConfig, build_config, to_toml
from pollinate.common.models import resolve_model
from pollinate.common.report import RunRecorder, atomic_write_text
from pollinate.methods import method_module


def server_half(method: str):
    return importlib.import_module(f"pollinate.server.{method_module(method)}")


def run_server(grid: Grid, cfg: RunConfig, run_dir: Path, quiet: bool = False) -> dict[str, Any]:
    """One complete federated run on ``grid``; returns the report (also written to ``run_dir``)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.toml", to_toml(cfg))
    header = {
        "method": cfg.method, "model": cfg.model.name, "model_path": resolve_model(cfg.model.name).path,
        "task": cfg.data.source, "num_clients": cfg.federation.clients, "rounds_planned": cfg.federation.rounds,
        "seed": cfg.federation.seed,
    }
    recorder = RunRecorder(run_dir, header, quiet=quiet)
    strategy = server_half(cfg.method).make_strategy(cfg, recorder, run_dir)
    try:
        strategy.prepare(grid)
        result = strategy.start(
            grid=grid, initial_arrays=strategy.initial_arrays(), num_rounds=cfg.federation.rounds,
            timeout=cfg.federation.round_timeout_s, train_config=ConfigRecord(), evaluate_fn=strategy.end_round,
        )
        extra = strategy.save_final(result.arrays if len(result.arrays) else strategy.initial_arrays())
    finally:
        strategy.close()
    return recorder.write({**extra, "config": cfg.to_dict()}, plots=cfg.output.plots)


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Deployment entry: the coordinator passes ``config-path`` (its run.toml) and ``run-dir``."""
    run_config = dict(context.run_config)
    cfg = build_config(run_config.get("config-path") or None)
    run_server(grid, cfg, Path(str(run_config.get("run-dir", "runs/deployed"))))
