"""Client-side error feedback: what a lossy encoding dropped is sent later, not lost."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from pollinate.methods.fedpipe.codec.bundle import decode_bundle, encode_bundle


class ErrorFeedback:
    """Client-side residual memory that makes lossy encodings unbiased over rounds (EF-SGD).

    Each ``encode`` sends ``C(delta + residual)`` and keeps ``delta + residual − decoded`` for the next
    call, so what the compressor drops is delayed, not lost (Stich et al. 2018; Karimireddy et al. 2019).
    A tensor absent from a call keeps its residual; a tensor whose shape changed (a new planned rank)
    starts afresh, since the old residual lives in a factor space that no longer exists.

    Dropped entries return up to ~1/fraction calls later, so top-k with EF needs a step size of about
    ``fraction / L`` to stay stable. Across heterogeneous clients plain EF still leaves an error floor.

    Parameters
    ----------
    residuals : Mapping[str, np.ndarray], optional
        Residuals kept from earlier calls (e.g. restored from Flower's ``context.state``).
    """

    def __init__(self, residuals: Mapping[str, np.ndarray] | None = None) -> None:
        self._residual: dict[str, np.ndarray] = {
            k: np.asarray(v, dtype=np.float32) for k, v in (residuals or {}).items()
        }

    @property
    def residuals(self) -> dict[str, np.ndarray]:
        return dict(self._residual)

    def residual_norm(self) -> float:
        """Global L2 norm of what has been dropped and not yet sent."""
        return math.sqrt(sum(float(np.sum(r.astype(np.float64) ** 2)) for r in self._residual.values()))

    def reset(self) -> None:
        self._residual.clear()

    def encode(
        self, deltas: Mapping[str, np.ndarray], encoding: str | Mapping[str, str], **kwargs: object
    ) -> bytes:
        """``encode_bundle`` of ``deltas`` plus the stored residual; keyword arguments pass through."""
        corrected: dict[str, np.ndarray] = {}
        for name, delta in deltas.items():
            d = np.asarray(delta, dtype=np.float32)
            r = self._residual.get(name)
            corrected[name] = d + r if r is not None and r.shape == d.shape else d
        payload = encode_bundle(corrected, encoding, **kwargs)  # type: ignore[arg-type]
        # Our own payload: its tensors are exactly the ones just encoded.
        decoded = decode_bundle(payload, expected_shapes={k: v.shape for k, v in corrected.items()}).tensors
        for name, c in corrected.items():
            self._residual[name] = c - decoded[name]
        return payload
