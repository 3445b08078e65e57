"""gRPC service hosting the frozen middle ("body") of a split model for SFPrompt.

Per training step a client calls ``Forward`` (head activations up, body output down) and then ``Backward``
(gradient at the body output up, gradient at the body input down). Between the two the server keeps the
body's autograd graph for that session; it is freed on Backward, CloseSession, TTL expiry, when the client
cancels the Forward call, or when the next Forward of the session replaces an abandoned step.

Status codes (the service keeps serving other clients after any of them):

- UNAUTHENTICATED: token unknown, revoked or expired.
- INVALID_ARGUMENT: malformed request — empty/oversized session id; tensor dtype, shape or byte size
  inconsistent or not what the body expects.
- NOT_FOUND: Backward on a session this server does not hold (never opened, closed, expired, or owned by
  another client — indistinguishable on purpose, so session ids cannot be probed).
- FAILED_PRECONDITION: protocol order — a step id not above the session's last one (replay or reorder),
  Backward for a step that is not the pending one or was run without ``keep_graph``, Forward on a closed
  session id.
- RESOURCE_EXHAUSTED: too many sessions, the graphs held would exceed ``max_graph_bytes``, or a message over
  ``max_message_bytes`` (enforced by gRPC itself).
- INTERNAL: the body raised.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import torch
from torch import nn

from pollinate.methods.sfprompt.splitmodel import TensorDecodeError, decode_tensor, encode_tensor
from pollinate.protos import split_pb2, split_pb2_grpc

logger = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
_MAX_SESSION_ID_CHARS = 128
_MAX_TOMBSTONES = 16384
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------- tokens
class TokenError(Exception):
    """A split-service token that is unknown, revoked or expired."""


@dataclass(frozen=True)
class TokenInfo:
    """Whom a token was issued to, for which round, and until when (in the registry's clock)."""

    client_id: str
    round: int
    expires_at: float


class TokenRegistry:
    """Short-lived per-round tokens the coordinator issues to clients and the split service checks.

    Tokens are ``secrets.token_urlsafe(32)``; only their SHA-256 is stored, so lookups never compare the
    secret itself. Thread-safe.

    Parameters
    ----------
    clock : callable, default time.monotonic
        Time source in seconds (injectable for tests).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._tokens: dict[bytes, TokenInfo] = {}

    @staticmethod
    def _key(token: str) -> bytes:
        return hashlib.sha256(token.encode("utf-8")).digest()

    def issue(self, client_id: str, round: int, ttl_s: float) -> str:
        """A new token for ``client_id`` in ``round``, valid for ``ttl_s`` seconds."""
        if ttl_s <= 0:
            raise ValueError(f"ttl_s={ttl_s}: a token needs a positive lifetime in seconds")
        if not client_id:
            raise ValueError("client_id must be a non-empty string")
        token = secrets.token_urlsafe(32)
        now = self._clock()
        with self._lock:
            # Expired entries are pruned here so the table stays the size of the live tokens.
            self._tokens = {k: v for k, v in self._tokens.items() if v.expires_at > now}
            self._tokens[self._key(token)] = TokenInfo(client_id, int(round), now + ttl_s)
        return token

    def check(self, token: str) -> TokenInfo:
        """The token's info; raises ``TokenError`` if it is unknown, revoked or expired."""
        if not token:
            raise TokenError("missing token")
        with self._lock:
            info = self._tokens.get(self._key(token))
        if info is None:
            raise TokenError("unknown or revoked token")
        if self._clock() >= info.expires_at:
            raise TokenError(f"token for client {info.client_id!r} round {info.round} has expired")
        return info

    def revoke(self, token: str) -> None:
        """Invalidate one token now (no error if unknown)."""
        with self._lock:
            self._tokens.pop(self._key(token), None)

    def revoke_round(self, round: int) -> int:
        """Invalidate every token of ``round``; returns how many."""
        with self._lock:
            doomed = [k for k, v in self._tokens.items() if v.round == round]
            for key in doomed:
                del self._tokens[key]
        return len(doomed)


# --------------------------------------------------------------------------------------------- sessions
class SplitRejected(Exception):
    """A request the service refuses; ``code`` is the gRPC status it maps to."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


@dataclass
class _Pending:
    step_id: int
    inputs: torch.Tensor | None  # None when the step was run without keep_graph
    output: torch.Tensor | None
    graph_bytes: int = 0


@dataclass
class _Session:
    client_id: str
    last_used: float
    last_step: int = 0  # step ids start at 1
    pending: _Pending | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


class SplitBodyService(split_pb2_grpc.SplitBodyServicer):
    """Runs the frozen body for many clients, one session (autograd graph in flight) per client stream.

    Parameters
    ----------
    body : nn.Module
        ``body(hidden (B, S, H), attention_mask (B, S)) -> hidden``; its parameters are frozen here.
    tokens : TokenRegistry
        Checked on every call.
    session_ttl_s : float, default 300
        A session idle this long is dropped with its graph.
    max_sessions : int, default 64
        Live sessions at once; a Forward opening one more gets RESOURCE_EXHAUSTED.
    max_graph_bytes : int, default 4 GiB
        Bound on the activations held by all pending graphs together (measured, not estimated).
    hidden_size : int, optional
        Expected last dimension of ``hidden``; defaults to ``body.config.hidden_size``.
    clock : callable, default time.monotonic
        Time source for session expiry.
    """

    def __init__(
        self,
        body: nn.Module,
        tokens: TokenRegistry,
        *,
        session_ttl_s: float = 300.0,
        max_sessions: int = 64,
        max_graph_bytes: int = 4 * 1024**3,
        hidden_size: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if session_ttl_s <= 0:
            raise ValueError(f"session_ttl_s={session_ttl_s}: expected a positive number of seconds")
        if max_sessions < 1:
            raise ValueError(f"max_sessions={max_sessions}: expected at least 1")
        if hidden_size is None:
            config = getattr(body, "config", None)
            if config is None:
                raise ValueError("hidden_size is required when the body has no .config")
            hidden_size = int(config.hidden_size)
        self.body = body.requires_grad_(False)  # frozen: the graph is kept for the input gradient only
        self.tokens = tokens
        self.session_ttl_s = session_ttl_s
        self.max_sessions = max_sessions
        self.max_graph_bytes = max_graph_bytes
        self.hidden_size = hidden_size
        self._clock = clock
        first = next(body.parameters(), None)
        self._dtype = first.dtype if first is not None else torch.float32
        self._device = first.device if first is not None else torch.device("cpu")
        self._param_storages = {p.untyped_storage().data_ptr() for p in body.parameters()}
        self._lock = threading.Lock()
        self._sessions: dict[str, _Session] = {}
        self._tombstones: OrderedDict[str, None] = OrderedDict()
        self._graph_bytes = 0

    # ---- bookkeeping
    @property
    def num_sessions(self) -> int:
        with self._lock:
            return len(self._sessions)

    @property
    def graph_bytes(self) -> int:
        """Bytes of activations currently held by pending graphs."""
        with self._lock:
            return self._graph_bytes

    def holds_graph(self, session_id: str) -> bool:
        """Whether the session has a step's autograd graph waiting for its Backward."""
        with self._lock:
            session = self._sessions.get(session_id)
            return session is not None and session.pending is not None and session.pending.output is not None

    def sweep_expired(self) -> int:
        """Drop sessions idle longer than the TTL; returns how many."""
        now = self._clock()
        with self._lock:
            doomed = [sid for sid, s in self._sessions.items() if now - s.last_used > self.session_ttl_s]
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
        self._release_pending_locked(session)
        return True

    def _release_pending_locked(self, session: _Session) -> None:
        if session.pending is not None:
            self._graph_bytes -= session.pending.graph_bytes
            session.pending = None

    def _authenticate(self, token: str) -> str:
        try:
            return self.tokens.check(token).client_id
        except TokenError as exc:
            raise SplitRejected(grpc.StatusCode.UNAUTHENTICATED, str(exc)) from None

    @staticmethod
    def _check_session_id(session_id: str) -> None:
        if not session_id or len(session_id) > _MAX_SESSION_ID_CHARS:
            raise SplitRejected(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"session_id must be 1..{_MAX_SESSION_ID_CHARS} characters, got {len(session_id)}",
            )

    def _owned_session(self, session_id: str, client_id: str) -> _Session:
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None or session.client_id != client_id:
                raise SplitRejected(grpc.StatusCode.NOT_FOUND,
                                    f"session {session_id!r} is unknown (never opened, closed or expired)")
            session.last_used = self._clock()
            return session

    def _decode(self, message: split_pb2.Tensor, name: str) -> torch.Tensor:
        try:
            return decode_tensor(message, name=name)
        except TensorDecodeError as exc:
            raise SplitRejected(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None

    # ---- the three calls, transport-free (raise SplitRejected)
    def handle_forward(
        self, request: split_pb2.ForwardRequest, is_active: Callable[[], bool] = lambda: True
    ) -> split_pb2.ForwardReply:
        """Run the body for one step; keeps the graph until Backward when ``keep_graph`` is set."""
        client_id = self._authenticate(request.token)
        self._check_session_id(request.session_id)
        hidden = self._decode(request.hidden, "hidden")
        mask = self._decode(request.attention_mask, "attention_mask")
        if hidden.dtype not in _FLOAT_DTYPES or hidden.dim() != 3 or hidden.shape[2] != self.hidden_size:
            raise SplitRejected(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"hidden has shape {tuple(hidden.shape)} and dtype {hidden.dtype}, expected "
                f"(batch, seq, {self.hidden_size}) of float32/float16/bfloat16",
            )
        if mask.dtype not in (torch.int64, torch.bool) or tuple(mask.shape) != tuple(hidden.shape[:2]):
            raise SplitRejected(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"attention_mask has shape {tuple(mask.shape)} and dtype {mask.dtype}, expected "
                f"{tuple(hidden.shape[:2])} of int64 or bool",
            )
        self.sweep_expired()
        session = self._open_session(request.session_id, client_id)
        with session.lock:
            step = int(request.step_id)
            if step <= session.last_step:
                raise SplitRejected(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"step_id {step} of session {request.session_id!r} is not above the last step "
                    f"{session.last_step} (replayed or out of order)",
                )
            session.last_step = step
            with self._lock:
                self._release_pending_locked(session)  # an abandoned step is replaced, not kept
            output, inputs, graph_bytes = self._run_body(hidden, mask.to(torch.long), request.keep_graph)
            with self._lock:
                if self._sessions.get(request.session_id) is not session:
                    raise SplitRejected(grpc.StatusCode.NOT_FOUND,
                                        f"session {request.session_id!r} closed or expired during the call")
                if not is_active():
                    # The client cancelled or hit its deadline: it will never send this step's Backward.
                    raise SplitRejected(grpc.StatusCode.CANCELLED, "client cancelled the Forward call")
                if request.keep_graph and self._graph_bytes + graph_bytes > self.max_graph_bytes:
                    raise SplitRejected(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"step needs {graph_bytes} bytes of activations but {self._graph_bytes} of "
                        f"max_graph_bytes={self.max_graph_bytes} are held; retry later or send less",
                    )
                keep = request.keep_graph
                session.pending = _Pending(step, inputs if keep else None, output if keep else None,
                                           graph_bytes if keep else 0)
                self._graph_bytes += session.pending.graph_bytes
                session.last_used = self._clock()
        return split_pb2.ForwardReply(session_id=request.session_id, step_id=step,
                                      hidden=encode_tensor(output, hidden.dtype))

    def handle_backward(self, request: split_pb2.BackwardRequest) -> split_pb2.BackwardReply:
        """Gradient at the body input for the pending step; frees its graph."""
        client_id = self._authenticate(request.token)
        self._check_session_id(request.session_id)
        session = self._owned_session(request.session_id, client_id)
        with session.lock:
            step, pending = int(request.step_id), session.pending
            if pending is None or pending.step_id != step:
                what = f"pending step is {pending.step_id}" if pending is not None else "no step is pending"
                raise SplitRejected(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"Backward for step {step} of session {request.session_id!r} but {what} "
                    f"(replayed, out of order, or its Forward was replaced)",
                )
            if pending.output is None:
                raise SplitRejected(grpc.StatusCode.FAILED_PRECONDITION,
                                    f"step {step} was run without keep_graph; it has no gradient")
            grad = self._decode(request.grad, "grad")
            if grad.dtype not in _FLOAT_DTYPES or grad.shape != pending.output.shape:
                raise SplitRejected(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"grad has shape {tuple(grad.shape)} and dtype {grad.dtype}, expected "
                    f"{tuple(pending.output.shape)} of float32/float16/bfloat16",
                )
            with self._lock:
                self._release_pending_locked(session)
            try:
                (grad_in,) = torch.autograd.grad(pending.output, pending.inputs,
                                                 grad.to(device=self._device, dtype=pending.output.dtype))
            except Exception as exc:  # the body is user code: report, keep serving
                logger.exception("split service: body backward failed")
                raise SplitRejected(grpc.StatusCode.INTERNAL, f"body backward failed: {exc}") from exc
            session.last_used = self._clock()
        return split_pb2.BackwardReply(session_id=request.session_id, step_id=step,
                                       grad=encode_tensor(grad_in, grad.dtype))

    def handle_close(self, request: split_pb2.CloseSessionRequest) -> split_pb2.CloseSessionReply:
        """Free a session's state; closing an unknown session is not an error (``existed=False``)."""
        client_id = self._authenticate(request.token)
        self._check_session_id(request.session_id)
        with self._lock:
            session = self._sessions.get(request.session_id)
            if session is not None and session.client_id != client_id:
                return split_pb2.CloseSessionReply(existed=False)
            existed = self._drop_locked(request.session_id)
        return split_pb2.CloseSessionReply(existed=existed)

    def _open_session(self, session_id: str, client_id: str) -> _Session:
        with self._lock:
            session = self._sessions.get(session_id)
            if session is not None:
                if session.client_id != client_id:
                    raise SplitRejected(grpc.StatusCode.NOT_FOUND,
                                        f"session {session_id!r} is unknown for this client")
                session.last_used = self._clock()
                return session
            if session_id in self._tombstones:
                raise SplitRejected(grpc.StatusCode.FAILED_PRECONDITION,
                                    f"session {session_id!r} was closed or expired; open a new session id")
            if len(self._sessions) >= self.max_sessions:
                raise SplitRejected(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                    f"max_sessions={self.max_sessions} sessions are open; retry later")
            session = _Session(client_id=client_id, last_used=self._clock())
            self._sessions[session_id] = session
            return session

    def _run_body(
        self, hidden: torch.Tensor, mask: torch.Tensor, keep_graph: bool
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        inputs = hidden.to(device=self._device, dtype=self._dtype).requires_grad_(keep_graph)
        mask = mask.to(self._device)
        saved: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            # Count what autograd keeps for backward (the real memory cost), not the frozen weights.
            storage = t.untyped_storage()
            if storage.data_ptr() not in self._param_storages:
                saved[storage.data_ptr()] = storage.nbytes()
            return t

        try:
            if keep_graph:
                with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    output = self.body(inputs, mask)
            else:
                with torch.no_grad():
                    output = self.body(inputs, mask)
        except Exception as exc:  # the body is user code: report, keep serving
            logger.exception("split service: body forward failed")
            raise SplitRejected(grpc.StatusCode.INTERNAL, f"body forward failed: {exc}") from exc
        return output, inputs, sum(saved.values())

    # ---- gRPC entry points
    def Forward(  # noqa: N802
        self, request: split_pb2.ForwardRequest, context: grpc.ServicerContext
    ) -> split_pb2.ForwardReply:
        return _abort_on_reject(context, lambda: self.handle_forward(request, context.is_active))

    def Backward(  # noqa: N802
        self, request: split_pb2.BackwardRequest, context: grpc.ServicerContext
    ) -> split_pb2.BackwardReply:
        return _abort_on_reject(context, lambda: self.handle_backward(request))

    def CloseSession(  # noqa: N802
        self, request: split_pb2.CloseSessionRequest, context: grpc.ServicerContext
    ) -> split_pb2.CloseSessionReply:
        return _abort_on_reject(context, lambda: self.handle_close(request))


def _abort_on_reject(context: grpc.ServicerContext, call: Callable):
    try:
        return call()
    except SplitRejected as exc:
        context.abort(exc.code, exc.details)


# --------------------------------------------------------------------------------------------- server
def start_split_server(
    body: nn.Module,
    *,
    tokens: TokenRegistry,
    host: str = "127.0.0.1",
    port: int = 0,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    session_ttl_s: float = 300.0,
    max_sessions: int = 64,
    max_graph_bytes: int = 4 * 1024**3,
    max_workers: int = 4,
    tls_cert_chain: bytes | None = None,
    tls_private_key: bytes | None = None,
    hidden_size: int | None = None,
) -> tuple[grpc.Server, int]:
    """Serve ``body`` as a ``SplitBody`` gRPC service; returns the started server and the bound port.

    ``port=0`` binds an ephemeral port. With ``tls_cert_chain`` and ``tls_private_key`` (PEM bytes) the port
    is TLS (``grpc.ssl_server_credentials``); otherwise plaintext. Messages over ``max_message_bytes`` are
    refused by gRPC with RESOURCE_EXHAUSTED. Expired sessions are swept in a daemon thread that ends with
    the server. Stop it with ``server.stop(grace)``.
    """
    if (tls_cert_chain is None) != (tls_private_key is None):
        raise ValueError("TLS needs both tls_cert_chain and tls_private_key (PEM bytes), or neither")
    service = SplitBodyService(body, tokens, session_ttl_s=session_ttl_s, max_sessions=max_sessions,
                               max_graph_bytes=max_graph_bytes, hidden_size=hidden_size)
    options = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="split-body"),
                         options=options)
    split_pb2_grpc.add_SplitBodyServicer_to_server(service, server)
    address = f"{host}:{port}"
    if tls_cert_chain is not None:
        credentials = grpc.ssl_server_credentials([(tls_private_key, tls_cert_chain)])
        bound = server.add_secure_port(address, credentials)
    else:
        bound = server.add_insecure_port(address)
    if bound == 0:
        raise OSError(f"could not bind the split service to {address}")
    server.start()
    server.split_service = service  # for inspection (tests, metrics); grpc.Server has no other handle
    _start_sweeper(server, service, interval_s=max(0.05, min(session_ttl_s / 2, 30.0)))
    logger.info("split service on %s:%d (%s)", host, bound, "TLS" if tls_cert_chain else "plaintext")
    return server, bound


def _start_sweeper(server: grpc.Server, service: SplitBodyService, interval_s: float) -> None:
    def sweep() -> None:
        # wait_for_termination returns True when it timed out, False once the server stopped.
        while server.wait_for_termination(timeout=interval_s):
            service.sweep_expired()

    threading.Thread(target=sweep, name="split-body-sweeper", daemon=True).start()
