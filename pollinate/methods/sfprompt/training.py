"""The client's two training phases of an SFPrompt round: local-loss steps (head -> tail) and split steps
(head -> body -> tail), both training only the prompts and the tail."""

from __future__ import annotations

import math

import numpy as np
import torch

from pollinate.client.runtime import optimizer_step, proximal_term
from pollinate.common.config import RunConfig
from pollinate.common.data import ExampleStream
from pollinate.methods.sfprompt.pruning import BodyFn
from pollinate.methods.sfprompt.split import SplitParts


def phase_steps(epochs: float, num_examples: int, batch_size: int, cap: int) -> int:
    """Optimizer steps for ``epochs`` passes over ``num_examples`` (at most ``cap`` when cap > 0)."""
    steps = math.ceil(epochs * num_examples / batch_size) if epochs > 0 and num_examples else 0
    return min(steps, cap) if cap > 0 else steps


def train_prompts_and_tail(parts: SplitParts, local: ExampleStream, local_steps: int, kept: ExampleStream,
                           split_steps: int, body: BodyFn, cfg: RunConfig) -> dict[str, float]:
    """Local-loss steps (head -> tail), then split steps (head -> ``body`` -> tail); one AdamW for both, plus the
    FedProx term (``train.prox_mu``) toward the round's start."""
    prompt_params = list(parts.prompt.parameters()) if parts.prompt is not None else []
    prompt_ids = {id(p) for p in prompt_params}
    tail_params = [p for _, p in parts.trainable_parameters() if id(p) not in prompt_ids]
    groups = [{"params": tail_params, "lr": cfg.train.lr}]
    if prompt_params:
        groups.append({"params": prompt_params, "lr": cfg.sfprompt.prompt_lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.train.weight_decay)
    params = prompt_params + tail_params
    proximal = proximal_term(params, cfg.train.prox_mu)
    parts.head.train()
    parts.tail.train()

    def step(batch: dict[str, torch.Tensor], through: BodyFn | None) -> float:
        head_out = parts.head(batch["input_ids"], batch["attention_mask"])
        hidden = head_out.hidden if through is None else through(head_out.hidden, head_out.attention_mask)
        loss = parts.tail(hidden, head_out.attention_mask, batch["labels"], answers_only=True).loss
        optimizer_step(optimizer, loss if proximal is None else loss + proximal(), params, cfg.train.max_grad_norm)
        return float(loss.detach())

    local_losses = [step(local.next_batch(), None) for _ in range(local_steps)]
    split_losses = [step(kept.next_batch(), body) for _ in range(split_steps)]
    losses = local_losses + split_losses
    return {
        "train_loss": float(np.mean(losses)) if losses else float("nan"),
        "local_loss": float(np.mean(local_losses)) if local_losses else float("nan"),
        "split_loss": float(np.mean(split_losses)) if split_losses else float("nan"),
    }

