"""FedPipe's client-side evaluation: after a round, each client that trained gets the whole global state (factors
and head) in one bundle, rebuilds the global model on an fp32 base and evaluates its held-out examples; the results
are the server's own model's on those examples, bad replies are rejected alone, and the bytes are counted apart.

The strategy's hooks are driven as Flower drives them, with the real client half called in-process."""

import json
import random
import uuid
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from pollinate.client import runtime
from pollinate.common.checks import UpdateRejected
from pollinate.common.config import RunConfig
from pollinate.common.config_io import build_config
from pollinate.common.report import RunRecorder
from pollinate.common.wire import bytes_to_record, wire_bytes
from pollinate.methods.fedpipe import client as fedpipe_client
from pollinate.methods.fedpipe.codec import encode_bundle
from pollinate.methods.fedpipe.global_model import encode_global, eval_encoding, load_global
from pollinate.methods.fedpipe.server import FedPipe

NODES = [101, 102]
FAST = ["federation.clients=2", "train.local_steps=2", "fedpipe.max_local_steps=0",
        "fedpipe.score_batches=1", "fedpipe.batch_sizes=[4]", "fedpipe.bits=[32]", "federation.relative_norm_bound=0",
        "eval.client_fraction=0.2"]


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    for name, value in (("_run_id", 1), ("_node_id", 1), ("_task_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)


def write_colors(path: Path) -> Path:
    """A 3-class text task whose label is readable from the words, written to ``path``."""
    rng = random.Random(0)
    words = {0: "red apple cherry", 1: "blue sea sky", 2: "green grass leaf"}
    with path.open("w") as fh:
        for _ in range(90):
            label = rng.randrange(3)
            fh.write(json.dumps({"text": " ".join(rng.choice(words[label].split()) for _ in range(4)),
                                 "label": label}) + "\n")
    return path


@pytest.fixture(scope="module")
def colors(tmp_path_factory) -> Path:
    return write_colors(tmp_path_factory.mktemp("data") / "colors.jsonl")


def model_overrides(model: str, colors: Path) -> list[str]:
    """tiny-llama on the built-in generation task, or tiny-bert on the colors classification task."""
    if model == "tiny-llama":
        return ['model.name="tiny-llama"', "data.builtin_examples=40", "data.eval_examples=2"]
    return ['model.name="tiny-bert"', f'data.source="{colors}"', "data.eval_examples=12", "model.max_seq_len=24"]


def fedpipe_strategy(tmp_path: Path, model: str, colors: Path, *overrides: str) -> FedPipe:
    cfg = build_config(None, ['method="fedpipe"', *model_overrides(model, colors), *FAST, *overrides])
    return FedPipe(cfg, RunRecorder(tmp_path, {"rounds_planned": 2}, quiet=True), tmp_path)


def context_of(node_id: int, contexts: dict[int, Context]) -> Context:
    config = {"partition-id": NODES.index(node_id), "num-partitions": len(NODES)}
    return contexts.setdefault(node_id, Context(run_id=1, node_id=node_id, node_config=config, state=RecordDict(),
                                                run_config={}))


def pushed(messages) -> list[Message]:
    for message in messages:  # what the grid does when it pushes a message
        message.metadata.__dict__["_message_id"] = str(uuid.uuid4())
    return sorted(messages, key=lambda m: m.metadata.dst_node_id)


def client_cfg(message: Message) -> RunConfig:
    return RunConfig.from_json(str(message.content["config"]["run-config"]))


class ClientGrid:
    """Flower's grid: the connected nodes, and round 0 answered by the real client half in-process."""

    def __init__(self, contexts: dict[int, Context]):
        self.contexts = contexts

    def get_node_ids(self) -> list[int]:
        return list(NODES)

    def send_and_receive(self, messages, timeout):
        return [Message(fedpipe_client.prepare(m, client_cfg(m), context_of(m.metadata.dst_node_id, self.contexts)),
                        reply_to=m) for m in pushed(messages)]


def train_round(strategy: FedPipe, contexts: dict[int, Context], server_round: int = 1):
    """One round trained by the real clients: (the train messages, their replies, the new global arrays)."""
    arrays = strategy.global_arrays if len(strategy.global_arrays) else strategy.initial_arrays()
    messages = pushed(strategy.configure_train(server_round, arrays, ConfigRecord(), ClientGrid(contexts)))
    replies = [Message(fedpipe_client.train(m, client_cfg(m), context_of(m.metadata.dst_node_id, contexts)),
                       reply_to=m) for m in messages]
    new, _ = strategy.aggregate_train(server_round, replies)
    return messages, replies, new


def _evaluated(strategy: FedPipe, contexts: dict[int, Context], new):
    sent = pushed(strategy.configure_evaluate(1, new, ConfigRecord(), ClientGrid(contexts)))
    replies = [Message(fedpipe_client.evaluate(m, client_cfg(m), context_of(m.metadata.dst_node_id, contexts)),
                       reply_to=m) for m in sent]
    return sent, replies


@pytest.mark.parametrize("model, metric", [("tiny-llama", "exact_match"), ("tiny-bert", "accuracy")])
def test_clients_evaluate_the_model_the_server_evaluates_on_their_held_out_examples(tmp_path, colors, model, metric):
    strategy = fedpipe_strategy(tmp_path, model, colors, "fedpipe.downlink_encoding='dense-fp32'")
    contexts: dict[int, Context] = {}
    strategy.prepare(ClientGrid(contexts))
    _, _, new = train_round(strategy, contexts)
    assert new is not None and strategy.recorder.rejected == []
    sent, replies = _evaluated(strategy, contexts, new)
    assert [m.metadata.dst_node_id for m in sent] == NODES
    assert all(m.metadata.message_type == MessageType.EVALUATE for m in sent)

    cfg = client_cfg(sent[0])
    held_out = [runtime.local_data(cfg, dict(context_of(node, contexts).node_config)) for node in NODES]

    def server_model_on_held_out(arrays) -> list[MetricRecord]:
        strategy.evaluate_global(arrays)  # the server's fp32 model of a global state
        return [runtime.evaluation_reply(cfg, data, strategy.model)["metrics"] for data in held_out]

    before, expected = server_model_on_held_out(strategy.initial_arrays()), server_model_on_held_out(new)
    for reply, data, start, server in zip(replies, held_out, before, expected, strict=True):
        got = reply.content["metrics"]
        assert got["eval_loss"] != pytest.approx(start["eval_loss"], rel=1e-4)  # the round's ΔW is in it
        assert got["num-examples"] == server["num-examples"] == len(data.eval_encoded) > 0
        assert got["eval_loss"] == pytest.approx(server["eval_loss"], rel=1e-5)
        assert got[metric] == pytest.approx(server[metric])

    means = strategy.aggregate_evaluate(1, replies)
    assert set(means) == {"eval_loss", metric} and strategy.recorder.rejected == []
    fields = strategy.client_eval.round_fields()
    assert fields["bytes_eval_down"] == sum(wire_bytes(m.content) for m in sent) > 0
    assert fields["bytes_eval_up"] == sum(wire_bytes(r.content) for r in replies) > 0
    assert sorted(c["client_id"] for c in fields["client_eval"]["clients"]) == [0, 1]
    assert fields["client_eval"]["worst"][metric] == min(c[metric] for c in fields["client_eval"]["clients"])


FORGED = [({"client_id": 0}, "but its reply names client 0"),
          ({"accuracy": 1.5}, "accuracy = 1.5 is not a number in [0, 1]"),
          ({"eval_loss": -0.5}, "eval_loss = -0.5 is not a finite number >= 0"),
          ({"num-examples": 10**6}, "num-examples = 1000000 is not an integer")]


def test_a_forged_evaluation_reply_is_rejected_alone(tmp_path, colors):
    strategy = fedpipe_strategy(tmp_path, "tiny-bert", colors)
    contexts: dict[int, Context] = {}
    strategy.prepare(ClientGrid(contexts))
    _, _, new = train_round(strategy, contexts)
    _, replies = _evaluated(strategy, contexts, new)
    honest, other = replies[0].content, replies[1].content
    smuggled = bytes_to_record(encode_bundle({"x": np.ones(3, np.float32)}, "dense-fp32"))
    for count, (forged, reason) in enumerate(FORGED, start=1):
        sent = pushed(strategy.configure_evaluate(1, new, ConfigRecord(), ClientGrid(contexts)))
        hostile = RecordDict({"metrics": MetricRecord({**dict(other["metrics"]), **forged}),
                              "arrays": smuggled})  # an update in an evaluation reply counts for nothing
        means = strategy.aggregate_evaluate(1, [Message(honest, reply_to=sent[0]), Message(hostile, reply_to=sent[1])])
        assert means["accuracy"] == pytest.approx(honest["metrics"]["accuracy"])
        assert len(strategy.recorder.rejected) == count
        rejected = strategy.recorder.rejected[-1]
        assert rejected["client_id"] == 1 and reason in rejected["reason"]


def test_the_evaluation_download_is_compressed_unless_the_encoding_drops_entries(tmp_path, colors):
    strategy = fedpipe_strategy(tmp_path, "tiny-bert", colors)
    rng = np.random.default_rng(0)
    state = {**{f"bert.encoder.layer.0.intermediate.dense.{k}": rng.normal(size=s).astype(np.float32)
                for k, s in (("a", (8, 64)), ("b", (128, 8)))},
             **{f"head/{k}": v for k, v in strategy.initial_head.items()}}
    nf4, dense = encode_global(state, strategy.cfg.fedpipe), encode_bundle(state, "dense-fp32")
    assert len(nf4) < 0.3 * len(dense)
    assert eval_encoding("topk") == eval_encoding("lowrank") == "dense-fp16" and eval_encoding("int8") == "int8"


def test_a_global_state_that_does_not_fit_the_model_is_refused_by_name(tmp_path, colors):
    strategy = fedpipe_strategy(tmp_path, "tiny-bert", colors)
    heads = strategy.head_modules
    up = "bert.encoder.layer.0.intermediate.dense"
    good = {f"{up}.a": np.zeros((4, 64), np.float32), f"{up}.b": np.zeros((128, 4), np.float32),
            **{f"head/{k}": v for k, v in strategy.initial_head.items()}}
    load_global(strategy.model, encode_bundle(good, "dense-fp32"), heads, 32)
    for bad, message in [({**good, f"{up}.a": np.zeros((4, 32), np.float32)}, f"global ΔW of '{up}' has shape"),
                         ({**good, "bert.nowhere.a": good[f"{up}.a"], "bert.nowhere.b": good[f"{up}.b"]},
                          "names module 'bert.nowhere'"),
                         ({k: v for k, v in good.items() if k != f"{up}.b"}, f"no pair '{up}.a'/'{up}.b'")]:
        with pytest.raises(ValueError, match=message):
            load_global(strategy.model, encode_bundle(bad, "dense-fp32"), heads, 32)
    huge = {**good, f"{up}.a": np.zeros((5000, 64), np.float32), f"{up}.b": np.zeros((128, 5000), np.float32)}
    with pytest.raises(UpdateRejected, match="more than the"):  # beyond rank-32 factors of every layer
        load_global(strategy.model, encode_bundle(huge, "dense-fp32"), heads, 32)
