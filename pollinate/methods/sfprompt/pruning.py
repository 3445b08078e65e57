"""EL2N data pruning (Paul et al. 2021) as SFPrompt uses it: score every local example, keep the top fraction γ.

Pure functions of the split model and the data; the client half decides when to re-score (``kept_examples``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from pollinate.common.data import collate
from pollinate.methods.sfprompt.config import SFPromptConfig
from pollinate.methods.sfprompt.split import BodyFn, SplitParts, TailOutput

__all__ = ["BodyFn", "el2n", "el2n_per_example", "el2n_scores", "keep_top", "keep_top_per_class", "select_kept"]


def el2n(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """EL2N per row: ‖softmax(f(x)) − onehot(y)‖₂ (Paul et al. 2021), for ``logits`` (N, C), ``labels`` (N,)."""
    probs = logits.float().softmax(-1)
    target = probs.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    # ‖p − e_y‖² = Σp² − 2p_y + 1: no one-hot needed, which matters for a 49k vocabulary.
    return (probs.square().sum(-1) - 2 * target + 1).clamp_min(0).sqrt()


def el2n_per_example(tail: TailOutput, labels: torch.Tensor) -> torch.Tensor:
    """EL2N of each example: of its logits (classification), or the mean over its answer tokens (causal LM,
    from a tail run with ``answers_only``; 0 for an example without any)."""
    if tail.rows is None:
        return el2n(tail.logits, labels)
    per_token = el2n(tail.logits, tail.targets)
    batch = labels.shape[0]
    totals = per_token.new_zeros(batch).index_add_(0, tail.rows, per_token)
    counts = per_token.new_zeros(batch).index_add_(0, tail.rows, torch.ones_like(per_token))
    return totals / counts.clamp_min(1)


@torch.no_grad()
def el2n_scores(parts: SplitParts, encoded: list[dict[str, Any]], batch_size: int, pad_id: int,
                body: BodyFn | None = None) -> np.ndarray:
    """EL2N of every example in eval mode: head -> ``body`` -> tail, the split model being trained (no grad, so
    the service keeps no graph), or with ``body`` None the head output straight into the tail."""
    parts.head.eval()
    parts.tail.eval()
    scores = []
    for start in range(0, len(encoded), batch_size):
        batch = collate(encoded[start: start + batch_size], pad_id)
        out = parts.head(batch["input_ids"], batch["attention_mask"])
        hidden = out.hidden if body is None else body(out.hidden, out.attention_mask)
        tail = parts.tail(hidden, out.attention_mask, batch["labels"], answers_only=True)
        scores.append(el2n_per_example(tail, batch["labels"]))
    return torch.cat(scores).cpu().numpy()


def keep_top(scores: np.ndarray, fraction: float) -> list[int]:
    """Indices (ascending) of the ``ceil(fraction · n)`` highest scores (at least one); ties keep the
    earlier example."""
    if not 0 < fraction <= 1:
        raise ValueError(f"keep fraction {fraction}: expected a float in (0, 1]")
    n = len(scores)
    k = min(n, max(1, math.ceil(fraction * n - 1e-9)))  # the epsilon keeps 0.5 * 10 at 5, not 6
    order = np.argsort(-np.asarray(scores), kind="stable")
    return sorted(int(i) for i in order[:k])


def keep_top_per_class(scores: np.ndarray, labels: list[int], fraction: float) -> list[int]:
    """Indices (ascending) of the top ``fraction`` of each class by score (at least one per class).

    Under a freshly initialised classifier EL2N mostly measures the class prior: ‖p − e_y‖ is smallest for the
    class the untrained head happens to favour, and a global top-γ can drop that class altogether (on MiniLM /
    poem_sentiment, seed 0, a global top-half kept none of client 0's 37 class-0 examples)."""
    kept: list[int] = []
    for label in sorted(set(labels)):
        members = [i for i, y in enumerate(labels) if y == label]
        kept += [members[j] for j in keep_top(np.asarray(scores)[members], fraction)]
    return sorted(kept)


def select_kept(scores: np.ndarray, encoded: list[dict[str, Any]], sf: SFPromptConfig) -> list[int]:
    """Top-γ by EL2N: per class for classification data when ``sfprompt.keep_per_class``, else overall."""
    labels = [example["labels"] for example in encoded]
    if sf.keep_per_class and labels and all(isinstance(y, int) for y in labels):
        return keep_top_per_class(scores, labels, sf.keep_fraction)
    return keep_top(scores, sf.keep_fraction)

