"""Local differential privacy on the client: a reply's update is clipped to the round's clip norm and noised
with std σ·C, seeded per (run, round, client), before it leaves; a round without the entries leaves it as is."""

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from pollinate.client.privacy import privatize_reply
from pollinate.common.privacy import DP_CLIPPED_METRIC, local_dp_entries, update_norm
from pollinate.common.wire import arrays_to_record, record_to_arrays

BASE = {"a": np.zeros((40, 50), np.float32), "b": np.ones(1000, np.float32)}


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """Messages take their run and source from Flower's task identity, which a process running an app sets."""
    for name, value in (("_run_id", 1), ("_node_id", 1), ("_task_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)


def _exchange(shift: float, client_id: int = 2, **entries: float) -> tuple[Message, RecordDict]:
    config = ConfigRecord({"server-round": 3, **entries})
    msg = Message(RecordDict({"arrays": arrays_to_record(BASE), "config": config}), dst_node_id=5,
                  message_type=MessageType.TRAIN)
    state = {k: v + np.float32(shift) for k, v in BASE.items()}
    reply = RecordDict({"arrays": arrays_to_record(state),
                        "metrics": MetricRecord({"client_id": client_id, "num-examples": 7})})
    return msg, reply


def _sent(shift: float, clip: float, sigma: float, client_id: int = 2, seed: int = 0) -> tuple[dict, RecordDict]:
    msg, reply = _exchange(shift, client_id, **local_dp_entries(clip, sigma))
    out = privatize_reply(msg, reply, seed)
    return record_to_arrays(out["arrays"]), out


def test_a_large_update_is_clipped_on_the_client():
    state, reply = _sent(5.0, clip=0.3, sigma=0.0)
    assert update_norm(state, BASE) == pytest.approx(0.3, rel=1e-5)
    assert reply["metrics"][DP_CLIPPED_METRIC] == 1
    small, reply = _sent(1e-6, clip=0.3, sigma=0.0)
    assert reply["metrics"][DP_CLIPPED_METRIC] == 0
    assert update_norm(small, BASE) == pytest.approx(update_norm({k: v + 1e-6 for k, v in BASE.items()}, BASE),
                                                     rel=1e-3)


def test_the_noise_has_std_sigma_clip_and_is_seeded_per_client():
    state, _ = _sent(0.0, clip=0.5, sigma=2.0)
    change = np.concatenate([(state[k] - BASE[k]).ravel() for k in BASE])
    assert float(change.std()) == pytest.approx(1.0, rel=0.05)
    again, _ = _sent(0.0, clip=0.5, sigma=2.0)
    other, _ = _sent(0.0, clip=0.5, sigma=2.0, client_id=3)
    assert all(np.array_equal(state[k], again[k]) for k in BASE)
    assert not np.array_equal(state["a"], other["a"])


def test_a_round_without_local_dp_leaves_the_reply_as_it_is():
    msg, reply = _exchange(5.0)
    assert privatize_reply(msg, reply, 0) is reply
    assert DP_CLIPPED_METRIC not in reply["metrics"]


def test_malformed_entries_are_refused():
    msg, reply = _exchange(1.0, **{"dp-clip-norm": 0.0, "dp-noise-multiplier": 1.0})
    with pytest.raises(ValueError, match="dp-clip-norm"):
        privatize_reply(msg, reply, 0)


def test_the_client_app_sends_a_clipped_update_when_the_server_asks(tmp_path):
    # The real path: the strategy's round message -> the client app (fedavg-full trains) -> the server's round.
    import uuid

    from flwr.app import Context

    from pollinate.client.app import train as client_train
    from pollinate.common.config_io import build_config
    from pollinate.common.report import RunRecorder
    from pollinate.methods.fedavg_full.server import FedAvgFull

    pytest.importorskip("opacus")
    cfg = build_config(None, ["model.name=tiny-llama", "method=fedavg-full", "federation.clients=1",
                              "data.builtin_examples=16", "data.eval_examples=2", "train.local_steps=2",
                              "train.lr=0.05", "privacy.dp=local", "privacy.noise_multiplier=0",
                              "privacy.clip_norm=1e-3"])
    strategy = FedAvgFull(cfg, RunRecorder(tmp_path, {"rounds_planned": 1}, quiet=True), tmp_path)

    class Grid:
        def get_node_ids(self) -> list[int]:
            return [5]

    initial = strategy.initial_arrays()
    [msg] = list(strategy.configure_train(1, initial, ConfigRecord(), Grid()))
    msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
    context = Context(run_id=1, node_id=5, node_config={"partition-id": 0, "num-partitions": 1}, state=RecordDict(),
                      run_config={})
    reply = client_train(msg, context)
    assert reply.content["metrics"][DP_CLIPPED_METRIC] == 1
    sent = record_to_arrays(reply.content["arrays"])
    assert update_norm(sent, record_to_arrays(initial)) == pytest.approx(1e-3, rel=1e-3)
    reply.metadata.__dict__["_src_node_id"] = 5
    new, _ = strategy.aggregate_train(1, [reply])
    assert strategy.round_fields()["privacy"]["clipped_fraction"] == 1.0
    assert update_norm(record_to_arrays(new), record_to_arrays(initial)) == pytest.approx(1e-3, rel=1e-3)
