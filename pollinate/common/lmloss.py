"""Causal-LM loss computed only where it is defined: the logits of positions that predict a labelled token.

Instruction data labels only the answer (prompt positions carry ``IGNORE_INDEX``), yet a plain
``model(**batch).loss`` projects every position onto the vocabulary: for SmolLM2 that is a 49,152-wide fp32
row per token, the largest activation of a training step (and the LM head a large share of its forward FLOPs).
Projecting only the (example, position) pairs whose next token is labelled gives the same loss — the ignored
positions contribute nothing to Hugging Face's mean either — at a fraction of the memory and compute. The shift
and the cross-entropy are the ones HF's ``ForCausalLMLoss`` uses (labels shifted left by one, fp32 logits, mean
over labelled tokens). HF's own ``logits_to_keep`` keeps whole positions shared by the batch, which projects
more; it is the fallback for models whose decoder stack is not reachable.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # what Hugging Face losses skip


def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """Sequence positions (1-D, ascending) whose next token is labelled in at least one row of ``labels``."""
    if labels.dim() != 2:
        raise ValueError(f"labels of shape {tuple(labels.shape)}: expected (batch, seq_len) token labels")
    return (labels[:, 1:] != IGNORE_INDEX).any(0).nonzero().squeeze(-1)


def shifted_targets(labels: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The token each kept position predicts: ``labels[:, p + 1]`` (``IGNORE_INDEX`` where a row has none)."""
    return labels[:, positions + 1]


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the labelled entries of ``targets`` (logits upcast to fp32, as HF does)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)


@dataclass
class AnswerProjection:
    """LM-head logits of the labelled (example, position) pairs, (N, V); the token each predicts, (N,); the
    example each belongs to, (N,); and their mean cross-entropy."""

    loss: torch.Tensor
    logits: torch.Tensor
    targets: torch.Tensor
    rows: torch.Tensor


def project_answers(hidden: torch.Tensor, labels: torch.Tensor, head: torch.nn.Module) -> AnswerProjection:
    """Project the final hidden states (B, S, H) onto the vocabulary only where ``labels`` (B, S) label the
    next token. With no labelled token (every answer truncated away) the loss is a zero that trains nothing,
    where the full-logits mean would be NaN and poison the weights."""
    targets = labels[:, 1:]  # position p predicts token p + 1
    labelled = targets != IGNORE_INDEX
    logits = head(hidden[:, :-1][labelled])
    return AnswerProjection(answers_loss(logits, targets[labelled]), logits, targets[labelled],
                            labelled.nonzero()[:, 0])


def answers_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of answer logits (N, V) against their tokens (N,), in fp32 as HF computes it; with
    N = 0 a zero that still backpropagates (to nothing)."""
    return F.cross_entropy(logits.float(), targets) if len(logits) else logits.sum()


def is_token_labelled(batch: Mapping[str, torch.Tensor]) -> bool:
    """True for causal-LM batches (per-token labels), False for classification (one label per example)."""
    labels = batch.get("labels")
    return labels is not None and labels.dim() == 2


def training_loss(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``model(**batch).loss``, with the LM head run only on the labelled (example, position) pairs of causal-LM
    batches: the decoder's last hidden states are gathered there and projected, as the model's own forward
    would project every position. Models without ``get_decoder`` fall back to HF's ``logits_to_keep`` (the
    positions labelled in any row). Classification batches take the model's own loss unchanged. A causal-LM
    batch without any labelled token (every answer truncated away) gives a zero loss that trains nothing,
    where the full-logits mean would be NaN and poison the weights.
    """
    if not is_token_labelled(batch):
        return model(**batch).loss
    labels = batch["labels"]
    if not (labels[:, 1:] != IGNORE_INDEX).any():  # nothing to learn: skip the forward altogether
        return torch.zeros((), device=labels.device, requires_grad=True)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    decoder, head = _decoder_and_head(model)
    if decoder is None:
        positions = answer_positions(labels)
        logits = model(**inputs, logits_to_keep=positions, use_cache=False).logits
        return token_cross_entropy(logits, shifted_targets(labels, positions))
    return project_answers(decoder(**inputs, use_cache=False).last_hidden_state, labels, head).loss


def _decoder_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module | None, torch.nn.Module | None]:
    """The decoder stack (ending in the final norm) and the LM head of a causal LM, through peft wrappers."""
    try:
        decoder, head = model.get_decoder(), model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None, None
    if decoder is None or head is None or decoder is model:
        return None, None
    return decoder, head
