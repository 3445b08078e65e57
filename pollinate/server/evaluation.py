"""Server-side evaluation of the global model on the held-out split: eval loss and the task metric.

Generation tasks: greedy decoding, exact match of the first answer line (overall and per skill/category).
Classification: accuracy. The eval split is held out before partitioning, so no client ever trains on it.
How a model is evaluated is ``pollinate.common.evaluation`` (clients evaluate their own held-out slice with it).
"""

from __future__ import annotations

from typing import Any

import torch

from pollinate.common.config import RunConfig
from pollinate.common.data import TaskData, encoder_for, load_task, resolve_task_type
from pollinate.common.evaluation import EvalExamples, evaluate_model
from pollinate.common.models import load_tokenizer, resolve_model


class ServerEvaluator:
    """Evaluates any model with the HF forward signature (``input_ids, attention_mask, labels -> loss``) on the
    run's held-out split.

    Parameters
    ----------
    cfg : RunConfig
        The run's config (``[model]``, ``[data]``, ``[eval]``).
    """

    def __init__(self, cfg: RunConfig):
        info = resolve_model(cfg.model.name)
        task = resolve_task_type(cfg.data, info.default_task)
        self.cfg = cfg
        self.model_path = info.path
        self.family = info.family
        self.tokenizer = load_tokenizer(info.path)
        self.task: TaskData = load_task(cfg.data, task, cfg.federation.seed)
        encode = encoder_for(self.task.task_type, cfg.data.template)
        self.encoded = [encode(r, self.tokenizer, cfg.model.max_seq_len) for r in self.task.eval]
        self.examples = EvalExamples(self.task.task_type, self.task.eval, self.encoded, self.task.partition_by,
                                     cfg.data.template)

    @property
    def num_labels(self) -> int:
        return len(self.task.labels)

    def evaluate(self, model: torch.nn.Module) -> dict[str, Any]:
        """``{"eval_loss": float, "eval_metrics": {...}}`` for the report."""
        return evaluate_model(model, self.examples, self.tokenizer, self.cfg.eval.batch_size,
                              self.cfg.eval.max_new_tokens)
