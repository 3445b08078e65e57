"""sfprompt client-side evaluation: the evaluate message carries the global prompts + tail and a forward-only split
token; the client's head -> service body -> tail evaluation equals the unsplit global model; the token admits no
training call, no other node, and ends with the evaluation; the split bytes count in the round's eval bytes."""

import json
import math
import uuid

import grpc
import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from pollinate.client import runtime
from pollinate.client.app import evaluate as client_evaluate
from pollinate.common.config_io import build_config
from pollinate.common.evaluation import EvalExamples, evaluate_model, generation_loss
from pollinate.common.report import RunRecorder
from pollinate.common.wire import arrays_to_record, record_to_arrays, wire_bytes
from pollinate.methods.sfprompt.channel import SplitCallError, SplitChannel
from pollinate.methods.sfprompt.client import in_batches
from pollinate.methods.sfprompt.server import SFPrompt
from pollinate.methods.sfprompt.service import LocalBody, TokenError, TokenRegistry
from pollinate.methods.sfprompt.split import PromptedSplitModel, split_model, unsplit_forward

NODES = [11, 12]


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """Messages take their run and source from Flower's task identity, which a ServerApp process sets."""
    for name, value in (("_run_id", 1), ("_node_id", 1), ("_task_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def colors(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "colors.jsonl"
    words = {0: "red apple cherry", 1: "blue sea sky", 2: "green grass leaf"}
    path.write_text("".join(json.dumps({"text": f"{words[i % 3]} {i}", "label": i % 3}) + "\n" for i in range(60)))
    return path


def _strategy(tmp_path, *overrides: str, clock=None) -> SFPrompt:
    cfg = build_config(None, ["method=sfprompt", f"federation.clients={len(NODES)}", "data.eval_examples=4",
                              "data.partition=iid", "eval.client_fraction=0.25", "train.batch_size=2",
                              "eval.batch_size=5", "eval.max_new_tokens=2", *overrides])
    strategy = SFPrompt(cfg, RunRecorder(tmp_path, {"rounds_planned": 1}, quiet=True), tmp_path)
    if clock is not None:
        strategy.tokens = TokenRegistry(clock=clock)
    strategy.prepare(None)
    return strategy


def _moved_global(strategy: SFPrompt) -> object:
    """A global unlike the initial one (so a client evaluating its own fresh state would not match)."""
    rng = np.random.default_rng(0)
    state = {k: v + rng.normal(0, 0.05, v.shape).astype(v.dtype)
             for k, v in record_to_arrays(strategy.initial_arrays()).items()}
    return arrays_to_record(state)


def _evaluate_on_client(strategy: SFPrompt, arrays, node: int = 7, partition: int = 1) -> MetricRecord:
    msg = Message(content=strategy.evaluate_content(node, 1, arrays), dst_node_id=node,
                  message_type=MessageType.EVALUATE)
    context = Context(run_id=1, node_id=node, node_config={"partition-id": partition, "num-partitions": 2},
                      state=RecordDict(), run_config={})
    return client_evaluate(msg, context).content["metrics"]


class Unsplit(torch.nn.Module):
    """The global model unsplit: the model's own forward with the global prompts (``unsplit_forward``)."""

    def __init__(self, strategy: SFPrompt) -> None:
        super().__init__()
        self.model, self.prompt = strategy.parts.architecture.model, strategy.parts.prompt

    def forward(self, input_ids, attention_mask=None, labels=None):
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        return unsplit_forward(self.model, self.prompt, batch)


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_client_evaluation_through_the_split_service_equals_the_unsplit_global_model(tmp_path, colors, kind):
    data_args = [f'data.source="{colors}"'] if kind == "bert" else ["data.builtin_examples=40"]
    strategy = _strategy(tmp_path, f"model.name=tiny-{kind}", *data_args)
    try:
        arrays = _moved_global(strategy)
        metrics = _evaluate_on_client(strategy, arrays)
        strategy._load(arrays)
        data = runtime.local_data(strategy.cfg, {"partition-id": 1, "num-partitions": 2})
        examples = EvalExamples(data.task_type, data.eval_rows, data.eval_encoded)
        tokenizer, batch = strategy.evaluator.tokenizer, strategy.cfg.eval.batch_size
        assert metrics["num-examples"] == len(data.eval_encoded) > 2 and metrics["client_id"] == 1
        assert metrics["split_bytes_up"] > 0 and metrics["split_bytes_down"] > 0
        if kind == "bert":
            unsplit = evaluate_model(Unsplit(strategy).eval(), examples, tokenizer, batch, 2)
            assert math.isclose(metrics["eval_loss"], unsplit["eval_loss"], rel_tol=1e-4)
            assert metrics["accuracy"] == unsplit["eval_metrics"]["accuracy"]
        else:  # the loss against the unsplit model; the greedy answers against the in-process split model's
            loss = generation_loss(Unsplit(strategy).eval(), data.eval_encoded, tokenizer.pad_token_id, batch)
            assert math.isclose(metrics["eval_loss"], loss, rel_tol=1e-4)
            in_process = evaluate_model(strategy.model, examples, tokenizer, batch, 2)
            assert metrics["exact_match"] == in_process["eval_metrics"]["exact_match"]
    finally:
        strategy.close()
        runtime.drop_cached(("sfprompt",))


def _forward(channel: SplitChannel, *, grad: bool = False) -> torch.Tensor:
    return channel.body(torch.zeros(1, 4, 64, requires_grad=grad), torch.ones(1, 4, dtype=torch.long))


def _code(call) -> grpc.StatusCode:
    with pytest.raises(SplitCallError) as refused:
        call()
    return refused.value.code


def test_the_evaluation_token_admits_forward_only_calls_of_its_node_until_the_replies_are_in(tmp_path):
    strategy = _strategy(tmp_path, "model.name=tiny-llama", "data.builtin_examples=20")
    try:
        split = strategy.evaluate_content(7, 1, strategy.initial_arrays())["split"]
        assert split["max-batch"] == 2 and split["max-seq-len"] == 64 + 8  # train.batch_size; model + prompt
        with SplitChannel(split["address"], split["token"], node_id="7") as channel:
            assert _forward(channel).shape == (1, 4, 64)
            # A training step (Forward keeping the graph, then Backward) is refused before the body runs.
            assert _code(lambda: _forward(channel, grad=True)) == grpc.StatusCode.PERMISSION_DENIED
            backward = channel._backward
            assert _code(lambda: backward(1, torch.zeros(1, 4, 64))) == grpc.StatusCode.PERMISSION_DENIED
        with SplitChannel(split["address"], split["token"], node_id="8") as hostile:  # another node's token
            assert _code(lambda: _forward(hostile)) == grpc.StatusCode.UNAUTHENTICATED
        with SplitChannel(split["address"], split["token"], node_id="7") as channel:
            assert strategy.aggregate_evaluate(1, []) is None  # the evaluation replies are in
            assert _code(lambda: _forward(channel)) == grpc.StatusCode.UNAUTHENTICATED
        # A training token still admits both (the restriction is the evaluation token's alone).
        train_split = strategy.train_content(7, 2, strategy.initial_arrays(), ConfigRecord({"server-round": 2}))
        with SplitChannel(strategy.address, train_split["split"]["token"], node_id="7") as channel:
            _forward(channel, grad=True).sum().backward()
    finally:
        strategy.close()


def test_the_evaluation_token_expires_with_its_ttl(tmp_path):
    clock = Clock()
    strategy = _strategy(tmp_path, "model.name=tiny-llama", "data.builtin_examples=20", "sfprompt.token_ttl_s=30",
                         clock=clock)
    try:
        split = strategy.evaluate_content(7, 1, strategy.initial_arrays())["split"]
        assert strategy.tokens.check(split["token"], "7").forward_only
        clock.now = 31.0
        with pytest.raises(TokenError, match="expired"):
            strategy.tokens.check(split["token"], "7")
        with SplitChannel(split["address"], split["token"], node_id="7") as channel:
            assert _code(lambda: _forward(channel)) == grpc.StatusCode.UNAUTHENTICATED
    finally:
        strategy.close()


def _pushed(messages) -> list[Message]:
    for message in messages:  # what the grid does when it pushes a message
        message.metadata.__dict__["_message_id"] = str(uuid.uuid4())
    return list(messages)


class FakeGrid:
    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)


def test_the_evaluations_split_bytes_count_in_the_rounds_eval_bytes_not_the_training_totals(tmp_path):
    strategy = _strategy(tmp_path, "model.name=tiny-llama", "data.builtin_examples=20")
    try:
        sent = _pushed(strategy.configure_train(1, strategy.initial_arrays(), ConfigRecord(), FakeGrid(NODES)))
        replies = [Message(RecordDict({"arrays": m.content["arrays"], "metrics": MetricRecord({
            "client_id": NODES.index(m.metadata.dst_node_id), "num-examples": 5, "train_loss": 1.0,
            "split_bytes_up": 100, "split_bytes_down": 200, "kept_examples": 3})}), reply_to=m) for m in sent]
        arrays, _ = strategy.aggregate_train(1, replies)
        training = {key: strategy.round_fields()[key] for key in ("split_bytes_up", "split_bytes_down")}
        evaluate = _pushed(strategy.configure_evaluate(1, arrays, ConfigRecord(), FakeGrid(NODES)))
        assert len(evaluate) == 2 and all(m.content["split"]["token"] for m in evaluate)
        answers = [MetricRecord({"client_id": 0, "num-examples": 2, "eval_loss": 1.0, "exact_match": 0.5,
                                 "split_bytes_up": 1_000, "split_bytes_down": 3_000}),
                   MetricRecord({"client_id": 1, "num-examples": 2, "eval_loss": 1.0, "exact_match": 0.5})]
        eval_replies = [Message(RecordDict({"metrics": metrics}), reply_to=m)
                        for m, metrics in zip(evaluate, answers, strict=True)]
        assert strategy.aggregate_evaluate(1, eval_replies) is not None
        fields = strategy.client_eval.round_fields()
        assert fields["split_bytes_eval_up"] == 1_000 and fields["split_bytes_eval_down"] == 3_000
        assert fields["bytes_eval_up"] == sum(wire_bytes(r.content) for r in eval_replies) + 1_000
        assert fields["bytes_eval_down"] == sum(wire_bytes(m.content) for m in evaluate) + 3_000
        # The reply without its split bytes is rejected, alone; the training totals did not move.
        assert [c["client_id"] for c in fields["client_eval"]["clients"]] == [0]
        assert any("split_bytes_up" in r["reason"] for r in strategy.recorder.rejected)
        assert {key: strategy.round_fields()[key] for key in training} == training
    finally:
        strategy.close()


def test_the_clients_body_keeps_to_the_services_batch_and_positions():
    from test_sfprompt import tiny_llama

    parts = split_model(tiny_llama(), 1, 1, 3, generator=torch.Generator().manual_seed(0))
    body = LocalBody(parts.body)
    calls = []

    def counted(hidden, mask):
        calls.append(hidden.shape[0])
        return body(hidden, mask)

    prompts = torch.randint(2, 128, (5, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(prompts)
    together = PromptedSplitModel(parts).generate(prompts, mask, max_new_tokens=3, pad_token_id=0)
    through = PromptedSplitModel(parts, in_batches(counted, 2)).generate(prompts, mask, max_new_tokens=3,
                                                                        pad_token_id=0)
    assert through.tolist() == together.tolist() and calls[:3] == [2, 2, 1]
    # 3 soft-prompt positions + 3 new tokens in 12 positions: a prompt keeps its last 7 tokens (the last new
    # token is never fed back).
    bounded = PromptedSplitModel(parts, max_positions=12).generate(prompts, mask, max_new_tokens=3, pad_token_id=0)
    cut = PromptedSplitModel(parts).generate(prompts[:, -7:], mask[:, -7:], max_new_tokens=3, pad_token_id=0)
    assert bounded[:, 12:].tolist() == cut[:, 7:].tolist()
    with pytest.raises(ValueError, match="max_positions=5 leaves no room"):
        PromptedSplitModel(parts, max_positions=5).generate(prompts, mask, max_new_tokens=3, pad_token_id=0)


def test_with_activation_noise_the_clients_evaluation_sends_noised_activations(tmp_path, colors):
    strategy = _strategy(tmp_path, "model.name=tiny-bert", f'data.source="{colors}"', "sfprompt.activation_noise=1.0")
    try:
        arrays = _moved_global(strategy)
        noisy = _evaluate_on_client(strategy, arrays)
        strategy._load(arrays)
        data = runtime.local_data(strategy.cfg, {"partition-id": 1, "num-partitions": 2})
        examples = EvalExamples(data.task_type, data.eval_rows, data.eval_encoded)
        clean = evaluate_model(Unsplit(strategy).eval(), examples, strategy.evaluator.tokenizer, 5, 2)
        assert not math.isclose(noisy["eval_loss"], clean["eval_loss"], rel_tol=1e-3)
        assert noisy["eval_loss"] == _evaluate_on_client(strategy, arrays)["eval_loss"]  # reproducible
    finally:
        strategy.close()
        runtime.drop_cached(("sfprompt",))
