"""Where a round's wall time goes: the phases the strategy marks at Flower's hooks, on a clock the test moves."""

import json
import uuid

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

import pollinate.server.strategy as strategy_module
from pollinate.common.config_io import build_config
from pollinate.common.report import RunRecorder
from pollinate.common.wire import arrays_to_record, record_to_arrays
from pollinate.methods.fedavg_full.server import FedAvgFull
from pollinate.server.round_timing import RoundTiming

NODES = [11, 12, 13]


class Clock:
    """Time moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeGrid:
    def get_node_ids(self) -> list[int]:
        return list(NODES)


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    for name, value in (("_run_id", 1), ("_node_id", 1), ("_task_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)


def test_phases_add_up_to_the_wall_time_and_other_is_the_rest():
    clock = Clock()
    timing = RoundTiming(clock)
    clock.advance(1.0)  # building the messages: other
    timing.open("train")
    clock.advance(10.0)
    timing.close("train")
    with timing.measure("aggregate"):
        clock.advance(2.0)
    timing.close("client_eval")  # never opened: counts nothing
    with timing.measure("eval"):
        clock.advance(3.0)
    before = timing.round_fields(checkpointed=False)
    assert before == {"seconds": 16.0, "timing": {
        "train_seconds": 10.0, "eval_seconds": 3.0, "client_eval_seconds": 0.0, "aggregate_seconds": 2.0,
        "checkpoint_seconds": None, "other_seconds": 1.0}}
    with timing.measure("checkpoint"):
        clock.advance(0.5)
    after = timing.round_fields()
    assert after["seconds"] == 16.5 and after["timing"]["checkpoint_seconds"] == 0.5
    assert after["timing"]["other_seconds"] == 1.0
    timing.start()
    assert timing.round_fields()["timing"]["train_seconds"] == 0.0  # a new round starts from nothing


def _reply(message: Message, client_id: int) -> Message:
    state = {k: v + np.float32(0.5) for k, v in record_to_arrays(message.content["arrays"]).items()}
    metrics = MetricRecord({"client_id": client_id, "num-examples": 10, "train_loss": 1.0})
    return Message(RecordDict({"arrays": arrays_to_record(state), "metrics": metrics}), reply_to=message)


def _pushed(messages) -> list[Message]:
    for message in messages:  # what the grid does when it pushes a message
        message.metadata.__dict__["_message_id"] = str(uuid.uuid4())
    return list(messages)


def test_a_round_driven_as_flower_does_records_each_phase(tmp_path, monkeypatch):
    """configure_train → (clients train) → aggregate_train → configure_evaluate → (clients evaluate) →
    aggregate_evaluate → end_round (server evaluation, checkpoint): each phase lands in its own field; the
    checkpoint keeps the round as it stood before it was written."""
    cfg = build_config(None, ["model.name=tiny-llama", "method=fedavg-full", "federation.clients=3",
                              "federation.rounds=1", "data.builtin_examples=12", "data.eval_examples=2"])
    strategy = FedAvgFull(cfg, RunRecorder(tmp_path, {"rounds_planned": 1}, quiet=True), tmp_path)
    clock = Clock()
    strategy.timing = RoundTiming(clock)
    aggregate, save_round = strategy.aggregate, strategy_module.save_round
    monkeypatch.setattr(strategy, "begin_round", lambda grid, server_round: clock.advance(1.0))
    monkeypatch.setattr(strategy, "aggregate", lambda *a: (clock.advance(2.0), aggregate(*a))[1])
    monkeypatch.setattr(strategy, "evaluate_global",
                        lambda arrays: (clock.advance(3.0), {"eval_loss": 1.5, "eval_metrics": {}})[1])
    monkeypatch.setattr(strategy_module, "save_round", lambda *a: (clock.advance(0.5), save_round(*a))[1])

    messages = _pushed(strategy.configure_train(1, strategy.initial_arrays(), ConfigRecord(), FakeGrid()))
    clock.advance(10.0)  # Flower sends the messages; the clients train and reply
    arrays, _ = strategy.aggregate_train(1, [_reply(m, client) for client, m in enumerate(messages)])
    assert list(strategy.configure_evaluate(1, arrays, ConfigRecord(), FakeGrid()))  # eval.client_fraction > 0
    clock.advance(4.0)  # the evaluate round trip (no client answers here)
    strategy.aggregate_evaluate(1, [])
    strategy.end_round(1, arrays)

    (record,) = strategy.recorder.rounds
    assert record["seconds"] == 20.5
    assert record["server_rss_bytes"] > 1 << 20  # this process's resident memory, in bytes
    assert record["timing"] == {"train_seconds": 10.0, "eval_seconds": 3.0, "client_eval_seconds": 4.0,
                                "aggregate_seconds": 2.0, "checkpoint_seconds": 0.5, "other_seconds": 1.0}
    line = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"round"' in x][-1]
    assert line["timing"] == record["timing"]
    saved = json.loads((tmp_path / "checkpoints" / "round-0001" / "state.json").read_text())
    (kept,) = saved["history"]["rounds"]
    assert kept["timing"]["checkpoint_seconds"] is None and kept["seconds"] == 20.0
    assert kept["timing"]["train_seconds"] == 10.0 and kept["timing"]["other_seconds"] == 1.0


def test_report_md_has_the_timing_table(tmp_path):
    recorder = RunRecorder(tmp_path, {"method": "m", "model": "x", "task": "t", "num_clients": 1,
                                      "rounds_planned": 1}, quiet=True)
    recorder.round_done({"round": 1, "train_loss": 1.0, "eval_loss": 2.0, "eval_metrics": {}, "bytes_up": 1,
                         "bytes_down": 2, "seconds": 9.0, "clients": [],
                         "timing": {"train_seconds": 5.0, "eval_seconds": 2.0, "client_eval_seconds": 0.0,
                                    "aggregate_seconds": 1.0, "checkpoint_seconds": None, "other_seconds": 1.0}})
    recorder.write(plots=True)
    text = (tmp_path / "report.md").read_text()
    assert "| round | wall | training | aggregation | client evaluation | evaluation | checkpoint | other |" in text
    assert "| 1 | 9.0 | 5.0 | 1.0 | 0.0 | 2.0 | - | 1.0 |" in text
