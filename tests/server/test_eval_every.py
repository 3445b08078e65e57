"""``eval.every``: the server evaluates every N rounds and after the last; the rounds between record eval_loss
null, and everything that reads the rounds (report, plots, bench, trackers, resume) takes that."""

import uuid

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from pollinate.common.config import ConfigError
from pollinate.common.config_io import build_config
from pollinate.common.report import RunRecorder, summary_table
from pollinate.common.trackers import round_scalars
from pollinate.common.wire import arrays_to_record, record_to_arrays
from pollinate.methods.fedavg_full.server import FedAvgFull
from pollinate.server.checkpoint import find_resume_point
from pollinate.simulations.bench import bytes_to_reach, round_tables, summarize

NODES = [11, 12]


class FakeGrid:
    def get_node_ids(self) -> list[int]:
        return list(NODES)


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    for name, value in (("_run_id", 1), ("_node_id", 1), ("_task_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)


def _run(tmp_path, monkeypatch, rounds: int, every: int) -> tuple[FedAvgFull, list[int], list]:
    """Flower's loop over ``rounds`` rounds with a stand-in server evaluation; the rounds it evaluated and what
    ``end_round`` returned each round."""
    cfg = build_config(None, ["model.name=tiny-llama", "method=fedavg-full", "federation.clients=2",
                              f"federation.rounds={rounds}", f"eval.every={every}", "eval.client_fraction=0",
                              "data.builtin_examples=8", "data.eval_examples=2"])
    header = {"method": "fedavg-full", "model": "tiny-llama", "task": "skills", "num_clients": 2,
              "rounds_planned": rounds}
    strategy = FedAvgFull(cfg, RunRecorder(tmp_path, header, quiet=True), tmp_path)
    evaluated: list[int] = []
    monkeypatch.setattr(strategy, "evaluate_global", lambda arrays: (
        evaluated.append(len(strategy.recorder.rounds) + 1),
        {"eval_loss": 3.0 - len(evaluated), "eval_metrics": {"exact_match": 0.1 * len(evaluated)}})[1])
    returned = [strategy.end_round(0, strategy.initial_arrays())]
    evaluated.clear()
    arrays = strategy.initial_arrays()
    for server_round in range(1, rounds + 1):
        messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), FakeGrid()))
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid.uuid4())
        replies = []
        for message in messages:
            client = NODES.index(message.metadata.dst_node_id)  # each node stays its client
            state = {k: v + np.float32(0.1) for k, v in record_to_arrays(message.content["arrays"]).items()}
            metrics = MetricRecord({"client_id": client, "num-examples": 4, "train_loss": 1.0})
            replies.append(Message(RecordDict({"arrays": arrays_to_record(state), "metrics": metrics}),
                                   reply_to=message))
        arrays, _ = strategy.aggregate_train(server_round, replies)
        returned.append(strategy.end_round(server_round, arrays))
    return strategy, evaluated, returned


def test_rounds_between_evaluations_record_null_and_the_last_is_always_evaluated(tmp_path, monkeypatch):
    strategy, evaluated, returned = _run(tmp_path, monkeypatch, rounds=5, every=2)
    assert evaluated == [2, 4, 5]
    rounds = strategy.recorder.rounds
    assert [r["eval_loss"] for r in rounds] == [None, 2.0, None, 1.0, 0.0]
    assert rounds[0]["eval_metrics"] == {} and rounds[0]["timing"]["eval_seconds"] == 0.0
    assert returned[0] is not None and [r is None for r in returned[1:]] == [True, False, True, False, False]

    report = strategy.recorder.write(plots=True)  # report.md, plots and the console table take the nulls
    assert "| 1 | 1.0000 | - |" in (tmp_path / "report.md").read_text()
    summary_table(report)
    assert bytes_to_reach(report, 1.0) == sum(r["bytes_up"] + r["bytes_down"] for r in rounds[:4])
    row = summarize(report, baseline_final_loss=0.5)
    assert row["final_eval_loss"] == 0.0 and row["eval_loss_per_round"][0] is None
    assert "| 1 | - |" in "\n".join(round_tables([row]))
    assert "eval/loss" not in round_scalars(rounds[0]) and round_scalars(rounds[1])["eval/loss"] == 2.0


def test_a_resumed_run_keeps_the_null_rounds(tmp_path, monkeypatch):
    strategy, _, _ = _run(tmp_path, monkeypatch, rounds=3, every=2)
    point = find_resume_point(tmp_path, strategy.cfg)
    assert [r["eval_loss"] for r in point.history["rounds"]] == [None, 2.0, 1.0]


def test_every_must_be_a_positive_int():
    with pytest.raises(ConfigError, match="eval.every"):
        build_config(None, ["eval.every=0"])
