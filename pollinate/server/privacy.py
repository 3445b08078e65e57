"""Differential privacy on the server half of the dense methods (``StateFedAvg``; docs/privacy.md).

- ``central``: Flower's DifferentialPrivacyServerSideFixedClipping math (McMahan et al. 2018, "Learning
  Differentially Private Recurrent Language Models"): every client's update (its state minus the global) is
  clipped to L2 norm ``clip_norm`` (``common.privacy.clip_update``, Flower's FlatClip), the clipped updates are
  averaged with equal weights (example weights would let one client's share exceed ``1/n``), and Gaussian noise
  of standard deviation ``σ · clip_norm / n`` (Flower's ``compute_stdv``) is added to the mean. With
  ``adaptive_clipping`` the clip norm follows a noisy count of clipped updates towards the median norm (Andrew
  et al. 2021, with Flower's DifferentialPrivacyServerSideAdaptiveClipping defaults: target quantile 0.5,
  learning rate 0.2, count noise ``n / 20``, the update noise raised so the pair of releases has noise
  multiplier σ).
- ``local``: the clients clip and noise (``client.privacy``); the server sends them the clip norm and σ in the
  round's train config and aggregates what arrives as it is.

The noise is seeded per round from the run seed (stream ``server-dp-noise``). ε after each round comes from
Opacus's RDP accountant (``server.privacy_accountant``): central DP at sampling rate clients per round / clients;
local DP at rate 1, since the server knows which clients took part and sampling hides nothing from it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.supercore.differential_privacy import compute_adaptive_noise_params, compute_stdv

from pollinate.common.config import ConfigError, RunConfig
from pollinate.common.privacy import DP_CLIPPED_METRIC, add_noise, clip_update, local_dp_entries
from pollinate.common.seeds import derive_seed
from pollinate.server.privacy_accountant import RoundAccountant, noise_for_epsilon

# Flower's DifferentialPrivacyServerSideAdaptiveClipping defaults (Andrew et al. 2021).
TARGET_CLIPPED_QUANTILE = 0.5
CLIP_NORM_LR = 0.2

Arrays = dict[str, np.ndarray]
Combine = Callable[[list[Arrays], list[float]], Arrays]


class ServerPrivacy:
    """The run's DP mechanism on the server and its accountant; see the module docstring.

    Parameters
    ----------
    cfg : RunConfig
        The run's config (``[privacy]``; ``[federation]`` gives the seed, clients, rounds and aggregator).
    sampled : int
        Clients sampled per round.
    """

    def __init__(self, cfg: RunConfig, sampled: int):
        privacy, fed = cfg.privacy, cfg.federation
        self.mode = privacy.dp
        if self.mode == "central" and fed.aggregator != "fedavg":
            raise ConfigError(f"privacy.dp = 'central' needs federation.aggregator = 'fedavg' (got "
                              f"{fed.aggregator!r}): the noise is calibrated to the sensitivity of the mean")
        self.run_seed = fed.seed
        self.sampled = sampled
        sample_rate = min(sampled / fed.clients, 1.0) if self.mode == "central" else 1.0
        self.noise_multiplier = (noise_for_epsilon(privacy.target_epsilon, privacy.delta, sample_rate, fed.rounds)
                                 if privacy.target_epsilon > 0 else privacy.noise_multiplier)
        self.accountant = RoundAccountant(self.noise_multiplier, sample_rate, privacy.delta)
        self.accountant.epsilon(1)  # Opacus is importable (a one-line error naming the extra, now, not in round 1)
        self.clip_norm = privacy.clip_norm
        self.adaptive = privacy.adaptive_clipping
        self.count_std, self.update_noise = 0.0, self.noise_multiplier
        if self.adaptive:
            try:
                self.count_std, self.update_noise = compute_adaptive_noise_params(self.noise_multiplier, sampled, None)
            except ValueError as exc:
                raise ConfigError(f"privacy.adaptive_clipping with noise_multiplier {self.noise_multiplier:.4g} and "
                                  f"{sampled} clients per round: {exc}") from None
        self._record: dict[str, Any] = {}

    @classmethod
    def for_run(cls, cfg: RunConfig, sampled: int) -> ServerPrivacy | None:
        """The mechanism of ``cfg.privacy``; None when ``dp`` is ``none``."""
        return None if cfg.privacy.dp == "none" else cls(cfg, sampled)

    def train_config_entries(self) -> dict[str, float]:
        """What each round's train config carries: the clip norm and σ with local DP, nothing with central."""
        return local_dp_entries(self.clip_norm, self.noise_multiplier) if self.mode == "local" else {}

    def aggregate(self, server_round: int, states: list[Arrays], weights: list[float], base: Arrays,
                  combine: Combine, reply_metrics: list[Any]) -> Arrays:
        """The new global state from the clients' ``states`` (their ``weights`` and ``reply_metrics`` in the same
        order): central DP clips, averages with equal weights and adds noise; local DP combines as given."""
        if self.mode == "local":
            self.note_local(server_round, reply_metrics)
            return combine(states, weights)
        clipped = [clip_update(state, base, self.clip_norm) for state in states]
        mean = combine([state for state, _ in clipped], [1.0] * len(clipped))
        return self.noised_mean(server_round, mean, [was_clipped for _, was_clipped in clipped])

    def note_local(self, server_round: int, reply_metrics: list[Any]) -> None:
        """Local DP: the round's ε and the share of clients that clipped (each reply's ``dp_clipped``)."""
        flags = [bool(metrics.get(DP_CLIPPED_METRIC, 0)) for metrics in reply_metrics]
        self._note(server_round, self.clip_norm, flags)

    def noised_mean(self, server_round: int, mean: Arrays, flags: list[bool]) -> Arrays:
        """Central DP's release: ``mean`` (the equal-weight mean of ``len(flags)`` updates clipped to ``clip_norm``;
        ``flags``: which were clipped) plus seeded noise of std σ·C/n, drawn tensor by tensor in name order; then
        the clip norm adapts (``adaptive_clipping``) and the round is recorded."""
        clip_norm = self.clip_norm
        rng = np.random.default_rng(derive_seed(self.run_seed, "server-dp-noise", server_round))
        noised = add_noise(mean, compute_stdv(self.update_noise, clip_norm, len(flags)), rng)
        if self.adaptive:
            self._adapt(flags, rng)
        self._note(server_round, clip_norm, flags)
        return noised

    def _adapt(self, flags: list[bool], rng: np.random.Generator) -> None:
        """Andrew et al.'s geometric update ``C ← C · exp(-η (b̄ - γ))``, ``b̄`` the noisy fraction of updates
        that were *not* clipped (norm ≤ C): too many unclipped, C shrinks; too many clipped, it grows. (Flower
        1.42 counts the clipped ones in the same formula, which drives C towards 0 once most are clipped.)"""
        unclipped = len(flags) - sum(flags)
        noisy_fraction = float(rng.normal(unclipped, self.count_std)) / len(flags)
        self.clip_norm *= math.exp(-CLIP_NORM_LR * (noisy_fraction - TARGET_CLIPPED_QUANTILE))

    def _note(self, server_round: int, clip_norm: float, flags: list[bool]) -> None:
        epsilon = self.accountant.epsilon(server_round)
        self._record = {
            "epsilon": None if math.isinf(epsilon) else epsilon, "delta": self.accountant.delta,
            "noise_multiplier": self.noise_multiplier, "clip_norm": clip_norm,
            "clipped_fraction": sum(flags) / len(flags) if flags else None,
        }

    def take_round_record(self) -> dict[str, Any] | None:
        """The round record's ``privacy`` field, once: ε spent so far (null: no noise, no guarantee), δ, σ, the
        clip norm used this round and the fraction of updates clipped; None when the round aggregated nothing."""
        record, self._record = self._record, {}
        return record or None
