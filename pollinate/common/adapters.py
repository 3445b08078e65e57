"""peft adapters shared by the LoRA-based methods: build, read and write the trainable state as numpy."""

from __future__ import annotations

import numpy as np
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, TaskType, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

from pollinate.common.config import LoraConfig
from pollinate.common.models import FAMILY_DEFAULT_TARGETS


def head_module_names(task: str, pooling: str) -> list[str]:
    """Modules trained in full next to the LoRA factors (and communicated with them): a classifier's head, and
    with CLS pooling its pooler too (the checkpoint's pooler was not trained for the task); none for generation.
    ``pooling`` is the resolved one (``common.pooling.resolve_pooling``)."""
    if task == "generation":
        return []
    return ["classifier", "pooler"] if pooling == "cls" else ["classifier"]


def peft_lora_config(lora: LoraConfig, family: str, task: str, *, rank_pattern: dict[str, int] | None = None,
                     alpha_pattern: dict[str, float] | None = None, target_modules: list[str] | None = None,
                     head_modules: list[str] | None = None) -> PeftLoraConfig:
    """Pollinate's [lora] section -> a peft LoraConfig (family default targets when none are configured);
    ``head_modules`` (see :func:`head_module_names`) are trained in full."""
    targets = target_modules or lora.target_modules or FAMILY_DEFAULT_TARGETS[family]
    return PeftLoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
        rank_pattern=rank_pattern or {}, alpha_pattern=alpha_pattern or {}, modules_to_save=head_modules or None,
        task_type=TaskType.CAUSAL_LM if task == "generation" else TaskType.SEQ_CLS,
    )


def is_head_parameter(name: str, head_modules: list[str]) -> bool:
    """Whether the parameter ``name`` belongs to a fully trained head module (peft's ``modules_to_save`` copy,
    or the module itself in a model without peft): ``train.head_lr`` applies to these."""
    parts = name.split(".")
    return "modules_to_save" in parts or any(module in parts for module in head_modules)


def wrap_with_lora(base: torch.nn.Module, config: PeftLoraConfig) -> PeftModel:
    """Inject LoRA layers (deterministic init from the current torch seed); classification heads train too."""
    return get_peft_model(base, config)


def adapter_state(model: PeftModel, adapter_name: str = "default") -> dict[str, np.ndarray]:
    """Trainable adapter state as fp32 numpy, under peft's portable key names."""
    state = get_peft_model_state_dict(model, adapter_name=adapter_name)
    return {key: value.detach().to(torch.float32).cpu().numpy().copy() for key, value in state.items()}


def load_adapter_state(model: PeftModel, state: dict[str, np.ndarray], adapter_name: str = "default") -> None:
    """Overwrite the adapter with ``state``; every expected key must be present (no silent partial loads)."""
    expected = set(get_peft_model_state_dict(model, adapter_name=adapter_name))
    missing, unknown = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unknown:
        raise ValueError(f"adapter state does not match the model: missing {missing[:3]}, unknown {unknown[:3]}")
    tensors = {key: torch.from_numpy(np.asarray(value, dtype=np.float32)) for key, value in state.items()}
    set_peft_model_state_dict(model, tensors, adapter_name=adapter_name)


def parameter_state(params: dict[str, torch.nn.Parameter]) -> dict[str, np.ndarray]:
    """Named parameters as fp32 numpy (pass ``dict(model.named_parameters())``: tied weights appear once)."""
    return {name: p.detach().to(torch.float32).cpu().numpy().copy() for name, p in params.items()}


def load_parameter_state(params: dict[str, torch.nn.Parameter], state: dict[str, np.ndarray]) -> None:
    """Overwrite named parameters in place; the key sets must match exactly (no silent partial loads)."""
    missing, unknown = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or unknown:
        raise ValueError(f"parameter state does not match the model: missing {missing[:3]}, unknown {unknown[:3]}")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(torch.from_numpy(np.asarray(state[name], dtype=np.float32)))
