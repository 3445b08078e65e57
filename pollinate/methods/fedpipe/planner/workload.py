"""What one client's training steps cost beyond its profile: how long its examples are, and how fast it measured.

A batch is padded to its longest example (``common.data.collate``), so a step at batch ``s`` computes
``s x W`` tokens, ``W`` the longest of ``s`` examples drawn from the client's data. The client reports its
examples' token lengths as quantiles at evenly spaced levels (minimum first, maximum last); the cost model reads
them as a piecewise-linear quantile function ``Q`` and takes, per batch size, ``E[W]`` and ``E[W^2]`` (the
maximum of ``s`` uniform draws has density ``s u^(s-1)`` on ``[0, 1]``: ``E[g(W)] = ∫ g(Q(u)) s u^(s-1) du``)
and, for memory, the longest example (a batch of them is the worst case).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

__all__ = ["TOKEN_LEVELS", "SequenceWidths", "Workload", "sequence_widths", "token_quantiles"]

TOKEN_LEVELS = 16  # quantiles a client reports: a bounded summary whatever its example count
_GRID = 256  # midpoints of [0, 1] the expectations are integrated on


def token_quantiles(lengths: Sequence[int], levels: int = TOKEN_LEVELS) -> list[int]:
    """``levels`` quantiles of ``lengths`` at levels ``0, 1/(levels-1), ..., 1`` (observed values: the first is
    the shortest example, the last the longest)."""
    if not lengths:
        raise ValueError("token_quantiles needs at least one example length")
    values = np.quantile(np.asarray(lengths, dtype=float), np.linspace(0.0, 1.0, levels), method="inverted_cdf")
    return [int(v) for v in values]


@dataclass(frozen=True)
class SequenceWidths:
    """Padded widths of many clients' batches: ``mean`` and ``mean_square`` are (clients, batch sizes) ``E[W]``
    and ``E[W^2]``, ``longest`` is (clients,) the longest width any of a client's batches can have."""

    mean: np.ndarray
    mean_square: np.ndarray
    longest: np.ndarray


def sequence_widths(quantiles: Sequence[Sequence[int]], batch_sizes: Sequence[int], seq_len: int) -> SequenceWidths:
    """Padded widths of batches drawn from clients with these token-length quantiles (one row per client; an
    empty row: every example ``seq_len`` tokens, the cost model's default)."""
    sizes = np.asarray(batch_sizes, dtype=float)
    mean = np.full((len(quantiles), len(sizes)), float(seq_len))
    mean_square = np.full((len(quantiles), len(sizes)), float(seq_len) * float(seq_len))
    longest = np.full(len(quantiles), float(seq_len))
    u = (np.arange(_GRID) + 0.5) / _GRID
    density = sizes[:, None] * u[None, :] ** (sizes[:, None] - 1.0)
    density /= density.sum(axis=1, keepdims=True)  # the midpoint rule's weights, normalised to sum 1
    for levels in {len(q) for q in quantiles} - {0}:  # rows of one length interpolate together
        rows = [i for i, q in enumerate(quantiles) if len(q) == levels]
        q = np.array([quantiles[i] for i in rows], dtype=float)
        position = u * (levels - 1)
        below = np.minimum(position.astype(int), levels - 2)
        frac = position - below
        widths = q[:, below] * (1.0 - frac) + q[:, below + 1] * frac  # (rows, grid) piecewise-linear Q(u)
        mean[rows], mean_square[rows], longest[rows] = widths @ density.T, widths**2 @ density.T, q[:, -1]
    return SequenceWidths(mean, mean_square, longest)


@dataclass(frozen=True)
class Workload:
    """One client's steps beyond its profile (hashable: clients with equal workloads and budgets share one plan).

    Parameters
    ----------
    token_quantiles : tuple of int, default ()
        Token lengths of its training examples after truncation, at evenly spaced quantile levels (shortest
        first, longest last); empty: every example ``PlanOptions.seq_len`` tokens long.
    time_scale : tuple of (int, float), default ()
        ``(bits, factor)`` pairs: the client's measured step time over the cost model's for it at those bits;
        bits not listed have factor 1 (``PlanOptions.time_factor`` alone).
    comm_scale : float, default 1.0
        Measured over modelled communication seconds.
    step_overhead : tuple of (int, float), default ()
        ``(bits, flops)`` pairs: FLOPs-equivalent of the part of a step at those bits that does not grow with its
        tokens (measured at two batch sizes), added to every step's FLOPs; bits not listed have none.
    """

    token_quantiles: tuple[int, ...] = ()
    time_scale: tuple[tuple[int, float], ...] = ()
    comm_scale: float = 1.0
    step_overhead: tuple[tuple[int, float], ...] = ()

    def __post_init__(self) -> None:
        q = self.token_quantiles
        if q and (len(q) < 2 or any(not isinstance(v, int) or v < 1 for v in q)
                  or any(b < a for a, b in zip(q, q[1:], strict=False))):
            raise ValueError(f"Workload.token_quantiles must be >= 2 non-decreasing ints >= 1, got {q!r}")
        for bits, factor in self.time_scale:
            if not isinstance(bits, int) or not math.isfinite(factor) or factor <= 0:
                raise ValueError(f"Workload.time_scale must be (bits, factor > 0) pairs, got {(bits, factor)!r}")
        for bits, flops in self.step_overhead:
            if not isinstance(bits, int) or not math.isfinite(flops) or flops < 0:
                raise ValueError(f"Workload.step_overhead must be (bits, flops >= 0) pairs, got {(bits, flops)!r}")
        if not math.isfinite(self.comm_scale) or self.comm_scale <= 0:
            raise ValueError(f"Workload.comm_scale must be > 0, got {self.comm_scale!r}")

    def time_factor(self, bits: int) -> float:
        """The measured correction at ``bits`` (1 where none was measured)."""
        return dict(self.time_scale).get(bits, 1.0)

    def with_time_factor(self, bits: int, factor: float) -> Workload:
        """This workload with the correction at ``bits`` replaced."""
        scales = dict(self.time_scale)
        scales[bits] = float(factor)
        return replace(self, time_scale=tuple(sorted(scales.items())))

    def overhead_flops(self, bits: int) -> float:
        """FLOPs a step at ``bits`` costs beyond its tokens (0 where none was measured)."""
        return dict(self.step_overhead).get(bits, 0.0)
