"""fedavg-full, client half: an evaluate message is answered with the received global's loss and metric on the
client's held-out examples (every weight of the cached model overwritten)."""

import math

import numpy as np
import pytest
from flwr.app import Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from pollinate.client import runtime
from pollinate.client.app import evaluate as client_evaluate
from pollinate.common.adapters import load_parameter_state
from pollinate.common.config_io import build_config
from pollinate.common.evaluation import EvalExamples, evaluate_model
from pollinate.common.report import RunRecorder
from pollinate.common.wire import arrays_to_record, record_to_arrays
from pollinate.methods.fedavg_full.server import FedAvgFull


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    for name, value in (("_run_id", 1), ("_node_id", 1), ("_task_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)


def test_fedavg_full_client_evaluates_the_global_it_receives(tmp_path):
    cfg = build_config(None, ["model.name=tiny-llama", "method=fedavg-full", "federation.clients=2",
                              "data.builtin_examples=40", "data.partition=iid", "data.eval_examples=2",
                              "eval.max_new_tokens=2", "eval.client_fraction=0.2"])
    strategy = FedAvgFull(cfg, RunRecorder(tmp_path, {"rounds_planned": 1}, quiet=True), tmp_path)
    state = {k: v * np.float32(0.9) for k, v in record_to_arrays(strategy.initial_arrays()).items()}
    msg = Message(content=strategy.evaluate_content(5, 1, arrays_to_record(state)), dst_node_id=5,
                  message_type=MessageType.EVALUATE)
    context = Context(run_id=1, node_id=5, node_config={"partition-id": 0, "num-partitions": 2}, state=RecordDict(),
                      run_config={})
    metrics = client_evaluate(msg, context).content["metrics"]
    data = runtime.local_data(cfg, {"partition-id": 0, "num-partitions": 2})
    assert metrics["num-examples"] == len(data.eval_encoded) == 4 and metrics["client_id"] == 0
    load_parameter_state(dict(strategy.model.named_parameters()), state)
    examples = EvalExamples("generation", data.eval_rows, data.eval_encoded)
    expected = evaluate_model(strategy.model, examples, strategy.evaluator.tokenizer, cfg.eval.batch_size, 2)
    assert math.isclose(metrics["eval_loss"], expected["eval_loss"], rel_tol=1e-5)
    assert metrics["exact_match"] == expected["eval_metrics"]["exact_match"]
