"""LoRA target modules checked against the model before a run starts: a misspelled module is a one-line error
with a "did you mean", not peft's traceback from inside the server after the run directory exists."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pollinate.common.config import ConfigError
from pollinate.common.suggest import did_you_mean


def module_names(path: str, task: str) -> dict[str, bool]:
    """Every module name of the model at ``path`` built for ``task`` -> whether it is a linear layer; built on
    the meta device (no weights are read, so this is quick even for large models)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(path)
    auto = AutoModelForCausalLM if task == "generation" else AutoModelForSequenceClassification
    with torch.device("meta"):
        model = auto.from_config(config)
    return {name: isinstance(module, torch.nn.Linear) for name, module in model.named_modules() if name}


def check_target_modules(targets: Sequence[str], names: dict[str, bool], key: str, model: str) -> None:
    """Raise ``ConfigError`` for the first of ``targets`` that no module name ends with (peft's suffix match),
    naming the closest linear layer and the model's distinct linear layer names (``names``: see
    :func:`module_names`)."""
    suffixes = sorted({name.rsplit(".", 1)[-1] for name, linear in names.items() if linear})
    for target in targets:
        if not any(name == target or name.endswith("." + target) for name in names):
            raise ConfigError(f"{key}: {target!r} matches no module of model {model!r}"
                              f"{did_you_mean(target.rsplit('.', 1)[-1], suffixes)}; its linear layers are {suffixes}")
