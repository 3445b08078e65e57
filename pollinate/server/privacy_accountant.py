"""The privacy accountant: Opacus's RDP accountant (Mironov 2017; the sampled Gaussian mechanism of Mironov et al.
2019) over a run's rounds, one Gaussian release per round at the run's client sampling rate.

Opacus is an optional dependency (the ``privacy`` extra); only runs with ``privacy.dp`` other than ``none`` import
it, and they fail at start with a one-line error naming the extra when it is missing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from pollinate.common.config import ConfigError

INSTALL_HINT = "pip install 'pollinate[privacy]'"


def _opacus() -> Any:
    try:
        from opacus.accountants import RDPAccountant
        from opacus.accountants.utils import get_noise_multiplier
    except ImportError as exc:
        raise ConfigError(f"privacy.dp needs Opacus for its privacy accountant ({exc.name} is not installed): "
                          f"{INSTALL_HINT}") from None
    return RDPAccountant, get_noise_multiplier


@dataclass(frozen=True)
class RoundAccountant:
    """(ε, δ) spent after a number of rounds of the Gaussian mechanism.

    Parameters
    ----------
    noise_multiplier : float
        Noise standard deviation / clip norm of each round's release (0: no guarantee, ε is infinite).
    sample_rate : float
        Probability that a client takes part in a round (clients per round / clients; 1 = no amplification).
    delta : float
        The δ at which ε is reported.
    """

    noise_multiplier: float
    sample_rate: float
    delta: float

    def epsilon(self, rounds: int) -> float:
        """ε after ``rounds`` releases (``math.inf`` without noise, 0 before any)."""
        if rounds <= 0:
            return 0.0
        if self.noise_multiplier <= 0:
            return math.inf
        rdp_accountant, _ = _opacus()
        accountant = rdp_accountant()
        accountant.history = [(self.noise_multiplier, self.sample_rate, int(rounds))]
        return float(accountant.get_epsilon(delta=self.delta))


def noise_for_epsilon(target_epsilon: float, delta: float, sample_rate: float, rounds: int) -> float:
    """The noise multiplier with which ``rounds`` releases at ``sample_rate`` spend at most ``target_epsilon``
    (Opacus's ``get_noise_multiplier``, RDP accountant)."""
    _, get_noise_multiplier = _opacus()
    try:
        return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                          sample_rate=sample_rate, steps=int(rounds), accountant="rdp"))
    except ValueError as exc:
        raise ConfigError(f"privacy.target_epsilon = {target_epsilon!r} cannot be met over {rounds} rounds at "
                          f"sampling rate {sample_rate:g}: {exc}") from None
