"""One optimizer step of the local loop with the ``train`` options: micro-batches whose gradients add up to the
whole batch's (``grad_accumulation``), autocast of the forward pass (``precision``) and activation recomputation
(``gradient_checkpointing``).

With the defaults (one micro-batch, fp32) a step runs exactly today's operations: the loss, backward, clip,
AdamW step, so default runs keep their numbers bit for bit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from pollinate.common.config import ConfigError
from pollinate.common.lmloss import IGNORE_INDEX, is_token_labelled, training_loss

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class PrecisionError(ConfigError):
    """``train.precision`` asks for an autocast dtype this client's device does not support."""


@dataclass(frozen=True)
class StepOptions:
    """How each optimizer step runs: ``grad_accumulation`` micro-batches, autocast at ``precision``."""

    grad_accumulation: int = 1
    precision: str = "fp32"


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``precision`` on ``device`` (None for fp32); a one-line error where unsupported."""
    if precision == "fp32":
        return None
    if precision not in AUTOCAST_DTYPES:
        raise PrecisionError(f"train.precision = {precision!r}: expected one of fp32, bf16, fp16")
    if precision == "fp16" and device.type != "cuda":
        raise PrecisionError(f"train.precision = 'fp16' needs a CUDA device, this client trains on {device.type}: "
                             "use --set train.precision=bf16 (or fp32)")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise PrecisionError("train.precision = 'bf16': this GPU does not support bf16; use fp16 or fp32")
    return AUTOCAST_DTYPES[precision]


def loss_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """fp16 gradients underflow without loss scaling; bf16 and fp32 need none."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


def micro_batches(batch: dict[str, torch.Tensor], count: int) -> list[tuple[dict[str, torch.Tensor], float]]:
    """``batch`` split by rows into at most ``count`` micro-batches, each with its share of the batch's loss:
    labelled tokens for causal-LM batches (their loss is a mean over labelled tokens), rows otherwise. Columns
    that are padding in every row of a micro-batch are dropped."""
    if count <= 1:
        return [(batch, 1.0)]
    rows = len(next(iter(batch.values())))
    pieces = [dict(zip(batch, parts, strict=True))
              for parts in zip(*(torch.tensor_split(v, count) for v in batch.values()), strict=True)]
    pieces = [_trim_padding(p) for p in pieces if len(next(iter(p.values())))]
    sizes = [float(_labelled_tokens(p)) for p in pieces] if is_token_labelled(batch) else []
    if not sum(sizes):  # classification, or no labelled token at all: rows
        sizes = [float(len(next(iter(p.values())))) for p in pieces]
    total = sum(sizes) or float(rows)
    return [(p, size / total) for p, size in zip(pieces, sizes, strict=True)]


def _labelled_tokens(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def _trim_padding(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop trailing columns that no row attends to (their outputs are never used)."""
    mask = batch.get("attention_mask")
    if mask is None or mask.dim() != 2 or not bool(mask.any()):
        return batch
    width = mask.shape[1]
    keep = int(mask.any(0).nonzero().max()) + 1
    if keep == width:
        return batch
    return {k: v[:, :keep] if v.dim() == 2 and v.shape[1] == width else v for k, v in batch.items()}


def finish_step(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], max_grad_norm: float,
                scaler: torch.amp.GradScaler | None = None) -> None:
    """After the backward pass(es): clip (when ``max_grad_norm`` > 0, on unscaled gradients), step, clear."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    if scaler is not None:
        scaler.step(optimizer)  # skips the step when fp16 gradients overflowed
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def accumulated_step(model: torch.nn.Module, batch: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                     params: list[torch.nn.Parameter], max_grad_norm: float, options: StepOptions,
                     device: torch.device, proximal: Callable[[], torch.Tensor] | None = None,
                     scaler: torch.amp.GradScaler | None = None) -> float:
    """One optimizer step over ``batch``: each micro-batch's loss (under autocast) backpropagated at its share,
    the proximal term once, then clip and step. Returns the batch's task loss (without the proximal term)."""
    dtype = autocast_dtype(options.precision, device)
    parts = micro_batches(batch, options.grad_accumulation)
    task_loss = 0.0
    for index, (part, share) in enumerate(parts):
        with torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext():
            loss = training_loss(model, part)
        objective = loss if share == 1.0 else loss * share
        if proximal is not None and index == len(parts) - 1:
            objective = objective + proximal()
        (scaler.scale(objective) if scaler is not None else objective).backward()
        task_loss += float(loss.detach()) * share
    finish_step(optimizer, params, max_grad_norm, scaler)
    return task_loss


def checkpointing_on(model: Any) -> bool:
    """Whether Hugging Face activation checkpointing is on (the attribute was renamed within transformers 5)."""
    state = getattr(model, "is_activation_checkpointing", None)
    return bool(getattr(model, "is_gradient_checkpointing", False) if state is None else state)


def use_gradient_checkpointing(model: Any, enabled: bool) -> None:
    """Turn Hugging Face activation checkpointing on or off (non-reentrant; the input embeddings' output
    requires grad, so a peft model's recomputed segments still reach its adapters); a no-op when already so."""
    if checkpointing_on(model) == enabled:
        return
    if not hasattr(model, "gradient_checkpointing_enable"):
        raise ValueError(f"train.gradient_checkpointing = true: {type(model).__name__} does not support it")
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        if enabled:  # also makes the embeddings' output require grad
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.activation_checkpointing_disable()
    elif enabled:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.enable_input_require_grads()
    else:
        model.gradient_checkpointing_disable()


def check_simulated_precision(precision: str, client_gpus: float, ray_address: str) -> None:
    """Before a simulation starts: fp16 needs CUDA, and local clients that reserve no GPU train on the CPU."""
    if precision == "fp16" and client_gpus <= 0 and not ray_address:
        raise PrecisionError("train.precision = 'fp16' needs CUDA, but simulated clients reserve no GPU "
                             "(federation.client_gpus = 0): set federation.client_gpus > 0, or train.precision=bf16")
