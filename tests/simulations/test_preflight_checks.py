"""Preflight catches a misspelled LoRA target and a missing tracker package: one line, no run directory."""

from __future__ import annotations

import pytest

from pollinate.cli import main
from pollinate.common import trackers
from pollinate.common.config import ConfigError
from pollinate.common.config_io import build_config
from pollinate.simulations.run import preflight


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("pollinate: error:")]


def test_a_misspelled_lora_target_is_one_line_and_leaves_no_run_directory(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["simulate", "--model", "tiny-llama", "--clients", "2", "--set", "lora.target_modules=q_projj",
                 "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    (line,) = _error_lines(err)
    assert "'q_projj' matches no module of model 'tiny-llama' (did you mean 'q_proj'?)" in line
    assert "Traceback" not in err and not out.exists()


def test_a_missing_tracker_package_fails_before_the_run(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(trackers.TRACKER_MODULES, "wandb", "pollinate_no_such_module")
    out = tmp_path / "run"
    assert main(["simulate", "--model", "tiny-llama", "--clients", "2", "--set", 'output.loggers=["wandb"]',
                 "--out", str(out), "--quiet"]) == 2
    (line,) = _error_lines(capsys.readouterr().err)
    assert "pip install 'pollinate[wandb]'" in line and not out.exists()


def test_existing_targets_pass_and_encoder_targets_are_checked_too():
    cfg = build_config(None, ['model.name="tiny-llama"', "federation.clients=2",
                              'lora.target_modules=["q_proj", "o_proj", "mlp.down_proj"]'])
    assert len(preflight(cfg)["examples_per_client"]) == 2
    with pytest.raises(ConfigError, match="did you mean 'query'"):
        preflight(build_config(None, ['model.name="tiny-bert"', 'data.source="nowhere.jsonl"',
                                      'lora.target_modules=["queryy"]']))
