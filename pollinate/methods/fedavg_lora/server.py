"""fedavg-lora, server half: FedAvg of the full fp32 LoRA state (the FlowerTune protocol baseline).

The global state is peft's adapter state dict; every client receives all of it and returns all of it;
the new global is the example-weighted mean (``federation.aggregator``). Evaluation and the saved adapter use
the same peft model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord

from pollinate.common.adapters import (
    adapter_state,
    head_module_names,
    load_adapter_state,
    peft_lora_config,
    wrap_with_lora,
)
from pollinate.common.config import RunConfig
from pollinate.common.models import load_model
from pollinate.common.pooling import resolve_pooling
from pollinate.common.report import RunRecorder
from pollinate.common.wire import arrays_to_record, record_to_arrays
from pollinate.server.deployment import Deployment
from pollinate.server.evaluation import ServerEvaluator
from pollinate.server.state_fedavg import StateFedAvg


class FedAvgLora(StateFedAvg):
    """FedAvg over peft LoRA adapters; all parameters in ``RunConfig`` (``[lora]``, ``[train]``, ...)."""

    supports_secure_aggregation = True  # one dense state of fixed shapes: masked sums work (server.secagg)

    def __init__(self, cfg: RunConfig, recorder: RunRecorder, run_dir: Path, deployment: Deployment | None = None):
        super().__init__(cfg, recorder, run_dir, deployment)
        self.evaluator = ServerEvaluator(cfg)
        torch.manual_seed(cfg.federation.seed)  # the initial adapter is a function of the seed
        task, path = self.evaluator.task.task_type, self.evaluator.model_path
        base = load_model(path, task, self.evaluator.num_labels, pooling=cfg.model.pooling)
        heads = head_module_names(task, resolve_pooling(cfg.model.pooling, path))
        self.model = wrap_with_lora(base, peft_lora_config(cfg.lora, self.evaluator.family, task, head_modules=heads))
        self.shapes = {k: v.shape for k, v in adapter_state(self.model).items()}

    def initial_arrays(self) -> ArrayRecord:
        return arrays_to_record(adapter_state(self.model))

    def evaluate_global(self, arrays: ArrayRecord) -> dict[str, Any]:
        load_adapter_state(self.model, record_to_arrays(arrays))
        return self.evaluator.evaluate(self.model)

    def save_final(self, arrays: ArrayRecord) -> dict[str, Any]:
        load_adapter_state(self.model, record_to_arrays(arrays))
        adapter_dir = self.run_dir / "adapter"
        self.model.save_pretrained(adapter_dir)
        return {"adapter_dir": str(adapter_dir)}


def make_strategy(cfg: RunConfig, recorder: RunRecorder, run_dir: Path,
                  deployment: Deployment | None = None) -> FedAvgLora:
    return FedAvgLora(cfg, recorder, run_dir, deployment)
