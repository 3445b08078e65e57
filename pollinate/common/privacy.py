"""Differential-privacy steps both sides share: clipping a client's update (Flower's FlatClip) and adding seeded
Gaussian noise, and the round-config entries that tell a client to apply local DP (docs/privacy.md).

The clipping reuses Flower's ``flwr.supercore.differential_privacy`` functions, which work on lists of NumPy
arrays; the noise is drawn from a ``numpy.random.Generator`` seeded from the run seed instead of Flower's
``add_gaussian_noise_inplace`` (which draws from NumPy's global RNG), so a run reproduces.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.supercore.differential_privacy import compute_adaptive_clip_model_update, get_norm

# Train-config keys of a round with local DP (absent otherwise): the clip norm and the noise multiplier.
DP_CLIP_KEY = "dp-clip-norm"
DP_NOISE_KEY = "dp-noise-multiplier"
# Reply metric of a client with local DP: 1 when its update was clipped this round.
DP_CLIPPED_METRIC = "dp_clipped"


def update_norm(state: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray]) -> float:
    """L2 norm of ``state - base`` over all tensors (Flower's ``get_norm``)."""
    return get_norm([np.subtract(state[name], base[name]) for name in sorted(state)])


def clip_update(state: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray],
                clip_norm: float) -> tuple[dict[str, np.ndarray], bool]:
    """``base + clip(state - base)`` with the change scaled to L2 norm at most ``clip_norm``, and whether it was
    scaled (Flower's ``compute_adaptive_clip_model_update``); ``state`` is not modified."""
    names = sorted(state)
    if update_norm(state, base) == 0.0:  # Flower divides by the norm
        return {name: np.array(state[name], copy=True) for name in names}, False
    current = [np.array(state[name], copy=True) for name in names]
    clipped = compute_adaptive_clip_model_update(current, [base[name] for name in names], clip_norm)
    return dict(zip(names, current, strict=True)), bool(clipped)


def add_noise(arrays: Mapping[str, np.ndarray], std: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Each tensor plus i.i.d. N(0, std²) noise in its own dtype, drawn in name order from ``rng``."""
    if std <= 0:
        return {name: np.array(arrays[name], copy=True) for name in sorted(arrays)}
    return {name: (arrays[name] + rng.normal(0.0, std, np.shape(arrays[name]))).astype(np.asarray(arrays[name]).dtype)
            for name in sorted(arrays)}


def local_dp_entries(clip_norm: float, noise_multiplier: float) -> dict[str, float]:
    """What a round's train config carries when the clients must apply local DP."""
    return {DP_CLIP_KEY: float(clip_norm), DP_NOISE_KEY: float(noise_multiplier)}


def read_local_dp(config: Mapping[str, Any]) -> tuple[float, float] | None:
    """``(clip_norm, noise_multiplier)`` from a train config, or None when the round asks for no local DP."""
    if DP_CLIP_KEY not in config:
        return None
    clip, noise = config.get(DP_CLIP_KEY), config.get(DP_NOISE_KEY)
    for key, value in ((DP_CLIP_KEY, clip), (DP_NOISE_KEY, noise)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"train config '{key}' = {value!r}: expected a finite float >= 0")
    if clip <= 0:
        raise ValueError(f"train config '{DP_CLIP_KEY}' = {clip!r}: expected a float > 0")
    return float(clip), float(noise)
