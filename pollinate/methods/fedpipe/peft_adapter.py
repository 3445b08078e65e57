"""FedPipe's global state as a standard PEFT LoRA adapter: what the run saves as ``adapter/`` and what
``pollinate export`` writes for any checkpointed round.

The global ΔW of each module is kept as factors ``b @ a`` with alpha = rank (scaling 1), each module at its own
rank: a peft ``LoraConfig`` with per-module ``rank_pattern``/``alpha_pattern``; a classifier's head is its
``modules_to_save``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, TaskType, get_peft_model

from pollinate.common.adapters import load_adapter_state
from pollinate.methods.fedpipe import head
from pollinate.methods.fedpipe.factors import lora_keys


def global_to_peft(state: dict[str, np.ndarray], head_modules: list[str],
                   task: str) -> tuple[LoraConfig, dict[str, np.ndarray]] | None:
    """(peft config, adapter state under peft's keys) of a FedPipe global state; None while no module has been
    adapted (before round 1, or no client planned)."""
    factors, adapter = head.split_global(state)
    modules = sorted({key.rsplit(".", 1)[0] for key in factors})
    if not modules:
        return None
    ranks = {m: int(factors[f"{m}.a"].shape[0]) for m in modules}
    config = LoraConfig(
        r=max(ranks.values()), lora_alpha=max(ranks.values()), target_modules=modules,
        rank_pattern={re.escape(m): r for m, r in ranks.items()},
        alpha_pattern={re.escape(m): float(r) for m, r in ranks.items()},
        lora_dropout=0.0, modules_to_save=head_modules or None,
        task_type=TaskType.CAUSAL_LM if task == "generation" else TaskType.SEQ_CLS,
    )
    for module in modules:
        key_a, key_b = lora_keys(module)
        adapter[key_a], adapter[key_b] = factors[f"{module}.a"], factors[f"{module}.b"]
    return config, adapter


def save_adapter(state: dict[str, np.ndarray], head_modules: list[str], task: str,
                 load_base: Callable[[], torch.nn.Module], adapter_dir: Path) -> str | None:
    """Write a FedPipe global state as a peft adapter on the base ``load_base()`` returns; the adapter's directory,
    or None while no module has been adapted."""
    converted = global_to_peft(state, head_modules, task)
    if converted is None:
        return None
    config, adapter = converted
    model = get_peft_model(load_base(), config)
    load_adapter_state(model, adapter)
    model.save_pretrained(adapter_dir)
    return str(adapter_dir)
