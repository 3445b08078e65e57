"""fedavg-full, client half: federated full fine-tuning, the comparison method for SFPrompt.

Every weight trains; the client receives the full fp32 parameter state and returns it (no compression, no
deltas), so the bytes are what sending the whole model costs.
"""

from __future__ import annotations

from flwr.app import Context, Message, RecordDict

from pollinate.client import runtime
from pollinate.common.adapters import load_parameter_state, parameter_state
from pollinate.common.config import RunConfig
from pollinate.common.wire import arrays_to_record, record_to_arrays


def train(msg: Message, cfg: RunConfig, context: Context) -> RecordDict:
    server_round = int(msg.content["config"]["server-round"])
    data = runtime.local_data(cfg, dict(context.node_config))
    # Loaded once per process; every round overwrites all of its weights, so reuse is safe.
    model = runtime.base_model(cfg, data.num_labels, tag="fedavg-full").requires_grad_(True)
    load_parameter_state(dict(model.named_parameters()), record_to_arrays(msg.content["arrays"]))
    stats = runtime.local_training(cfg, data, model, server_round)
    return runtime.training_reply(cfg, dict(context.node_config), data, stats,
                                  arrays_to_record(parameter_state(dict(model.named_parameters()))))


def evaluate(msg: Message, cfg: RunConfig, context: Context) -> RecordDict:
    """The global model on this client's held-out examples (the cached model, every weight overwritten)."""
    data = runtime.local_data(cfg, dict(context.node_config))
    if not data.eval_encoded:
        return runtime.evaluation_reply(cfg, data)
    model = runtime.base_model(cfg, data.num_labels, tag="fedavg-full")
    load_parameter_state(dict(model.named_parameters()), record_to_arrays(msg.content["arrays"]))
    return runtime.evaluation_reply(cfg, data, model)
