"""Server optimizers: FedAvgM, FedAdam and FedYogi step as Flower's own strategies do, fedavg stays the plain
aggregate, and the optimizer's state survives a checkpoint so a resumed run continues with the same moments.
Also what else the server adds to a round for non-IID runs: the learning-rate schedule's multiplier."""

import uuid

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvgM, FedYogi
from flwr.supercore.task_identity import TaskIdentity

from pollinate.common.config import FederationConfig
from pollinate.common.config_io import build_config
from pollinate.common.report import RunRecorder
from pollinate.common.wire import arrays_to_record, record_to_arrays
from pollinate.methods.fedavg_full.server import FedAvgFull
from pollinate.server import robust
from pollinate.server.checkpoint import OPTIMIZER_FILE, ResumeError, find_resume_point, round_dir
from pollinate.server.server_optimizer import ServerOptimizer, server_optimizer_for

LR, MOMENTUM, BETA2, TAU = 0.3, 0.8, 0.95, 0.01
NODES = [11, 12, 13]


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """Messages take their run and source from Flower's task identity, which a ServerApp process sets."""
    for name, value in (("_run_id", 1), ("_node_id", 1), ("_task_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)


def _flower(name: str):
    if name == "fedavgm":
        return FedAvgM(server_learning_rate=LR, server_momentum=MOMENTUM)
    cls = FedAdam if name == "fedadam" else FedYogi
    return cls(eta=LR, beta_1=MOMENTUM, beta_2=BETA2, tau=TAU)


def _flower_step(strategy, name: str, current: dict, aggregated: dict, server_round: int) -> dict:
    """Flower's strategy aggregating one reply that carries ``aggregated``, from the global ``current``."""
    if name == "fedavgm":
        strategy.current_arrays = ArrayRecord({k: Array(v) for k, v in current.items()})
    else:
        strategy.current_arrays = {k: v.copy() for k, v in current.items()}
    sent = Message(RecordDict({"config": ConfigRecord()}), dst_node_id=5, message_type=MessageType.TRAIN)
    sent.metadata.__dict__["_message_id"] = str(uuid.uuid4())
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in aggregated.items()}),
                          "metrics": MetricRecord({"num-examples": 1})})
    arrays, _ = strategy.aggregate_train(server_round, [Message(content, reply_to=sent)])
    return {key: arrays[key].numpy() for key in arrays}


@pytest.mark.parametrize("name", ["fedavgm", "fedadam", "fedyogi"])
def test_each_optimizer_steps_as_flowers_strategy_does(name):
    rng = np.random.default_rng(3)
    current = {"a": rng.normal(size=(2, 3)).astype(np.float32), "b": rng.normal(size=4).astype(np.float32)}
    ours, flower = ServerOptimizer(name, LR, MOMENTUM, BETA2, TAU), _flower(name)
    for server_round in (1, 2, 3):
        aggregated = {k: (v + rng.normal(scale=0.1, size=v.shape)).astype(np.float32) for k, v in current.items()}
        expected = _flower_step(flower, name, current, aggregated, server_round)
        stepped = ours.step(current, aggregated, server_round)
        for key in current:
            assert stepped[key].dtype == np.float32
            np.testing.assert_allclose(stepped[key], expected[key], rtol=1e-5, atol=1e-7, err_msg=key)
            assert not np.allclose(stepped[key], aggregated[key])  # the optimizer did move it elsewhere
        current = stepped


def test_fedavgm_by_hand():
    optimizer = ServerOptimizer("fedavgm", lr=1.0, momentum=0.5)
    first = optimizer.step({"w": np.float32([1.0])}, {"w": np.float32([0.0])}, 1)  # g = 1, v = 1
    second = optimizer.step(first, {"w": np.float32([-0.5])}, 2)  # g = 0.5, v = 0.5 * 1 + 0.5 = 1
    assert first["w"].tolist() == [0.0] and second["w"].tolist() == [-1.0]


def test_fedavg_and_an_inert_fedavgm_have_no_optimizer():
    assert server_optimizer_for(FederationConfig()) is None
    assert server_optimizer_for(FederationConfig(server_optimizer="fedavgm", server_momentum=0.0)) is None
    assert server_optimizer_for(FederationConfig(server_optimizer="fedyogi")).name == "fedyogi"


def test_a_failed_step_leaves_the_state_as_it_was():
    optimizer = ServerOptimizer("fedadam", LR, MOMENTUM, BETA2, TAU)
    optimizer.step({"w": np.ones(2, np.float32)}, {"w": np.zeros(2, np.float32)}, 1)
    before = optimizer.state()
    with pytest.raises(ValueError, match="tensor 'x' is in only one"):
        optimizer.step({"w": np.ones(2, np.float32)}, {"w": np.zeros(2, np.float32), "x": np.zeros(1)}, 2)
    with pytest.raises(ValueError, match="tensor 'w' has shape"):
        optimizer.step({"w": np.ones(2, np.float32)}, {"w": np.zeros(3, np.float32)}, 2)
    after = optimizer.state()
    assert before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before)
    with pytest.raises(ValueError, match="expected '<slot>/<tensor>'"):
        optimizer.load_state({"momentum/w": np.zeros(2)})


# --- in the strategy ------------------------------------------------------------------------------------
class FakeGrid:
    def get_node_ids(self) -> list[int]:
        return list(NODES)


def _strategy(tmp_path, *overrides: str) -> FedAvgFull:
    cfg = build_config(None, ["model.name=tiny-llama", "method=fedavg-full", "federation.clients=3",
                              "federation.rounds=3", "data.builtin_examples=12", "data.eval_examples=2", *overrides])
    return FedAvgFull(cfg, RunRecorder(tmp_path, {"rounds_planned": 3}, quiet=True), tmp_path)


def _round(strategy: FedAvgFull, server_round: int, arrays: ArrayRecord) -> tuple[ArrayRecord, list[dict]]:
    """One round in which client ``c`` returns the global shifted by ``(c + 1) · server_round / 100``."""
    messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), FakeGrid()))
    for message in messages:
        message.metadata.__dict__["_message_id"] = str(uuid.uuid4())
    states = []
    replies = []
    for message in sorted(messages, key=lambda m: m.metadata.dst_node_id):
        client = NODES.index(message.metadata.dst_node_id)
        shift = np.float32((client + 1) * server_round / 100)
        states.append({k: v + shift for k, v in record_to_arrays(message.content["arrays"]).items()})
        metrics = MetricRecord({"client_id": client, "num-examples": 10 + client, "train_loss": 1.0})
        replies.append(Message(RecordDict({"arrays": arrays_to_record(states[-1]), "metrics": metrics}),
                               reply_to=message))
    new, _ = strategy.aggregate_train(server_round, replies)
    return new, states


def test_fedavg_is_the_aggregate_itself_and_checkpoints_no_optimizer(tmp_path):
    strategy = _strategy(tmp_path)
    initial = strategy.initial_arrays()
    new, states = _round(strategy, 1, initial)
    expected = robust.aggregate("fedavg", states, [10.0, 11.0, 12.0])
    assert all(np.array_equal(v, expected[k]) for k, v in record_to_arrays(new).items())
    strategy.end_round(1, new)
    assert not (round_dir(tmp_path, 1) / OPTIMIZER_FILE).exists()


def test_fedadam_moves_the_global_and_a_resumed_run_continues_with_the_same_moments(tmp_path):
    overrides = ("federation.server_optimizer=fedadam", "federation.server_lr=0.05")
    strategy = _strategy(tmp_path, *overrides)
    initial = strategy.initial_arrays()
    new, states = _round(strategy, 1, initial)
    by_hand = ServerOptimizer("fedadam", 0.05, 0.9, 0.99, 1e-3).step(
        record_to_arrays(initial), robust.aggregate("fedavg", states, [10.0, 11.0, 12.0]), 1)
    assert all(np.array_equal(v, by_hand[k]) for k, v in record_to_arrays(new).items())
    strategy.end_round(1, new)
    assert (round_dir(tmp_path, 1) / OPTIMIZER_FILE).is_file()

    point = find_resume_point(tmp_path, strategy.cfg)
    resumed = _strategy(tmp_path, *overrides)
    point.restore_optimizer(resumed.server_optimizer)
    continued, _ = _round(strategy, 2, new)
    from_checkpoint, _ = _round(resumed, 2, arrays_to_record(point.arrays))
    fresh, _ = _round(_strategy(tmp_path, *overrides), 2, new)  # what a resume that lost the moments gives
    ours, theirs = record_to_arrays(continued), record_to_arrays(from_checkpoint)
    assert all(np.array_equal(v, theirs[k]) for k, v in ours.items())
    assert any(not np.array_equal(v, record_to_arrays(fresh)[k]) for k, v in ours.items())

    point.optimizer_state = None
    with pytest.raises(ResumeError, match=OPTIMIZER_FILE):
        point.restore_optimizer(resumed.server_optimizer)


def test_the_round_message_carries_the_schedules_multiplier_only_when_one_is_on(tmp_path):
    def sent(*overrides: str) -> list:
        strategy = _strategy(tmp_path, *overrides)
        messages = strategy.configure_train(2, strategy.initial_arrays(), ConfigRecord(), FakeGrid())
        return [dict(m.content["config"]).get("lr-scale") for m in messages]

    assert sent() == [None] * 3  # the default run's messages are byte for byte what they were
    assert sent("train.lr_schedule=linear", "train.min_lr_ratio=0.2") == [pytest.approx(0.6)] * 3
