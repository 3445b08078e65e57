"""fedavg-full, client half: federated full fine-tuning, the comparison method for SFPrompt.

Every weight trains; the client receives the full fp32 parameter state and returns it (no compression, no
deltas), so the bytes are what sending the whole model costs.
"""

from __future__ import annotations

from flwr.app import Context, Message, MetricRecord, RecordDict

from pollinate.client import runtime
from pollinate.common.adapters import load_parameter_state, parameter_state
from pollinate.common.config import RunConfig
from pollinate.common.data import ExampleStream
from pollinate.common.wire import arrays_to_record, record_to_arrays


def train(msg: Message, cfg: RunConfig, context: Context) -> RecordDict:
    server_round = int(msg.content["config"]["server-round"])
    data = runtime.local_data(cfg, dict(context.node_config))
    # Loaded once per process; every round overwrites all of its weights, so reuse is safe.
    model = runtime.base_model(cfg, data.num_labels, tag="fedavg-full").requires_grad_(True)
    load_parameter_state(dict(model.named_parameters()), record_to_arrays(msg.content["arrays"]))
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
    return RecordDict({"arrays": arrays_to_record(parameter_state(dict(model.named_parameters()))), "metrics": metrics,
                       "profile": timing["profile"]})
