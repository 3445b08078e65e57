"""Stopping a running simulation on Ctrl-C or SIGTERM: cleanly, resumable, with no process left behind.

The first SIGINT/SIGTERM asks the ServerApp to stop: its next grid call (at most a poll interval away, or right
after the step it is in) raises ``SimulationStopped``, Flower's simulation then lets the clients finish the
message they are on, terminates its Ray actors and shuts Ray down, the way a finished run ends. Checkpoints are
written atomically, so the last complete round stays resumable. A second signal stops at once (Flower still
shuts Ray down on the way out). Before the federation runs (preflight, model conversion) a signal stops at once.

Ray's ``ray.init`` replaces this process's SIGTERM handler with ``sys.exit``, so Ray is started here, before
Flower would, with the init Flower's Ray backend does (it then finds Ray running and uses it), and the handlers
are installed after it.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_PULL_INTERVAL_S = 0.1  # Flower's InMemoryGrid default


class SimulationStopped(Exception):
    """Raised inside the ServerApp at its next grid call once a stop was asked for."""


class SimulationInterrupted(KeyboardInterrupt):
    """``simulate`` stopped on a signal. ``exit_code`` is 128 + the signal number; the message says after which
    round it stopped and how to resume.

    Parameters
    ----------
    signum : int
        The signal that stopped it.
    run_dir : Path
        The run directory.
    last_round : int or None
        The newest complete checkpoint (None: no round completed).
    """

    def __init__(self, signum: int, run_dir: Path, last_round: int | None) -> None:
        self.signum, self.run_dir, self.last_round = signum, Path(run_dir), last_round
        self.exit_code = 128 + signum
        if last_round is None:
            text = "stopped before round 1 completed; nothing to resume"
        else:
            text = f"stopped after round {last_round}; resume with: pollinate simulate --resume {run_dir}"
        super().__init__(text)

    def __str__(self) -> str:
        return str(self.args[0])


class StopRequest:
    """SIGINT/SIGTERM handling for one simulation: records the first signal and lets the run stop gracefully
    once ``graceful`` is set (the federation runs); otherwise, and on a second signal, raises KeyboardInterrupt."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.signum: int | None = None
        self.graceful = False

    @property
    def requested(self) -> bool:
        return self.event.is_set()

    def handle(self, signum: int, frame: object = None) -> None:
        first = not self.event.is_set()
        self.signum = self.signum or signum
        self.event.set()
        if not (first and self.graceful):
            raise KeyboardInterrupt

    def install(self) -> None:
        """(Re)install the handlers (main thread only; elsewhere the caller's own handling stays)."""
        if threading.current_thread() is threading.main_thread():
            for sig in _SIGNALS:
                signal.signal(sig, self.handle)

    @contextmanager
    def handling_signals(self) -> Iterator[StopRequest]:
        """Handle SIGINT/SIGTERM inside the block; the previous handlers come back after it."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {sig: signal.getsignal(sig) for sig in _SIGNALS}
        self.install()
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def check(self) -> None:
        if self.event.is_set():
            raise SimulationStopped("the simulation was asked to stop")


class StoppableGrid(Grid):
    """A grid that raises ``SimulationStopped`` from every call once ``stop`` is requested, also while it waits
    for replies; otherwise it is ``grid``, with the same reply polling as Flower's InMemoryGrid."""

    def __init__(self, grid: Grid, stop: StopRequest) -> None:
        self.grid, self.stop = grid, stop

    def set_run(self, run: Any) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Any:
        return self.grid.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        self.stop.check()
        return self.grid.get_node_ids()

    def get_nodes(self) -> Iterable[Any]:
        self.stop.check()
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        self.stop.check()
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        self.stop.check()
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        pending = set(self.push_messages(messages))
        end_time = time.time() + (timeout if timeout is not None else 0.0)
        replies: list[Message] = []
        while timeout is None or time.time() < end_time:
            received = list(self.pull_messages(pending))
            replies.extend(received)
            pending.difference_update(msg.metadata.reply_to_message_id for msg in received)
            if not pending:
                break
            time.sleep(_PULL_INTERVAL_S)
        return replies


def start_ray(init_args: dict[str, Any]) -> bool:
    """Start (or connect to) Ray with the init Flower's Ray backend does; returns False when Ray was already
    running in this process (its owner shuts it down)."""
    import ray

    if ray.is_initialized():
        return False
    # As Flower's RayBackend: workers import what this driver can (its sys.path), not only what is installed.
    pythonpath = os.pathsep.join(sys.path)
    if os.environ.get("PYTHONPATH"):
        pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
    os.environ["PYTHONPATH"] = pythonpath
    ray.init(runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, **{"include_dashboard": False, **init_args})
    return True


def stop_ray() -> None:
    import ray

    ray.shutdown()
