"""Where the body's forwards and backwards run, and handing the memory they leave back to the OS.

glibc's allocator gives each thread that allocates its own arena and keeps freed activation memory there. Run
on the gRPC server's many worker threads, a few steps each leave several arenas holding a step's peak memory;
a few dedicated compute threads bound that to their number, and ``malloc_trim`` returns it once idle.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
from collections.abc import Callable
from concurrent import futures
from typing import TypeVar

T = TypeVar("T")


class ComputeSlots:
    """At most ``slots`` body computations at once, on the calling thread or on ``slots`` dedicated threads.

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
        self._pool = (futures.ThreadPoolExecutor(max_workers=slots, thread_name_prefix="split-compute")
                      if dedicated_threads else None)
        self._slots = threading.BoundedSemaphore(slots)
        self.calls = 0  # read by the sweeper to trim only after new work; a lost increment is harmless

    def run(self, work: Callable[[], T]) -> T:
        self.calls += 1
        if self._pool is not None:
            return self._pool.submit(work).result()
        with self._slots:
            return work()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


def _malloc_trim() -> Callable[[int], int] | None:
    path = ctypes.util.find_library("c")
    if path is None:
        return None
    return getattr(ctypes.CDLL(path), "malloc_trim", None)  # glibc only


_TRIM = _malloc_trim()


def return_free_memory() -> bool:
    """Give the allocator's free pages back to the OS (glibc ``malloc_trim``); False where unavailable."""
    return bool(_TRIM(0)) if _TRIM is not None else False
