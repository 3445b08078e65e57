"""The interface every method's client half implements: the module named by ``register_method(client=...)``."""

from __future__ import annotations

from types import ModuleType
from typing import Protocol, runtime_checkable

from flwr.app import Context, Message, RecordDict

from pollinate.common.config import RunConfig


@runtime_checkable
class ClientHalf(Protocol):
    """A method's client half; ``train`` is required.

    ``train(msg, cfg, context)`` runs one round on this client and returns ``runtime.training_reply(...)``: the
    one reply shape (``arrays``, ``metrics`` with ``num-examples``, ``client_id`` and ``train_loss``, and
    ``profile``). ``cfg`` holds the sections the method's client half reads (``MethodSpec.client_sections``).
    A half may also define ``evaluate`` (see ``EvaluatingClientHalf``).
    """

    def train(self, msg: Message, cfg: RunConfig, context: Context) -> RecordDict: ...


@runtime_checkable
class EvaluatingClientHalf(ClientHalf, Protocol):
    """A client half that also evaluates the global model on this client's held-out examples (Flower's evaluate
    message, ``eval.client_fraction``); optional. ``evaluate(msg, cfg, context)`` loads the message's global state
    and returns ``runtime.evaluation_reply(...)``. A half without it answers that it evaluated nothing."""

    def evaluate(self, msg: Message, cfg: RunConfig, context: Context) -> RecordDict: ...


@runtime_checkable
class PreparingClientHalf(ClientHalf, Protocol):
    """A client half that also answers the server's round 0 (``message_type = "train.prepare"``), e.g. FedPipe's
    profile and importance scores before planning; optional."""

    def prepare(self, msg: Message, cfg: RunConfig, context: Context) -> RecordDict: ...


def checked_half(method: str, module: ModuleType, *, prepare: bool = False) -> ClientHalf:
    """``module`` as a client half of ``method``; a TypeError names what it lacks."""
    needed = PreparingClientHalf if prepare else ClientHalf
    if not isinstance(module, needed):
        what = "train and prepare" if prepare else "train"
        raise TypeError(f"method {method!r}: client half {module.__name__} must define {what}, each "
                        f"(msg, cfg, context) -> RecordDict (see pollinate.client.half.{needed.__name__})")
    return module
