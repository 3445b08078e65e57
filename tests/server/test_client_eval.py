"""Client-side evaluation as Flower drives it: after training, the nodes that trained get the new global in an
evaluate message; their replies are checked (a hostile one is rejected alone) and the round record gets the
per-client results, their example-weighted mean, the worst client and the evaluate bytes apart from training's."""

import math
import uuid

import numpy as np
import pytest
from flwr.app import ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from test_strategy import FakeGrid, task_identity  # noqa: F401  (the autouse fixture applies here too)

from pollinate.common.config_io import build_config
from pollinate.common.report import RunRecorder
from pollinate.common.wire import arrays_to_record, record_to_arrays
from pollinate.methods.fedavg_full.server import FedAvgFull

NODES = [11, 12, 13, 14]


def _strategy(tmp_path, *overrides: str) -> FedAvgFull:
    cfg = build_config(None, ["model.name=tiny-llama", "method=fedavg-full", f"federation.clients={len(NODES)}",
                              "data.builtin_examples=20", "data.eval_examples=2", "eval.client_max_examples=8",
                              *overrides])
    return FedAvgFull(cfg, RunRecorder(tmp_path, {"rounds_planned": 3}, quiet=True), tmp_path)


def _pushed(messages) -> list[Message]:
    for message in messages:  # what the grid does when it pushes a message
        message.metadata.__dict__["_message_id"] = str(uuid.uuid4())
    return list(messages)


def _trained(strategy, server_round: int = 1):
    """One training round in which every sampled node replies; the new global arrays."""
    messages = _pushed(strategy.configure_train(server_round, strategy.initial_arrays(), ConfigRecord(),
                                                FakeGrid(NODES)))
    replies = []
    for message in messages:
        state = {k: v + np.float32(0.5) for k, v in record_to_arrays(message.content["arrays"]).items()}
        metrics = MetricRecord({"client_id": NODES.index(message.metadata.dst_node_id), "num-examples": 5,
                                "train_loss": 1.0})
        replies.append(Message(RecordDict({"arrays": arrays_to_record(state), "metrics": metrics}), reply_to=message))
    arrays, _ = strategy.aggregate_train(server_round, replies)
    return messages, arrays


def _eval_reply(message: Message, **metrics) -> Message:
    values = {"client_id": NODES.index(message.metadata.dst_node_id), **metrics}
    return Message(RecordDict({"metrics": MetricRecord(values)}), reply_to=message)


def test_nodes_that_trained_evaluate_the_new_global_and_the_round_records_mean_and_worst(tmp_path):
    strategy = _strategy(tmp_path, "federation.fraction_train=0.5")
    trained, arrays = _trained(strategy)
    sent = _pushed(strategy.configure_evaluate(1, arrays, ConfigRecord(), FakeGrid(NODES)))
    assert sorted(m.metadata.dst_node_id for m in sent) == sorted(m.metadata.dst_node_id for m in trained)
    assert all(m.metadata.message_type == MessageType.EVALUATE for m in sent)
    assert sent[0].content["config"]["server-round"] == 1
    assert record_to_arrays(sent[0].content["arrays"]).keys() == record_to_arrays(arrays).keys()
    first, second = sorted(sent, key=lambda m: m.metadata.dst_node_id)
    replies = [_eval_reply(first, **{"num-examples": 2, "eval_loss": 1.0, "exact_match": 0.5}),
               _eval_reply(second, **{"num-examples": 6, "eval_loss": 3.0, "exact_match": 0.25})]
    means = strategy.aggregate_evaluate(1, replies)
    assert means["eval_loss"] == pytest.approx(2.5) and means["exact_match"] == pytest.approx(0.3125)
    strategy.end_round(1, arrays)
    (record,) = strategy.recorder.rounds
    client_eval = record["client_eval"]
    worst_id = NODES.index(second.metadata.dst_node_id)
    assert client_eval["worst"] == {"client_id": worst_id, "num_examples": 6, "eval_loss": 3.0, "exact_match": 0.25}
    assert client_eval["mean"] == {"eval_loss": pytest.approx(2.5), "exact_match": pytest.approx(0.3125),
                                   "num_examples": 8}
    assert [c["client_id"] for c in client_eval["clients"]] == sorted(c["client_id"] for c in client_eval["clients"])
    assert record["bytes_eval_down"] > 0 and record["bytes_eval_up"] > 0
    assert record["bytes_down"] == sum(c["bytes_down"] for c in record["clients"])  # training bytes only
    assert strategy.recorder.rejected == []


@pytest.mark.parametrize("metrics, reason", [
    ({"num-examples": 3, "eval_loss": math.nan, "exact_match": 0.5}, "eval_loss = nan is not a finite number"),
    ({"num-examples": 3, "eval_loss": -1.0, "exact_match": 0.5}, "eval_loss = -1.0 is not a finite number >= 0"),
    ({"num-examples": 3, "eval_loss": 1.0, "exact_match": 7.0}, "exact_match = 7.0 is not a number in [0, 1]"),
    ({"num-examples": 3, "eval_loss": 1.0, "accuracy": 0.5}, "exact_match = None is not a number in [0, 1]"),
    ({"num-examples": 10**9, "eval_loss": 1.0, "exact_match": 0.5}, "num-examples = 1000000000 is not an integer"),
    ({"num-examples": 2.5, "eval_loss": 1.0, "exact_match": 0.5}, "num-examples = 2.5 is not an integer"),
    ({"eval_loss": 1.0, "exact_match": 0.5}, "num-examples = None is not an integer"),
    ({"num-examples": 3, "eval_loss": [1.0, 2.0], "exact_match": 0.5}, "eval_loss = [1.0, 2.0] is not a finite"),
    ({"num-examples": 3, "eval_loss": 1.0, "exact_match": 0.5, "client_id": 3}, "but its reply names client 3"),
    (None, "reply has no 'metrics' MetricRecord"),
    ("error", "evaluation failed (node 11): out of memory"),
])
def test_a_hostile_evaluation_reply_is_rejected_alone_and_the_round_goes_on(tmp_path, metrics, reason):
    strategy = _strategy(tmp_path)
    _, arrays = _trained(strategy)
    sent = sorted(_pushed(strategy.configure_evaluate(1, arrays, ConfigRecord(), FakeGrid(NODES))),
                  key=lambda m: m.metadata.dst_node_id)
    hostile, honest = sent[0], sent[1:]
    if metrics == "error":
        bad = Message(Error(code=0, reason="out of memory"), reply_to=hostile)
    elif metrics is None:
        bad = Message(RecordDict({"other": MetricRecord({"num-examples": 3})}), reply_to=hostile)
    else:
        bad = Message(RecordDict({"metrics": MetricRecord({"client_id": 0, **metrics})}), reply_to=hostile)
    replies = [bad, *(_eval_reply(m, **{"num-examples": 4, "eval_loss": 2.0, "exact_match": 0.5}) for m in honest)]
    means = strategy.aggregate_evaluate(1, replies)
    assert means["eval_loss"] == pytest.approx(2.0)
    (rejected,) = strategy.recorder.rejected
    assert rejected["client_id"] == 0 and reason in rejected["reason"]
    strategy.end_round(1, arrays)
    (record,) = strategy.recorder.rounds
    assert sorted(c["client_id"] for c in record["client_eval"]["clients"]) == [1, 2, 3]


def test_a_second_reply_from_one_node_is_rejected(tmp_path):
    strategy = _strategy(tmp_path)
    _, arrays = _trained(strategy)
    sent = _pushed(strategy.configure_evaluate(1, arrays, ConfigRecord(), FakeGrid(NODES)))
    good = {"num-examples": 4, "eval_loss": 2.0, "exact_match": 0.5}
    strategy.aggregate_evaluate(1, [_eval_reply(sent[0], **good), _eval_reply(sent[0], **good)])
    (rejected,) = strategy.recorder.rejected
    assert "more than one evaluation reply" in rejected["reason"]


def test_a_client_without_held_out_examples_is_skipped_and_off_sends_nothing(tmp_path):
    strategy = _strategy(tmp_path)
    _, arrays = _trained(strategy)
    sent = _pushed(strategy.configure_evaluate(1, arrays, ConfigRecord(), FakeGrid(NODES)))
    assert strategy.aggregate_evaluate(1, [_eval_reply(m, **{"num-examples": 0}) for m in sent]) is None
    strategy.end_round(1, arrays)
    assert "client_eval" not in strategy.recorder.rounds[-1] and strategy.recorder.rejected == []

    off = _strategy(tmp_path / "off", "eval.client_fraction=0")
    _, arrays = _trained(off)
    assert list(off.configure_evaluate(1, arrays, ConfigRecord(), FakeGrid(NODES))) == []
    off.end_round(1, arrays)
    assert not {"client_eval", "bytes_eval_up", "bytes_eval_down"} & set(off.recorder.rounds[-1])


def test_a_method_without_client_evaluation_sends_nothing(tmp_path, monkeypatch):
    strategy = _strategy(tmp_path)
    monkeypatch.setattr(strategy, "evaluate_content", lambda node_id, server_round, arrays: None)
    _, arrays = _trained(strategy)
    assert list(strategy.configure_evaluate(1, arrays, ConfigRecord(), FakeGrid(NODES))) == []
    assert strategy.aggregate_evaluate(1, []) is None


def test_a_resumed_run_sends_its_own_round_number(tmp_path):
    strategy = _strategy(tmp_path)
    strategy.round_offset = 2
    _, arrays = _trained(strategy)
    sent = list(strategy.configure_evaluate(1, arrays, ConfigRecord(), FakeGrid(NODES)))
    assert {m.content["config"]["server-round"] for m in sent} == {3}
