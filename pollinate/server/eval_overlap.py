"""``eval.overlap``: the server evaluates round t's global model on a background thread while round t+1 trains.

The strategy's ``end_round`` hands round t's evaluation here (every ``eval.every`` round but the run's last,
which the final report needs at once), checkpoints round t as usual (its checkpointed record says
``eval_pending``) and holds its record back. The next ``end_round`` first waits for that evaluation (the time it
blocked is round t+1's ``timing.eval_wait_seconds``), puts its ``eval_loss`` and ``eval_metrics`` and its own
duration (``timing.eval_seconds``) into round t's record and records round t, so metrics.jsonl and the report
stay in round order and every record has the shape a synchronous run gives it.

- What the evaluation reads is safe to read from a second thread: the round's ``ArrayRecord`` is snapshotted
  (its arrays are immutable bytes), and each method's ``evaluate_global`` writes only the server's evaluation
  model, which nothing else uses until the last round's synchronous evaluation (``save_final`` comes after).
  Grad mode (``torch.no_grad``) is per thread. SFPrompt's evaluation model shares the frozen body with its split
  service: both only run forwards on it (the service already runs several at once), so neither a lock nor a copy
  is needed.
- An evaluation that fails is logged when it fails and its exception is raised from the next ``end_round``: the
  run stops with it as a synchronous evaluation error stops it (round t's checkpoint is kept, marked pending).
- A run resumed from a checkpoint whose evaluation was pending evaluates the restored global (round t's) in
  Flower's round-0 call and records round t then (``finish_restored``).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from logging import ERROR
from typing import Any

from flwr.app import ArrayRecord
from flwr.common.logger import log

from pollinate.common.report import RunRecorder
from pollinate.server.round_timing import RoundTiming

PENDING = "eval_pending"  # marks, in a checkpoint's history, the round whose evaluation had not finished

Evaluate = Callable[[ArrayRecord], dict[str, Any]]


class OverlappedEvaluation:
    """At most one server evaluation running beside the next round, and the record of the round it belongs to.

    Parameters
    ----------
    enabled : bool
        ``eval.overlap``; when False every method here does nothing and no round is held back.
    last_round : int
        ``federation.rounds``: that round is always evaluated synchronously.
    """

    def __init__(self, enabled: bool, last_round: int) -> None:
        self.enabled = enabled
        self.last_round = last_round
        self._running: Future | None = None
        self._record: dict[str, Any] | None = None

    def overlaps(self, server_round: int) -> bool:
        """Whether ``server_round``'s evaluation runs in the background (never the run's last)."""
        return self.enabled and server_round < self.last_round

    def start(self, server_round: int, evaluate: Evaluate, arrays: ArrayRecord, clock: Callable[[], float]) -> None:
        """Run ``evaluate`` on a snapshot of ``arrays`` on a thread of its own; ``hold`` the round's record next."""
        if self._running is not None:
            raise RuntimeError(f"round {server_round}: the previous round's evaluation was never joined")
        snapshot = ArrayRecord(dict(arrays))  # new Array wrappers around the same immutable bytes
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"pollinate-eval-{server_round}")
        self._running = executor.submit(_in_background, server_round, evaluate, snapshot, clock)
        executor.shutdown(wait=False)  # its thread ends once the evaluation has

    def checkpointed(self, record: dict[str, Any]) -> dict[str, Any]:
        """What the checkpoint keeps of ``record``: marked ``eval_pending`` while its evaluation runs."""
        return record if self._running is None else {**record, PENDING: True}

    def hold(self, record: dict[str, Any]) -> bool:
        """Keep ``record`` until its evaluation is joined; False (nothing held) when none is running."""
        if self._running is None:
            return False
        self._record = record
        return True

    def record_previous(self, recorder: RunRecorder, timing: RoundTiming) -> None:
        """Wait for the held round's evaluation (``timing``'s ``eval_wait``, 0 when none) and record that round;
        raises the evaluation's exception."""
        if not self.enabled:
            return
        with timing.measure("eval_wait"):
            running, record = self._running, self._record
            self._running = self._record = None
            if running is None:
                return
            evaluation, seconds = running.result()
        recorder.round_done(completed(record, evaluation, seconds))

    def finish_restored(self, recorder: RunRecorder, evaluate: Evaluate, arrays: ArrayRecord,
                        clock: Callable[[], float]) -> None:
        """A resumed run whose last checkpointed round was still being evaluated: evaluate ``arrays`` (that
        round's global, restored) now and record the round."""
        if not recorder.rounds or not recorder.rounds[-1].get(PENDING):
            return
        record = {k: v for k, v in recorder.rounds.pop().items() if k != PENDING}
        recorder.round_done(completed(record, *_timed_evaluation(evaluate, arrays, clock)))


def completed(record: dict[str, Any], evaluation: dict[str, Any], seconds: float) -> dict[str, Any]:
    """``record`` with its evaluation and, as ``timing.eval_seconds``, that evaluation's own duration."""
    record.update(evaluation)
    record["timing"] = {**record["timing"], "eval_seconds": round(seconds, 3)}
    return record


def _timed_evaluation(evaluate: Evaluate, arrays: ArrayRecord,
                      clock: Callable[[], float]) -> tuple[dict[str, Any], float]:
    started = clock()
    evaluation = evaluate(arrays)
    return evaluation, clock() - started


def _in_background(server_round: int, evaluate: Evaluate, arrays: ArrayRecord,
                   clock: Callable[[], float]) -> tuple[dict[str, Any], float]:
    try:
        return _timed_evaluation(evaluate, arrays, clock)
    except BaseException:
        # Logged now (the next round may train for long before it is joined), raised again when joined.
        log(ERROR, "round %d: the server evaluation (eval.overlap) failed; the run stops when the next round "
            "ends", server_round, exc_info=True)
        raise
