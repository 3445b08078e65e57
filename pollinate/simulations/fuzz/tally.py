"""How each fuzzed case ends (an outcome and a reason, under a watchdog), tallied per target; memory readings."""

from __future__ import annotations

import contextlib
import resource
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import psutil

OUTCOMES = ("accepted", "rejected", "crash", "hang", "bad-accept")

class CaseTimeout(BaseException):
    """A case ran past its limit (a BaseException, so no ``except Exception`` in the code under test takes it)."""


@dataclass
class Tally:
    """Outcomes of one target: counts, the reasons given, the slowest case, and what reproduces each finding."""

    target: str
    counts: Counter = field(default_factory=Counter)
    reasons: Counter = field(default_factory=Counter)
    findings: list[dict[str, Any]] = field(default_factory=list)
    slowest_s: float = 0.0
    seconds: float = 0.0
    notes: Counter = field(default_factory=Counter)
    slowest: dict[str, Any] = field(default_factory=dict)

    def run(self, timeout_s: float, case: Callable[[], tuple[str, str]], repro: Callable[[], dict]) -> None:
        """Run one case under a SIGALRM watchdog and count it."""
        start = time.perf_counter()
        try:
            with _time_limit(timeout_s):
                outcome, reason = case()
        except CaseTimeout:
            outcome, reason = "hang", f"over {timeout_s:g} s"
        except Exception as exc:  # noqa: BLE001  (what the fuzzer is looking for)
            outcome, reason = "crash", f"{type(exc).__name__}: {str(exc)[:200]}"
        elapsed = time.perf_counter() - start
        if elapsed > timeout_s and outcome != "hang":  # a C loop the alarm could not interrupt
            outcome, reason = "hang", f"{outcome} after {elapsed:.1f} s"
        self.counts[outcome] += 1
        self.reasons[f"{outcome}: {reason}"[:120]] += 1
        if elapsed > self.slowest_s:
            self.slowest_s, self.slowest = elapsed, {"outcome": outcome, **repro()}
        self.seconds += elapsed
        if outcome in ("crash", "hang", "bad-accept") and len(self.findings) < 20:
            self.findings.append({"outcome": outcome, "reason": reason, **repro()})

    def summary(self) -> dict[str, Any]:
        return {"target": self.target, "cases": sum(self.counts.values()), **{o: self.counts[o] for o in OUTCOMES},
                "slowest_case_ms": round(self.slowest_s * 1e3, 1), "seconds": round(self.seconds, 1),
                "top_reasons": dict(self.reasons.most_common(8)), "notes": dict(self.notes.most_common(8)),
                "findings": self.findings, "slowest_case": self.slowest}


@contextlib.contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    def expire(signum: int, frame: Any) -> None:
        raise CaseTimeout(f"case ran past {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def rss_mib() -> float:
    return round(psutil.Process().memory_info().rss / 2**20, 1)


def peak_rss_mib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux
