"""A classifier's head in FedPipe: trained in full next to the LoRA factors, sent and aggregated as dense state.

An encoder classifier needs its head trained (``common.adapters.head_module_names``: the classifier, and the
pooler with CLS pooling); peft trains it as ``modules_to_save``. The global state holds the head's parameters
under ``HEAD_PREFIX`` + their peft state-dict key, next to the ``<module>.a``/``.b`` factors of ΔW. Every planned
client gets the global head in its downlink bundle (same codec, same delta-against-held bookkeeping, so its
bytes count like the factors'), trains it and returns its change. The new head is the global one plus the
clients' changes combined by ``federation.aggregator`` (example-weighted FedAvg by default), as ``StateFedAvg``
does; for the norm bounds and Krum a head tensor's change is one more factor pair (``update_space.dense_pair``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

HEAD_PREFIX = "head/"
PEFT_PREFIX = "base_model.model."  # get_peft_model_state_dict's names for a modules_to_save module


def head_parameters(model: torch.nn.Module, head_modules: Sequence[str]) -> dict[str, torch.nn.Parameter]:
    """The head's parameters of a plain (non-peft) model under the keys a client's adapter state gives them
    (modules matched by name suffix, as peft's ``modules_to_save``)."""
    params: dict[str, torch.nn.Parameter] = {}
    for name, module in model.named_modules():
        if any(name == h or name.endswith("." + h) for h in head_modules):
            for param_name, param in module.named_parameters():
                params[f"{PEFT_PREFIX}{name}.{param_name}"] = param
    return params


def head_arrays(params: dict[str, torch.nn.Parameter]) -> dict[str, np.ndarray]:
    """The head as fp32 numpy."""
    return {key: p.detach().to(torch.float32).cpu().numpy().copy() for key, p in params.items()}


@torch.no_grad()
def load_head(params: dict[str, torch.nn.Parameter], head: dict[str, np.ndarray]) -> None:
    """Write ``head`` into the model's head parameters (the key sets and shapes must match)."""
    if head.keys() != params.keys():
        raise ValueError(f"global head has tensors {sorted(head)[:3]}, the model's head {sorted(params)[:3]}")
    for key, param in params.items():
        if np.shape(head[key]) != tuple(param.shape):
            raise ValueError(f"global head tensor '{key}' has shape {np.shape(head[key])}, expected "
                             f"{tuple(param.shape)}")
        param.copy_(torch.from_numpy(np.asarray(head[key], dtype=np.float32)).to(param.device))


def split_global(state: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(ΔW factor tensors, head tensors under their peft keys) of a global state."""
    factors = {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIX)}
    head = {k[len(HEAD_PREFIX):]: v for k, v in state.items() if k.startswith(HEAD_PREFIX)}
    return factors, head


def prefixed(head: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Head tensors under their global-state keys."""
    return {HEAD_PREFIX + key: value for key, value in head.items()}


def head_change(start: dict[str, np.ndarray], trained: dict[str, np.ndarray],
                keys: Sequence[str]) -> dict[str, np.ndarray]:
    """One client's change of every head tensor this round (trained − what it was sent)."""
    return {key: (trained[key].astype(np.float64) - start[key]).astype(np.float32) for key in keys}
