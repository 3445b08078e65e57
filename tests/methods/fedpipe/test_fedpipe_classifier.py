"""FedPipe on a BERT-family classifier: the head is planned for, sent, trained, checked, aggregated and evaluated.

The fast tests drive the strategy's hooks as Flower does, with the real client half called in-process on tiny-bert.
"""

import json
import os
import random
import re
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from pollinate.client import runtime
from pollinate.common.config import ConfigError, RunConfig
from pollinate.common.config_io import build_config
from pollinate.common.report import RunRecorder
from pollinate.common.wire import bytes_to_record, record_to_arrays, record_to_bytes
from pollinate.methods.fedpipe import client as fedpipe_client
from pollinate.methods.fedpipe import update_space
from pollinate.methods.fedpipe.codec import decode_bundle, encode_bundle
from pollinate.methods.fedpipe.head import HEAD_PREFIX
from pollinate.methods.fedpipe.lowrank import LoraFactors
from pollinate.methods.fedpipe.planner import ClientPlan
from pollinate.methods.fedpipe.server import FedPipe, lora_keys
from pollinate.protos import update_pb2 as pb
from pollinate.server.strategy import Reply

ROOT = Path(__file__).resolve().parents[3]
NODES = [101, 102]
LAYER0 = "bert.encoder.layer.0."
UP, DOWN = LAYER0 + "intermediate.dense", LAYER0 + "output.dense"  # (128, 64) and (64, 128)
CLASSIFIER_W = "base_model.model.classifier.weight"


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    for name, value in (("_run_id", 1), ("_node_id", 1), ("_task_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)


@pytest.fixture(scope="module")
def colors(tmp_path_factory) -> Path:
    """A 3-class text task whose label is readable from the words."""
    rng = random.Random(0)
    words = {0: "red apple cherry", 1: "blue sea sky", 2: "green grass leaf"}
    path = tmp_path_factory.mktemp("data") / "colors.jsonl"
    with path.open("w") as fh:
        for _ in range(90):
            label = rng.randrange(3)
            fh.write(json.dumps({"text": " ".join(rng.choice(words[label].split()) for _ in range(4)),
                                 "label": label}) + "\n")
    return path


def _strategy(tmp_path: Path, data: Path, *overrides: str) -> FedPipe:
    cfg = build_config(None, ['model.name="tiny-bert"', 'method="fedpipe"', f'data.source="{data}"',
                              "federation.clients=2", "data.eval_examples=12", "model.max_seq_len=24",
                              "train.local_steps=2", "fedpipe.max_local_steps=0", "fedpipe.score_batches=1",
                              "fedpipe.batch_sizes=[4]", "fedpipe.bits=[32]", "federation.relative_norm_bound=0",
                              *overrides])
    return FedPipe(cfg, RunRecorder(tmp_path, {"rounds_planned": 1}, quiet=True), tmp_path)


def _context(node_id: int, contexts: dict[int, Context]) -> Context:
    config = {"partition-id": NODES.index(node_id), "num-partitions": len(NODES)}
    return contexts.setdefault(node_id, Context(run_id=1, node_id=node_id, node_config=config, state=RecordDict(),
                                                run_config={}))


class ClientGrid:
    """Flower's grid for round 0, with the real client half answering in-process."""

    def __init__(self, contexts: dict[int, Context]):
        self.contexts = contexts

    def get_node_ids(self) -> list[int]:
        return list(NODES)

    def send_and_receive(self, messages, timeout):
        replies = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            cfg = RunConfig.from_json(str(message.content["config"]["run-config"]))
            content = fedpipe_client.prepare(message, cfg, _context(message.metadata.dst_node_id, self.contexts))
            replies.append(Message(content, reply_to=message))
        return replies


def _train_messages(strategy: FedPipe, contexts: dict[int, Context], server_round: int = 1) -> list[Message]:
    arrays = strategy.global_arrays if len(strategy.global_arrays) else strategy.initial_arrays()
    messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), ClientGrid(contexts)))
    for message in messages:
        message.metadata.__dict__["_message_id"] = str(uuid.uuid4())
    return messages


def _client_reply(message: Message, contexts: dict[int, Context]) -> Message:
    cfg = RunConfig.from_json(str(message.content["config"]["run-config"]))
    content = fedpipe_client.train(message, cfg, _context(message.metadata.dst_node_id, contexts))
    return Message(content, reply_to=message)


@pytest.mark.parametrize("pooling, bits, heads", [
    ("cls", 32, {"base_model.model.bert.pooler.dense.weight", "base_model.model.bert.pooler.dense.bias"}),
    ("mean", 4, set()),
])
def test_tiny_bert_round_sends_trains_and_aggregates_the_head(tmp_path, colors, pooling, bits, heads):
    strategy = _strategy(tmp_path, colors, f'model.pooling="{pooling}"', f"fedpipe.bits=[{bits}]")
    heads |= {CLASSIFIER_W, "base_model.model.classifier.bias"}
    contexts: dict[int, Context] = {}
    strategy.prepare(ClientGrid(contexts))
    assert set(strategy.plans) == {0, 1} and {p.bits for p in strategy.plans.values()} == {bits}
    assert strategy.spec.head_params == sum(v.size for v in strategy.initial_head.values()) > 0
    assert set(strategy.initial_head) == heads
    initial = strategy.initial_arrays()
    before = strategy.evaluate_global(initial)

    messages = _train_messages(strategy, contexts)
    for message in messages:  # the downlink bundle carries the global head with the planned factors
        assert heads <= set(decode_bundle(record_to_bytes(message.content["arrays"])).tensors)
    replies = [_client_reply(m, contexts) for m in messages]
    for reply in replies:
        assert heads <= set(decode_bundle(record_to_bytes(reply.content["arrays"])).tensors)
    new, _ = strategy.aggregate_train(1, replies)
    assert strategy.recorder.rejected == [] and new is not None

    moved = record_to_arrays(new)
    for key in heads:
        assert not np.allclose(moved[HEAD_PREFIX + key], record_to_arrays(initial)[HEAD_PREFIX + key])
    assert strategy.global_factors(new)  # ΔW of the planned encoder projections
    after = strategy.evaluate_global(new)
    assert set(after["eval_metrics"]) == {"accuracy"} and after["eval_loss"] != before["eval_loss"]
    saved = strategy.save_final(new)
    adapter_config = json.loads(Path(saved["adapter_dir"], "adapter_config.json").read_text())
    assert set(adapter_config["modules_to_save"]) >= {"classifier"}


def _bad_head_payload(strategy: FedPipe, client: int, mutate) -> bytes:
    """A dense-fp32 reply of small changes whose classifier weight is then mutated in the protobuf."""
    start = strategy.round_starts[client]
    payload = encode_bundle({k: np.full_like(v, 1e-3) for k, v in start.items()}, "dense-fp32",
                            base_version=strategy.held_version[client])
    bundle = pb.UpdateBundle()
    bundle.ParseFromString(payload)
    (tensor,) = [t for t in bundle.tensors if t.name == CLASSIFIER_W]
    mutate(tensor)
    return bundle.SerializeToString()


def _wrong_shape(tensor) -> None:
    del tensor.shape[:]
    tensor.shape.extend([2, 64])
    tensor.dense.data = np.zeros((2, 64), np.float32).tobytes()


def _nan(tensor) -> None:
    values = np.frombuffer(tensor.dense.data, np.float32).copy()
    values[0] = np.nan
    tensor.dense.data = values.tobytes()


@pytest.mark.parametrize("mutate, reason", [(_wrong_shape, r"shape \(2, 64\), expected \(3, 64\)"),
                                            (_nan, "NaN or Inf")])
def test_reply_with_a_bad_head_is_rejected_and_the_round_goes_on(tmp_path, colors, mutate, reason):
    strategy = _strategy(tmp_path, colors)
    strategy.node_client = {101: 0, 102: 1}
    strategy.plans = {c: ClientPlan(str(c), {UP: 2}, 4, 32, 1.0, 1.0, 1.0, 1.0) for c in (0, 1)}
    messages = _train_messages(strategy, {})
    replies = []
    for message in messages:
        client = NODES.index(message.metadata.dst_node_id)
        start = strategy.round_starts[client]
        payload = (_bad_head_payload(strategy, client, mutate) if client == 1 else
                   encode_bundle({k: np.full_like(v, 1e-3) for k, v in start.items()}, "dense-fp32",
                                 base_version=strategy.held_version[client]))
        content = RecordDict({"arrays": bytes_to_record(payload),
                              "metrics": MetricRecord({"client_id": client, "num-examples": 10})})
        replies.append(Message(content, reply_to=message))
    new, _ = strategy.aggregate_train(1, replies)
    (rejected,) = strategy.recorder.rejected
    assert rejected["client_id"] == 1 and CLASSIFIER_W in rejected["reason"]
    assert re.search(reason, rejected["reason"])
    assert new is not None  # client 0's change of its head (1e-3 everywhere) made the round
    np.testing.assert_allclose(record_to_arrays(new)[HEAD_PREFIX + CLASSIFIER_W],
                               strategy.initial_head[CLASSIFIER_W] + 1e-3, atol=1e-6)


def _replies(strategy: FedPipe, plans: dict[int, dict[str, int]], examples: list[int],
             rng: np.random.Generator) -> list[Reply]:
    """Replies of clients planned on ``plans`` (module -> rank), each with random start and trained factors and a
    random head change."""
    replies = []
    for client, ranks in plans.items():
        strategy.plans[client] = ClientPlan(str(client), ranks, 4, 32, 1.0, 1.0, 1.0, 1.0)
        start, trained = {}, {}
        for module, rank in ranks.items():
            out_features, in_features = strategy.shapes[module]
            for key, shape in zip(lora_keys(module), [(rank, in_features), (out_features, rank)], strict=True):
                start[key] = rng.normal(size=shape).astype(np.float32)
                trained[key] = (start[key] + rng.normal(size=shape)).astype(np.float32)
        for key, value in strategy.initial_head.items():
            start[key] = value
            trained[key] = (value + rng.normal(size=value.shape)).astype(np.float32)
        strategy.round_starts[client] = start
        replies.append(Reply(client, client, examples[client], RecordDict(), trained,
                             strategy.update_norm(client, trained)))
    return replies


def test_heterogeneous_ranks_are_exact_on_bert_modules_and_the_head_is_the_weighted_mean(tmp_path, colors):
    strategy = _strategy(tmp_path, colors)
    strategy.global_arrays = strategy.initial_arrays()
    replies = _replies(strategy, {0: {UP: 2, DOWN: 8}, 1: {UP: 8}}, [10, 30], np.random.default_rng(0))
    new = strategy.aggregate(1, replies)
    got = strategy.global_factors(new)

    def change(reply: Reply, module: str) -> np.ndarray:
        rank = strategy.plans[reply.client_id].ranks[module]
        start, trained = strategy.round_starts[reply.client_id], reply.update
        key_a, key_b = lora_keys(module)
        return (LoraFactors(a=trained[key_a], b=trained[key_b], alpha=2.0 * rank).delta()
                - LoraFactors(a=start[key_a], b=start[key_b], alpha=2.0 * rank).delta())

    np.testing.assert_allclose(got[UP].delta(), 0.25 * change(replies[0], UP) + 0.75 * change(replies[1], UP),
                               rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(got[DOWN].delta(), change(replies[0], DOWN), rtol=1e-5, atol=1e-4)  # only client 0
    head = {k[len(HEAD_PREFIX):]: v for k, v in record_to_arrays(new).items() if k.startswith(HEAD_PREFIX)}
    assert head.keys() == strategy.initial_head.keys()
    for key, value in head.items():
        expected = strategy.initial_head[key] + sum(
            q * (r.update[key] - strategy.initial_head[key]) for q, r in zip([0.25, 0.75], replies, strict=True))
        np.testing.assert_allclose(value, expected, rtol=1e-6, atol=1e-6)


def test_head_counts_in_the_norm_and_goes_through_the_robust_aggregator(tmp_path, colors):
    strategy = _strategy(tmp_path, colors, "federation.clients=3", "federation.aggregator='median'",
                         "federation.byzantine_clients=0")
    strategy.global_arrays = strategy.initial_arrays()
    replies = _replies(strategy, {0: {UP: 2}, 1: {UP: 2}, 2: {UP: 2}}, [1, 1, 100], np.random.default_rng(1))
    factors_only = {m: p for m, p in strategy.change_pairs(0, replies[0].update).items() if m == UP}
    head_sq = sum(np.sum((replies[0].update[k].astype(np.float64) - v) ** 2) for k, v in strategy.initial_head.items())
    assert replies[0].norm == pytest.approx(np.sqrt(update_space.update_norm(factors_only) ** 2 + head_sq))
    head = record_to_arrays(strategy.aggregate(1, replies))[HEAD_PREFIX + CLASSIFIER_W]
    changes = np.stack([r.update[CLASSIFIER_W] - strategy.initial_head[CLASSIFIER_W] for r in replies])
    np.testing.assert_allclose(head, strategy.initial_head[CLASSIFIER_W] + np.median(changes, axis=0), atol=1e-6)


def test_server_optimizers_other_than_fedavg_are_refused(tmp_path, colors):
    with pytest.raises(ConfigError, match="federation.server_optimizer = 'fedadam'"):
        _strategy(tmp_path, colors, "federation.server_optimizer='fedadam'")


def test_a_4_bit_cls_classifier_keeps_its_pooler_and_classifier_in_full_precision(tmp_path, colors):
    cfg = _strategy(tmp_path, colors, 'model.pooling="cls"', "fedpipe.bits=[4]").cfg
    for key in ("fedpipe-peft", "fedpipe-base"):  # the process cache may hold a 4-bit base of another pooling
        runtime.drop_cached((key, 4))
    model, _ = fedpipe_client.planned_model(cfg, {"ranks": {UP: 2}, "bits": 4, "batch_size": 4}, 3, 0)
    kinds = {name: type(module).__name__ for name, module in model.named_modules()}
    for key in ("fedpipe-peft", "fedpipe-base"):
        runtime.drop_cached((key, 4))
    assert kinds["base_model.model.bert.encoder.layer.0.output.dense"] == "Linear4bit"
    heads = [name for name in kinds if ".pooler." in name or ".classifier" in name]
    assert heads and not any(kinds[name].startswith("Linear4bit") for name in heads)


@pytest.mark.slow
def test_simulate_fedpipe_on_tiny_bert(tmp_path, colors):
    out = tmp_path / "fp"
    cmd = [sys.executable, "-m", "pollinate.cli", "simulate", "--method", "fedpipe", "--model", "tiny-bert",
           "--data", str(colors), "--clients", "2", "--rounds", "2", "--out", str(out), "--quiet",
           "--set", "fedpipe.bits=[32, 4]", "--set", "data.eval_examples=12"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=os.environ.copy())
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    assert all("accuracy" in r["eval_metrics"] for r in report["rounds"])
    assert all(not c.get("rejected") for r in report["rounds"] for c in r["clients"])
    adapter_config = json.loads(Path(report["adapter_dir"], "adapter_config.json").read_text())
    assert "classifier" in adapter_config["modules_to_save"]
