"""`flwr run .`: pyproject.toml is a valid Flower App whose ServerApp maps Flower's run config onto Pollinate's."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import psutil
import pytest
from flwr.cli.config_utils import load_and_validate
from flwr.common.config import flatten_dict, fuse_dicts, parse_config_args

from pollinate.common.config import ConfigError, RunConfig
from pollinate.server.flower_app import config_from_flower, flower_config_defaults, wait_for_nodes

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = ROOT / "pyproject.toml"


def _flower_run_config(*overrides: str) -> dict:
    """The run config Flower hands the ServerApp: pyproject's defaults fused with ``--run-config`` (Flower's code)."""
    defaults = flatten_dict(tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"])
    return fuse_dicts(defaults, parse_config_args(list(overrides)))


def test_pyproject_declares_every_config_key_with_its_default():
    declared = flatten_dict(tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"])
    assert declared == flower_config_defaults(), (
        "pyproject.toml's [tool.flwr.app.config] is out of date: replace it with the output of "
        "`.venv/bin/python -m pollinate.server.flower_app`")


def test_flower_accepts_the_app_and_finds_its_components():
    config, _warnings = load_and_validate(PYPROJECT, check_module=True)
    app = config["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": "pollinate.server.flower_app:app",
                                 "clientapp": "pollinate.client.app:app"}
    # Flower 1.42 moves a [tool.flwr.federations] table into $FLWR_HOME and comments it out of pyproject.toml.
    assert "federations" not in config["tool"]["flwr"]


def test_run_config_overrides_become_the_run_config():
    cfg = config_from_flower(_flower_run_config(
        'federation.rounds=1 model.name="tiny-llama"', 'lora.target_modules="q_proj,v_proj" fedpipe.ranks="2,4"',
        "output.plots=false"))
    assert cfg.federation.rounds == 1 and cfg.model.name == "tiny-llama" and cfg.output.plots is False
    assert cfg.lora.target_modules == ["q_proj", "v_proj"] and cfg.fedpipe.ranks == [2, 4]
    assert cfg.federation.clients == 2  # flwr's default local simulation size
    defaults = RunConfig().to_dict()
    untouched = config_from_flower(_flower_run_config()).to_dict()
    assert {k: v for k, v in untouched.items() if k != "federation"} == {k: v for k, v in defaults.items()
                                                                          if k != "federation"}


def test_a_misspelled_key_is_refused_by_flower_and_by_pollinate():
    with pytest.raises(ValueError, match="federation.round"):
        _flower_run_config("federation.round=1")
    with pytest.raises(ConfigError, match="did you mean 'federation.rounds'"):
        config_from_flower({"federation.round": 1})


class _Grid:
    def __init__(self, nodes: int):
        self.nodes = nodes

    def get_node_ids(self):
        return list(range(self.nodes))


def test_too_few_supernodes_says_both_ways_to_match():
    assert wait_for_nodes(_Grid(3), 2, wait_s=0) == 3
    with pytest.raises(ConfigError, match=r"federation.clients=2.*num-supernodes=4"):
        wait_for_nodes(_Grid(2), 4, wait_s=0, poll_s=0)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop_local_superlink(flwr_home: Path) -> None:
    """Terminate the SuperLink `flwr run` started for ``flwr_home`` (and its process tree), nothing else."""
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if "flower-superlink" in cmdline and str(flwr_home) in cmdline:
            family = [proc, *proc.children(recursive=True)]
            for member in family:
                with contextlib.suppress(psutil.NoSuchProcess):  # a child may end with its parent
                    member.terminate()
            _, alive = psutil.wait_procs(family, timeout=10)
            for member in alive:
                with contextlib.suppress(psutil.NoSuchProcess):
                    member.kill()


@pytest.mark.slow
def test_flwr_run_dot_runs_pollinate_on_a_local_superlink(tmp_path):
    flwr = Path(sys.executable).parent / "flwr"
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr"), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(_free_port()),
           "FLWR_LOCAL_CONTROL_API_PORT": str(_free_port()),
           "PATH": f"{flwr.parent}{os.pathsep}{os.environ['PATH']}"}
    out = tmp_path / "run"
    try:
        started = subprocess.run([str(flwr), "run", ".", "--run-config",
                                  f'federation.rounds=1 model.name="tiny-llama" output.dir="{out}"'],
                                 cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert started.returncode == 0 and "Successfully started run" in started.stdout, started.stderr[-2000:]
        deadline, status = time.monotonic() + 600, ""
        while time.monotonic() < deadline and not status.startswith("finished"):
            time.sleep(5)
            listed = subprocess.run([str(flwr), "ls", "--format", "json"], cwd=ROOT, env=env, capture_output=True,
                                    text=True, timeout=60)
            status = json.loads(listed.stdout)["runs"][0]["status"]
        assert status == "finished:completed"
        report = json.loads((out / "report.json").read_text())
        assert report["model"] == "tiny-llama" and [r["round"] for r in report["rounds"]] == [1]
        assert report["num_clients"] == 2
    finally:
        _stop_local_superlink(tmp_path / "flwr")
