"""The clients' learning rate across rounds (``train.lr_schedule``, ``warmup_rounds``, ``min_lr_ratio``).

The schedule is the server's (its settings are server-only): each round's train message carries the round's
multiplier under ``lr-scale`` and a client multiplies ``train.lr`` and ``train.head_lr`` by it. The default
(constant, no warmup) sends nothing, so its messages are what they were before schedules existed; a client that
receives no ``lr-scale`` (an older server) trains at 1×.

Rounds ``1..W`` (``W`` = warmup rounds) ramp linearly, ``r / (W + 1)``; from round ``W + 1`` to the last round
the multiplier goes from 1 to ``min_lr_ratio``: linearly, or along a half cosine; ``constant`` stays at 1.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from pollinate.common.config import RunConfig, TrainConfig

LR_SCALE_KEY = "lr-scale"


def lr_multiplier(server_round: int, rounds: int, schedule: str, warmup_rounds: int, min_lr_ratio: float) -> float:
    """The learning-rate multiplier of ``server_round`` (1-based) in a run of ``rounds``; see the module docstring."""
    if server_round <= warmup_rounds:
        return server_round / (warmup_rounds + 1)
    decay_rounds = rounds - warmup_rounds - 1  # the first round after warmup is at 1, the last at min_lr_ratio
    progress = min(max((server_round - warmup_rounds - 1) / decay_rounds, 0.0), 1.0) if decay_rounds > 0 else 0.0
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return 1.0 - (1.0 - min_lr_ratio) * progress
    if schedule == "cosine":
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"train.lr_schedule = {schedule!r}: expected constant, cosine or linear")


def lr_scale_entry(train: TrainConfig, server_round: int, rounds: int) -> dict[str, float]:
    """What the round's train config carries: ``{"lr-scale": x}``, or nothing when the schedule is off."""
    if train.lr_schedule == "constant" and train.warmup_rounds == 0:
        return {}
    return {LR_SCALE_KEY: lr_multiplier(server_round, rounds, train.lr_schedule, train.warmup_rounds,
                                        train.min_lr_ratio)}


def read_lr_scale(config: Mapping[str, Any]) -> float:
    """The round's multiplier from a train message's config (1.0 when the server sent none)."""
    value = config.get(LR_SCALE_KEY, 1.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"train config '{LR_SCALE_KEY}' = {value!r}: expected a finite float > 0")
    return float(value)


def scaled_learning_rates(cfg: RunConfig, scale: float) -> RunConfig:
    """``cfg`` with ``train.lr`` and ``train.head_lr`` multiplied by ``scale`` (``cfg`` itself at 1)."""
    if scale == 1.0:
        return cfg
    return cfg.with_section("train", replace(cfg.train, lr=cfg.train.lr * scale, head_lr=cfg.train.head_lr * scale))
