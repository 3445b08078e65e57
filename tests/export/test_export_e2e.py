"""End to end on a real run: simulate (tiny model), then generate, eval and export it from the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def pollinate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pollinate.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=os.environ.copy())


def test_a_finished_run_generates_evaluates_and_exports(tmp_path):
    run = tmp_path / "run"
    done = pollinate("simulate", "--model", "tiny-llama", "--clients", "2", "--rounds", "1", "--out", str(run),
                     "--quiet")
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((run / "report.json").read_text())

    evaluated = pollinate("eval", str(run), "--data", "skills", "--json")
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    result = json.loads(evaluated.stdout)
    assert result["eval_loss"] == pytest.approx(report["rounds"][-1]["eval_loss"], rel=1e-5)
    assert result["eval_metrics"] == report["rounds"][-1]["eval_metrics"]

    generated = pollinate("generate", str(run), "--prompt", "What is 37 + 45?", "--max-new-tokens", "4")
    assert generated.returncode == 0 and len(generated.stdout.splitlines()) == 1, generated.stderr[-2000:]

    exported = pollinate("export", str(run), "--adapter", str(tmp_path / "adapter"), "--merged",
                         str(tmp_path / "merged"), "--base-id", "org/tiny")
    assert exported.returncode == 0, exported.stderr[-2000:]
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        "org/tiny"
    from peft import PeftModel

    ids = torch.tensor([[5, 40, 41, 42]])
    base = AutoModelForCausalLM.from_pretrained(report["model_path"])
    with torch.no_grad():
        via_run_adapter = PeftModel.from_pretrained(base, run / "adapter").eval()(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()(input_ids=ids).logits
    assert torch.allclose(merged, via_run_adapter, atol=1e-4)
