"""fedavg-lora, client half: the FlowerTune protocol baseline.

Receives the full fp32 LoRA state, trains it locally, returns the full fp32 state (no compression, no
deltas), so every other method is measured against exactly what the FlowerTune protocol sends.
"""

from __future__ import annotations

from flwr.app import Context, Message, RecordDict

from pollinate.client import runtime
from pollinate.common.adapters import (
    adapter_state,
    head_module_names,
    load_adapter_state,
    peft_lora_config,
    wrap_with_lora,
)
from pollinate.common.config import RunConfig
from pollinate.common.models import resolve_model
from pollinate.common.pooling import resolve_pooling
from pollinate.common.wire import arrays_to_record, record_to_arrays


def quantized_base(cfg: RunConfig, num_labels: int, heads: list[str]):
    """The frozen base at ``lora.base_bits`` (the head, trained in full, stays fp32); fp32 at 32."""
    bits = cfg.lora.base_bits
    if bits == 32:
        return runtime.base_model(cfg, num_labels, tag="fedavg-lora")
    from pollinate.common.quantize import load_quantized_base

    path, task = runtime.model_task(cfg)
    return load_quantized_base(path, task, num_labels, bits, heads, pooling=cfg.model.pooling)


def lora_model(cfg: RunConfig, num_labels: int):
    """Base + LoRA, built once per process; each round only overwrites the adapter weights."""
    info = resolve_model(cfg.model.name)
    _, task = runtime.model_task(cfg)

    def build():
        heads = head_module_names(task, resolve_pooling(cfg.model.pooling, info.path))
        base = quantized_base(cfg, num_labels, heads)
        return wrap_with_lora(base, peft_lora_config(cfg.lora, info.family, task, head_modules=heads))

    return runtime.cached(("fedavg-lora", info.path, task, num_labels, repr(cfg.lora), cfg.model.pooling), build)


def train(msg: Message, cfg: RunConfig, context: Context) -> RecordDict:
    server_round = int(msg.content["config"]["server-round"])
    data = runtime.local_data(cfg, dict(context.node_config))
    model = lora_model(cfg, data.num_labels)
    load_adapter_state(model, record_to_arrays(msg.content["arrays"]))
    stats = runtime.local_training(cfg, data, model, server_round)
    return runtime.training_reply(cfg, dict(context.node_config), data, stats,
                                  arrays_to_record(adapter_state(model)))


def evaluate(msg: Message, cfg: RunConfig, context: Context) -> RecordDict:
    """The global adapter on this client's held-out examples (the cached model, its adapter overwritten)."""
    data = runtime.local_data(cfg, dict(context.node_config))
    if not data.eval_encoded:
        return runtime.evaluation_reply(cfg, data)
    model = lora_model(cfg, data.num_labels)
    load_adapter_state(model, record_to_arrays(msg.content["arrays"]))
    return runtime.evaluation_reply(cfg, data, model)
