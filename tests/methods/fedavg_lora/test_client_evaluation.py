"""Client-side evaluation, client half: a client holds out a reproducible slice of its rows that it never trains
on, and answers an evaluate message with the global model's loss and metric on that slice."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from flwr.app import Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from pollinate.client import runtime
from pollinate.client.app import evaluate as client_evaluate
from pollinate.common.config_io import build_config
from pollinate.common.evaluation import EvalExamples, evaluate_model
from pollinate.common.report import RunRecorder
from pollinate.methods.fedavg_lora.server import FedAvgLora

BASE = ["model.name=tiny-llama", "method=fedavg-lora", "federation.clients=2", "data.builtin_examples=40",
        "data.partition=iid", "data.eval_examples=2", "eval.max_new_tokens=2"]


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    for name, value in (("_run_id", 1), ("_node_id", 1), ("_task_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)


def _node(client: int) -> dict:
    return {"partition-id": client, "num-partitions": 2}


def _ids(encoded: list[dict]) -> set[tuple[int, ...]]:
    return {tuple(e["input_ids"]) for e in encoded}


def test_held_out_rows_are_disjoint_from_training_reproducible_and_off_at_zero():
    cfg = build_config(None, [*BASE, "eval.client_fraction=0.25"])
    whole = runtime.local_data(build_config(None, [*BASE, "eval.client_fraction=0"]), _node(0))
    data = runtime.local_data(cfg, _node(0))
    assert whole.eval_encoded == [] and len(whole.encoded) == 20
    assert len(data.eval_encoded) == 5 and len(data.encoded) == 15 and data.num_examples == 15
    assert not _ids(data.encoded) & _ids(data.eval_encoded)
    assert _ids(data.encoded) | _ids(data.eval_encoded) == _ids(whole.encoded)
    runtime.drop_cached(("data",))
    again = runtime.local_data(cfg, _node(0))
    assert again is not data and again.eval_rows == data.eval_rows  # rebuilt, the same rows
    other = runtime.local_data(cfg, _node(1))
    assert not _ids(other.eval_encoded) & _ids(data.eval_encoded)


def test_fedavg_lora_client_evaluates_the_global_it_receives(tmp_path):
    cfg = build_config(None, [*BASE, "eval.client_fraction=0.25"])
    strategy = FedAvgLora(cfg, RunRecorder(tmp_path, {"rounds_planned": 1}, quiet=True), tmp_path)
    state = {k: torch.full_like(v, 0.01) for k, v in strategy.model.state_dict().items() if "lora_" in k}
    strategy.model.load_state_dict(state, strict=False)  # a global unlike the fresh adapter a client would build
    arrays = strategy.initial_arrays()
    msg = Message(content=strategy.evaluate_content(7, 3, arrays), dst_node_id=7, message_type=MessageType.EVALUATE)
    context = Context(run_id=1, node_id=7, node_config=_node(1), state=RecordDict(), run_config={})
    metrics = client_evaluate(msg, context).content["metrics"]
    data = runtime.local_data(cfg, _node(1))
    assert metrics["num-examples"] == len(data.eval_encoded) == 5 and metrics["client_id"] == 1
    assert 0 <= metrics["exact_match"] <= 1
    examples = EvalExamples("generation", data.eval_rows, data.eval_encoded)
    expected = evaluate_model(strategy.model, examples, strategy.evaluator.tokenizer, cfg.eval.batch_size, 2)
    assert math.isclose(metrics["eval_loss"], expected["eval_loss"], rel_tol=1e-5)


@pytest.mark.slow
def test_simulation_reports_each_clients_evaluation_every_round(tmp_path):
    data = tmp_path / "colors.jsonl"
    words = {0: "red apple cherry", 1: "blue sea sky", 2: "green grass leaf"}
    data.write_text("".join(json.dumps({"text": f"{words[i % 3]} {i}", "label": i % 3}) + "\n" for i in range(90)))
    out = tmp_path / "run"
    args = ["simulate", "--method", "fedavg-lora", "--model", "tiny-bert", "--data", str(data), "--clients", "2",
            "--rounds", "2", "--out", str(out), "--quiet", "--set", "data.eval_examples=10", "--set",
            "eval.client_fraction=0.2"]
    proc = subprocess.run([sys.executable, "-m", "pollinate.cli", *args], cwd=Path(__file__).resolve().parents[3],
                          capture_output=True, text=True, timeout=900, env=os.environ.copy())
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    for r in report["rounds"]:
        client_eval = r["client_eval"]
        assert sorted(c["client_id"] for c in client_eval["clients"]) == [0, 1]
        assert all(c["num_examples"] >= 1 and 0 <= c["accuracy"] <= 1 for c in client_eval["clients"])
        assert client_eval["worst"]["accuracy"] <= client_eval["mean"]["accuracy"]
        assert r["bytes_eval_down"] > 0 and r["bytes_eval_up"] > 0
    assert report["totals"]["bytes_eval_down"] == sum(r["bytes_eval_down"] for r in report["rounds"])
    assert report["rejected"] == []
    assert "Client-side evaluation" in (out / "report.md").read_text()


def test_a_client_half_without_evaluate_answers_that_it_evaluated_nothing(monkeypatch, tmp_path):
    from types import SimpleNamespace

    import pollinate.client.app as client_app

    cfg = build_config(None, BASE)
    strategy = FedAvgLora(cfg, RunRecorder(tmp_path, {"rounds_planned": 1}, quiet=True), tmp_path)
    monkeypatch.setattr(client_app, "client_half", lambda method: SimpleNamespace(train=lambda *a: None))
    msg = Message(content=strategy.evaluate_content(7, 1, strategy.initial_arrays()), dst_node_id=7,
                  message_type=MessageType.EVALUATE)
    context = Context(run_id=1, node_id=7, node_config=_node(0), state=RecordDict(), run_config={})
    assert dict(client_evaluate(msg, context).content["metrics"]) == {"num-examples": 0}
