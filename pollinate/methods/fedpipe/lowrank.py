"""Heterogeneous-rank LoRA algebra: exact update-space aggregation and SVD refactorisation.

Conventions follow peft: ``lora_A`` has shape ``(r, in_features)``, ``lora_B`` has shape
``(out_features, r)`` and the weight update is ``ΔW = scaling · B @ A`` with ``scaling = alpha / r``
(``alpha / sqrt(r)`` for rsLoRA). Clients with different ranks cannot be averaged factor by factor
(the shapes differ, and even at equal rank mean(B)·mean(A) ≠ mean(B·A)); the exact aggregate lives in
ΔW space. All arithmetic here runs in float64 so that the aggregate is exact to float32 tolerance.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "LoraFactors",
    "apply_weighted_updates",
    "factorize_delta",
    "lora_scaling",
    "normalize_weights",
    "reproject_lora",
]


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
    small ``R × R`` core gives the SVD of ΔW in ``O((out + in) R²)``: the cheap path for stacked client factors
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


def _check_same_shape(current: LoraFactors | None,
                      updates: Sequence[tuple[float, LoraFactors, LoraFactors]]) -> None:
    """Every factor pair describes a ΔW of one shape; the error names the client (update index) that differs."""
    out_in = (updates[0][1].out_features, updates[0][1].in_features)
    named = [("the current ΔW", current)] if current is not None else []
    for k, (_, start, trained) in enumerate(updates):
        named += [(f"update {k}'s start", start), (f"update {k}'s trained factors", trained)]
    for what, factors in named:
        if (factors.out_features, factors.in_features) != out_in:
            raise ValueError(f"{what} has ΔW shape ({factors.out_features}, {factors.in_features}) "
                             f"(out_features, in_features), expected {out_in} like update 0")


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
    _check_same_shape(current, updates)
    for q_k, (_, start, trained) in zip(q, updates, strict=True):
        b_parts += [q_k * trained.scaling * trained.b.astype(np.float64),
                    -q_k * start.scaling * start.b.astype(np.float64)]
        a_parts += [trained.a.astype(np.float64), start.a.astype(np.float64)]
    b, a = np.concatenate(b_parts, axis=1), np.concatenate(a_parts, axis=0)
    stacked = LoraFactors(a=a, b=b, alpha=float(a.shape[0]))
    rank = min(max_rank, a.shape[0], a.shape[1], b.shape[0])
    return reproject_lora(stacked, rank, alpha=float(rank))
