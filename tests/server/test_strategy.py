"""The strategy base as Flower drives it: sampling as FedAvg's, one message per node carrying only the client
sections, the run's round numbers in every hook on resume, and a reply that fails its checks rejected alone."""

import json
import random
import uuid

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity

from pollinate.common.config_io import build_config
from pollinate.common.report import RunRecorder
from pollinate.common.wire import arrays_to_record, record_to_arrays
from pollinate.methods.fedavg_full.server import FedAvgFull

NODES = [11, 12, 13, 14, 15, 16]


class FakeGrid:
    """What the strategy asks of Flower's grid: the connected nodes."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """Messages take their run and source from Flower's task identity, which a ServerApp process sets."""
    for name, value in (("_run_id", 1), ("_node_id", 1), ("_task_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)


def _strategy(tmp_path, *overrides: str) -> FedAvgFull:
    cfg = build_config(None, ["model.name=tiny-llama", "method=fedavg-full", "federation.clients=6",
                              "data.builtin_examples=20", "data.eval_examples=2", *overrides])
    return FedAvgFull(cfg, RunRecorder(tmp_path, {"rounds_planned": 3}, quiet=True), tmp_path)


def _pushed(messages) -> list[Message]:
    for message in messages:  # what the grid does when it pushes a message
        message.metadata.__dict__["_message_id"] = str(uuid.uuid4())
    return list(messages)


def _reply(message: Message, shift: float, client_id: int, **metrics) -> Message:
    state = {k: v + np.float32(shift) for k, v in record_to_arrays(message.content["arrays"]).items()}
    values = {"client_id": client_id, "num-examples": 10, "train_loss": 1.0, **metrics}
    return Message(RecordDict({"arrays": arrays_to_record(state), "metrics": MetricRecord(values)}),
                   reply_to=message)


def test_sampling_draws_the_nodes_flower_fedavg_draws(tmp_path):
    strategy = _strategy(tmp_path, "federation.fraction_train=0.5")
    random.seed(7)
    ours = [m.metadata.dst_node_id for m in strategy.configure_train(1, strategy.initial_arrays(), ConfigRecord(),
                                                                      FakeGrid(NODES))]
    random.seed(7)
    fedavg = FedAvg(fraction_train=0.5, min_train_nodes=3, min_available_nodes=6)
    theirs = [m.metadata.dst_node_id for m in fedavg.configure_train(1, ArrayRecord(), ConfigRecord(),
                                                                      FakeGrid(NODES))]
    assert ours == theirs and len(ours) == 3


def test_a_seed_samples_the_same_clients_whatever_their_node_ids(tmp_path):
    """Node ids are random per SuperLink and per rejoin; a seed (or a resumed RNG state) must pick the same
    clients, so sampling draws from the nodes ordered by their client identity."""
    from pollinate.server.identity import NodeIdentity

    picked = []
    for nodes in (NODES, [905, 17, 333, 4, 71, 250]):
        strategy = _strategy(tmp_path, "federation.fraction_train=0.5")
        strategy.identity = NodeIdentity({node: client for client, node in enumerate(nodes)})
        random.seed(7)
        sent = strategy.configure_train(1, strategy.initial_arrays(), ConfigRecord(), FakeGrid(list(reversed(nodes))))
        picked.append(sorted(nodes.index(m.metadata.dst_node_id) for m in sent))
    assert picked[0] == picked[1] and len(picked[0]) == 3


def test_each_message_carries_the_round_and_only_the_client_sections(tmp_path):
    strategy = _strategy(tmp_path)
    messages = list(strategy.configure_train(1, strategy.initial_arrays(), ConfigRecord(), FakeGrid(NODES)))
    assert sorted(m.metadata.dst_node_id for m in messages) == NODES
    config = messages[0].content["config"]
    assert config["server-round"] == 1
    assert set(json.loads(config["run-config"])) == {"method", "model", "data", "federation", "train", "eval"}
    assert len({id(m.content) for m in messages}) == len(messages)  # one message per node, none rebuilt


def test_a_resumed_run_sees_its_own_round_numbers_in_every_hook(tmp_path):
    strategy = _strategy(tmp_path)
    strategy.round_offset = 3
    assert strategy.end_round(0, strategy.initial_arrays()) is None  # the initial evaluation is in the history
    messages = _pushed(strategy.configure_train(1, strategy.initial_arrays(), ConfigRecord(), FakeGrid(NODES)))
    assert {m.content["config"]["server-round"] for m in messages} == {4}
    replies = [_reply(m, 0.1, client) for client, m in enumerate(messages)]
    arrays, _ = strategy.aggregate_train(1, replies)
    strategy.end_round(1, arrays)
    assert [r["round"] for r in strategy.recorder.rounds] == [4]
    assert (tmp_path / "checkpoints" / "round-0004").is_dir()


def test_one_bad_reply_is_rejected_and_the_others_are_averaged(tmp_path):
    strategy = _strategy(tmp_path)
    messages = _pushed(strategy.configure_train(1, strategy.initial_arrays(), ConfigRecord(), FakeGrid(NODES)))
    replies = [_reply(m, 1.0, client) for client, m in enumerate(messages[:-1])]
    broken = Message(RecordDict({"metrics": MetricRecord({"client_id": 5, "num-examples": 10})}),
                     reply_to=messages[-1])  # no arrays at all
    arrays, metrics = strategy.aggregate_train(1, [*replies, broken])
    initial = record_to_arrays(strategy.initial_arrays())
    assert all(np.allclose(v, initial[k] + 1.0, atol=1e-6) for k, v in record_to_arrays(arrays).items())
    assert metrics["train_loss"] == 1.0
    (rejected,) = strategy.recorder.rejected
    assert rejected["client_id"] == 5 and rejected["reason"] == "reply has no 'arrays' ArrayRecord"


def test_a_failing_aggregation_keeps_the_global_and_the_run_goes_on(tmp_path, monkeypatch):
    strategy = _strategy(tmp_path)
    messages = _pushed(strategy.configure_train(1, strategy.initial_arrays(), ConfigRecord(), FakeGrid(NODES)))

    def broken_aggregate(server_round, replies):
        raise ZeroDivisionError("total weight 0")

    monkeypatch.setattr(strategy, "aggregate", broken_aggregate)
    assert strategy.aggregate_train(1, [_reply(m, 1.0, c) for c, m in enumerate(messages)]) == (None, None)
    strategy.end_round(1, strategy.initial_arrays())
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    skipped = [e for e in events if e["type"] == "round_skipped"]
    assert skipped and "ZeroDivisionError: total weight 0" in skipped[0]["reason"]


def test_rounds_with_no_accepted_update_in_a_row_stop_the_run_and_an_accepted_round_resets_the_count(tmp_path):
    from pollinate.server.strategy import RunStalled

    strategy = _strategy(tmp_path, "federation.max_skipped_rounds=2", "federation.update_norm_bound=1.0")

    def train(server_round: int, shift: float):
        messages = _pushed(strategy.configure_train(server_round, strategy.initial_arrays(), ConfigRecord(),
                                                    FakeGrid(NODES)))
        return strategy.aggregate_train(server_round, [_reply(m, shift, NODES.index(m.metadata.dst_node_id))
                                                       for m in messages])

    assert train(1, 5.0) == (None, None)  # every update over the norm bound: skipped, the run goes on
    assert train(2, 1e-4)[0] is not None  # accepted: the count starts again
    assert train(3, 5.0) == (None, None)
    with pytest.raises(RunStalled) as stalled:
        train(4, 5.0)
    message = str(stalled.value)
    assert message.startswith("stopped: rounds 3-4 had no accepted update (federation.max_skipped_rounds = 2)")
    assert "exceeds federation.update_norm_bound = 1" in message and "\n" not in message


def test_max_skipped_rounds_zero_never_stops(tmp_path):
    strategy = _strategy(tmp_path, "federation.max_skipped_rounds=0", "federation.update_norm_bound=1.0")
    for server_round in range(1, 5):
        messages = _pushed(strategy.configure_train(server_round, strategy.initial_arrays(), ConfigRecord(),
                                                    FakeGrid(NODES)))
        replies = [_reply(m, 5.0, NODES.index(m.metadata.dst_node_id)) for m in messages]
        assert strategy.aggregate_train(server_round, replies) == (None, None)
