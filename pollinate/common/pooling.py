"""How an encoder classifier turns its token states into one vector: the pooling the checkpoint was trained with.

Sentence-embedding checkpoints (sentence-transformers, e.g. all-MiniLM-L6-v2) were trained with mean pooling and
ship it in ``1_Pooling/config.json``; their BERT ``pooler`` (dense + tanh over [CLS]) is a leftover of pre-training
that the sentence objective never touched. A sequence classifier built on them reads that stale pooler by default,
so ``model.pooling = auto`` reads the shipped pooling config and swaps the pooler for :class:`MeanPooler`; with
CLS pooling the pooler is trained with the head (see ``common.adapters.head_module_names``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

POOLING_CONFIG = Path("1_Pooling") / "config.json"


def resolve_pooling(setting: str, model_path: str) -> str:
    """``mean`` or ``cls`` for ``model.pooling`` = ``setting`` on the model at ``model_path`` (``auto``: mean
    when the model ships a sentence-transformers pooling config asking for it, else cls)."""
    if setting != "auto":
        return setting
    try:
        config = json.loads((Path(model_path) / POOLING_CONFIG).read_text())
    except (OSError, ValueError):
        return "cls"
    return "mean" if config.get("pooling_mode_mean_tokens") else "cls"


class MeanPooler(nn.Module):
    """Mean of the token states under the attention mask, in place of BERT's [CLS] pooler.

    ``BertModel`` calls its pooler with the hidden states only; the encoder's attention mask reaches it through a
    forward pre-hook on the encoder (:func:`use_mean_pooling`), or a caller that runs the layers itself (the split
    model) passes it explicitly.
    """

    def __init__(self) -> None:
        super().__init__()
        self.attention_mask: torch.Tensor | None = None

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        mask = attention_mask if attention_mask is not None else self.attention_mask
        if mask is None or mask.shape[:2] != hidden.shape[:2]:
            return hidden.mean(1)  # no (matching) mask: every position is a token
        weights = mask[..., None].to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def use_mean_pooling(model: nn.Module) -> nn.Module:
    """Replace a BERT-family sequence classifier's pooler by :class:`MeanPooler` (in place); returns the model."""
    encoder = getattr(model, model.base_model_prefix)
    pooler = MeanPooler()
    encoder.pooler = pooler

    def remember_mask(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        pooler.attention_mask = mask

    encoder.register_forward_pre_hook(remember_mask, with_kwargs=True)
    return model
