"""fedavg-full: the whole fp32 model travels both ways, is averaged by examples, and is saved loadable."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import MetricRecord, RecordDict
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from pollinate.common.adapters import load_parameter_state, parameter_state
from pollinate.common.config_io import build_config
from pollinate.common.report import RunRecorder
from pollinate.common.wire import arrays_to_record, record_to_arrays
from pollinate.methods.fedavg_full.server import FedAvgFull
from pollinate.server.strategy import Reply

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return LlamaForCausalLM(config)


def test_state_holds_every_parameter_once_and_round_trips():
    source, target = tiny_llama(0), tiny_llama(1)
    state = parameter_state(dict(source.named_parameters()))
    assert "lm_head.weight" not in state and "model.embed_tokens.weight" in state  # tied: sent once
    assert sum(v.size for v in state.values()) == sum(p.numel() for p in source.parameters())
    assert all(v.dtype == np.float32 for v in state.values())
    load_parameter_state(dict(target.named_parameters()), state)
    ids = torch.tensor([[3, 9, 27, 81]])
    torch.testing.assert_close(target(input_ids=ids).logits, source(input_ids=ids).logits, rtol=0, atol=0)
    assert target.lm_head.weight.data_ptr() == target.model.embed_tokens.weight.data_ptr()  # still tied


def test_loading_a_state_with_missing_or_extra_tensors_is_refused():
    model, state = tiny_llama(0), parameter_state(dict(tiny_llama(0).named_parameters()))
    state.pop("model.norm.weight")
    state["extra.weight"] = np.zeros(2, dtype=np.float32)
    with pytest.raises(ValueError, match=r"missing \['model.norm.weight'\], unknown \['extra.weight'\]"):
        load_parameter_state(dict(model.named_parameters()), state)


@pytest.fixture
def strategy(tmp_path):
    cfg = build_config(overrides=["model.name=tiny-llama", "method=fedavg-full", "federation.clients=2",
                                  "data.builtin_examples=20", "data.eval_examples=4"])
    return FedAvgFull(cfg, RunRecorder(tmp_path, {"rounds_planned": 1}, quiet=True), tmp_path)


def test_aggregate_is_the_example_weighted_mean_of_full_states(strategy):
    base = record_to_arrays(strategy.initial_arrays())
    replies = []
    for client, (shift, examples) in enumerate(((1.0, 1), (4.0, 3))):
        state = {k: v + shift for k, v in base.items()}
        content = RecordDict({"arrays": arrays_to_record(state), "metrics": MetricRecord({"num-examples": examples})})
        replies.append(Reply(client, client, examples, content, strategy.decode_reply(1, client, content), 0.0))
    merged = record_to_arrays(strategy.aggregate(1, replies))
    for key, value in base.items():
        np.testing.assert_allclose(merged[key], value + 3.25, rtol=1e-6, atol=1e-6)


def test_saved_model_loads_with_from_pretrained_and_equals_the_global(strategy, tmp_path):
    arrays = record_to_arrays(strategy.initial_arrays())
    arrays = {k: v * 0.5 for k, v in arrays.items()}
    extra = strategy.save_final(arrays_to_record(arrays))
    loaded = AutoModelForCausalLM.from_pretrained(extra["model_dir"]).eval()
    reference = parameter_state(dict(loaded.named_parameters()))
    assert set(reference) == set(arrays)
    for key, value in arrays.items():
        np.testing.assert_array_equal(reference[key], value)


@pytest.mark.slow
def test_simulate_tiny_llama_sends_the_whole_model_both_ways(tmp_path):
    out = tmp_path / "full"
    args = ["simulate", "--method", "fedavg-full", "--model", "tiny-llama", "--clients", "2", "--rounds", "2",
            "--out", str(out), "--quiet", "--set", "data.builtin_examples=60", "--set", "data.eval_examples=10"]
    proc = subprocess.run([sys.executable, "-m", "pollinate.cli", *args], cwd=Path(__file__).resolve().parents[3],
                          capture_output=True, text=True, timeout=900, env=os.environ.copy())
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(report["model_dir"])
    model_bytes = sum(p.numel() * 4 for p in model.parameters())
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    for r in report["rounds"]:
        assert "exact_match" in r["eval_metrics"]
        for c in r["clients"]:
            assert model_bytes < c["bytes_up"] < model_bytes * 1.05
            assert model_bytes < c["bytes_down"] < model_bytes * 1.1
