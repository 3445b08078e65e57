"""FedPipe's global state as a model, for evaluation on the server and on the clients.

The server keeps, per adapted module, the factors of the global ΔW (``<module>.a``/``.b`` at alpha = rank, so
``b @ a`` is ΔW) and a classifier's head (``head/<peft key>``). Evaluating it means writing W₀ + ΔW into a plain
model and loading the head: the server does so on its fp32 copy; a client evaluating the global model on its
held-out examples (``client.evaluate``) gets the whole state in one bundle (``encode_global``) and rebuilds the
same model on an fp32 copy of its base (``load_global``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from pollinate.methods.fedpipe import head
from pollinate.methods.fedpipe.codec import decode_bundle, encode_bundle
from pollinate.methods.fedpipe.config import FedPipeConfig
from pollinate.methods.fedpipe.lowrank import LoraFactors

# Encodings that send every entry (to their precision). topk and lowrank drop entries: a training downlink recovers
# them over rounds (deltas against what the client holds), a one-off evaluation download would not.
ELEMENTWISE_ENCODINGS = ("dense-fp32", "dense-fp16", "int8", "nf4")
EVAL_FALLBACK_ENCODING = "dense-fp16"


def global_factors(state: Mapping[str, np.ndarray]) -> dict[str, LoraFactors]:
    """The factors of every module's global ΔW in a global state (its head tensors ignored)."""
    factors, _ = head.split_global(dict(state))
    modules = {key.rsplit(".", 1)[0] for key in factors}
    for module in sorted(modules):
        if f"{module}.a" not in factors or f"{module}.b" not in factors:
            raise ValueError(f"global state has no pair '{module}.a'/'{module}.b': expected both factors of each "
                             "module")
    if len(factors) != 2 * len(modules):
        raise ValueError(f"global state has tensors other than '<module>.a'/'<module>.b': {sorted(factors)[:3]}")
    return {m: LoraFactors(a=factors[f"{m}.a"], b=factors[f"{m}.b"], alpha=float(factors[f"{m}.a"].shape[0]))
            for m in modules}


def eval_encoding(downlink_encoding: str) -> str:
    """The encoding of an evaluation download: the training downlink's when it sends every entry, else fp16."""
    return downlink_encoding if downlink_encoding in ELEMENTWISE_ENCODINGS else EVAL_FALLBACK_ENCODING


def encode_global(state: Mapping[str, np.ndarray], fedpipe: FedPipeConfig) -> bytes:
    """The whole global state (factors and head, under their global-state names) as one bundle, in full."""
    return encode_bundle(state, eval_encoding(fedpipe.downlink_encoding), block_size=fedpipe.block_size)


def decoded_limit(model: torch.nn.Module, head_params: Mapping[str, torch.nn.Parameter], global_rank: int) -> int:
    """Most float32 bytes a global state for ``model`` can hold: rank ≤ ``global_rank`` factors of each of its
    linear layers, and its head."""
    factors = sum(global_rank * (m.in_features + m.out_features) for m in model.modules()
                  if isinstance(m, torch.nn.Linear))
    return 4 * (factors + sum(p.numel() for p in head_params.values()))


@torch.no_grad()
def add_global_delta(model: torch.nn.Module, factors: Mapping[str, LoraFactors]) -> None:
    """``W ← W + ΔW`` for every module of ``factors``, each checked against the model's linear layer."""
    modules = dict(model.named_modules())
    for name in sorted(factors):
        layer, delta = modules.get(name), factors[name]
        if not isinstance(layer, torch.nn.Linear):
            raise ValueError(f"global ΔW names module '{name}', which is not a linear layer of this model")
        if tuple(layer.weight.shape) != (delta.out_features, delta.in_features):
            raise ValueError(f"global ΔW of '{name}' has shape ({delta.out_features}, {delta.in_features}), expected "
                             f"the layer's {tuple(layer.weight.shape)}")
        layer.weight.add_(torch.from_numpy(delta.delta().astype(np.float32)).to(layer.weight.device))


def load_global(model: torch.nn.Module, payload: bytes, head_modules: Sequence[str], global_rank: int) -> None:
    """Make ``model`` (a plain fp32 base, used once) the global model of an ``encode_global`` bundle: W₀ + ΔW on
    every module it names and the global head. A payload that does not fit the model raises (``UpdateRejected``
    for a malformed bundle, ``ValueError`` for one naming other layers or shapes)."""
    params = head.head_parameters(model, head_modules)
    bundle = decode_bundle(payload, max_decoded_bytes=decoded_limit(model, params, global_rank))
    _, head_state = head.split_global(bundle.tensors)
    add_global_delta(model, global_factors(bundle.tensors))
    if params or head_state:
        head.load_head(params, head_state)
