"""The run's trained model after a checkpointed round: the base with the round's LoRA adapter (fedavg-lora,
fedpipe) or the whole fine-tuned model (fedavg-full).

SFPrompt's checkpoints hold a split model and soft prompts (its own state, used through its split service),
not something ``transformers`` loads: it is refused with a message saying so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pollinate.common.adapters import (
    head_module_names,
    load_adapter_state,
    load_parameter_state,
    peft_lora_config,
    wrap_with_lora,
)
from pollinate.common.models import load_model, load_tokenizer
from pollinate.common.pooling import resolve_pooling
from pollinate.export.run import ExportError, FinishedRun

# Method -> what its checkpoints hold: a LoRA adapter over the base, or every weight of the model.
CHECKPOINT_KINDS = {"fedavg-lora": "adapter", "fedpipe": "adapter", "fedavg-full": "full"}


@dataclass
class TrainedModel:
    """A run's model after one round.

    Parameters
    ----------
    model : torch.nn.Module
        A ``PeftModel`` (adapter methods) or the plain fine-tuned model (fedavg-full), in eval mode.
    tokenizer : Any
        The base model's tokenizer.
    server_round : int
        The round whose global state it holds.
    pooling : str
        Classification: the resolved pooling, ``mean`` or ``cls`` (see ``common.pooling``).
    """

    model: torch.nn.Module
    tokenizer: Any
    server_round: int
    pooling: str

    @property
    def is_adapter(self) -> bool:
        return hasattr(self.model, "peft_config")


def checkpoint_kind(run: FinishedRun) -> str:
    """``adapter`` or ``full``; ``ExportError`` for a method whose checkpoints are its own state."""
    kind = CHECKPOINT_KINDS.get(run.cfg.method)
    if kind is None:
        raise ExportError(f"run '{run.run_dir}' used method {run.cfg.method!r}, whose checkpoints hold its own "
                          f"state (not a transformers model); export, generate and eval support the methods "
                          f"{sorted(CHECKPOINT_KINDS)}")
    return kind


def num_labels_of(state: dict[str, np.ndarray]) -> int:
    """A classifier's class count, from its head's output rows in a global state (peft or plain keys)."""
    heads = sorted(k for k in state if ".classifier." in f".{k}" and k.endswith("weight"))
    if not heads:
        raise ExportError("the checkpoint holds no classifier head (key '...classifier...weight')")
    return int(state[heads[-1]].shape[0])  # roberta: classifier.dense < classifier.out_proj


def trained_model(run: FinishedRun, server_round: int | None = None) -> TrainedModel:
    """The run's model after ``server_round`` (default: the last checkpointed round)."""
    kind = checkpoint_kind(run)
    picked = run.pick_round(server_round)
    state, _ = run.global_state(picked)
    cfg, task, path = run.cfg, run.task_type, run.model.path
    num_labels = num_labels_of(state) if task == "classification" else 0
    torch.manual_seed(cfg.federation.seed)  # a fresh head is overwritten below; seeded so nothing varies anyway
    base = load_model(path, task, num_labels, pooling=cfg.model.pooling)
    pooling = resolve_pooling(cfg.model.pooling, path) if task == "classification" else ""
    if kind == "full":
        load_parameter_state(dict(base.named_parameters()), state)
        model = base
    elif cfg.method == "fedpipe":
        model = _fedpipe_model(base, state, head_module_names(task, pooling), task)
    else:
        heads = head_module_names(task, pooling)
        model = wrap_with_lora(base, peft_lora_config(cfg.lora, run.model.family, task, head_modules=heads))
        load_adapter_state(model, state)
    model.eval()
    return TrainedModel(model, load_tokenizer(path), picked, pooling)


def _fedpipe_model(base: torch.nn.Module, state: dict[str, np.ndarray], heads: list[str],
                   task: str) -> torch.nn.Module:
    from peft import get_peft_model

    from pollinate.methods.fedpipe.peft_adapter import global_to_peft

    converted = global_to_peft(state, heads, task)
    if converted is None:
        raise ExportError("this FedPipe checkpoint has no adapted module yet (no client was planned)")
    config, adapter = converted
    model = get_peft_model(base, config)
    load_adapter_state(model, adapter)
    return model
