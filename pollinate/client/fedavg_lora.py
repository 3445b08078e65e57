"""fedavg-lora, client half: the FlowerTune protocol baseline.

Receives the full fp32 LoRA state, trains it locally, returns the full fp32 state (no compression, no
deltas), so every other method is measured against exactly what the FlowerTune protocol sends.
"""

from __future__ import annotations

from flwr.app import Context, Message, MetricRecord, RecordDict

from pollinate.client import runtime
from pollinate.common.adapters import adapter_state, load_adapter_state, peft_lora_config, wrap_with_lora
from pollinate.common.config import RunConfig
from pollinate.common.data import ExampleStream
from pollinate.common.models import resolve_model
from pollinate.common.wire import arrays_to_record, record_to_arrays


def lora_model(cfg: RunConfig, num_labels: int):
    """Base + LoRA, built once per process; each round only overwrites the adapter weights."""
    info = resolve_model(cfg.model.name)
    _, task = runtime.model_task(cfg)

    def build():
        base = runtime.base_model(cfg, num_labels, tag="fedavg-lora")
        return wrap_with_lora(base, peft_lora_config(cfg.lora, info.family, task))

    return runtime.cached(("fedavg-lora", info.path, task, num_labels, repr(cfg.lora)), build)


def train(msg: Message, cfg: RunConfig, context: Context) -> RecordDict:
    server_round = int(msg.content["config"]["server-round"])
    data = runtime.local_data(cfg, dict(context.node_config))
    model = lora_model(cfg, data.num_labels)
    load_adapter_state(model, record_to_arrays(msg.content["arrays"]))
    runtime.seed_everything(cfg, server_round, data.client_id)
    batches = ExampleStream(data.encoded, cfg.train.batch_size, runtime.tokenizer_for(cfg).pad_token_id,
                            seed=cfg.federation.seed * 7919 + server_round * 31 + data.client_id)
    stats = runtime.train_steps(model, batches, cfg.train.local_steps, cfg.train.lr, cfg.train.weight_decay,
                                cfg.train.max_grad_norm)
    timing = runtime.profile_reply(cfg, dict(context.node_config), stats["train_seconds"])
    metrics = MetricRecord({
        "num-examples": data.num_examples, "client_id": data.client_id,
        "peak_rss_bytes": runtime.peak_rss_bytes(), "compute_seconds": timing["compute_seconds"], **stats,
    })
    return RecordDict({"arrays": arrays_to_record(adapter_state(model)), "metrics": metrics,
                       "profile": timing["profile"]})
