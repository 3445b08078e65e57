"""Gaussian noise on the smashed activations a client sends to the split service (``sfprompt.activation_noise``).

The split-learning mitigation against input reconstruction from intermediate activations (Titcombe et al. 2021,
"Practical defences against model inversion attacks for split neural networks"): every activation tensor ``h``
that leaves the client becomes ``h + N(0, (σ · RMS(h))²)``, σ = ``activation_noise``. The scale is relative to
each request's own RMS (over every value sent) so that one σ means one signal-to-noise ratio (1/σ²) whatever the
model and cut point. The noise is a constant to autograd: the gradient at ``h`` is the gradient at ``h + noise``,
so prompts and tail train through it. It is heuristic protection, with no differential-privacy guarantee.
"""

from __future__ import annotations

import torch

from pollinate.common.seeds import derive_seed
from pollinate.methods.sfprompt.split import BodyFn

TRAINING, EVALUATION = 0, 1  # the phase part of the seed: one round's two uses of the split plane draw apart


class NoisyBody:
    """``body`` behind Gaussian noise on its input activations; the k-th call of a (round, client, phase) draws
    the k-th noise of a generator seeded from the run seed, so runs reproduce.

    Parameters
    ----------
    body : callable
        ``body(hidden, attention_mask) -> hidden`` (the split service's, e.g. ``SplitChannel.body``).
    scale : float
        σ, the noise's standard deviation as a multiple of the RMS of each tensor sent (> 0).
    seed : int
        Seed of this (round, client, phase)'s noise (``activation_noise_seed``).
    """

    def __init__(self, body: BodyFn, scale: float, seed: int) -> None:
        if not scale > 0:
            raise ValueError(f"activation noise scale={scale}: expected a float > 0 (0 = leave the body as it is)")
        self.body = body
        self.scale = float(scale)
        self._generator = torch.Generator().manual_seed(int(seed))

    def noise_for(self, hidden: torch.Tensor) -> torch.Tensor:
        """The next noise tensor for ``hidden``, drawn on the CPU (the same numbers on any device), detached."""
        rms = hidden.detach().float().square().mean().sqrt()
        draw = torch.randn(hidden.shape, generator=self._generator, dtype=torch.float32)
        return (draw.to(hidden.device) * (self.scale * rms)).to(hidden.dtype)

    def __call__(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.body(hidden + self.noise_for(hidden), attention_mask)


def activation_noise_seed(run_seed: int, server_round: int, client_id: int, phase: int) -> int:
    """The noise seed of one client's ``phase`` (``TRAINING`` or ``EVALUATION``) in ``server_round``."""
    return derive_seed(run_seed, "client-activation-noise", server_round, client_id, phase)


def with_activation_noise(body: BodyFn, scale: float, seed: int) -> BodyFn:
    """``body`` itself when ``scale`` is 0 (nothing drawn, nothing changed), else ``NoisyBody``."""
    return body if scale == 0 else NoisyBody(body, scale, seed)
