"""The planner's parameters: its search space, the shape of a round, and the cost model's constants."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = ["SUPPORTED_BITS", "PlanOptions"]

SUPPORTED_BITS = (32, 16, 8, 4)


def _default_activation_factor() -> dict[int, float]:
    return {32: 1.0, 16: 1.0, 8: 1.19, 4: 1.11}


def _default_time_factor() -> dict[int, float]:
    return {32: 1.0, 16: 1.0, 8: 1.0, 4: 0.91}


def _default_bits_bonus() -> dict[int, float]:
    return {32: 0.1, 16: 0.1, 8: 0.08, 4: 0.05}


@dataclass
class PlanOptions:
    """Search space, round shape and cost-model constants of the planner.

    Parameters
    ----------
    ranks : tuple of int, default (0, 2, 4, 8, 16)
        LoRA ranks per module; 0 means the module is not adapted.
    bits : tuple of int, default (32, 8, 4)
        Base-weight bits to consider (32/16 = fp32/bf16, 8 = LLM.int8, 4 = NF4).
    batch_sizes : tuple of int, default (1, 2, 4, 8)
        Local batch sizes to consider.
    seq_len : int, default 128
        Tokens per sequence.
    local_steps : int, default 10
        Optimizer steps per round: every plan must fit the deadline with this many.
    max_local_steps : int, default 0
        When above ``local_steps``, a client whose plan leaves deadline to spare trains more steps, up to this
        many, filling ``deadline_fill`` of the deadline: the update it sends costs the same bytes whatever
        the steps, so spare compute is free progress per byte (0 = always ``local_steps``).
    deadline_fill : float, default 0.8
        Share of the deadline the extra steps may fill (headroom for estimate error).
    deadline_s : float, default 120.0
        Round deadline: local compute plus adapter download and upload.
    utilization : float, default 0.7
        Fraction of the profile's matmul TFLOP/s a training step achieves (calibrated on SmolLM2).
    update_bytes_per_param : float, default 4.0
        Bytes per adapter parameter on the wire, each direction (4 = fp32, before any codec).
    adapter_state_bytes_per_param : float, default 16.0
        Training state per adapter parameter: fp32 weight, gradient and two Adam moments.
    act_bytes_per_token_hidden_layer : float, default 103.0
        Activation bytes per token, per hidden unit, per layer (calibrated, see ``costs``).
    act_bytes_per_token_logit : float, default 12.0
        Activation bytes per token per logit (three fp32 copies).
    activation_factor : dict, default {32: 1.0, 16: 1.0, 8: 1.19, 4: 1.11}
        Per-bits multiplier on activations (bitsandbytes' extra buffers; 16 not measured).
    time_factor : dict, default {32: 1.0, 16: 1.0, 8: 1.0, 4: 0.91}
        Per-bits multiplier on compute time (measured; NF4 computes in bf16).
    bits_bonus : dict, default {32: 0.1, 16: 0.1, 8: 0.08, 4: 0.05}
        Objective bonus per bits (less quantization error is better); keep it non-decreasing in bits.
    batch_bonus : float, default 0.02
        Objective bonus per doubling of the batch size.
    max_adapter_params : float, default inf
        Cap on trainable adapter parameters per client, on top of memory and deadline: the per-round
        communication budget of a deployment (each parameter travels both ways every round).
    """

    ranks: tuple[int, ...] = (0, 2, 4, 8, 16)
    bits: tuple[int, ...] = (32, 8, 4)
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8)
    seq_len: int = 128
    local_steps: int = 10
    max_local_steps: int = 0
    deadline_fill: float = 0.8
    deadline_s: float = 120.0
    utilization: float = 0.7
    update_bytes_per_param: float = 4.0
    adapter_state_bytes_per_param: float = 16.0
    act_bytes_per_token_hidden_layer: float = 103.0
    act_bytes_per_token_logit: float = 12.0
    activation_factor: dict[int, float] = field(default_factory=_default_activation_factor)
    time_factor: dict[int, float] = field(default_factory=_default_time_factor)
    bits_bonus: dict[int, float] = field(default_factory=_default_bits_bonus)
    batch_bonus: float = 0.02
    max_adapter_params: float = math.inf

    def __post_init__(self) -> None:
        self.ranks = tuple(sorted(set(self.ranks)))
        self.bits = tuple(sorted(set(self.bits), reverse=True))
        self.batch_sizes = tuple(sorted(set(self.batch_sizes)))
        if not self.ranks or any(not isinstance(r, int) or r < 0 for r in self.ranks) or self.ranks == (0,):
            raise ValueError(f"PlanOptions.ranks must be ints >= 0 with at least one > 0, got {self.ranks}")
        if not self.bits or any(b not in SUPPORTED_BITS for b in self.bits):
            raise ValueError(f"PlanOptions.bits must be a non-empty subset of {SUPPORTED_BITS}, got {self.bits}")
        if not self.batch_sizes or any(not isinstance(b, int) or b < 1 for b in self.batch_sizes):
            raise ValueError(f"PlanOptions.batch_sizes must be ints >= 1, got {self.batch_sizes}")
        for name in ("seq_len", "local_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"PlanOptions.{name} must be an int >= 1, got {value!r}")
        for name in ("deadline_s", "update_bytes_per_param", "adapter_state_bytes_per_param",
                     "act_bytes_per_token_hidden_layer", "act_bytes_per_token_logit"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"PlanOptions.{name} must be > 0, got {value!r}")
        self._check_ranges()

    def _check_ranges(self) -> None:
        if not isinstance(self.max_local_steps, int) or self.max_local_steps < 0:
            raise ValueError(f"PlanOptions.max_local_steps must be an int >= 0, got {self.max_local_steps!r}")
        if not 0 < self.deadline_fill <= 1:
            raise ValueError(f"PlanOptions.deadline_fill must be in (0, 1], got {self.deadline_fill!r}")
        if not 0 < self.utilization <= 1:
            raise ValueError(f"PlanOptions.utilization must be in (0, 1], got {self.utilization!r}")
        if not self.max_adapter_params > 0:
            raise ValueError(f"PlanOptions.max_adapter_params must be > 0, got {self.max_adapter_params!r}")
        if not math.isfinite(self.batch_bonus) or self.batch_bonus < 0:
            raise ValueError(f"PlanOptions.batch_bonus must be >= 0, got {self.batch_bonus!r}")
        for name in ("activation_factor", "time_factor", "bits_bonus"):
            table = getattr(self, name)
            missing = [b for b in self.bits if b not in table]
            if missing:
                raise ValueError(f"PlanOptions.{name} has no entry for bits {missing}; it has {sorted(table)}")
