"""``pollinate simulate``: a federated run of N virtual clients on Flower's simulation engine (Ray).

The driver resolves the model (building any preset cache once, before clients start), then runs the
ServerApp in-process and the ClientApp in Ray actors, all on 127.0.0.1.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any

from pollinate.common.config import RunConfig
from pollinate.common.data import load_task, partition_indices
from pollinate.common.models import resolve_model

# Ray binds every interface unless told otherwise; Pollinate's listeners stay on loopback.
LOOPBACK_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def quiet_library_warnings() -> None:
    """Deprecation chatter from torch/transformers internals says nothing actionable to a Pollinate user."""
    for category in (DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category)


def default_run_dir(cfg: RunConfig) -> Path:
    if cfg.output.dir:
        return Path(cfg.output.dir)
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")


def preflight(cfg: RunConfig) -> None:
    """Fail before any process starts: the model resolves, the data loads and partitions without empties."""
    info = resolve_model(cfg.model.name)
    task = info.default_task if cfg.data.task_type == "auto" else cfg.data.task_type
    data = load_task(cfg.data, task, cfg.federation.seed)
    partition_indices(data.train, cfg.federation.clients, cfg.data, data.partition_by, cfg.federation.seed)


def simulate(cfg: RunConfig, run_dir: Path | None = None, quiet: bool = False,
             resume: bool = False) -> dict[str, Any]:
    for key, value in LOOPBACK_ENV.items():
        os.environ.setdefault(key, value)
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from pollinate.client.app import app as client_app
    from pollinate.server.app import run_server

    run_dir = Path(run_dir or default_run_dir(cfg))
    preflight(cfg)
    outcome: dict[str, Any] = {}
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        outcome["report"] = run_server(grid, cfg, run_dir, quiet=quiet, resume=resume)

    logging.getLogger("flwr").setLevel(logging.ERROR)  # Pollinate prints its own per-round progress
    quiet_library_warnings()
    workers = max(1, int((os.cpu_count() or 2) // cfg.federation.client_cpus))
    run_simulation(
        server_app=server_app, client_app=client_app, num_supernodes=cfg.federation.clients,
        backend_config={
            "client_resources": {"num_cpus": cfg.federation.client_cpus, "num_gpus": 0.0},
            "init_args": {"num_cpus": max(workers, 1) * cfg.federation.client_cpus, "include_dashboard": False,
                          "logging_level": "error", "log_to_driver": False},
        },
    )
    if "report" not in outcome:
        raise RuntimeError(f"the simulation ended without a report; see the log above and {run_dir}/metrics.jsonl")
    return outcome["report"]
