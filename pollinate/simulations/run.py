"""``pollinate simulate``: a federated run of N virtual clients on Flower's simulation engine (Ray).

The driver resolves the model (building any preset cache once, before clients start), then runs the
ServerApp in-process and the ClientApp in Ray actors, all on 127.0.0.1.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pollinate.client.step import check_simulated_precision
from pollinate.common.config import ConfigError, RunConfig
from pollinate.common.data import load_task, partition_indices, resolve_task_type
from pollinate.common.environment import SIMULATION_ENV, set_env_defaults
from pollinate.common.models import resolve_model
from pollinate.common.targets import check_target_modules, module_names
from pollinate.common.trackers import check_trackers
from pollinate.methods import get_method

if TYPE_CHECKING:
    from pollinate.simulations.stopping import StopRequest


def quiet_library_warnings() -> None:
    """Deprecation chatter from torch/transformers internals says nothing actionable to a Pollinate user."""
    for category in (DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category)


def default_run_dir(cfg: RunConfig) -> Path:
    if cfg.output.dir:
        return Path(cfg.output.dir)
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")


def preflight(cfg: RunConfig, quiet: bool = False) -> dict[str, Any]:
    """Fail before any process starts: the trackers are installed, a GPU is there for clients that reserve one,
    the model resolves (unless ``quiet``, a line says when a preset is converted), the LoRA targets exist, the data
    loads and partitions without empties. Returns what the run's header reports of the data: examples in training
    and eval, and per client."""
    check_trackers(cfg.output.loggers)
    check_secure_aggregation(cfg)
    check_client_gpus(cfg, local_gpus())
    check_simulated_precision(cfg.train.precision, cfg.federation.client_gpus, cfg.federation.ray_address)
    info = resolve_model(cfg.model.name, quiet=quiet)
    task = resolve_task_type(cfg.data, info.default_task)
    if cfg.lora.target_modules and "lora" in get_method(cfg.method).shared_sections:
        check_target_modules(cfg.lora.target_modules, module_names(info.path, task), "lora.target_modules",
                             cfg.model.name)
    data = load_task(cfg.data, task, cfg.federation.seed)
    parts = partition_indices(data.train, cfg.federation.clients, cfg.data, data.partition_by, cfg.federation.seed)
    return {"train_examples": len(data.train), "eval_examples": len(data.eval),
            "examples_per_client": [len(part) for part in parts]}


def check_secure_aggregation(cfg: RunConfig) -> None:
    """What the server would refuse at its first round, refused before the simulation engine starts."""
    if not cfg.privacy.secure_aggregation:
        return
    from pollinate.server.secagg import check_combination

    module = get_method(cfg.method).server_half()
    strategies = [obj for obj in vars(module).values() if isinstance(obj, type) and obj.__module__ == module.__name__]
    if not any(getattr(cls, "supports_secure_aggregation", False) for cls in strategies):
        raise ConfigError(f"privacy.secure_aggregation = true is not supported by method {cfg.method!r}; "
                          "expected fedavg-lora or fedavg-full")
    check_combination(cfg, max(1, round(cfg.federation.clients * cfg.federation.fraction_train)))


def local_gpus() -> int:
    """CUDA GPUs this host's Ray would find."""
    import torch

    return torch.cuda.device_count()


def check_client_gpus(cfg: RunConfig, gpus: int) -> None:
    """Clients that reserve a GPU need one: a local Ray without GPUs could place none of them."""
    fed = cfg.federation
    if fed.client_gpus > 0 and not fed.ray_address and gpus == 0:
        raise ConfigError(f"federation.client_gpus = {fed.client_gpus:g} but this host has no CUDA GPU; set it to 0, "
                          "or run on a Ray cluster with GPUs (federation.ray_address)")


def describe_data(cfg: RunConfig, summary: dict[str, Any]) -> str:
    """One line for the console: how many examples train, evaluate, and each client holds."""
    counts = summary["examples_per_client"]
    held_out = (f"; each holds out {cfg.eval.client_fraction:g} (at most {cfg.eval.client_max_examples}) for "
                "client-side evaluation" if cfg.eval.client_fraction else "")
    return (f"data: {cfg.data.source}: {summary['train_examples']} training examples over {len(counts)} clients "
            f"(min {min(counts)}, max {max(counts)}, per client {counts if len(counts) <= 10 else '...'}), "
            f"{summary['eval_examples']} held out for server evaluation{held_out}")


@contextmanager
def external_methods_for_workers() -> Iterator[None]:
    """Methods registered from outside Pollinate (imported by the caller) reach the Ray workers: the workers
    import their client halves (which registers them, see ``pollinate.client.app``) from the folders they live in."""
    from pollinate.client.app import METHOD_MODULES_ENV
    from pollinate.methods import METHODS

    modules = sorted(spec.client for spec in METHODS.values() if not spec.client.startswith("pollinate."))
    folders = []
    for module in modules:
        top = importlib.import_module(module.partition(".")[0])
        source = Path(top.__file__).parent
        folders.append(str(source.parent if hasattr(top, "__path__") else source))
    saved = {key: os.environ.get(key) for key in (METHOD_MODULES_ENV, "PYTHONPATH")}
    if modules:
        os.environ[METHOD_MODULES_ENV] = ",".join(modules)
        os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys([*folders, *filter(None, [saved["PYTHONPATH"]])]))
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def backend_config(cfg: RunConfig, cpu_count: int | None = None) -> dict[str, Any]:
    """Flower's Ray backend config: each client reserves ``federation.client_cpus`` and ``client_gpus``; Ray
    starts locally with as many CPUs as whole clients fit in ``cpu_count`` (default: this host's), or, with
    ``federation.ray_address``, connects to that cluster (which owns its resources: Ray refuses ``num_cpus``
    there)."""
    fed = cfg.federation
    init_args: dict[str, Any] = {"include_dashboard": False, "logging_level": "error", "log_to_driver": False}
    if fed.ray_address:
        init_args["address"] = fed.ray_address
    else:
        workers = max(1, int((cpu_count or os.cpu_count() or 2) // fed.client_cpus))
        init_args["num_cpus"] = workers * fed.client_cpus
    return {"client_resources": {"num_cpus": fed.client_cpus, "num_gpus": fed.client_gpus}, "init_args": init_args}


def describe_engine(backend: dict[str, Any]) -> str:
    """One line for the console before Ray starts (or is connected to), which takes seconds."""
    init_args = backend["init_args"]
    if "address" in init_args:
        return f"connecting the simulation engine (Ray) to the cluster at {init_args['address']}..."
    workers = round(init_args["num_cpus"] / backend["client_resources"]["num_cpus"])  # backend_config made it whole
    return f"starting the simulation engine (Ray) with {workers} worker{'s' if workers != 1 else ''}..."


def _ray_initialized() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def simulate(cfg: RunConfig, run_dir: Path | None = None, quiet: bool = False,
             resume: bool = False) -> dict[str, Any]:
    """Run ``cfg`` on Flower's simulation engine and return the report (also written to ``run_dir``).

    SIGINT/SIGTERM (in the main thread) stop it cleanly and raise ``SimulationInterrupted``, which names the last
    complete round and how to resume; Ray and its processes are shut down first (see ``stopping``).
    """
    set_env_defaults(SIMULATION_ENV)  # before Flower and Ray are imported
    from pollinate.simulations.stopping import SimulationInterrupted, SimulationStopped, StopRequest

    run_dir = Path(run_dir or default_run_dir(cfg))
    stop = StopRequest()
    try:
        with stop.handling_signals():
            return _simulate(cfg, run_dir, quiet, resume, stop)
    except (KeyboardInterrupt, SimulationStopped):
        if stop.signum is None:
            raise
        from pollinate.server.checkpoint import latest_round

        raise SimulationInterrupted(stop.signum, run_dir, latest_round(run_dir)) from None


def _simulate(cfg: RunConfig, run_dir: Path, quiet: bool, resume: bool, stop: StopRequest) -> dict[str, Any]:
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation
    from rich.console import Console

    from pollinate.client.app import app as client_app
    from pollinate.server.app import run_server
    from pollinate.simulations.stopping import StoppableGrid, start_ray, stop_ray

    data_summary = preflight(cfg, quiet=quiet)
    console = Console(stderr=True, soft_wrap=True, quiet=quiet)  # quiet: no progress lines
    console.print(describe_data(cfg, data_summary), markup=False)
    outcome: dict[str, Any] = {}
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        outcome["server"] = threading.current_thread()
        outcome["report"] = run_server(StoppableGrid(grid, stop), cfg, run_dir, quiet=quiet, resume=resume,
                                       data=data_summary)

    logging.getLogger("flwr").setLevel(logging.ERROR)  # Pollinate prints its own per-round progress
    quiet_library_warnings()
    backend = backend_config(cfg)
    with external_methods_for_workers():
        if not _ray_initialized():
            console.print(describe_engine(backend), markup=False, highlight=False)
        ray_started = start_ray(backend["init_args"])
        try:
            stop.install()  # after ray.init, which replaced the SIGTERM handler
            stop.graceful = True
            run_simulation(server_app=server_app, client_app=client_app, num_supernodes=cfg.federation.clients,
                           backend_config=backend)
        finally:
            stop.graceful = False
            stop.event.set()  # a ServerApp still running (the simulation failed or was forced) stops at once
            if (server := outcome.get("server")) is not None:
                server.join()
            if ray_started:
                stop_ray()
    if "report" not in outcome:
        raise RuntimeError(f"the simulation ended without a report; see the log above and {run_dir}/metrics.jsonl")
    return outcome["report"]
