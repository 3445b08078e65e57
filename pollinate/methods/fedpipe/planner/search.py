"""The plan search: per client, the ranks, bits and batch size that maximise the objective within its budget.

Objective (monotone in every choice): ``sum_m w_m log2(1 + r_m) / log2(1 + r_max)`` with the client
importance ``w`` normalised to sum 1 (so it lies in [0, 1]; log2 is concave: the tenth rank buys less
than the first), plus ``bits_bonus[bits]`` (less quantization error) plus ``batch_bonus x log2(batch)``.

Search: memory and round time are both affine in the adapter's parameter count P (:class:`CostModel`), so for
each (bits, batch) the budget is one capacity ``P <= P_max``. Choosing ranks is then a multiple-choice
knapsack over modules whose weights are multiples of ``g = gcd(r x (in + out))``; one dynamic
programme over capacities in units of ``g`` gives the exact optimum for every capacity at once, so
all clients and all (bits, batch) pairs share it and each client costs a table lookup.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from pollinate.common.profiles import GIB, ResourceProfile
from pollinate.methods.fedpipe.planner.costs import CostModel
from pollinate.methods.fedpipe.planner.options import PlanOptions
from pollinate.methods.fedpipe.planner.spec import ModelSpec
from pollinate.methods.fedpipe.planner.workload import Workload

__all__ = ["ClientPlan", "PlanInfeasible", "combine_importance", "local_steps_to_fill", "plan_clients"]

_MAX_TABLE_ENTRIES = 50_000_000  # DP choice table (int8) above this is coarsened; see _capacity_unit


class PlanInfeasible(ValueError):
    """No plan in the search space fits a client's memory and deadline."""


@dataclass
class ClientPlan:
    """What one client trains this run, and what the planner expects it to cost.

    Parameters
    ----------
    client_id : str
        The client (Flower node id or simulation index, as a string).
    ranks : dict of str to int
        LoRA rank per adapted module (modules not listed are not adapted).
    batch_size : int
        Local batch size.
    bits : int
        Base-weight bits (32, 16, 8 or 4).
    est_memory_bytes, est_compute_s, est_comm_s : float
        Cost-model estimates: peak training memory, local compute per round, adapter down + up per round.
    objective : float
        The planner's objective value for this plan.
    local_steps : int
        Optimizer steps per round (0 in plans from before the planner chose them: the run's default).
    """

    client_id: str
    ranks: dict[str, int]
    batch_size: int
    bits: int
    est_memory_bytes: float
    est_compute_s: float
    est_comm_s: float
    objective: float
    local_steps: int = 0


def _normalised_importance(importance: Mapping[str, float], spec: ModelSpec) -> np.ndarray:
    names = {m.name for m in spec.modules}
    unknown = [k for k in importance if k not in names]
    if unknown:
        raise ValueError(f"importance names module(s) {unknown[:3]} not in the model spec "
                         f"(expected names like {spec.modules[0].name!r})")
    values = [float(importance.get(m.name, 0.0)) for m in spec.modules]
    bad = [(m.name, v) for m, v in zip(spec.modules, values, strict=True) if not math.isfinite(v) or v < 0]
    if bad:
        raise ValueError(f"importance must be finite and >= 0, got {bad[0][1]!r} for {bad[0][0]!r}")
    w = np.array(values)
    total = w.sum()
    # No signal at all (e.g. a fresh model): every module counts the same.
    return w / total if total > 0 else np.full(len(w), 1.0 / len(w))


def _rank_gain(rank: np.ndarray, options: PlanOptions) -> np.ndarray:
    return np.log2(1.0 + np.asarray(rank, dtype=float)) / math.log2(1.0 + options.ranks[-1])


@dataclass
class _Knapsack:
    """Exact multiple-choice knapsack over modules, solved once for every capacity up to ``cap``."""

    unit: int  # parameters per capacity unit
    weights: np.ndarray  # (modules, ranks) in units
    params: np.ndarray  # (modules, ranks) in parameters
    values: np.ndarray  # (modules, ranks)
    best: np.ndarray  # (cap + 1,) best value at capacity <= c units (-inf: nothing feasible)
    choice: np.ndarray  # (modules, cap + 1) rank index chosen for module m at capacity c
    min_units: int  # smallest capacity that adapts at least one module
    min_params: int

    @classmethod
    def solve(cls, spec: ModelSpec, w: np.ndarray, options: PlanOptions, max_params: float) -> _Knapsack:
        ranks = np.array(options.ranks)
        fan = np.array([m.in_features + m.out_features for m in spec.modules])
        params = fan[:, None] * ranks[None, :]
        values = w[:, None] * _rank_gain(ranks, options)[None, :]
        unit = _capacity_unit(params, len(spec.modules), max_params)
        # Rounding weights up keeps plans within budget if the table had to be coarsened.
        weights = -(-params // unit)
        if options.ranks[0] == 0:
            min_units = int(weights[:, 1].min())
            min_params = int(params[:, 1].min())
        else:  # every module must be adapted
            min_units, min_params = int(weights[:, 0].sum()), int(params[:, 0].sum())
        cap = int(min(weights[:, -1].sum(), max(max_params // unit, 0)))
        best = np.zeros(cap + 1)
        choice = np.zeros((len(spec.modules), cap + 1), dtype=np.int8)
        for m in range(len(spec.modules)):
            new = np.full(cap + 1, -np.inf)
            pick = choice[m]
            for k in range(len(ranks)):  # ascending ranks + strict ">" -> ties keep the smaller rank
                wk = int(weights[m, k])
                if wk > cap:
                    break
                cand = best[: cap + 1 - wk] + values[m, k]
                better = cand > new[wk:]
                new[wk:][better] = cand[better]
                pick[wk:][better] = k
            best = new
        return cls(unit, weights, params, values, best, choice, min_units, min_params)

    def backtrack(self, caps: np.ndarray) -> np.ndarray:
        """Rank indices (clients, modules) of the optimum at each capacity in ``caps`` (units)."""
        c = np.minimum(caps, len(self.best) - 1).astype(np.int64)
        picks = np.empty((len(c), self.weights.shape[0]), dtype=np.int64)
        for m in range(self.weights.shape[0] - 1, -1, -1):
            k = self.choice[m, c].astype(np.int64)
            picks[:, m] = k
            c = c - self.weights[m, k]
        return picks


def _capacity_unit(params: np.ndarray, num_modules: int, max_params: float) -> int:
    unit = int(np.gcd.reduce(params[params > 0]))
    cap = min(params[:, -1].sum(), max(max_params, 0)) / unit
    if num_modules * (cap + 1) > _MAX_TABLE_ENTRIES:
        # Huge models with coprime shapes: coarsen so the table fits; weights round up (still feasible,
        # optimal up to one unit per module).
        unit *= math.ceil(num_modules * (cap + 1) / _MAX_TABLE_ENTRIES)
    return unit


def _unique_clients(profiles: Sequence[ResourceProfile], workloads: Sequence[Workload]) -> tuple[list[int], list[int]]:
    """(index of each client's (budget, workload) among the distinct ones, first client of each distinct one)."""
    keys = [(p.memory_gib, p.compute_tflops, p.uplink_mbps, p.downlink_mbps, w)
            for p, w in zip(profiles, workloads, strict=True)]
    unique: dict[tuple, int] = {}
    owner = [unique.setdefault(k, len(unique)) for k in keys]
    first: dict[int, int] = {}
    for i, u in enumerate(owner):
        first.setdefault(u, i)
    return owner, [first[u] for u in range(len(unique))]


def plan_clients(profiles: Sequence[ResourceProfile], importance: Mapping[str, float], spec: ModelSpec,
                 options: PlanOptions | None = None, client_ids: Sequence[str | int] | None = None,
                 workloads: Sequence[Workload] | None = None) -> list[ClientPlan]:
    """Plan every client against one (combined) importance map; ``workloads`` (one per client, default none) are
    the clients' token lengths and measured speed.

    Clients with identical profiles and workloads are planned once; the rank search is one knapsack table shared
    by all clients.

    Raises
    ------
    PlanInfeasible
        For the first client with no feasible plan (exclude it and plan the others).
    """
    options = options or PlanOptions()
    if client_ids is None:
        client_ids = [str(i) for i in range(len(profiles))]
    workloads = [Workload()] * len(profiles) if workloads is None else list(workloads)
    if len(client_ids) != len(profiles) or len(workloads) != len(profiles):
        raise ValueError(f"got {len(client_ids)} client_ids and {len(workloads)} workloads for {len(profiles)} "
                         "profiles")
    if not profiles:
        return []
    w = _normalised_importance(importance, spec)
    owner, first = _unique_clients(profiles, workloads)
    costs = CostModel.build(spec, options, [profiles[i] for i in first], [workloads[i] for i in first])
    cap_params = costs.max_params()
    knap = _Knapsack.solve(spec, w, options, float(cap_params.max()))
    cap_units = np.floor(cap_params / knap.unit).astype(np.int64)
    feasible = cap_units >= knap.min_units
    bonus = np.array([options.bits_bonus[b] + options.batch_bonus * math.log2(s) for b, s in costs.combos])
    score = np.where(feasible, knap.best[np.clip(cap_units, 0, len(knap.best) - 1)] + bonus[None, :], -np.inf)
    chosen = np.argmax(score, axis=1)  # first max wins: combos are ordered high bits, large batch first
    infeasible = np.flatnonzero(~feasible.any(axis=1))
    if infeasible.size:
        u = int(infeasible[0])
        raise _infeasible(costs, knap, u, client_ids[first[u]])
    plans = _plans(spec, costs, knap, chosen, cap_units[np.arange(len(first)), chosen], bonus)
    return [replace(plans[u], client_id=str(cid), ranks=dict(plans[u].ranks))
            for cid, u in zip(client_ids, owner, strict=True)]


def _infeasible(costs: CostModel, knap: _Knapsack, u: int, client_id: str | int) -> PlanInfeasible:
    """The error for profile ``u``: its budget, and the least memory and time any plan needs."""
    profile, options, combos = costs.profiles[u], costs.options, costs.combos
    need_mem = costs.fixed_memory[u] + options.adapter_state_bytes_per_param * knap.min_params
    need_t = costs.fixed_seconds[u] + costs.seconds_per_param[u] * knap.min_params
    jm, jt = int(np.argmin(need_mem)), int(np.argmin(need_t))
    head = f", with the {costs.head_params} head parameters trained in full" if costs.head_params else ""
    return PlanInfeasible(
        f"no plan fits client {str(client_id)!r} ({profile.name or 'unnamed profile'}): budget "
        f"{profile.memory_gib:.2f} GiB memory and {options.deadline_s:g} s round deadline; the "
        f"smallest plan needs {need_mem[jm] / GIB:.2f} GiB (bits {combos[jm][0]}, batch {combos[jm][1]}) "
        f"and {need_t[jt]:.1f} s (bits {combos[jt][0]}, batch {combos[jt][1]}){head}"
    )


def _plans(spec: ModelSpec, costs: CostModel, knap: _Knapsack, chosen: np.ndarray, caps: np.ndarray,
           bonus: np.ndarray) -> list[ClientPlan]:
    """One plan per profile of ``costs``: the knapsack optimum at its chosen (bits, batch) capacity."""
    options = costs.options
    picks = knap.backtrack(caps)
    rank_values = np.array(options.ranks)
    cheapest = int(np.argmin(knap.params[:, 1])) if options.ranks[0] == 0 else 0
    # Only zero-importance modules fit: adapt the cheapest one so the client trains something.
    picks[(rank_values[picks] == 0).all(axis=1), cheapest] = 1
    rows = np.arange(len(spec.modules))
    n_params = knap.params[rows[None, :], picks].sum(axis=1).tolist()
    objective = (knap.values[rows[None, :], picks].sum(axis=1) + bonus[chosen]).tolist()
    ranks_table = rank_values[picks].tolist()  # python ints: building dicts from numpy scalars is slower
    names = spec.module_names()
    plans = []
    for u, j in enumerate(chosen.tolist()):
        bits, batch = costs.combos[j]
        comm_s = costs.comm_seconds(u, n_params[u])
        step_s = costs.step_seconds(u, j, n_params[u])
        steps = local_steps_to_fill(step_s, comm_s, options)
        plans.append(ClientPlan(
            client_id="",
            ranks={name: r for name, r in zip(names, ranks_table[u], strict=True) if r},
            batch_size=batch,
            bits=bits,
            est_memory_bytes=costs.memory_bytes(u, j, n_params[u]),
            est_compute_s=steps * step_s,
            est_comm_s=comm_s,
            objective=objective[u],
            local_steps=steps,
        ))
    return plans


def local_steps_to_fill(step_seconds: float, comm_seconds_: float, options: PlanOptions) -> int:
    """Steps a feasible plan trains: ``local_steps``, raised towards ``max_local_steps`` while the estimated
    round stays within ``deadline_fill`` of the deadline."""
    if options.max_local_steps <= options.local_steps:
        return options.local_steps
    room = options.deadline_fill * options.deadline_s - comm_seconds_
    fits = int(room // step_seconds) if step_seconds > 0 else options.max_local_steps
    return max(options.local_steps, min(options.max_local_steps, fits))


def combine_importance(per_client: Sequence[Mapping[str, float]],
                       weights: Sequence[float] | None = None) -> dict[str, float]:
    """Weighted mean of the clients' importance maps, each first normalised to sum 1.

    A module a client did not score counts as 0 for it; a client whose scores are all 0 carries no
    information and is left out. ``weights`` (e.g. sample counts) default to equal.
    """
    if weights is None:
        weights = [1.0] * len(per_client)
    if len(weights) != len(per_client):
        raise ValueError(f"got {len(weights)} weights for {len(per_client)} importance maps")
    if not per_client:
        raise ValueError("combine_importance needs at least one client's importance")
    combined: dict[str, float] = {}
    total_weight = 0.0
    for index, (scores, weight) in enumerate(zip(per_client, weights, strict=True)):
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"weight of client {index} must be finite and >= 0, got {weight!r}")
        for name, value in scores.items():
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"importance of {name!r} from client {index} must be finite and >= 0, "
                                 f"got {value!r}")
        total = sum(scores.values())
        if total <= 0 or weight == 0:
            continue
        total_weight += weight
        for name, value in scores.items():
            combined[name] = combined.get(name, 0.0) + weight * value / total
    names = {name for scores in per_client for name in scores}
    if total_weight == 0:
        return {name: 1.0 / len(names) for name in sorted(names)} if names else {}
    return {name: combined.get(name, 0.0) / total_weight for name in sorted(names)}
