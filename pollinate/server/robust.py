"""Bounded, robust aggregation of client states: finite and norm checks, then an aggregator chosen by name.

Every function is pure: a *state* is a ``dict[str, np.ndarray]`` of float32 tensors with the same keys and
shapes for every client, *weights* are the clients' example counts, and results are float32 states in the
key order of the first state. Sums run in float64 in a fixed order (clients in the order given, keys in the
first state's order), so a round's result does not depend on anything but its inputs.

Order of use in a round: drop clients in ``nonfinite_clients``, then those in ``norm_outliers`` of their
``update_norms`` (update = client state − the round's global state), then ``aggregate`` the rest.

States or updates: every aggregator here is translation-equivariant — ``agg(x_k + c) = agg(x_k) + c`` for a
shared offset ``c`` (FedAvg because its weights sum to 1; median and trimmed mean coordinate by coordinate;
Krum because its distances do not change). A caller may pass client states or client updates and add the
global back; the results agree up to float32 rounding of the offset.

Method notes:
- FedPipe (factored ΔW): aggregate each client's dense per-module update ``ΔW_k = s_k (B'_k A'_k − B⁰_k A⁰_k)``
  (what the server reconstructs), module by module over the clients that adapted it, then re-factor to the
  global rank as now. Never aggregate the A and B factors separately: ``B A = (B G)(G⁻¹ A)`` for any invertible
  ``G``, so factors are not unique and a coordinate-wise median of factors is not a median of anything. A
  client's ``‖ΔW_k‖_F`` is computable from its factors without forming ΔW (``‖U Vᵀ‖² = tr(UᵀU · VᵀV)``).
- SFPrompt (prompts + tail): dense tensors that every client returns in full; apply everything here directly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
from flwr.server.strategy.aggregate import aggregate_median, aggregate_trimmed_avg

State = dict[str, np.ndarray]


class AggregatorError(ValueError):
    """Inputs or parameters an aggregator cannot work with; the message names the parameter and what it needs."""


# --- checks before aggregation ------------------------------------------------------------------------------
def nonfinite_clients(states: Sequence[State]) -> list[int]:
    """Indices of the clients with a NaN or Inf anywhere in their state (or update)."""
    return [i for i, state in enumerate(states) if not all(np.isfinite(v).all() for v in state.values())]


def update_norms(updates: Sequence[State], reference: State | None = None) -> np.ndarray:
    """Global L2 norm per client over all its tensors, accumulated in float64.

    ``updates`` are client updates, or client states with ``reference`` the round's global state: then the
    norm is that of ``state − reference``, computed in float64 without materialising the updates. A client
    with a non-finite value gets a non-finite norm.
    """
    norms = np.zeros(len(updates), dtype=np.float64)
    for i, update in enumerate(updates):
        total = 0.0
        for key, value in update.items():
            delta = value.astype(np.float64)
            if reference is not None:
                delta -= reference[key]
            total += float(np.dot(delta.ravel(), delta.ravel()))
        norms[i] = np.sqrt(total)
    return norms


def norm_outliers(norms: Sequence[float] | np.ndarray, absolute_bound: float | None = None,
                  relative_bound: float | None = None) -> dict[int, str]:
    """Clients to reject, ``{index: reason}`` in index order: a non-finite norm, a norm above
    ``absolute_bound``, or one above ``relative_bound`` × the median of the round's finite norms.

    The relative bound applies only when at least 3 clients have finite norms: with 2 the median is their
    mean, which one client alone can raise. ``None`` or 0 turns a bound off.
    """
    _check_bound("absolute_bound", absolute_bound, minimum=0.0)
    _check_bound("relative_bound", relative_bound, minimum=1.0)
    values = np.asarray(norms, dtype=np.float64)
    finite = np.isfinite(values)
    relative_limit = None
    if relative_bound and finite.sum() >= 3:
        relative_limit = relative_bound * float(np.median(values[finite]))
    rejected: dict[int, str] = {}
    for i, norm in enumerate(values):
        if not finite[i]:
            rejected[i] = "update norm is not finite"
        elif absolute_bound and norm > absolute_bound:
            rejected[i] = f"update norm {norm:.4g} exceeds the absolute bound {absolute_bound:.4g}"
        elif relative_limit is not None and norm > relative_limit:
            rejected[i] = (f"update norm {norm:.4g} exceeds {relative_bound:g} x the round's median norm "
                           f"({relative_limit:.4g})")
    return rejected


def _check_bound(name: str, bound: float | None, minimum: float) -> None:
    if bound is not None and bound != 0 and not (np.isfinite(bound) and bound >= minimum):
        raise AggregatorError(f"{name} must be None, 0 (off) or a finite number >= {minimum:g}, got {bound!r}")


# --- aggregators --------------------------------------------------------------------------------------------
def fedavg(states: Sequence[State], weights: Sequence[float]) -> State:
    """Σ_k (n_k / Σn) · state_k per tensor in float64, clients in order: the same operations, hence the same
    bits, as ``pollinate.server.strategy.weighted_average``."""
    total = float(sum(weights))
    if not (np.isfinite(total) and total > 0) or any(not np.isfinite(w) or w < 0 for w in weights):
        raise AggregatorError(f"weights must be finite, >= 0 and sum to > 0, got {list(weights)}")
    out = {}
    for key in states[0]:
        acc = np.zeros(states[0][key].shape, dtype=np.float64)
        for state, weight in zip(states, weights, strict=True):
            acc += (weight / total) * state[key].astype(np.float64)
        out[key] = acc.astype(np.float32)
    return out


def _per_tensor(states: Sequence[State], reduce: Callable[[list[tuple[list[np.ndarray], int]]], list]) -> State:
    """Apply a Flower aggregate function tensor by tensor, in float64: one tensor of every client in memory
    at a time (not a second copy of every state), and the float64 sums this module promises."""
    return {key: np.asarray(reduce([([s[key].astype(np.float64)], 1) for s in states])[0], dtype=np.float32)
            for key in states[0]}


def coordinate_median(states: Sequence[State]) -> State:
    """Coordinate-wise median (Flower's ``aggregate_median``); weights are ignored: a client's self-reported
    example count must not buy it influence."""
    return _per_tensor(states, aggregate_median)


def trimmed_mean(states: Sequence[State], trim_fraction: float) -> State:
    """Coordinate-wise mean after dropping ``floor(trim_fraction · n)`` lowest and highest values (Flower's
    ``aggregate_trimmed_avg``, i.e. scipy's ``trim_mean``); weights are ignored."""
    _check_trim_fraction(trim_fraction)
    return _per_tensor(states, lambda results: aggregate_trimmed_avg(results, trim_fraction))


def krum_select(states: Sequence[State], byzantine: int, keep: int = 1) -> list[int]:
    """Indices (ascending) of the ``keep`` clients with the lowest Krum scores: the sum of squared distances
    to their ``n − byzantine − 2`` nearest other clients (Blanchard et al. 2017). Ties go to the lower index.

    Not Flower's ``aggregate_krum``: that stacks every client's whole state into one matrix (a second copy of
    all states), silently clamps ``n − f − 2`` to 1 instead of requiring ``n > 2f + 2``, and averages the
    kept clients by their self-reported example counts. Its selection is the same (a test compares them).
    """
    _check_krum(len(states), byzantine, keep)
    distances = _squared_distances(states)
    n = len(states)
    scores = np.array([np.sort(np.delete(distances[i], i))[: n - byzantine - 2].sum() for i in range(n)])
    return sorted(np.argsort(scores, kind="stable")[:keep].tolist())


def _squared_distances(states: Sequence[State]) -> np.ndarray:
    """Pairwise squared L2 distances in float64, tensor by tensor; differences are formed directly (no
    ``|x|² + |y|² − 2xy``, which cancels badly when states are large and close)."""
    n = len(states)
    distances = np.zeros((n, n), dtype=np.float64)
    for key in states[0]:
        flat = [s[key].astype(np.float64).ravel() for s in states]
        for i in range(n):
            for j in range(i + 1, n):
                delta = flat[i] - flat[j]
                distances[i, j] += float(np.dot(delta, delta))
    return distances + distances.T


def krum(states: Sequence[State], byzantine: int) -> State:
    """The one client state Krum selects (returned as is); weights are ignored."""
    (chosen,) = krum_select(states, byzantine, keep=1)
    return {key: value.astype(np.float32) for key, value in states[chosen].items()}


def multi_krum(states: Sequence[State], byzantine: int, keep: int | None = None) -> State:
    """Unweighted mean of the ``keep`` (default ``n − byzantine``) clients Krum scores best: the Multi-Krum
    of El Mhamdi et al. 2018; unweighted so a kept client cannot inflate its share with its example count."""
    keep = len(states) - byzantine if keep is None else keep
    chosen = krum_select(states, byzantine, keep)
    return fedavg([states[i] for i in chosen], [1.0] * len(chosen))


# --- parameter checks ----------------------------------------------------------------------------------------
def _check_trim_fraction(trim_fraction: float) -> None:
    if not (isinstance(trim_fraction, (int, float)) and 0.0 <= trim_fraction < 0.5):
        raise AggregatorError(f"trim_fraction must be a number in [0, 0.5), got {trim_fraction!r}")


def _check_krum(clients: int, byzantine: int, keep: int) -> None:
    if not (isinstance(byzantine, (int, np.integer)) and byzantine >= 0):
        raise AggregatorError(f"byzantine must be an integer >= 0, got {byzantine!r}")
    if clients <= 2 * byzantine + 2:
        raise AggregatorError(f"krum needs more than 2 x byzantine + 2 = {2 * byzantine + 2} clients, "
                              f"got {clients} (byzantine={byzantine})")
    if not (isinstance(keep, (int, np.integer)) and 1 <= keep <= clients - byzantine):
        raise AggregatorError(f"keep must be an integer in [1, clients - byzantine] = [1, {clients - byzantine}], "
                              f"got {keep!r}")


class _Params(NamedTuple):
    trim_fraction: float
    byzantine: int
    keep: int | None


class Aggregator(NamedTuple):
    """One row of ``AGGREGATORS``: how it runs, and what it checks of its parameters for ``clients`` clients."""

    run: Callable[[Sequence[State], Sequence[float], _Params], State]
    check: Callable[[int, _Params], None]


def _no_params(clients: int, p: _Params) -> None:
    """fedavg and median take no parameters."""


# Aggregator name -> its row; a new aggregator is one row here.
AGGREGATORS: dict[str, Aggregator] = {
    "fedavg": Aggregator(lambda states, weights, p: fedavg(states, weights), _no_params),
    "median": Aggregator(lambda states, weights, p: coordinate_median(states), _no_params),
    "trimmed-mean": Aggregator(lambda states, weights, p: trimmed_mean(states, p.trim_fraction),
                               lambda clients, p: _check_trim_fraction(p.trim_fraction)),
    "krum": Aggregator(lambda states, weights, p: krum(states, p.byzantine),
                       lambda clients, p: _check_krum(clients, p.byzantine, 1)),
    "multi-krum": Aggregator(lambda states, weights, p: multi_krum(states, p.byzantine, p.keep),
                             lambda clients, p: _check_krum(clients, p.byzantine,
                                                            clients - p.byzantine if p.keep is None else p.keep)),
}


def check_aggregator(name: str, clients: int, *, trim_fraction: float = 0.2, byzantine: int = 1,
                     keep: int | None = None) -> None:
    """Raise ``AggregatorError`` unless aggregator ``name`` can run a round of ``clients`` clients with these
    parameters (e.g. at config time with the run's minimum number of replies)."""
    if name not in AGGREGATORS:
        raise AggregatorError(f"aggregator must be one of {', '.join(AGGREGATORS)}, got {name!r}")
    if clients < 1:
        raise AggregatorError(f"an aggregator needs at least 1 client state, got {clients}")
    AGGREGATORS[name].check(clients, _Params(trim_fraction, byzantine, keep))


def check_states(states: Sequence[State], weights: Sequence[float]) -> None:
    """Raise ``AggregatorError`` unless there is one weight per state, every state has the first one's keys and
    shapes, and every value is finite (run ``nonfinite_clients`` first to drop such clients instead)."""
    if len(weights) != len(states):
        raise AggregatorError(f"weights must have one entry per state ({len(states)}), got {len(weights)}")
    first = states[0] if states else {}
    for i, state in enumerate(states):
        if state.keys() != first.keys():
            raise AggregatorError(f"state {i} has tensors {sorted(state)}, expected {sorted(first)}")
        for key, value in state.items():
            if value.shape != first[key].shape:
                raise AggregatorError(f"state {i} tensor '{key}' has shape {value.shape}, "
                                      f"expected {first[key].shape}")
    bad = nonfinite_clients(states)
    if bad:
        raise AggregatorError(f"states {bad} contain NaN or Inf; drop them before aggregating")


def aggregate(name: str, states: Sequence[State], weights: Sequence[float], *, trim_fraction: float = 0.2,
              byzantine: int = 1, keep: int | None = None) -> State:
    """The new state by aggregator ``name`` (a key of ``AGGREGATORS``), from client states or updates.

    Parameters
    ----------
    name : str
        ``fedavg`` (example-weighted mean), ``median``, ``trimmed-mean``, ``krum`` or ``multi-krum``.
    states : sequence of dict[str, np.ndarray]
        One float32 state (or update) per client, same keys and shapes, all finite.
    weights : sequence of float
        Example counts; only ``fedavg`` uses them.
    trim_fraction : float, default 0.2
        ``trimmed-mean``: fraction of clients dropped at each end, per coordinate, in [0, 0.5).
    byzantine : int, default 1
        ``krum``/``multi-krum``: the number of malicious clients ``f`` tolerated; needs ``n > 2f + 2``.
    keep : int or None, default None
        ``multi-krum``: how many clients to average, in [1, n − f]; None means ``n − f``.
    """
    check_aggregator(name, len(states), trim_fraction=trim_fraction, byzantine=byzantine, keep=keep)
    check_states(states, weights)
    return AGGREGATORS[name].run(states, weights, _Params(trim_fraction, byzantine, keep))
