"""Where a round's wall time goes, as the server sees it: the round record's ``timing``.

Flower's ``Strategy.start`` runs a round as configure_train → ``send_and_receive`` → aggregate_train →
configure_evaluate → ``send_and_receive`` → aggregate_evaluate → ``evaluate_fn`` (Pollinate's ``end_round``). The
strategy marks the hooks' edges, so the phases are:

- ``train_seconds``: from the end of configure_train to the start of aggregate_train (the train messages out,
  the clients' training, the last reply in: Ray or network transfer and serialization included);
- ``aggregate_seconds``: aggregate_train (checking and decoding every reply, aggregating, the server optimizer);
- ``client_eval_seconds``: from the end of configure_evaluate to the start of aggregate_evaluate (the evaluate
  messages' round trip; near 0 when none are sent);
- ``eval_seconds``: the server's evaluation of the global model (0 in a round ``eval.every`` skips);
- ``checkpoint_seconds``: writing the round's checkpoint;
- ``other_seconds``: the rest of the round's wall time (sampling and building the messages, checking the
  client-side evaluation replies, recording the round).

With ``eval.overlap`` (``server.eval_overlap``) every round's evaluation except the last's runs while the next round
trains: its ``eval_seconds`` is that evaluation's own duration, outside the round's ``seconds`` (the other
phases still add up to it), and every round has ``eval_wait_seconds``: the time its ``end_round`` waited for
the previous round's evaluation to finish (0 when it already had), part of its ``seconds``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

PHASES = ("train", "eval", "client_eval", "aggregate", "checkpoint")


class RoundTiming:
    """One round at a time: phase durations from marks at the strategy's hooks, then the round's ``timing``.

    Parameters
    ----------
    clock : callable, default ``time.perf_counter``
        Seconds from an arbitrary origin.
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self.start()

    def start(self) -> None:
        """A new round begins now (configure_train is called)."""
        self.started = self.clock()
        self.spans = dict.fromkeys(PHASES, 0.0)
        self._opened: dict[str, float] = {}

    def open(self, phase: str) -> None:
        """``phase`` runs from now until :meth:`close` (e.g. the messages are out, the replies not yet in)."""
        self._opened[phase] = self.clock()

    def close(self, phase: str) -> None:
        """``phase`` ends now; nothing is counted when it was never opened (a hook called on its own)."""
        opened = self._opened.pop(phase, None)
        if opened is not None:  # a phase beyond PHASES (eval_wait) appears once measured
            self.spans[phase] = self.spans.get(phase, 0.0) + self.clock() - opened

    @contextmanager
    def measure(self, phase: str) -> Iterator[None]:
        """Count the enclosed block towards ``phase``."""
        self.open(phase)
        try:
            yield
        finally:
            self.close(phase)

    def round_fields(self, checkpointed: bool = True) -> dict[str, Any]:
        """The round record's ``seconds`` (wall time since the round began) and ``timing``. Before the round's
        checkpoint is written (what the checkpoint keeps of the round), ``checkpointed`` is False:
        checkpoint_seconds is None and other_seconds covers what ran until then."""
        wall = self.clock() - self.started
        timing: dict[str, float | None] = {f"{phase}_seconds": round(span, 3) for phase, span in self.spans.items()}
        if not checkpointed:
            timing["checkpoint_seconds"] = None
        timing["other_seconds"] = round(max(0.0, wall - sum(self.spans.values())), 3)
        return {"seconds": round(wall, 3), "timing": timing}
