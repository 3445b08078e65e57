"""Heterogeneous-rank LoRA algebra: exact aggregation, stacking and SVD refactorisation.

Conventions follow peft: ``lora_A`` has shape ``(r, in_features)``, ``lora_B`` has shape
``(out_features, r)`` and the weight update is ``ΔW = scaling · B @ A`` with ``scaling = alpha / r``
(``alpha / sqrt(r)`` for rsLoRA). Clients with different ranks cannot be averaged factor by factor
(the shapes differ, and even at equal rank mean(B)·mean(A) ≠ mean(B·A)); the exact aggregate lives in
ΔW space. All arithmetic here runs in float64 so that the aggregate is exact to float32 tolerance.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "LoraFactors",
    "aggregate_heterogeneous_lora",
    "aggregate_lora_adapters",
    "factorize_delta",
    "group_lora_state",
    "lora_delta",
    "lora_scaling",
    "lora_state_from_factors",
    "normalize_weights",
    "reproject_lora",
    "stack_lora",
    "stack_lora_adapters",
]

# peft's get_peft_model_state_dict keys: "<module>.lora_A.weight"; a model's own state_dict adds the
# adapter name: "<module>.lora_A.<adapter>.weight". Both are accepted.
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")


def lora_scaling(alpha: float, rank: int, rslora: bool = False) -> float:
    """The factor peft multiplies ``B @ A`` by: ``alpha / rank`` (``alpha / sqrt(rank)`` for rsLoRA)."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    return float(alpha) / (math.sqrt(rank) if rslora else rank)


@dataclass(frozen=True)
class LoraFactors:
    """One LoRA module's factors.

    Parameters
    ----------
    a : np.ndarray
        ``lora_A`` weight, shape ``(rank, in_features)``.
    b : np.ndarray
        ``lora_B`` weight, shape ``(out_features, rank)``.
    alpha : float
        peft's ``lora_alpha`` for this module.
    rslora : bool, default False
        peft's ``use_rslora``: scale by ``alpha / sqrt(rank)`` instead of ``alpha / rank``.
    """

    a: np.ndarray
    b: np.ndarray
    alpha: float
    rslora: bool = False

    def __post_init__(self) -> None:
        a, b = np.asarray(self.a), np.asarray(self.b)
        if a.ndim != 2 or b.ndim != 2:
            raise ValueError(
                f"LoRA factors must be 2-D: got lora_A with shape {a.shape} and lora_B with shape {b.shape}"
            )
        if a.shape[0] != b.shape[1]:
            raise ValueError(
                f"lora_A has shape {a.shape} (rank {a.shape[0]}) but lora_B has shape {b.shape} "
                f"(rank {b.shape[1]}); expected lora_A (r, in_features) and lora_B (out_features, r)"
            )
        if a.shape[0] < 1:
            raise ValueError(f"LoRA rank must be >= 1, got lora_A with shape {a.shape}")
        if not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ValueError(f"lora alpha must be a finite number > 0, got {self.alpha}")
        object.__setattr__(self, "a", a)
        object.__setattr__(self, "b", b)

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.a.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.b.shape[0])

    @property
    def scaling(self) -> float:
        return lora_scaling(self.alpha, self.rank, self.rslora)

    def delta(self) -> np.ndarray:
        """``ΔW = scaling · B @ A`` in float64, shape ``(out_features, in_features)``."""
        return self.scaling * (self.b.astype(np.float64) @ self.a.astype(np.float64))


def lora_delta(a: np.ndarray, b: np.ndarray, alpha: float, rslora: bool = False) -> np.ndarray:
    """``(alpha / r) · B @ A`` for ``a`` of shape ``(r, in)`` and ``b`` of shape ``(out, r)``, in float64."""
    return LoraFactors(a, b, alpha, rslora).delta()


def normalize_weights(weights: Sequence[float], count: int | None = None) -> np.ndarray:
    """Aggregation weights (e.g. example counts) as probabilities ``p_k = w_k / Σ w``.

    Raises ``ValueError`` for a length other than ``count``, negative or non-finite weights, or a zero sum.
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1:
        raise ValueError(f"weights must be a flat sequence, got shape {w.shape}")
    if count is not None and w.shape[0] != count:
        raise ValueError(f"got {w.shape[0]} weights for {count} updates")
    if w.shape[0] == 0:
        raise ValueError("no updates to aggregate")
    bad = np.flatnonzero(~np.isfinite(w) | (w < 0))
    if bad.size:
        raise ValueError(f"weight {w[bad[0]]} of update {bad[0]} is invalid: weights must be finite and >= 0")
    total = w.sum()
    if total <= 0:
        raise ValueError(f"weights sum to {total}: at least one update needs a positive weight")
    return w / total


def _check_same_shape(
    updates: Sequence[LoraFactors], indices: Sequence[int] | None = None, what: str = "update"
) -> None:
    """All updates share ``(out_features, in_features)``; errors name the caller's index of the culprit."""
    if len(updates) == 0:
        return
    indices = list(range(len(updates))) if indices is None else list(indices)
    out_in = (updates[0].out_features, updates[0].in_features)
    for k, u in zip(indices, updates, strict=True):
        if (u.out_features, u.in_features) != out_in:
            raise ValueError(
                f"{what} {k} has ΔW shape ({u.out_features}, {u.in_features}) (out_features, in_features), "
                f"expected {out_in} like {what} {indices[0]}"
            )


def _stack_scaled(updates: Sequence[LoraFactors], p: np.ndarray) -> LoraFactors:
    """``B = [p_k s_k B_k]``, ``A = [A_k]`` with scaling 1, for already-normalised ``p``."""
    scaled = [p_k * u.scaling * u.b.astype(np.float64) for p_k, u in zip(p, updates, strict=True)]
    b = np.concatenate(scaled, axis=1)
    a = np.concatenate([u.a.astype(np.float64) for u in updates], axis=0)
    # alpha = rank makes peft's scaling exactly 1, so the weights live in B alone.
    return LoraFactors(a=a, b=b, alpha=float(a.shape[0]))


def stack_lora(updates: Sequence[LoraFactors], weights: Sequence[float]) -> LoraFactors:
    """Exact aggregate as one LoRA of rank ``Σ r_k``: ``B = [p_k s_k B_k]``, ``A = [A_k]``, scaling 1.

    ``stack_lora(u, w).delta()`` equals ``aggregate_heterogeneous_lora(u, w)``; the stacked factors are
    what ``reproject_lora`` refactorises cheaply without forming ΔW.
    """
    p = normalize_weights(weights, len(updates))
    _check_same_shape(updates)
    return _stack_scaled(updates, p)


def aggregate_heterogeneous_lora(updates: Sequence[LoraFactors], weights: Sequence[float]) -> np.ndarray:
    """Exact weighted aggregate ``Σ_k p_k (α_k / r_k) B_k A_k`` of one module's LoRA updates, in float64.

    Ranks and alphas may differ between updates; ``in_features``/``out_features`` may not.
    ``weights`` are normalised to ``p_k``; negative weights or a zero sum raise ``ValueError``.
    """
    # One GEMM over the stacked factors equals the sum of per-client products, at the same cost.
    return stack_lora(updates, weights).delta()


def stack_lora_adapters(
    adapters: Sequence[Mapping[str, LoraFactors]], weights: Sequence[float]
) -> dict[str, LoraFactors]:
    """``stack_lora`` per module over whole adapters that may adapt different module subsets.

    A module that a client did not adapt contributes zero for it: ``p`` is normalised over all clients,
    not over those that adapted the module (they did not move it, so their update there is 0).
    """
    p = normalize_weights(weights, len(adapters))
    modules = sorted({name for adapter in adapters for name in adapter})
    result: dict[str, LoraFactors] = {}
    for name in modules:
        holders = [k for k, adapter in enumerate(adapters) if name in adapter]
        _check_same_shape([adapters[k][name] for k in holders], holders, what=f"module '{name}' of client")
        result[name] = _stack_scaled([adapters[k][name] for k in holders], p[holders])
    return result


def aggregate_lora_adapters(
    adapters: Sequence[Mapping[str, LoraFactors]], weights: Sequence[float]
) -> dict[str, np.ndarray]:
    """Exact aggregate ΔW per module (float64) over adapters that may adapt different module subsets.

    A module a client did not adapt contributes zero for it (see ``stack_lora_adapters``).
    """
    return {name: stacked.delta() for name, stacked in stack_lora_adapters(adapters, weights).items()}


def _split_singular_values(
    u: np.ndarray, s: np.ndarray, vt: np.ndarray, rank: int, alpha: float, rslora: bool, dtype: np.dtype
) -> LoraFactors:
    """Factors with ``scaling · B @ A = U diag(s) Vt``; ``sqrt(s / scaling)`` goes to both B and A."""
    scaling = lora_scaling(alpha, rank, rslora)
    kept = min(rank, s.shape[0])
    root = np.sqrt(s[:kept] / scaling)
    out_features, in_features = u.shape[0], vt.shape[1]
    # Zero-padding beyond the matrix rank keeps the shapes the plan asked for and adds nothing to ΔW.
    a = np.zeros((rank, in_features), dtype=np.float64)
    b = np.zeros((out_features, rank), dtype=np.float64)
    a[:kept] = root[:, None] * vt[:kept]
    b[:, :kept] = u[:, :kept] * root[None, :]
    return LoraFactors(a=a.astype(dtype), b=b.astype(dtype), alpha=alpha, rslora=rslora)


def factorize_delta(
    delta: np.ndarray, rank: int, alpha: float, *, rslora: bool = False, dtype: np.dtype | type = np.float64
) -> tuple[LoraFactors, np.ndarray]:
    """Best rank-``rank`` LoRA factors of ``delta`` (Eckart–Young, by SVD).

    Returns ``(factors, dropped)`` where ``factors.delta()`` is the rank-``rank`` truncation of ``delta``
    and ``dropped`` holds the discarded singular values, so the Frobenius truncation error is
    ``np.linalg.norm(dropped)``. Singular values are split symmetrically (square roots) between A and B,
    which keeps both factors on the same scale for the next round of training. ``rank`` above
    ``min(delta.shape)`` zero-pads the factors.
    """
    d = np.asarray(delta, dtype=np.float64)
    if d.ndim != 2:
        raise ValueError(f"delta must be a 2-D (out_features, in_features) matrix, got shape {d.shape}")
    if not np.all(np.isfinite(d)):
        raise ValueError("delta contains NaN or Inf")
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    u, s, vt = np.linalg.svd(d, full_matrices=False)
    return _split_singular_values(u, s, vt, rank, alpha, rslora, np.dtype(dtype)), s[rank:].copy()


def reproject_lora(
    factors: LoraFactors,
    rank: int,
    alpha: float,
    *,
    rslora: bool = False,
    dtype: np.dtype | type = np.float64,
) -> tuple[LoraFactors, np.ndarray]:
    """``factorize_delta(factors.delta(), ...)`` without forming the ``(out, in)`` matrix.

    With ``B = Q_b R_b`` and ``Aᵀ = Q_a R_a`` (thin QR), ``s·B A = Q_b (s R_b R_aᵀ) Q_aᵀ``, so the SVD of the
    small ``R × R`` core gives the SVD of ΔW in ``O((out + in) R²)``: the cheap path after ``stack_lora``
    (R = Σ client ranks), where a dense SVD of a 4096 × 4096 ΔW per module would dominate a round.
    """
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    qb, rb = np.linalg.qr(factors.b.astype(np.float64))
    qa, ra = np.linalg.qr(factors.a.astype(np.float64).T)
    uc, s, vct = np.linalg.svd(factors.scaling * (rb @ ra.T))
    u, vt = qb @ uc, vct @ qa.T
    # ΔW has at most min(out, in, R) non-zero singular values; report the others as dropped zeros like
    # factorize_delta would, so both paths return the same `dropped` length.
    full = min(factors.out_features, factors.in_features)
    s_full = np.zeros(full)
    s_full[: min(full, s.shape[0])] = s[:full]
    return _split_singular_values(u, s, vt, rank, alpha, rslora, np.dtype(dtype)), s_full[rank:]


def group_lora_state(state: Mapping[str, np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Pair peft state-dict entries into ``{module: (lora_A, lora_B)}``.

    Keys are those of ``peft.get_peft_model_state_dict``, e.g.
    ``"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"`` → module
    ``"base_model.model.model.layers.0.self_attn.q_proj"``; keys with an adapter name
    (``"...q_proj.lora_A.default.weight"``) are accepted too. Entries that are not LoRA A/B weights
    (``modules_to_save``, biases, embeddings' ``lora_embedding_*``) are not LoRA factors and are skipped.
    """
    halves: dict[str, dict[str, np.ndarray]] = {}
    for key, value in state.items():
        match = _LORA_KEY.match(key)
        if match is None:
            continue
        module, which = match["module"], match["which"]
        if which in halves.setdefault(module, {}):
            raise ValueError(f"module '{module}' has more than one lora_{which} entry (second: '{key}')")
        halves[module][which] = np.asarray(value)
    grouped: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for module, pair in halves.items():
        missing = {"A", "B"} - pair.keys()
        if missing:
            have, lack = "".join(pair), "".join(missing)
            raise ValueError(f"module '{module}' has lora_{have} but no lora_{lack} entry")
        LoraFactors(pair["A"], pair["B"], alpha=1.0)  # validates shapes; errors name the offending shapes
        grouped[module] = (pair["A"], pair["B"])
    return grouped


def lora_state_from_factors(
    factors: Mapping[str, LoraFactors | tuple[np.ndarray, np.ndarray]],
    *,
    adapter_name: str | None = None,
    dtype: np.dtype | type | None = np.float32,
) -> dict[str, np.ndarray]:
    """The reverse of ``group_lora_state``: ``{module: (a, b)}`` → peft state keys.

    ``adapter_name=None`` gives ``get_peft_model_state_dict`` keys (``"<module>.lora_A.weight"``), which
    ``set_peft_model_state_dict`` loads; a name gives ``"<module>.lora_A.<name>.weight"``. ``dtype=None``
    keeps the factors' dtype.
    """
    infix = "" if adapter_name is None else f".{adapter_name}"
    state: dict[str, np.ndarray] = {}
    for module, f in factors.items():
        a, b = (f.a, f.b) if isinstance(f, LoraFactors) else f
        LoraFactors(a, b, alpha=1.0)
        state[f"{module}.lora_A{infix}.weight"] = np.asarray(a, dtype=dtype)
        state[f"{module}.lora_B{infix}.weight"] = np.asarray(b, dtype=dtype)
    return state


def apply_weighted_updates(
    current: LoraFactors | None,
    updates: Sequence[tuple[float, LoraFactors, LoraFactors]],
    max_rank: int,
) -> tuple[LoraFactors, np.ndarray]:
    """Exact update-space FedAvg of one module, kept in factored form.

    ``ΔW_new = ΔW_current + Σ_k q_k (trained_k.delta() − start_k.delta())`` with ``q_k = w_k / Σ w`` over the
    clients that adapted this module (each ``(w_k, start_k, trained_k)`` may have its own rank and alpha).
    The sum is stacked exactly (rank ≤ R_current + 2 Σ r_k), then re-projected to ``max_rank`` by SVD of the
    small core; the dropped singular values are returned, so the truncation error is known (zero whenever the
    true rank fits). The result has ``alpha == rank`` (scaling 1): ``b @ a`` is ΔW itself.
    """
    if not updates:
        raise ValueError("apply_weighted_updates needs at least one client update")
    q = normalize_weights([w for w, _, _ in updates])
    b_parts: list[np.ndarray] = []
    a_parts: list[np.ndarray] = []
    if current is not None:
        b_parts.append(current.scaling * current.b.astype(np.float64))
        a_parts.append(current.a.astype(np.float64))
    for q_k, (_, start, trained) in zip(q, updates, strict=True):
        _check_same_shape([start, trained], what="start/trained pair")
        b_parts += [q_k * trained.scaling * trained.b.astype(np.float64),
                    -q_k * start.scaling * start.b.astype(np.float64)]
        a_parts += [trained.a.astype(np.float64), start.a.astype(np.float64)]
    b, a = np.concatenate(b_parts, axis=1), np.concatenate(a_parts, axis=0)
    stacked = LoraFactors(a=a, b=b, alpha=float(a.shape[0]))
    rank = min(max_rank, a.shape[0], a.shape[1], b.shape[0])
    return reproject_lora(stacked, rank, alpha=float(rank))
