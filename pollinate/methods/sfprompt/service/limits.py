"""What the split service admits before it runs the body: request shapes, sessions, activation memory.

``SplitLimits`` holds the bounds; ``GraphCost`` estimates a step's activation memory from its shape alone, so a
step that would not fit is refused before any compute (the bytes are measured again after the body ran).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

_CALIBRATION_SEQ = 16


@dataclass(frozen=True)
class SplitLimits:
    """Bounds the split service enforces on every request.

    Parameters
    ----------
    max_batch : int, default 64
        Sequences in one request.
    max_seq_len : int, default 2048
        Positions of one sequence, prompt included; the service also caps it at the body's
        ``max_position_embeddings``.
    max_sessions : int, default 64
        Live sessions, all nodes together.
    sessions_per_client : int, default 2
        Live sessions of one node (one token cannot hold the whole table).
    max_graph_bytes : int, default 4 GiB
        Activation memory of every step together: graphs held for their Backward and steps being computed.
    client_activation_budget_bytes : int, default 0
        Activation memory of one node's steps; 0 = ``sessions_per_client`` steps of ``max_batch`` x
        ``max_seq_len`` as ``GraphCost`` estimates them (at most ``max_graph_bytes``).
    """

    max_batch: int = 64
    max_seq_len: int = 2048
    max_sessions: int = 64
    sessions_per_client: int = 2
    max_graph_bytes: int = 4 * 1024**3
    client_activation_budget_bytes: int = 0

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_seq_len", "max_sessions", "sessions_per_client", "max_graph_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"split service {name}={value!r}: expected an int >= 1")
        if not isinstance(self.client_activation_budget_bytes, int) or self.client_activation_budget_bytes < 0:
            raise ValueError(f"split service client_activation_budget_bytes={self.client_activation_budget_bytes!r}:"
                             f" expected an int >= 0 (0 = derived from max_batch and max_seq_len)")
        if self.sessions_per_client > self.max_sessions:
            raise ValueError(f"split service sessions_per_client={self.sessions_per_client} exceeds "
                             f"max_sessions={self.max_sessions}")


@dataclass(frozen=True)
class GraphCost:
    """Activation bytes of one body step of ``batch`` sequences of ``seq`` positions:
    ``batch * (per_position * seq + per_pair * seq**2)``.

    The linear term is what each block keeps per position, the quadratic one attention scores and masks. Fitted
    with ``calibrate`` on two small steps of the real body, padded so that the attention mask is materialised.
    """

    per_position: float
    per_pair: float = 0.0

    def estimate(self, batch: int, seq: int) -> int:
        return math.ceil(batch * (self.per_position * seq + self.per_pair * seq * seq))

    @classmethod
    def calibrate(cls, measure: Callable[[int], int], max_seq_len: int) -> GraphCost:
        """Fit on ``measure(seq)``, the bytes one sequence of ``seq`` positions keeps, at two lengths <= 16."""
        long = max(1, min(_CALIBRATION_SEQ, max_seq_len))
        short = max(1, long // 2)
        at_long = measure(long)
        if short == long:
            return cls(per_position=at_long / long)
        at_short = measure(short)
        # Two equations a*s + b*s² = f(s); negative coefficients (allocator noise) would under-count.
        per_pair = max(0.0, (short * at_long - long * at_short) / (short * long * (long - short)))
        per_position = max(0.0, (at_short - per_pair * short * short) / short, at_long / long - per_pair * long)
        return cls(per_position=per_position, per_pair=per_pair)
