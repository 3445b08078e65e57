"""SFPrompt's own local loop takes the FedProx term too: the prompts and tail stay nearer the round's start."""

import random

import numpy as np
import torch
from transformers import BertConfig, BertForSequenceClassification

from pollinate.common.config_io import build_config
from pollinate.common.data import ExampleStream
from pollinate.methods.sfprompt.client import trainable_state
from pollinate.methods.sfprompt.service import LocalBody
from pollinate.methods.sfprompt.split import split_model
from pollinate.methods.sfprompt.training import train_prompts_and_tail


def _drift(prox_mu: float) -> float:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                        num_attention_heads=2, max_position_embeddings=32, num_labels=3)
    parts = split_model(BertForSequenceClassification(config), 1, 1, 2, generator=torch.Generator().manual_seed(0))
    before = trainable_state(parts)
    rng = random.Random(0)
    data = [{"input_ids": [rng.randrange(2, 64) for _ in range(6)], "labels": rng.randrange(3)} for _ in range(12)]
    cfg = build_config(overrides=["train.batch_size=4", "train.lr=0.05", "train.max_grad_norm=0",
                                  f"train.prox_mu={prox_mu}"])
    train_prompts_and_tail(parts, ExampleStream(data, 4, 0, seed=0), 4, ExampleStream(data, 4, 0, seed=1), 4,
                           LocalBody(parts.body), cfg)
    after = trainable_state(parts)
    return float(np.sqrt(sum(np.sum((after[k] - before[k]) ** 2) for k in before)))


def test_the_proximal_term_holds_prompts_and_tail_nearer_the_rounds_start():
    free, held = _drift(0.0), _drift(50.0)
    assert 0 < held < 0.5 * free
