"""SmolLM2-360M / 1.7B-shaped presets: the published architectures, written shard by shard with random weights."""

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pollinate.common import models
from pollinate.common.models import (
    PRESETS,
    SHARDED_SHAPES,
    SMOLLM2_1_7B_SHAPE,
    SMOLLM2_360M_SHAPE,
    _shard_groups,
    write_random_checkpoint,
)


def _params(shape: dict) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in LlamaForCausalLM(LlamaConfig(**shape)).parameters())


@pytest.mark.parametrize("shape, millions", [(SMOLLM2_360M_SHAPE, 361.8), (SMOLLM2_1_7B_SHAPE, 1711.4)])
def test_shapes_have_the_published_parameter_counts(shape, millions):
    assert _params(shape) / 1e6 == pytest.approx(millions, abs=0.1)


def test_sharded_presets_are_listed():
    assert set(SHARDED_SHAPES) <= set(PRESETS)


def test_shard_groups_respect_the_limit_and_keep_the_order():
    shapes = {"a": torch.Size([10]), "b": torch.Size([10]), "big": torch.Size([100]), "c": torch.Size([5])}
    assert _shard_groups(shapes, 80) == [["a", "b"], ["big"], ["c"]]


def test_random_checkpoint_loads_like_a_saved_model(tmp_path):
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=96, tie_word_embeddings=True)
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(config)
    write_random_checkpoint(skeleton, 0.02, tmp_path, shard_bytes=40_000)
    config.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert "lm_head.weight" not in index["weight_map"]  # tied: written once, as save_pretrained does
    model = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert torch.equal(model.model.norm.weight, torch.ones(64))
    assert model.model.layers[0].mlp.up_proj.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_preset_builds_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("POLLINATE_CACHE", str(tmp_path))
    monkeypatch.setitem(SHARDED_SHAPES, "smollm2-360m-shape",
                        {**SMOLLM2_360M_SHAPE, "num_hidden_layers": 1, "vocab_size": 320})
    info = models.resolve_model("smollm2-360m-shape", quiet=True)
    assert info.family == "llama" and info.path.endswith("smollm2-360m-shape-v1")
    config = json.loads((tmp_path / "models" / "smollm2-360m-shape-v1" / "config.json").read_text())
    assert (config["hidden_size"], config["num_key_value_heads"]) == (960, 5)
    assert models.resolve_model("smollm2-360m-shape", quiet=True).path == info.path
