"""Server optimizers (``federation.server_optimizer``): how the aggregated client update moves the global model.

The aggregate of a round (``federation.aggregator``) is a candidate global state; its difference to the round's
global is a pseudo-gradient that a server optimizer applies with its own state (Reddi et al. 2021, "Adaptive
Federated Optimization"; Hsu et al. 2019 for FedAvgM). The update rules are Flower 1.42's, expression for
expression, on named numpy tensors instead of Flower's ``ArrayRecord`` round trip:

- ``fedavgm``: ``flwr.serverapp.strategy.FedAvgM.aggregate_train``: ``g = global - aggregate``;
  ``v = g`` on the first step, then ``v = momentum · v + g``; ``global - lr · v``. With momentum 0 and lr 1
  Flower returns the aggregate itself, and so does this module (no optimizer at all).
- ``fedadam``: ``flwr.serverapp.strategy.FedAdam.aggregate_train`` (``FedOpt._compute_deltat_and_mt``):
  ``d = aggregate - global``; ``m = β1·m + (1-β1)·d``; ``v = β2·v + (1-β2)·d²`` (both from zeros);
  ``global + lr · √(1-β2^(t+1)) / (1-β1^(t+1)) · m / (√v + τ)``, ``t`` the server round as Flower counts it.
- ``fedyogi``: ``flwr.serverapp.strategy.FedYogi.aggregate_train``: the same ``m``;
  ``v = v - (1-β2)·d²·sign(v - d²)``; ``global + lr · m / (√v + τ)``.

The state is per tensor name, so any method's trained state (or FedPipe's ΔW per module) can be stepped; it is
checkpointed with each round (``state``/``load_state``) so a resumed run continues with the same moments.
"""

from __future__ import annotations

import numpy as np

from pollinate.common.config import FederationConfig

# State tensor names: "<slot>/<tensor name>"; slots are "momentum" (fedavgm), "m" and "v" (fedadam, fedyogi).
_SLOTS = {"fedavgm": ("momentum",), "fedadam": ("m", "v"), "fedyogi": ("m", "v")}

State = dict[str, np.ndarray]


class ServerOptimizer:
    """One server optimizer and its state per tensor name; see the module docstring for the rules.

    Parameters
    ----------
    name : str
        ``fedavgm``, ``fedadam`` or ``fedyogi``.
    lr : float
        Server learning rate (Flower's ``server_learning_rate`` / ``eta``).
    momentum : float
        FedAvgM momentum; β1 of FedAdam/FedYogi.
    beta2 : float, default 0.99
        β2 of FedAdam/FedYogi.
    tau : float, default 1e-3
        Adaptivity τ of FedAdam/FedYogi.
    """

    def __init__(self, name: str, lr: float, momentum: float, beta2: float = 0.99, tau: float = 1e-3) -> None:
        if name not in _SLOTS:
            raise ValueError(f"server optimizer {name!r}: expected one of {', '.join(_SLOTS)}")
        self.name, self.lr, self.momentum, self.beta2, self.tau = name, lr, momentum, beta2, tau
        self.slots: dict[str, State] = {slot: {} for slot in _SLOTS[name]}

    def step(self, current: State, aggregated: State, server_round: int) -> State:
        """The new global state from the round's global ``current`` and the ``aggregated`` client states (same
        names and shapes), in ``current``'s dtypes. The optimizer state changes only when the step succeeds."""
        _check_matching(current, aggregated)
        rule = {"fedavgm": self._fedavgm, "fedadam": self._fedadam, "fedyogi": self._fedyogi}[self.name]
        new_global, slots = {}, {slot: dict(values) for slot, values in self.slots.items()}
        for key in sorted(current):
            new_global[key] = np.asarray(rule(key, current[key], aggregated[key], slots, server_round),
                                         dtype=current[key].dtype)
        self.slots = slots
        return new_global

    def _fedavgm(self, key: str, old: np.ndarray, new: np.ndarray, slots: dict[str, State], _round: int):
        pseudo_gradient = old - new
        if self.momentum > 0.0:
            previous = slots["momentum"].get(key)
            pseudo_gradient = pseudo_gradient if previous is None else self.momentum * previous + pseudo_gradient
            slots["momentum"][key] = pseudo_gradient
        return old - self.lr * pseudo_gradient

    def _first_moment(self, key: str, delta: np.ndarray, slots: dict[str, State]) -> np.ndarray:
        m = slots["m"].get(key, np.zeros_like(delta))
        slots["m"][key] = self.momentum * m + (1 - self.momentum) * delta
        return slots["m"][key]

    def _fedadam(self, key: str, x: np.ndarray, aggregated: np.ndarray, slots: dict[str, State], server_round: int):
        delta = aggregated - x
        m = self._first_moment(key, delta, slots)
        v = slots["v"].get(key, np.zeros_like(delta))
        slots["v"][key] = v = self.beta2 * v + (1 - self.beta2) * (delta ** 2)
        # Flower's bias correction counts from its server round + 1 (FedAdam.aggregate_train), kept as is.
        eta_norm = (self.lr * np.sqrt(1 - np.power(self.beta2, server_round + 1.0))
                    / (1 - np.power(self.momentum, server_round + 1.0)))
        return x + eta_norm * m / (np.sqrt(v) + self.tau)

    def _fedyogi(self, key: str, x: np.ndarray, aggregated: np.ndarray, slots: dict[str, State], _round: int):
        delta = aggregated - x
        m = self._first_moment(key, delta, slots)
        v = slots["v"].get(key, np.zeros_like(delta))
        slots["v"][key] = v = v - (1.0 - self.beta2) * (delta ** 2) * np.sign(v - delta ** 2)
        return x + self.lr * m / (np.sqrt(v) + self.tau)

    def state(self) -> State:
        """The optimizer state as named arrays (``<slot>/<tensor>``), for the round's checkpoint."""
        return {f"{slot}/{key}": value for slot, values in self.slots.items() for key, value in values.items()}

    def load_state(self, state: State) -> None:
        """Restore what :meth:`state` returned (a resumed run)."""
        slots: dict[str, State] = {slot: {} for slot in _SLOTS[self.name]}
        for name, value in state.items():
            slot, _, key = name.partition("/")
            if slot not in slots or not key:
                raise ValueError(f"server optimizer state entry {name!r}: expected '<slot>/<tensor>' with slot "
                                 f"one of {', '.join(slots)} ({self.name})")
            slots[slot][key] = np.asarray(value)
        self.slots = slots


def server_optimizer_for(federation: FederationConfig) -> ServerOptimizer | None:
    """The run's server optimizer; None when the aggregate itself is the new global (``fedavg``, and ``fedavgm``
    with momentum 0 and lr 1, as in Flower's FedAvgM)."""
    name = federation.server_optimizer
    if name == "fedavg" or (name == "fedavgm" and federation.server_momentum == 0 and federation.server_lr == 1):
        return None
    return ServerOptimizer(name, federation.server_lr, federation.server_momentum, federation.server_beta2,
                           federation.server_tau)


def _check_matching(current: State, aggregated: State) -> None:
    if set(current) != set(aggregated):
        differing = sorted(set(current) ^ set(aggregated))
        raise ValueError(f"server optimizer: tensor '{differing[0]}' is in only one of the global and the "
                         "aggregated state; expected the same tensor names")
    for key, value in current.items():
        if value.shape != aggregated[key].shape:
            raise ValueError(f"server optimizer: tensor '{key}' has shape {aggregated[key].shape} in the aggregate, "
                             f"expected {value.shape} as in the global state")
