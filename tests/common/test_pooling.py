"""Pooling: the model's own (sentence-transformers mean pooling for all-MiniLM), masked correctly, everywhere."""

import json

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from pollinate.common.adapters import head_module_names, is_head_parameter, peft_lora_config, wrap_with_lora
from pollinate.common.config import LoraConfig
from pollinate.common.pooling import MeanPooler, resolve_pooling, use_mean_pooling


def tiny_classifier() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                        num_attention_heads=2, max_position_embeddings=32, num_labels=3)
    return BertForSequenceClassification(config).eval()


def test_auto_reads_the_sentence_transformers_pooling_config(tmp_path):
    assert resolve_pooling("auto", str(tmp_path)) == "cls"  # no pooling config: the model's own [CLS] pooler
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    assert resolve_pooling("auto", str(tmp_path)) == "mean"
    assert resolve_pooling("cls", str(tmp_path)) == "cls"


def test_mean_pooling_ignores_padding():
    """A padded sequence gets the same logits as the same sequence alone."""
    model = use_mean_pooling(tiny_classifier())
    ids = torch.tensor([[5, 6, 7, 8], [5, 6, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    with torch.no_grad():
        padded = model(input_ids=ids, attention_mask=mask).logits[1]
        alone = model(input_ids=ids[1:, :2], attention_mask=mask[1:, :2]).logits[0]
    assert isinstance(model.bert.pooler, MeanPooler)
    assert torch.allclose(padded, alone, atol=1e-5)


def test_mean_pooler_matches_the_masked_mean():
    hidden = torch.arange(24, dtype=torch.float32).view(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    pooled = MeanPooler()(hidden, mask)
    assert torch.equal(pooled[0], hidden[0, :2].mean(0)) and torch.equal(pooled[1], hidden[1].mean(0))


@pytest.mark.parametrize(("pooling", "heads"), [("mean", ["classifier"]), ("cls", ["classifier", "pooler"])])
def test_head_modules_train_in_full_and_take_the_head_lr(pooling, heads):
    assert head_module_names("classification", pooling) == heads and head_module_names("generation", pooling) == []
    model = tiny_classifier()
    if pooling == "mean":
        use_mean_pooling(model)
    peft_model = wrap_with_lora(model, peft_lora_config(LoraConfig(), "bert", "classification", head_modules=heads))
    trained = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    head = {n for n in trained if is_head_parameter(n, heads)}
    assert head and all("lora_" in n for n in trained - head)
    assert any("pooler" in n for n in head) == (pooling == "cls")
