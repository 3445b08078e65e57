"""Checkpoint/resume: state.json holds what a resumed run needs, a differing config is refused before anything
is written, and a resumed simulation ends with the same adapter as an uninterrupted one."""

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pollinate.cli import main
from pollinate.common.config import RunConfig
from pollinate.common.config_io import build_config, to_toml
from pollinate.common.report import RunRecorder
from pollinate.server.checkpoint import (
    ResumeError,
    find_resume_point,
    latest_round,
    restore_rng_state,
    rng_state,
    round_dir,
    round_state,
    save_round,
)

ROOT = Path(__file__).resolve().parents[2]


def _fake_run(run_dir: Path, cfg: RunConfig, rounds: int = 2) -> None:
    """A run directory as the server leaves it: config.toml and checkpoints with resume state."""
    run_dir.mkdir(parents=True)
    (run_dir / "config.toml").write_text(to_toml(cfg))
    history = {"initial_eval": {"eval_loss": 2.0, "eval_metrics": {}}, "rounds": [], "rejected": [],
               "elapsed_s": 1.5}
    for r in range(1, rounds + 1):
        history["rounds"].append({"round": r, "eval_loss": 2.0 - r / 10})
        save_round(run_dir, r, {"w": np.full((2, 3), r, dtype=np.float32)}, round_state(r, cfg, history))


def test_rng_state_round_trips_python_numpy_and_torch():
    state = rng_state()
    first = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    json.loads(json.dumps(state))  # it must survive state.json
    restore_rng_state(json.loads(json.dumps(state)))
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == first


def test_resume_point_is_the_last_complete_round_with_its_arrays_and_history(tmp_path):
    cfg = RunConfig()
    _fake_run(tmp_path / "run", cfg, rounds=2)
    # A crash while writing round 3 leaves only a temporary directory: it must be ignored.
    (round_dir(tmp_path / "run", 3).with_name("round-0003.tmp")).mkdir()
    point = find_resume_point(tmp_path / "run", cfg)
    assert point.server_round == 2 and latest_round(tmp_path / "run") == 2
    assert np.array_equal(point.arrays["w"], np.full((2, 3), 2, dtype=np.float32))
    assert [r["round"] for r in point.history["rounds"]] == [1, 2]


def test_output_settings_may_differ_on_resume_but_nothing_else(tmp_path):
    cfg = RunConfig()
    _fake_run(tmp_path / "run", cfg)
    moved = build_config(None, ["output.dir='/elsewhere'", "output.plots=false"])
    assert find_resume_point(tmp_path / "run", moved).server_round == 2
    changed = build_config(None, ["train.lr=0.5"])
    with pytest.raises(ResumeError, match=r"'train.lr': this run has 0.5, the checkpoint has 0.001"):
        find_resume_point(tmp_path / "run", changed)


def test_resume_without_a_complete_round_is_refused(tmp_path):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(ResumeError, match="no complete round"):
        find_resume_point(tmp_path / "run", RunConfig())
    with pytest.raises(ResumeError, match="does not exist"):
        find_resume_point(tmp_path / "missing", RunConfig())


def _snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*"))}


@pytest.mark.parametrize("command", ["simulate", "coordinator"])
def test_mismatched_config_on_resume_exits_nonzero_naming_the_field_and_writes_nothing(tmp_path, capsys, command):
    cfg = build_config(None, ["model.name='tiny-llama'", "federation.clients=2", "federation.rounds=3"])
    run = tmp_path / "run"
    _fake_run(run, cfg)
    before = _snapshot(run)
    extra = ["--insecure", "--port", "1"] if command == "coordinator" else []
    code = main([command, "--resume", str(run), "--rounds", "5", *extra])
    assert code == 2
    err = capsys.readouterr().err
    assert "'federation.rounds': this run has 5, the checkpoint has 3" in err
    assert _snapshot(run) == before


def test_recorder_restore_continues_the_report(tmp_path):
    recorder = RunRecorder(tmp_path, {"method": "m", "rounds_planned": 3}, quiet=True)
    history = {"initial_eval": {"eval_loss": 1.0, "eval_metrics": {}}, "rounds": [{"round": 1, "bytes_up": 5,
               "bytes_down": 7}], "rejected": [{"round": 1, "client_id": 2, "reason": "x"}], "elapsed_s": 100.0}
    recorder.restore(history, from_round=1)
    report = recorder.report()
    assert report["rounds"] == history["rounds"] and report["rejected"] == history["rejected"]
    assert report["totals"]["bytes_up"] == 5 and report["totals"]["seconds"] >= 100.0
    recorder.write(plots=False)
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert events[-1]["type"] == "resumed" and events[-1]["from_round"] == 1


def _simulate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pollinate.cli", "simulate", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=400)


@pytest.mark.slow
def test_resumed_simulation_ends_with_the_same_adapter_as_an_uninterrupted_one(tmp_path):
    from safetensors.numpy import load_file

    full = tmp_path / "full"
    proc = _simulate("--model", "tiny-llama", "--clients", "2", "--rounds", "3", "--out", str(full), "--quiet",
                     "--set", "data.eval_examples=10", "--set", "train.local_steps=3", "--set", "output.plots=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # "Stopped after round 1": a copy of the run with only round 1 checkpointed and no final outputs.
    stopped = tmp_path / "stopped"
    shutil.copytree(full, stopped)
    for name in ("checkpoints/round-0002", "checkpoints/round-0003", "adapter", "report.json"):
        shutil.rmtree(stopped / name) if (stopped / name).is_dir() else (stopped / name).unlink()
    proc = _simulate("--resume", str(stopped), "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]

    expected = load_file(str(full / "adapter" / "adapter_model.safetensors"))
    resumed = load_file(str(stopped / "adapter" / "adapter_model.safetensors"))
    assert expected.keys() == resumed.keys()
    for key in expected:
        np.testing.assert_allclose(resumed[key], expected[key], rtol=1e-5, atol=1e-6, err_msg=key)
    # The adapter moved during rounds 2-3 (so the comparison above is not trivially true).
    round1 = load_file(str(full / "checkpoints" / "round-0001" / "global.safetensors"))
    round3 = load_file(str(full / "checkpoints" / "round-0003" / "global.safetensors"))
    assert any(not np.allclose(round1[k], round3[k]) for k in round1)
    report = json.loads((stopped / "report.json").read_text())
    full_report = json.loads((full / "report.json").read_text())
    assert [r["round"] for r in report["rounds"]] == [1, 2, 3]
    assert report["initial_eval"] == full_report["initial_eval"]
    assert [r["eval_loss"] for r in report["rounds"]] == pytest.approx(
        [r["eval_loss"] for r in full_report["rounds"]], rel=1e-5)
    state = json.loads((stopped / "checkpoints" / "round-0003" / "state.json").read_text())
    assert state["round"] == 3 and len(state["history"]["rounds"]) == 3
