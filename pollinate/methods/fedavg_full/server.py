"""fedavg-full, server half: FedAvg of every fp32 parameter (federated full fine-tuning).

The comparison method for SFPrompt: the global state is the whole model, every client receives and returns
all of it, and the new global is the example-weighted mean (``federation.aggregator``). The final model is saved with
``save_pretrained`` (loadable with ``Auto*.from_pretrained``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord

from pollinate.common.adapters import load_parameter_state, parameter_state
from pollinate.common.config import RunConfig
from pollinate.common.models import load_model
from pollinate.common.report import RunRecorder
from pollinate.common.wire import arrays_to_record, record_to_arrays
from pollinate.server.deployment import Deployment
from pollinate.server.evaluation import ServerEvaluator
from pollinate.server.state_fedavg import StateFedAvg


class FedAvgFull(StateFedAvg):
    """FedAvg over all model parameters; settings in ``RunConfig`` (``[train]``, ``[federation]``, ...)."""

    supports_secure_aggregation = True  # one dense state of fixed shapes: masked sums work (server.secagg)

    def __init__(self, cfg: RunConfig, recorder: RunRecorder, run_dir: Path, deployment: Deployment | None = None):
        super().__init__(cfg, recorder, run_dir, deployment)
        self.evaluator = ServerEvaluator(cfg)
        torch.manual_seed(cfg.federation.seed)  # a fresh classifier head is a function of the seed
        evaluator = self.evaluator
        self.model = load_model(evaluator.model_path, evaluator.task.task_type, evaluator.num_labels,
                                pooling=cfg.model.pooling)
        self.shapes = {name: tuple(p.shape) for name, p in self.model.named_parameters()}

    def initial_arrays(self) -> ArrayRecord:
        return arrays_to_record(parameter_state(dict(self.model.named_parameters())))

    def evaluate_global(self, arrays: ArrayRecord) -> dict[str, Any]:
        load_parameter_state(dict(self.model.named_parameters()), record_to_arrays(arrays))
        return self.evaluator.evaluate(self.model)

    def save_final(self, arrays: ArrayRecord) -> dict[str, Any]:
        load_parameter_state(dict(self.model.named_parameters()), record_to_arrays(arrays))
        model_dir = self.run_dir / "model"
        self.model.save_pretrained(model_dir)
        self.evaluator.tokenizer.save_pretrained(model_dir)
        return {"adapter_dir": None, "model_dir": str(model_dir)}


def make_strategy(cfg: RunConfig, recorder: RunRecorder, run_dir: Path,
                  deployment: Deployment | None = None) -> FedAvgFull:
    return FedAvgFull(cfg, recorder, run_dir, deployment)
