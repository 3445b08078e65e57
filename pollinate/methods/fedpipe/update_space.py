"""FedPipe clients' updates as changes of the model: ``ΔW_k = s (B'_k A'_k − B⁰_k A⁰_k)`` per module.

The norm bounds and the robust aggregators apply in this space, never to the A and B factors themselves
(``B A = (B G)(G⁻¹ A)`` for any invertible ``G``: factors are not unique, so a median of factors is a median of
nothing). Norms and distances come from the factors without forming any ``(out, in)`` matrix: with
``ΔW = U V`` (``U = [s B', −s B⁰]``, ``V = [A'; A⁰]``, rank ≤ 2r), ``⟨U_i V_i, U_j V_j⟩ = Σ (U_iᵀ U_j) ∘ (V_i V_jᵀ)``.

- Krum / Multi-Krum select whole clients by their distances over all modules (a module a client did not adapt
  is a zero change) and the head of a classifier (``dense_pair``); the selected clients are then aggregated
  exactly like FedAvg, with equal weights.
- Median / trimmed mean work module by module over the clients that adapted the module, on the dense ΔW_k,
  and the new global ΔW is re-factored to ``fedpipe.global_rank`` by SVD.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from pollinate.methods.fedpipe.lowrank import LoraFactors, factorize_delta

# One client's change of one module as a product U @ V (float64).
FactorPair = tuple[np.ndarray, np.ndarray]


def factor_pair(start: LoraFactors, trained: LoraFactors) -> FactorPair:
    """``(U, V)`` with ``U @ V = trained.delta() − start.delta()``."""
    u = np.concatenate([trained.scaling * trained.b.astype(np.float64),
                        -start.scaling * start.b.astype(np.float64)], axis=1)
    v = np.concatenate([trained.a.astype(np.float64), start.a.astype(np.float64)], axis=0)
    return u, v


def dense_pair(change: np.ndarray) -> FactorPair:
    """A dense change (a classifier head's tensor) as ``(vec, [[1]])``: its inner products are dot products."""
    return np.asarray(change, dtype=np.float64).reshape(-1, 1), np.ones((1, 1))


def inner(p: FactorPair, q: FactorPair) -> float:
    """Frobenius inner product of ``p[0] @ p[1]`` and ``q[0] @ q[1]``."""
    return float(np.sum((p[0].T @ q[0]) * (p[1] @ q[1].T)))


def update_norm(update: dict[str, FactorPair]) -> float:
    """``‖ΔW‖_F`` over all modules of one client's update."""
    return float(np.sqrt(max(sum(inner(pair, pair) for pair in update.values()), 0.0)))


def gram(updates: Sequence[dict[str, FactorPair]]) -> np.ndarray:
    """``G[i, j] = Σ_modules ⟨ΔW_i, ΔW_j⟩`` (a module only one of them adapted contributes 0)."""
    n = len(updates)
    g = np.zeros((n, n))
    for i in range(n):
        for j in range(i, n):
            g[i, j] = g[j, i] = sum(inner(pair, updates[j][m]) for m, pair in updates[i].items() if m in updates[j])
    return g


def distance_embedding(updates: Sequence[dict[str, FactorPair]]) -> list[dict[str, np.ndarray]]:
    """One short vector per client whose pairwise distances are those of the clients' ΔW (``G = X Xᵀ``): what
    Krum needs, at the size of the number of clients."""
    values, vectors = np.linalg.eigh(gram(updates))
    x = vectors * np.sqrt(np.clip(values, 0.0, None))
    return [{"x": row.astype(np.float64)} for row in x]


def combine_module(current: LoraFactors | None, changes: Sequence[FactorPair], weights: Sequence[float],
                   combine: Callable[[list[dict[str, np.ndarray]], list[float]], dict[str, np.ndarray]],
                   global_rank: int) -> tuple[LoraFactors, np.ndarray]:
    """New factors of one module: ``ΔW + combine(dense ΔW_k)`` at rank ≤ ``global_rank`` (alpha = rank, so
    ``b @ a`` is ΔW), and the singular values the truncation dropped."""
    dense = [{"dw": (u @ v).astype(np.float32)} for u, v in changes]
    new = combine(dense, list(weights))["dw"].astype(np.float64)
    if current is not None:
        new = new + current.delta()
    rank = min(global_rank, *new.shape)
    return factorize_delta(new, rank, alpha=float(rank), dtype=np.float32)
