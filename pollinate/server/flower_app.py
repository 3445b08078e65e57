"""The ServerApp that ``flwr run .`` starts (pyproject.toml's ``[tool.flwr.app]``): Pollinate's config from Flower's
run config, then the same federated run as ``pollinate simulate`` (the ClientApp is ``pollinate.client.app``).

Flower takes the keys and their defaults from ``[tool.flwr.app.config]``: every Pollinate config key, flat
(``"federation.rounds" = 3``; lists as comma-separated strings, Flower's config has no lists), which
``flwr run . --run-config 'federation.rounds=1 model.name="tiny-llama"'`` overrides. The run directory is
``output.dir`` (default ``runs/<timestamp>`` in the SuperLink's working directory; the log names it).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from logging import INFO
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from pollinate.common.config import ConfigError, RunConfig
from pollinate.common.config_io import config_from_dict, parse_override

# How long the ServerApp waits for federation.clients SuperNodes before saying how to match the two.
NODE_WAIT_S = 30.0
# flwr's default local simulation has 2 SuperNodes; `flwr run .` with no options runs that many clients.
FLOWER_DEFAULTS = {"federation.clients": 2}


def _flat(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def flower_config_defaults() -> dict[str, str | int | float | bool]:
    """``[tool.flwr.app.config]``: every config key with its default, lists as comma-separated strings."""
    flat = _flat(RunConfig().to_dict())
    flat = {key: ",".join(str(v) for v in value) if isinstance(value, list) else value for key, value in flat.items()}
    return {**flat, **FLOWER_DEFAULTS}


def config_table_toml() -> str:
    """The ``[tool.flwr.app.config]`` table for pyproject.toml (``python -m pollinate.server.flower_app``)."""
    import tomli_w

    return "[tool.flwr.app.config]\n" + tomli_w.dumps(flower_config_defaults())


def _list_value(text: str) -> list[Any]:
    """``"2,4,8"`` -> ``[2, 4, 8]``; each item read as TOML when it parses (numbers, booleans), else as text."""
    return [parse_override(f"v={item.strip()}")[1] for item in text.split(",") if item.strip()]


def config_from_flower(run_config: Mapping[str, Any]) -> RunConfig:
    """A validated RunConfig from Flower's flat run config (unknown keys are errors with a suggestion)."""
    list_keys = {key for key, value in _flat(RunConfig().to_dict()).items() if isinstance(value, list)}
    raw: dict[str, Any] = {}
    for key, value in run_config.items():
        if key in list_keys and isinstance(value, str):
            value = _list_value(value)
        node = raw
        *sections, name = key.split(".")
        for section in sections:
            node = node.setdefault(section, {})
        node[name] = value
    return config_from_dict(raw)


def wait_for_nodes(grid: Grid, needed: int, wait_s: float = NODE_WAIT_S, poll_s: float = 0.5) -> int:
    """The number of connected SuperNodes once ``needed`` are, or a ConfigError after ``wait_s`` naming both
    ways to match ``federation.clients`` and the federation's size."""
    deadline = time.monotonic() + wait_s
    while (joined := len(list(grid.get_node_ids()))) < needed and time.monotonic() < deadline:
        time.sleep(poll_s)
    if joined < needed:
        raise ConfigError(f"federation.clients = {needed} but {joined} SuperNodes are connected; run with "
                          f"--run-config 'federation.clients={joined}' or a federation of {needed} SuperNodes "
                          f"(local simulation: --federation-config 'num-supernodes={needed}')")
    return joined


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """``flwr run .``: the run config's keys are Pollinate's config keys."""
    from pollinate.server.app import run_server
    from pollinate.simulations.run import default_run_dir, describe_data, preflight

    cfg = config_from_flower(dict(context.run_config))
    run_dir = default_run_dir(cfg).resolve()
    data = preflight(cfg)
    log(INFO, "Pollinate: %s on %s, %d clients x %d rounds -> %s", cfg.method, cfg.model.name,
        cfg.federation.clients, cfg.federation.rounds, run_dir)
    log(INFO, "%s", describe_data(cfg, data))
    wait_for_nodes(grid, cfg.federation.clients)
    run_server(grid, cfg, Path(run_dir), data=data)


if __name__ == "__main__":
    print(config_table_toml(), end="")
