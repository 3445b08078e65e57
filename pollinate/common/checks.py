"""Validation of peer-supplied tensors: one rejection type for every path that checks an update."""

from __future__ import annotations

import numpy as np


class UpdateRejected(ValueError):
    """An incoming bundle failed validation.

    ``reason`` is a short machine-readable tag for metrics (``"size"``, ``"garbled"``, ``"version"``,
    ``"duplicate"``, ``"unknown-tensor"``, ``"shape"``, ``"encoding"``, ``"dtype"``, ``"payload-length"``,
    ``"index"``, ``"non-finite"``, ``"norm"``); ``tensor`` names the offending tensor when there is one.
    """

    def __init__(self, message: str, *, reason: str = "invalid", tensor: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.tensor = tensor



def check_arrays(arrays: dict[str, np.ndarray], expected: dict[str, tuple[int, ...]],
                 norm_bound: float | None = None) -> None:
    """Every expected tensor present with its shape, float32, finite, and (optionally) norm-bounded."""
    unknown = sorted(set(arrays) - set(expected))
    if unknown:
        raise UpdateRejected(f"unknown tensor name '{unknown[0]}'")
    missing = sorted(set(expected) - set(arrays))
    if missing:
        raise UpdateRejected(f"missing tensor '{missing[0]}'")
    for name, value in arrays.items():
        if tuple(value.shape) != tuple(expected[name]):
            raise UpdateRejected(f"tensor '{name}' has shape {tuple(value.shape)}, expected {tuple(expected[name])}")
        if value.dtype != np.float32:
            raise UpdateRejected(f"tensor '{name}' has dtype {value.dtype}, expected float32")
        if not np.isfinite(value).all():
            raise UpdateRejected(f"tensor '{name}' contains NaN or Inf")
    if norm_bound is not None:
        norm = float(np.sqrt(sum(float(np.square(v, dtype=np.float64).sum()) for v in arrays.values())))
        if norm > norm_bound:
            raise UpdateRejected(f"update L2 norm {norm:.3g} exceeds the bound {norm_bound:.3g}")
