"""One client of five is malicious: whatever it sends, the round completes, its reply is rejected and recorded (or
cannot move the global), and the printed and stored reasons are plain, short text.

The strategy's hooks are driven as Flower drives them, with fabricated Flower Messages; the state is one small
tensor so every case runs in milliseconds. Robust aggregators are held to a stated distance: the global stays
inside the honest clients' coordinate-wise spread around the honest-only FedAvg (``honest_radius``).
"""

import io
import json
import uuid

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from rich.console import Console

from pollinate.common.config_io import build_config
from pollinate.common.report import RunRecorder
from pollinate.common.wire import arrays_to_record, record_to_arrays
from pollinate.server.robust import fedavg
from pollinate.server.state_fedavg import StateFedAvg

NODES = [101, 102, 103, 104, 105]
ATTACKER_NODE, ATTACKER = 105, 4
SHAPE = (16, 8)
ROBUST = ("median", "trimmed-mean", "krum", "multi-krum")
# Bounds off: what a robust aggregator does on its own.
UNBOUNDED = ("federation.update_norm_bound=0", "federation.relative_norm_bound=0",
             "federation.max_examples_per_client=10000000000000000")


class FakeGrid:
    def get_node_ids(self) -> list[int]:
        return list(NODES)


class ToyState(StateFedAvg):
    """A state-averaging method on one (16, 8) tensor: the base's checks and aggregation, no model."""

    shapes = {"w": SHAPE}

    def initial_arrays(self) -> ArrayRecord:
        return arrays_to_record({"w": np.full(SHAPE, 0.5, np.float32)})

    def evaluate_global(self, arrays: ArrayRecord) -> dict:
        return {"eval_loss": 0.0, "eval_metrics": {}}

    def save_final(self, arrays: ArrayRecord) -> dict:
        return {}


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    for name, value in (("_run_id", 1), ("_node_id", 1), ("_task_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)


def strategy_for(tmp_path, *overrides: str) -> tuple[ToyState, io.StringIO]:
    cfg = build_config(None, ["federation.clients=5", "federation.rounds=3", *overrides])
    printed = io.StringIO()
    recorder = RunRecorder(tmp_path, {"rounds_planned": 3}, console=Console(file=printed, width=400), quiet=True)
    return ToyState(cfg, recorder, tmp_path), printed


def honest_states(global_: np.ndarray) -> list[np.ndarray]:
    """Clients 0-3 move the global the same way, each with its own small noise."""
    rng = np.random.default_rng(0)
    direction = rng.normal(0.0, 0.05, SHAPE)
    return [(global_ + direction + rng.normal(0.0, 0.01, SHAPE)).astype(np.float32) for _ in range(4)]


def reply(message: Message, state: dict | None = None, **metrics) -> Message:
    values = {"client_id": NODES.index(message.metadata.dst_node_id), "num-examples": 100, "train_loss": 1.0}
    values.update(metrics)
    values = {k: v for k, v in values.items() if v is not None}
    content = RecordDict({"metrics": MetricRecord(values)})
    if state is not None:
        content["arrays"] = arrays_to_record(state)
    return Message(content, reply_to=message)


def attack(name: str, global_: np.ndarray, honest: list[np.ndarray]) -> tuple[dict, dict]:
    """The attacker's state and metrics for attack ``name``."""
    mean_move = np.mean(honest, axis=0) - global_
    if name == "replacement":  # the state that makes the FedAvg of all five exactly the attacker's target
        target = global_ + 3.0
        return {"w": (5 * target - np.sum(honest, axis=0)).astype(np.float32)}, {}
    if name == "sign-flip-x20":
        return {"w": (global_ - 20 * mean_move).astype(np.float32)}, {}
    if name == "weight-1e15":
        return {"w": (global_ + 3.0).astype(np.float32)}, {"num-examples": 1e15}
    if name == "nan":
        return {"w": np.full(SHAPE, np.nan, np.float32)}, {}
    raise ValueError(name)


def run_round(strategy: ToyState, attacker: dict | None, attacker_metrics: dict,
              server_round: int = 1) -> tuple[np.ndarray | None, np.ndarray, list[np.ndarray]]:
    """One round as Flower runs it; returns (new global or None, the global it started from, honest states)."""
    arrays = strategy.global_arrays if len(strategy.global_arrays) else strategy.initial_arrays()
    messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), FakeGrid()))
    for message in messages:
        message.metadata.__dict__["_message_id"] = str(uuid.uuid4())
    global_ = record_to_arrays(arrays)["w"]
    honest = honest_states(global_)
    by_node = {m.metadata.dst_node_id: m for m in messages}
    replies = [reply(by_node[node], {"w": state}) for node, state in zip(NODES[:4], honest, strict=True)]
    replies.append(reply(by_node[ATTACKER_NODE], attacker, **attacker_metrics))
    new, _ = strategy.aggregate_train(server_round, replies)
    strategy.end_round(server_round, new if new is not None else arrays)  # record + checkpoint the round
    return (None if new is None else record_to_arrays(new)["w"]), global_, honest


def honest_radius(honest: list[np.ndarray], ideal: np.ndarray) -> float:
    """L2 radius of the honest clients' coordinate-wise spread around the honest-only FedAvg."""
    return float(np.sqrt(np.sum(np.max(np.abs(np.stack(honest) - ideal), axis=0) ** 2)))


def rejections(strategy: ToyState, tmp_path) -> tuple[list[dict], list[dict]]:
    """The report's rejections and metrics.jsonl's."""
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    return strategy.recorder.rejected, [e for e in events if e["type"] == "rejected"]


@pytest.mark.parametrize("name, reason", [
    ("replacement", "federation.relative_norm_bound"), ("sign-flip-x20", "federation.relative_norm_bound"),
    ("weight-1e15", "num-examples = 1000000000000000.0 is not an integer in [1, 1000000]"), ("nan", "NaN or Inf"),
])
def test_default_bounds_reject_the_attack_and_keep_the_honest_fedavg(tmp_path, name, reason):
    strategy, _ = strategy_for(tmp_path)
    global_ = record_to_arrays(strategy.initial_arrays())["w"]
    new, _, honest = run_round(strategy, *attack(name, global_, honest_states(global_)))
    np.testing.assert_array_equal(new, fedavg([{"w": h} for h in honest], [100.0] * 4)["w"])
    report, logged = rejections(strategy, tmp_path)
    assert [(r["client_id"], reason in r["reason"]) for r in report] == [(ATTACKER, True)]
    assert logged[0]["client_id"] == ATTACKER and reason in logged[0]["reason"]
    assert [c["client_id"] for c in strategy.recorder.rounds[0]["clients"]] == [0, 1, 2, 3, 4]


def test_the_absolute_norm_bound_alone_rejects_model_replacement(tmp_path):
    strategy, _ = strategy_for(tmp_path, "federation.relative_norm_bound=0", "federation.update_norm_bound=5")
    global_ = record_to_arrays(strategy.initial_arrays())["w"]
    new, _, honest = run_round(strategy, *attack("replacement", global_, honest_states(global_)))
    np.testing.assert_array_equal(new, fedavg([{"w": h} for h in honest], [100.0] * 4)["w"])
    assert "exceeds federation.update_norm_bound = 5" in strategy.recorder.rejected[0]["reason"]


def test_without_bounds_fedavg_is_taken_over_by_the_replacement(tmp_path):
    """The attack works when nothing stops it: what the tests above and below defend against."""
    strategy, _ = strategy_for(tmp_path, *UNBOUNDED)
    global_ = record_to_arrays(strategy.initial_arrays())["w"]
    new, _, _ = run_round(strategy, *attack("replacement", global_, honest_states(global_)))
    np.testing.assert_allclose(new, global_ + 3.0, atol=1e-5)


@pytest.mark.parametrize("aggregator", ROBUST)
@pytest.mark.parametrize("name", ["replacement", "sign-flip-x20", "weight-1e15"])
def test_robust_aggregators_keep_the_global_within_the_honest_spread(tmp_path, aggregator, name):
    strategy, _ = strategy_for(tmp_path, *UNBOUNDED, f"federation.aggregator='{aggregator}'")
    global_ = record_to_arrays(strategy.initial_arrays())["w"]
    new, _, honest = run_round(strategy, *attack(name, global_, honest_states(global_)))
    ideal = fedavg([{"w": h} for h in honest], [100.0] * 4)["w"]
    radius = honest_radius(honest, ideal)
    assert np.linalg.norm(new - ideal) <= radius
    assert radius < 0.05 * np.linalg.norm(attack("replacement", global_, honest)[0]["w"] - ideal)


@pytest.mark.parametrize("metrics, reason", [
    ({"num-examples": float("inf")}, "num-examples = inf"),
    ({"num-examples": -300}, "num-examples = -300"),
    ({"num-examples": 0}, "num-examples = 0"),
    ({"num-examples": 2.5}, "num-examples = 2.5"),
    ({"client_id": 0}, "node 105 is client 4, but its reply names client 0"),
])
def test_bad_counts_and_a_claimed_identity_are_rejected_after_a_clean_round(tmp_path, metrics, reason):
    strategy, _ = strategy_for(tmp_path)
    global_ = record_to_arrays(strategy.initial_arrays())["w"]
    run_round(strategy, {"w": honest_states(global_)[0]}, {})  # binds every node to its client
    new, _, honest = run_round(strategy, {"w": honest_states(global_)[0]}, metrics, server_round=2)
    assert new is not None
    (rejected,) = strategy.recorder.rejected
    assert rejected["round"] == 2 and rejected["client_id"] == ATTACKER and reason in rejected["reason"]


def test_a_second_node_claiming_a_bound_client_is_rejected(tmp_path):
    strategy, _ = strategy_for(tmp_path)
    global_ = record_to_arrays(strategy.initial_arrays())["w"]
    new, _, _ = run_round(strategy, {"w": honest_states(global_)[0]}, {"client_id": 2})
    assert new is not None
    (rejected,) = strategy.recorder.rejected
    assert rejected["client_id"] == "node-105" and "names client 2, which is node 103" in rejected["reason"]


def test_a_reply_without_train_loss_counts_and_the_round_loss_comes_from_the_others(tmp_path):
    strategy, _ = strategy_for(tmp_path)
    global_ = record_to_arrays(strategy.initial_arrays())["w"]
    new, _, honest = run_round(strategy, {"w": honest_states(global_)[0]}, {"train_loss": None})
    assert new is not None and not strategy.recorder.rejected
    assert strategy.recorder.rounds[0]["train_loss"] == 1.0


def test_markup_in_tensor_names_and_error_texts_is_stored_and_printed_as_plain_short_text(tmp_path):
    strategy, printed = strategy_for(tmp_path)
    global_ = record_to_arrays(strategy.initial_arrays())["w"]
    run_round(strategy, {"w": honest_states(global_)[0]}, {})
    run_round(strategy, {"[/x]": np.zeros(SHAPE, np.float32)}, {}, server_round=2)
    messages = list(strategy.configure_train(3, strategy.global_arrays, ConfigRecord(), FakeGrid()))
    for message in messages:
        message.metadata.__dict__["_message_id"] = str(uuid.uuid4())
    failed = Message(Error(code=0, reason="[/bold][red]" + "x" * 5000), reply_to=messages[-1])
    strategy.aggregate_train(3, [failed])
    report, logged = rejections(strategy, tmp_path)
    assert "unknown tensor name '[/x]'" in report[0]["reason"] and "[/bold][red]" in report[1]["reason"]
    assert all(len(r["reason"]) <= 200 for r in report + logged)
    assert "[/x]" in printed.getvalue() and "[/bold][red]" in printed.getvalue()
    strategy.recorder.write(plots=False)
    assert "[/bold][red]" in json.loads((tmp_path / "report.json").read_text())["rejected"][1]["reason"]
