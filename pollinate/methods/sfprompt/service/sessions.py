"""The split service's state: sessions, their pending graphs, and the quotas and memory each node may hold.

One lock guards it all. Every refusal here happens before the body runs and changes nothing, so a client may
retry a RESOURCE_EXHAUSTED call as it is.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import grpc
import torch

from pollinate.methods.sfprompt.service.limits import SplitLimits

logger = logging.getLogger(__name__)

_MAX_TOMBSTONES = 16384


class SplitRejected(Exception):
    """A request the service refuses; ``code`` is the gRPC status it maps to."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


@dataclass
class Pending:
    """A step whose Backward may still come; ``output`` and ``inputs`` are None without ``keep_graph``."""

    step_id: int
    inputs: torch.Tensor | None
    output: torch.Tensor | None
    graph_bytes: int = 0


@dataclass
class Session:
    """One client stream: its owner, last step and the graph it holds; ``lock`` serialises its calls."""

    client_id: str
    last_used: float
    last_step: int = 0  # step ids start at 1
    pending: Pending | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


class SessionTable:
    """Sessions by id with per-node quotas, activation-memory accounting and one call at a time per node.

    Parameters
    ----------
    limits : SplitLimits
        Session quotas and memory budgets (``client_activation_budget_bytes`` already resolved, > 0).
    session_ttl_s : float
        A session idle this long is dropped with its graph.
    clock : callable
        Time source for expiry.
    """

    def __init__(self, limits: SplitLimits, session_ttl_s: float, clock: Callable[[], float]) -> None:
        self.limits = limits
        self.session_ttl_s = session_ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._sessions: dict[str, Session] = {}
        self._tombstones: OrderedDict[str, None] = OrderedDict()
        self._graph_bytes = 0  # held by pending graphs plus reserved for steps being computed
        self._client_bytes: Counter[str] = Counter()
        self._busy: set[str] = set()

    # ---- inspection
    @property
    def num_sessions(self) -> int:
        with self._lock:
            return len(self._sessions)

    @property
    def graph_bytes(self) -> int:
        with self._lock:
            return self._graph_bytes

    def client_bytes(self, client_id: str) -> int:
        with self._lock:
            return self._client_bytes[client_id]

    def holds_graph(self, session_id: str) -> bool:
        with self._lock:
            session = self._sessions.get(session_id)
            return session is not None and session.pending is not None and session.pending.output is not None

    def is_live(self, session_id: str, session: Session) -> bool:
        with self._lock:
            return self._sessions.get(session_id) is session

    # ---- one call at a time per node
    @contextlib.contextmanager
    def one_call(self, client_id: str) -> Iterator[None]:
        """Admit one compute call of ``client_id``; a second one at the same time is refused, not queued."""
        with self._lock:
            if client_id in self._busy:
                raise SplitRejected(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                    "another call of this node is in progress; one at a time, retry later")
            self._busy.add(client_id)
        try:
            yield
        finally:
            with self._lock:
                self._busy.discard(client_id)

    # ---- sessions
    def open(self, session_id: str, client_id: str) -> Session:
        """The caller's session ``session_id``, created if new and the quotas allow."""
        with self._lock:
            session = self._sessions.get(session_id)
            if session is not None:
                if session.client_id != client_id:
                    raise SplitRejected(grpc.StatusCode.NOT_FOUND, f"session {session_id!r} is unknown for this client")
                session.last_used = self._clock()
                return session
            if session_id in self._tombstones:
                raise SplitRejected(grpc.StatusCode.FAILED_PRECONDITION,
                                    f"session {session_id!r} was closed or expired; open a new session id")
            if len(self._sessions) >= self.limits.max_sessions:
                raise SplitRejected(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                    f"max_sessions={self.limits.max_sessions} sessions are open; retry later")
            owned = sum(1 for s in self._sessions.values() if s.client_id == client_id)
            if owned >= self.limits.sessions_per_client:
                raise SplitRejected(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                    f"this node holds sessions_per_client={self.limits.sessions_per_client} sessions; "
                                    f"close one or let it expire")
            session = Session(client_id=client_id, last_used=self._clock())
            self._sessions[session_id] = session
            return session

    def owned(self, session_id: str, client_id: str) -> Session:
        """The caller's existing session; others' and unknown ones are indistinguishable (NOT_FOUND)."""
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None or session.client_id != client_id:
                raise SplitRejected(grpc.StatusCode.NOT_FOUND,
                                    f"session {session_id!r} is unknown (never opened, closed or expired)")
            session.last_used = self._clock()
            return session

    def close(self, session_id: str, client_id: str) -> bool:
        """Drop the caller's session; False when it was unknown or another node's."""
        with self._lock:
            session = self._sessions.get(session_id)
            if session is not None and session.client_id != client_id:
                return False
            return self._drop_locked(session_id)

    def sweep(self) -> int:
        """Drop sessions idle longer than the TTL; returns how many."""
        now = self._clock()
        with self._lock:
            # A session in a call is not idle, however long the call takes.
            doomed = [sid for sid, s in self._sessions.items()
                      if now - s.last_used > self.session_ttl_s and not s.lock.locked()]
            for sid in doomed:
                self._drop_locked(sid)
        if doomed:
            logger.info("split service: %d session(s) expired", len(doomed))
        return len(doomed)

    def _drop_locked(self, session_id: str) -> bool:
        session = self._sessions.pop(session_id, None)
        self._tombstones[session_id] = None
        while len(self._tombstones) > _MAX_TOMBSTONES:
            self._tombstones.popitem(last=False)
        if session is None:
            return False
        self._release_locked(session)
        return True

    # ---- activation memory
    @contextlib.contextmanager
    def reserving(self, client_id: str, nbytes: int) -> Iterator[None]:
        """Count ``nbytes`` for a step while it runs, or refuse it now when a budget would be exceeded."""
        limits = self.limits
        with self._lock:
            if self._client_bytes[client_id] + nbytes > limits.client_activation_budget_bytes:
                raise SplitRejected(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                    f"step needs ~{nbytes} bytes of activations but this node holds "
                                    f"{self._client_bytes[client_id]} of client_activation_budget_bytes="
                                    f"{limits.client_activation_budget_bytes}; finish or close a step first")
            if self._graph_bytes + nbytes > limits.max_graph_bytes:
                raise SplitRejected(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                    f"step needs ~{nbytes} bytes of activations but {self._graph_bytes} of "
                                    f"max_graph_bytes={limits.max_graph_bytes} are held; retry later or send less")
            self._add_locked(client_id, nbytes)
        try:
            yield
        finally:
            with self._lock:
                self._add_locked(client_id, -nbytes)

    def keep(self, session_id: str, session: Session, pending: Pending, reserved: int) -> None:
        """Store the step as the session's pending one (inside ``reserving(..., reserved)``), unless the session
        ended meanwhile or the measured bytes exceed ``max_graph_bytes``."""
        with self._lock:
            if self._sessions.get(session_id) is not session:
                raise SplitRejected(grpc.StatusCode.NOT_FOUND,
                                    f"session {session_id!r} closed or expired during the call")
            held = self._graph_bytes - reserved
            if held + pending.graph_bytes > self.limits.max_graph_bytes:
                # The estimate fell short of the measured bytes: refuse rather than exceed the bound.
                raise SplitRejected(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                    f"step holds {pending.graph_bytes} bytes of activations but {held} of "
                                    f"max_graph_bytes={self.limits.max_graph_bytes} are held; retry later or send less")
            self._release_locked(session)
            session.pending = pending
            self._add_locked(session.client_id, pending.graph_bytes)
            session.last_step = pending.step_id
            session.last_used = self._clock()

    def touch(self, session: Session) -> None:
        """Mark the session used now (its idle time restarts)."""
        with self._lock:
            session.last_used = self._clock()

    def release(self, session: Session) -> None:
        """Free the session's pending graph (its Backward came, or the next Forward replaces it)."""
        with self._lock:
            self._release_locked(session)

    def _release_locked(self, session: Session) -> None:
        if session.pending is not None:
            self._add_locked(session.client_id, -session.pending.graph_bytes)
            session.pending = None

    def _add_locked(self, client_id: str, nbytes: int) -> None:
        self._graph_bytes += nbytes
        self._client_bytes[client_id] += nbytes
        if self._client_bytes[client_id] == 0:
            del self._client_bytes[client_id]
