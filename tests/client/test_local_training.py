"""The client's local loop: the head trains at train.head_lr in its own AdamW group (today's single group
otherwise), the FedProx term keeps the weights nearer the round's start, and the client app applies the
server's lr-scale to the config its method half sees."""

import uuid

import pytest
import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from transformers import BertConfig, BertForSequenceClassification

from pollinate.client import app as client_app
from pollinate.client.runtime import optimizer_groups, optimizer_step, train_steps
from pollinate.common.adapters import peft_lora_config, wrap_with_lora
from pollinate.common.config import LoraConfig
from pollinate.common.config_io import build_config
from pollinate.common.lmloss import training_loss

HEADS = ["classifier"]


class Batches:
    """A fixed cycle of classification batches (what ``ExampleStream.next_batch`` gives)."""

    def __init__(self, seed: int = 0, count: int = 4) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.batches = [{"input_ids": torch.randint(1, 50, (4, 6), generator=generator),
                         "attention_mask": torch.ones(4, 6, dtype=torch.long),
                         "labels": torch.randint(0, 3, (4,), generator=generator)} for _ in range(count)]
        self.index = 0

    def next_batch(self) -> dict[str, torch.Tensor]:
        self.index += 1
        return self.batches[(self.index - 1) % len(self.batches)]


def lora_classifier():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                        num_attention_heads=2, max_position_embeddings=32, num_labels=3, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    base = BertForSequenceClassification(config)
    return wrap_with_lora(base, peft_lora_config(LoraConfig(dropout=0.0), "bert", "classification",
                                                 head_modules=HEADS))


def trainable(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def test_without_a_head_lr_the_loop_is_todays_single_group_loop():
    reference = lora_classifier()
    params = [p for p in reference.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=0.01, weight_decay=0.01)
    batches = Batches()
    reference.train()
    for _ in range(3):
        optimizer_step(optimizer, training_loss(reference, batches.next_batch()), params, 1.0)
    model = lora_classifier()
    train_steps(model, Batches(), 3, 0.01, 0.01, 1.0, head_lr=0.0, head_modules=HEADS)
    expected = trainable(reference)
    assert all(torch.equal(value, expected[name]) for name, value in trainable(model).items())


def test_the_head_gets_its_own_group_at_head_lr():
    named = [(n, p) for n, p in lora_classifier().named_parameters() if p.requires_grad]
    (single,) = optimizer_groups(named, 0.01, 0.0, HEADS)
    assert single["params"] == [p for _, p in named] and single["lr"] == 0.01
    assert len(optimizer_groups(named, 0.01, 0.5, [])) == 2  # peft's modules_to_save copy is a head anyway
    rest, head = optimizer_groups(named, 0.01, 0.5, HEADS)
    head_names = {n for n, p in named if any(p is q for q in head["params"])}
    assert head["lr"] == 0.5 and rest["lr"] == 0.01 and len(rest["params"]) + len(head["params"]) == len(named)
    assert head_names and all("classifier" in n and "modules_to_save" in n for n in head_names)


def test_head_lr_sets_how_far_the_head_moves_while_the_adapter_trains():
    start = trainable(lora_classifier())
    moved = {}
    for head_lr in (0.0, 1e-9):
        model = lora_classifier()
        train_steps(model, Batches(), 3, 0.01, 0.0, 1.0, head_lr=head_lr, head_modules=HEADS)
        moved[head_lr] = {n: float((v - start[n]).abs().max()) for n, v in trainable(model).items()}
    head = [n for n in start if "modules_to_save" in n]
    assert all(moved[0.0][n] > 1e-4 and moved[1e-9][n] < 1e-7 for n in head)
    assert all(moved[1e-9][n] > 1e-4 for n in start if "lora_" in n)


def test_the_proximal_term_keeps_the_weights_nearer_the_rounds_start():
    start = trainable(lora_classifier())

    def drift(mu: float) -> float:
        model = lora_classifier()
        stats = train_steps(model, Batches(), 8, 0.05, 0.0, 0.0, prox_mu=mu)
        assert stats["train_loss"] > 0
        return sum(float(((v - start[n]) ** 2).sum()) for n, v in trainable(model).items()) ** 0.5

    free, held = drift(0.0), drift(50.0)
    assert 0 < held < 0.5 * free


@pytest.fixture
def task_identity(monkeypatch):
    for name, value in (("_run_id", 1), ("_node_id", 1), ("_task_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)


@pytest.mark.parametrize(("sent", "lr"), [({}, 0.01), ({"lr-scale": 0.25}, 0.0025)])
def test_the_client_app_hands_its_method_the_rounds_learning_rate(monkeypatch, task_identity, sent, lr):
    seen = {}

    class Half:
        def train(self, msg, cfg, context):
            seen["cfg"] = cfg
            return RecordDict()

    monkeypatch.setattr(client_app, "client_half", lambda method: Half())
    cfg = build_config(None, ["train.lr=0.01"])
    config = ConfigRecord({"server-round": 1, "run-config": cfg.to_json(), **sent})
    msg = Message(RecordDict({"config": config}), dst_node_id=2, message_type=MessageType.TRAIN)
    msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
    client_app.train(msg, None)
    assert seen["cfg"].train.lr == pytest.approx(lr)
