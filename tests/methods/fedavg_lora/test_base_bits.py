"""fedavg-lora on a quantized base (lora.base_bits, as QLoRA/FlowerTune): the client's frozen base holds
bitsandbytes layers, its adapter trains and keeps the fp32 base's keys and shapes, so it aggregates with them."""

import bitsandbytes as bnb
import numpy as np
import pytest

from pollinate.client import runtime
from pollinate.common.adapters import adapter_state
from pollinate.common.config_io import build_config
from pollinate.methods.fedavg_lora.client import lora_model

BASE = ["model.name=tiny-llama", "method=fedavg-lora", "federation.clients=2", "data.builtin_examples=20",
        "train.local_steps=1", "train.batch_size=2", "eval.client_fraction=0"]
NODE = {"partition-id": 0, "num-partitions": 2}


@pytest.mark.parametrize(("bits", "layer"), [(4, bnb.nn.Linear4bit), (8, bnb.nn.Linear8bitLt)])
def test_a_quantized_base_trains_an_adapter_shaped_like_the_fp32_ones(bits, layer):
    cfg = build_config(None, [*BASE, f"lora.base_bits={bits}"])
    data = runtime.local_data(cfg, NODE)
    model = lora_model(cfg, data.num_labels)
    assert any(isinstance(m, layer) for m in model.modules())
    start = adapter_state(model)
    stats = runtime.local_training(cfg, data, model, server_round=1)
    trained = adapter_state(model)
    assert np.isfinite(stats["train_loss"])
    assert any(not np.array_equal(start[k], trained[k]) for k in start)
    full = adapter_state(lora_model(build_config(None, BASE), data.num_labels))
    assert {k: v.shape for k, v in full.items()} == {k: v.shape for k, v in trained.items()}
