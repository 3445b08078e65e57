"""Central differential privacy for FedPipe, in its update space (``privacy.dp = "central"``; docs/privacy.md).

A client's update is its change of the model: ``ΔW_k = s (B'_k A'_k − B⁰_k A⁰_k)`` of every module it adapted and
its head's change, the space ``update_space`` measures (``FedPipe.change_pairs``, ``update_norm``). Each accepted
update is clipped to ``clip_norm`` as one vector (Flower's FlatClip scale ``min(1, C / ‖u_k‖)``, its norm taken
from the factors); the clipped updates are averaged with equal weights over the n accepted clients (every module
is divided by n, also a module only some of them adapted: no client's share exceeds 1/n); Gaussian noise of std
σ·C/n is added to the dense mean of every module some client's plan adapts and of the head
(``ServerPrivacy.noised_mean``: the dense methods' seeding, adaptive clipping, accountant and round record). The
noised global ΔW is then re-factored to ``fedpipe.global_rank`` by SVD, which is post-processing: the guarantee
covers the global factors, every client's downlink and the saved adapter.

The noise is a dense ``(out, in)`` matrix per module, so unlike plain FedPipe's factored aggregation the mean is
formed densely: one model-sized float32 array and one SVD per module each round.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from pollinate.methods.fedpipe import update_space
from pollinate.methods.fedpipe.head import HEAD_PREFIX
from pollinate.methods.fedpipe.lowrank import LoraFactors, factorize_delta
from pollinate.server.privacy import ServerPrivacy

ChangePairs = dict[str, update_space.FactorPair]


def clip_scales(updates: Sequence[ChangePairs], clip_norm: float) -> tuple[list[float], list[bool]]:
    """Per client, the factor its whole update is scaled by (``min(1, C / ‖u_k‖)``, Flower's FlatClip; 1 for a
    zero update) and whether it was clipped."""
    scales, flags = [], []
    for pairs in updates:
        norm = update_space.update_norm(pairs)
        scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
        scales.append(scale)
        flags.append(scale < 1.0)
    return scales, flags


def clipped_mean(updates: Sequence[ChangePairs], shapes: Mapping[str, tuple[int, ...]],
                 clip_norm: float) -> tuple[dict[str, np.ndarray], list[bool]]:
    """The equal-weight mean of the clipped updates as dense float32 tensors, one per name of ``shapes`` (modules
    by name, head tensors under ``HEAD_PREFIX``; zero where no client changed it), and which updates were clipped."""
    scales, flags = clip_scales(updates, clip_norm)
    mean: dict[str, np.ndarray] = {}
    for name, shape in shapes.items():
        total = np.zeros(shape, np.float64)
        for scale, pairs in zip(scales, updates, strict=True):
            if name in pairs:
                u, v = pairs[name]
                total += (scale * (u @ v)).reshape(shape)
        mean[name] = (total / len(updates)).astype(np.float32)
    return mean, flags


def private_aggregate(privacy: ServerPrivacy, server_round: int, updates: Sequence[ChangePairs],
                      shapes: Mapping[str, tuple[int, ...]], current: Mapping[str, LoraFactors],
                      current_head: Mapping[str, np.ndarray], global_rank: int) -> tuple[dict[str, np.ndarray], float]:
    """The new global state (``<module>.a``/``.b`` and ``head/<key>``) from the accepted clients' ``updates``, and
    the Frobenius norm the re-factoring dropped.

    ``shapes`` names every module some client's plan adapts (``(out, in)``) and every head tensor (under
    ``HEAD_PREFIX``): the noise covers all of them whoever took part this round. ``current`` and ``current_head``
    are the global ΔW factors and head the round started from; modules outside ``shapes`` keep their factors.
    """
    mean, flags = clipped_mean(updates, shapes, privacy.clip_norm)
    noised = privacy.noised_mean(server_round, mean, flags)
    state: dict[str, np.ndarray] = {}
    dropped_sq = 0.0
    for module in sorted(set(current) | {name for name in shapes if not name.startswith(HEAD_PREFIX)}):
        if module in noised:
            dense = noised[module].astype(np.float64)
            if module in current:
                dense = dense + current[module].delta()
            rank = min(global_rank, *dense.shape)
            new, dropped = factorize_delta(dense, rank, alpha=float(rank), dtype=np.float32)
            dropped_sq += float(np.sum(dropped ** 2))
        else:
            new = current[module]
        state[f"{module}.a"], state[f"{module}.b"] = new.a.astype(np.float32), new.b.astype(np.float32)
    for key, value in current_head.items():
        state[HEAD_PREFIX + key] = (value.astype(np.float64) + noised[HEAD_PREFIX + key]).astype(np.float32)
    return state, float(np.sqrt(dropped_sq))
