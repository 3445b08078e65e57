"""End to end: `pollinate simulate` on a tiny model writes a complete, consistent report and a usable adapter."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pollinate.cli import main

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pollinate.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=os.environ.copy())


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "tiny"
    proc = run_cli("simulate", "--model", "tiny-llama", "--clients", "2", "--rounds", "2", "--out", str(out),
                   "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads((out / "report.json").read_text())


def test_report_has_the_documented_schema(tiny_run):
    out, report = tiny_run
    for key in ("method", "model", "task", "num_clients", "rounds", "totals", "adapter_dir", "initial_eval"):
        assert key in report
    assert report["method"] == "fedavg-lora" and report["num_clients"] == 2
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    for r in report["rounds"]:
        assert {"train_loss", "eval_loss", "eval_metrics", "bytes_up", "bytes_down", "seconds", "clients"} <= set(r)
        assert "exact_match" in r["eval_metrics"] and "exact_match/add" in r["eval_metrics"]
        timing = r["timing"]  # where the round's wall time went: its parts add up to it
        assert timing["train_seconds"] > 0 and timing["eval_seconds"] > 0 and timing["checkpoint_seconds"] > 0
        assert sum(timing.values()) == pytest.approx(r["seconds"], abs=0.01)
        assert sorted(c["client_id"] for c in r["clients"]) == [0, 1]
        for c in r["clients"]:
            assert {"client_id", "bytes_up", "bytes_down", "train_seconds", "num_examples", "peak_rss_bytes"} <= set(c)
            assert c["num_examples"] > 0 and c["peak_rss_bytes"] > 0
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines if x["type"] == "round"] == [1, 2]
    assert sum(x["type"] == "client" for x in lines) == 4
    for name in ("report.md", "loss_metric.png", "bytes.png", "config.toml"):
        assert (out / name).stat().st_size > 0


def test_bytes_follow_the_flowertune_protocol_formula(tiny_run):
    """Each client receives and sends the full fp32 adapter every round, plus a small documented overhead."""
    out, report = tiny_run
    from safetensors.numpy import load_file

    state = load_file(str(out / "checkpoints" / "round-0002" / "global.safetensors"))
    adapter_bytes = sum(v.size * 4 for v in state.values())
    per_tensor = 200  # Flower Array framing + .npy header, per tensor (README: "How bytes are counted")
    config_bytes = len((out / "config.toml").read_text()) * 2  # the run config (JSON) + key framing, upper bound
    for r in report["rounds"]:
        assert r["bytes_up"] == sum(c["bytes_up"] for c in r["clients"])
        assert r["bytes_down"] == sum(c["bytes_down"] for c in r["clients"])
        for c in r["clients"]:
            # up: + the reply's MetricRecord and the client's profile ConfigRecord (~600 B)
            assert 0 < c["bytes_up"] - adapter_bytes <= per_tensor * len(state) + 1000
            assert 0 < c["bytes_down"] - adapter_bytes <= per_tensor * len(state) + config_bytes
    assert report["totals"]["bytes_up"] == sum(r["bytes_up"] for r in report["rounds"])
    assert report["totals"]["bytes_down"] == sum(r["bytes_down"] for r in report["rounds"])


def test_saved_adapter_reproduces_the_final_global_model(tiny_run):
    out, report = tiny_run
    from peft import PeftModel
    from safetensors.numpy import load_file

    from pollinate.common.adapters import load_adapter_state, peft_lora_config, wrap_with_lora
    from pollinate.common.config import LoraConfig
    from pollinate.common.models import load_model

    ids = torch.tensor([[5, 60, 70, 80, 90, 100, 110]])
    loaded = PeftModel.from_pretrained(load_model(report["model_path"], "generation"), report["adapter_dir"])
    reference = wrap_with_lora(load_model(report["model_path"], "generation"),
                               peft_lora_config(LoraConfig(), "llama", "generation"))
    load_adapter_state(reference, load_file(str(out / "checkpoints" / "round-0002" / "global.safetensors")))
    loaded.eval(), reference.eval()
    with torch.no_grad():
        a, b = loaded(input_ids=ids).logits, reference(input_ids=ids).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    base = load_model(report["model_path"], "generation").eval()
    with torch.no_grad():
        assert not torch.allclose(base(input_ids=ids).logits, a, atol=1e-4)  # the adapter changed the model


@pytest.mark.parametrize("args, message", [
    (["--set", "federation.client=3"], "unknown config key 'federation.client'"),
    (["--model", "/nonexistent/model"], "neither a preset"),
    (["--clients", "900", "--set", "data.builtin_examples=100"], "100 training examples cannot be split over 900"),
])
def test_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, args, message):
    out = tmp_path / "never"
    assert main(["simulate", "--model", "tiny-llama", "--out", str(out), *args]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_data_file_missing_fields_exits_2_listing_fields(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"q": "1", "a": "2"}) + "\n")
    assert main(["simulate", "--model", "tiny-llama", "--data", str(data), "--out", str(tmp_path / "x")]) == 2
    assert "its fields are ['a', 'q']" in capsys.readouterr().err


def test_same_seed_same_results(tmp_path, tiny_run):
    _, first = tiny_run
    out = tmp_path / "again"
    proc = run_cli("simulate", "--model", "tiny-llama", "--clients", "2", "--rounds", "2", "--out", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    second = json.loads((out / "report.json").read_text())
    assert [r["eval_loss"] for r in second["rounds"]] == pytest.approx([r["eval_loss"] for r in first["rounds"]],
                                                                      rel=1e-6)
    assert np.isclose(second["rounds"][-1]["train_loss"], first["rounds"][-1]["train_loss"], rtol=1e-6)
