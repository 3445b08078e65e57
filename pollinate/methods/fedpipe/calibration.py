"""A client's speed as the planner sees it, corrected by what the client measured.

Round 0: a measured step at some bits gives that client's ``Workload.time_scale[bits]``: measured seconds over the
cost model's seconds for the measured configuration (its batch, mean padded tokens and adapter), applied to every
(batch, rank) choice at those bits; bits it did not measure keep the model's constants. A client that measured two
batch sizes also gets ``Workload.step_overhead[bits]``: the FLOPs-equivalent of the part of a step that does not
grow with its tokens, from the line through its two (FLOPs, seconds) points, so that the larger batch is not
charged the smaller one's cost per token.

Each round: a trained client's measured compute is checked against its plan's estimate. A round over the deadline,
or compute more than ``TOLERANCE`` off the estimate, multiplies the scale at the plan's bits by measured over
estimated compute (the estimate is linear in it) and, over the deadline, the client's ``comm_scale`` by measured
over estimated communication when that ran over too; the client is then re-planned with the corrected workload.
A round faster than its estimate corrects only halfway (the square root of the ratio): on a shared or throttling
device one fast round is weaker evidence for a larger plan than one slow round is for a smaller one, and a plan
grown on a lucky round misses the next deadline. Factors are kept within ``SCALE_RANGE`` (a reply may claim any
time).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from pollinate.common.profiles import ResourceProfile
from pollinate.methods.fedpipe.planner import ClientPlan, PlanOptions, Workload
from pollinate.methods.fedpipe.planner.costs import modelled_speed, step_flops
from pollinate.methods.fedpipe.planner.spec import ModelSpec
from pollinate.methods.fedpipe.round_zero import MeasuredStep

__all__ = ["MAX_OVERHEAD_RATIO", "SCALE_RANGE", "TOLERANCE", "Review", "fitted_step", "initial_workload",
           "measured_flops", "modelled_step_seconds", "review"]

TOLERANCE = 0.15  # relative gap between measured and estimated compute that re-plans a client
SCALE_RANGE = (1e-2, 1e2)
MAX_OVERHEAD_RATIO = 10.0  # most overhead FLOPs per step, over the larger measured batch's (a reply may claim any)


def _bounded(factor: float) -> float:
    return min(max(factor, SCALE_RANGE[0]), SCALE_RANGE[1])


def measured_flops(spec: ModelSpec, measured: MeasuredStep, batch_size: int, tokens: float) -> float:
    """The cost model's FLOPs for one step of the measured adapter at ``batch_size`` over ``tokens`` padded tokens."""
    n_params = sum(m.lora_params(measured.rank) for m in spec.modules)
    width = tokens / batch_size
    fixed, per_param = step_flops(spec, batch_size, width, width)
    return float(fixed + per_param * n_params)


def modelled_step_seconds(spec: ModelSpec, options: PlanOptions, profile: ResourceProfile, bits: int,
                          measured: MeasuredStep) -> float:
    """The cost model's seconds (no measured correction) for one step of the measured configuration at ``bits``."""
    flops = measured_flops(spec, measured, measured.batch_size, measured.tokens)
    return flops / modelled_speed(profile, bits, options)


def fitted_step(small: tuple[float, float], large: tuple[float, float] | None) -> tuple[float, float]:
    """(seconds per FLOP, overhead FLOPs per step) of the line ``seconds = (flops + overhead) x rate`` through the
    measured (FLOPs, seconds) points: one point gives no overhead; two give the line through both, with the overhead
    kept in ``[0, MAX_OVERHEAD_RATIO x`` the larger batch's FLOPs] (a larger batch measured no slower, or
    more than proportionally slower, is noise: no overhead, the rate of the two together)."""
    flops_small, seconds_small = small
    if large is not None:
        flops_large, seconds_large = large
        if flops_large > flops_small and seconds_large > seconds_small:
            overhead = (seconds_small * flops_large - seconds_large * flops_small) / (seconds_large - seconds_small)
            if 0 < overhead:
                overhead = min(overhead, MAX_OVERHEAD_RATIO * flops_large)
                return seconds_large / (flops_large + overhead), overhead
        return (seconds_small + seconds_large) / (flops_small + flops_large), 0.0
    return seconds_small / flops_small, 0.0


def initial_workload(spec: ModelSpec, options: PlanOptions, profile: ResourceProfile, quantiles: tuple[int, ...],
                     measured: MeasuredStep | None) -> Workload:
    """A client's workload after round 0: its token lengths, and per measured bits (of ``options.bits``) the
    measured over modelled seconds per FLOP and the overhead FLOPs per step."""
    if measured is None:
        return Workload(quantiles)
    scales, overheads = [], []
    flops_small = measured_flops(spec, measured, measured.batch_size, measured.tokens)
    flops_large = (measured_flops(spec, measured, measured.large_batch_size, measured.large_tokens)
                   if measured.large_batch_size else None)
    for i, bits in enumerate(measured.bits):
        if bits not in options.bits:
            continue
        large = None if flops_large is None else (flops_large, measured.large_seconds[i])
        rate, overhead = fitted_step((flops_small, measured.seconds[i]), large)
        scales.append((bits, _bounded(rate * modelled_speed(profile, bits, options))))
        if overhead > 0:
            overheads.append((bits, overhead))
    return Workload(quantiles, tuple(sorted(scales)), step_overhead=tuple(sorted(overheads)))


@dataclass(frozen=True)
class Review:
    """Why a client is re-planned, and its corrected workload."""

    reason: str
    workload: Workload
    compute_ratio: float


def review(plan: ClientPlan, workload: Workload, timing: dict[str, Any], deadline_s: float) -> Review | None:
    """The correction a round's ``timing`` (``compute_seconds``, ``comm_seconds``, ``round_seconds``,
    ``met_deadline`` as the strategy measured them) calls for under ``plan``; None when the plan held."""
    compute, comm = timing.get("compute_seconds"), timing.get("comm_seconds")
    if not _positive(compute) or not _positive(plan.est_compute_s):
        return None  # nothing measured to correct by
    ratio = float(compute) / plan.est_compute_s
    over = timing.get("met_deadline") is False
    if not over and abs(ratio - 1.0) <= TOLERANCE:
        return None
    step = ratio if ratio > 1.0 else math.sqrt(ratio)  # shrink at once, grow halfway
    corrected = workload.with_time_factor(plan.bits, _bounded(workload.time_factor(plan.bits) * step))
    if over and _positive(comm) and _positive(plan.est_comm_s) and comm > plan.est_comm_s:
        corrected = replace(corrected, comm_scale=_bounded(workload.comm_scale * float(comm) / plan.est_comm_s))
    if over:
        reason = (f"round took {timing.get('round_seconds')} s, over the {deadline_s:g} s deadline (compute "
                  f"{ratio:.2f}x the estimate)")
    else:
        reason = f"compute took {float(compute):.3g} s, {ratio:.2f}x the estimated {plan.est_compute_s:.3g} s"
    return Review(reason, corrected, ratio)


def _positive(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0
