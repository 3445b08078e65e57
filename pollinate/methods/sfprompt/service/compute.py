"""Where the body's forwards and backwards run, and handing the memory they leave back to the OS.

glibc's allocator gives each thread that allocates its own arena and keeps freed activation memory there. Run
on the gRPC server's many worker threads, a few steps each leave several arenas holding a step's peak memory;
a few dedicated compute threads bound that to their number, and ``malloc_trim`` returns it once idle.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import itertools
import queue
import threading
from collections.abc import Callable
from concurrent import futures
from typing import TypeVar

T = TypeVar("T")


class ComputeSlots:
    """At most ``slots`` body computations at once, on the calling thread or on ``slots`` dedicated threads.

    On dedicated threads waiting computations run in arrival order, except that backwards go first: a backward
    finishes a step in progress and frees its graph, while a forward starts a new one.

    Parameters
    ----------
    slots : int
        Computations running at once; further ones wait.
    dedicated_threads : bool, default False
        Run them on a pool of ``slots`` threads (a served body) rather than on the caller's thread (in process,
        where thread-local state such as torch dispatch modes must see the computation).
    """

    def __init__(self, slots: int, *, dedicated_threads: bool = False) -> None:
        if slots < 1:
            raise ValueError(f"compute_slots={slots}: expected at least 1")
        self._slots = threading.BoundedSemaphore(slots)
        self._waiting: queue.PriorityQueue | None = queue.PriorityQueue() if dedicated_threads else None
        self._arrival = itertools.count()  # ties within a priority go in arrival order
        self._threads = [threading.Thread(target=self._serve, name=f"split-compute-{i}", daemon=True)
                         for i in range(slots if dedicated_threads else 0)]
        for thread in self._threads:
            thread.start()
        self.calls = 0  # read by the sweeper to trim only after new work; a lost increment is harmless

    def run(self, work: Callable[[], T], *, backward: bool = False) -> T:
        """``work()``'s result (or exception), once a slot is free."""
        self.calls += 1
        if self._waiting is None:
            with self._slots:
                return work()
        done: futures.Future = futures.Future()
        self._waiting.put((0 if backward else 1, next(self._arrival), work, done))
        return done.result()

    def _serve(self) -> None:
        while True:
            _, _, work, done = self._waiting.get()
            if work is None:
                return
            try:
                done.set_result(work())
            except BaseException as exc:  # handed to the caller, which reports it
                done.set_exception(exc)
            del work, done  # the last result must not stay alive (it may hold a graph) while this thread waits

    def close(self) -> None:
        """Let the dedicated threads finish what waits, then end."""
        for _ in self._threads:
            self._waiting.put((2, next(self._arrival), None, None))


def _malloc_trim() -> Callable[[int], int] | None:
    path = ctypes.util.find_library("c")
    if path is None:
        return None
    return getattr(ctypes.CDLL(path), "malloc_trim", None)  # glibc only


_TRIM = _malloc_trim()


def return_free_memory() -> bool:
    """Give the allocator's free pages back to the OS (glibc ``malloc_trim``); False where unavailable."""
    return bool(_TRIM(0)) if _TRIM is not None else False
