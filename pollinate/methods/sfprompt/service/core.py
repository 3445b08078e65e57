"""The split service: runs the frozen middle ("body") of a split model for many SFPrompt clients.

Per training step a client calls ``Forward`` (head activations up, body output down) and then ``Backward``
(gradient at the body output up, gradient at the body input down). Between the two the server keeps the
body's autograd graph for that session; it is freed on Backward, CloseSession, TTL expiry, when the client
cancels the Forward call, or when the next Forward of the session replaces an abandoned step.

Every request is checked before the body runs: token and node, one call at a time per node, declared shapes
against ``SplitLimits`` (nothing is decoded before), finite values, the node's session quota, and the step's
estimated activation memory against the node's budget and ``max_graph_bytes``.

Status codes (the service keeps serving other clients after any of them):

- UNAUTHENTICATED: token missing, unknown, revoked, expired, or issued to another node than the one named.
- PERMISSION_DENIED: a forward-only (evaluation) token on a Forward with ``keep_graph`` or on a Backward.
- INVALID_ARGUMENT: malformed request — empty/oversized session id; tensor dtype, shape or byte size
  inconsistent or not what the body expects; an empty batch; batch or sequence over the limits; NaN or Inf
  values; a step that could never fit the memory budgets.
- NOT_FOUND: Backward on a session this server does not hold (never opened, closed, expired, or owned by
  another client — indistinguishable on purpose, so session ids cannot be probed).
- FAILED_PRECONDITION: protocol order — a step id not above the session's last one (replay or reorder),
  Backward for a step that is not the pending one or was run without ``keep_graph``, Forward on a closed
  session id.
- RESOURCE_EXHAUSTED (nothing changed; retry later): too many sessions (all, or this node's), another call of
  this node in progress, a step over the memory budgets, too many concurrent calls (gRPC's cap), or a
  message over ``max_message_bytes`` (gRPC's limit; that one never passes).
- INTERNAL: the body raised.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace

import grpc
import torch
from torch import nn

from pollinate.methods.sfprompt.channel import NODE_ID_METADATA
from pollinate.methods.sfprompt.service.compute import ComputeSlots
from pollinate.methods.sfprompt.service.limits import GraphCost, SplitLimits
from pollinate.methods.sfprompt.service.sessions import Pending, Session, SessionTable, SplitRejected
from pollinate.methods.sfprompt.service.tokens import TokenError, TokenRegistry
from pollinate.methods.sfprompt.split import TensorDecodeError, declared_dtype, decode_tensor, encode_tensor
from pollinate.protos import split_pb2, split_pb2_grpc

logger = logging.getLogger(__name__)

_MAX_SESSION_ID_CHARS = 128
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MASK_DTYPES = (torch.int64, torch.bool)
Invalid = grpc.StatusCode.INVALID_ARGUMENT


class SplitBodyService(split_pb2_grpc.SplitBodyServicer):
    """Runs the frozen body for many clients, one session (autograd graph in flight) per client stream.

    Parameters
    ----------
    body : nn.Module
        ``body(hidden (B, S, H), attention_mask (B, S)) -> hidden``; its parameters are frozen here.
    tokens : TokenRegistry
        Checked on every call, with the node id the call names.
    limits : SplitLimits, optional
        Request, session and memory bounds (defaults of ``SplitLimits``). ``max_seq_len`` is further capped
        at the body's ``config.max_position_embeddings``; a zero ``client_activation_budget_bytes`` is derived.
    session_ttl_s : float, default 300
        A session idle this long is dropped with its graph.
    compute_slots : int, default 1
        Body forwards and backwards running at once; further calls wait for a slot.
    dedicated_compute_threads : bool, default False
        Run them on ``compute_slots`` threads of their own (a served body), not on the calling thread.
    hidden_size : int, optional
        Expected last dimension of ``hidden``; defaults to ``body.config.hidden_size``.
    graph_cost : GraphCost, optional
        Activation-memory estimate of a step; by default fitted on two small steps of ``body`` here.
    clock : callable, default time.monotonic
        Time source for session expiry.
    """

    def __init__(self, body: nn.Module, tokens: TokenRegistry, *, limits: SplitLimits | None = None,
                 session_ttl_s: float = 300.0, compute_slots: int = 1, dedicated_compute_threads: bool = False,
                 hidden_size: int | None = None, graph_cost: GraphCost | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if session_ttl_s <= 0:
            raise ValueError(f"session_ttl_s={session_ttl_s}: expected a positive number of seconds")
        config = getattr(body, "config", None)
        if hidden_size is None:
            if config is None:
                raise ValueError("hidden_size is required when the body has no .config")
            hidden_size = int(config.hidden_size)
        limits = limits or SplitLimits()
        self.body = body.requires_grad_(False)  # frozen: the graph is kept for the input gradient only
        self.tokens = tokens
        self.hidden_size = hidden_size
        positions = getattr(config, "max_position_embeddings", None)
        self.max_seq_len = min(limits.max_seq_len, int(positions)) if positions else limits.max_seq_len
        first = next(body.parameters(), None)
        self._dtype = first.dtype if first is not None else torch.float32
        self._device = first.device if first is not None else torch.device("cpu")
        self._param_storages = {p.untyped_storage().data_ptr() for p in body.parameters()}
        self.compute = ComputeSlots(compute_slots, dedicated_threads=dedicated_compute_threads)
        self.graph_cost = graph_cost or GraphCost.calibrate(self._measure_graph_bytes, self.max_seq_len)
        budget = limits.client_activation_budget_bytes or min(
            limits.max_graph_bytes, limits.sessions_per_client * self.graph_cost.estimate(limits.max_batch,
                                                                                        self.max_seq_len))
        self.limits = replace(limits, client_activation_budget_bytes=max(budget, 1))
        self.sessions = SessionTable(self.limits, session_ttl_s, clock)

    # ---- bookkeeping
    @property
    def num_sessions(self) -> int:
        return self.sessions.num_sessions

    @property
    def graph_bytes(self) -> int:
        """Bytes of activations held by pending graphs and reserved by steps being computed."""
        return self.sessions.graph_bytes

    def holds_graph(self, session_id: str) -> bool:
        """Whether the session has a step's autograd graph waiting for its Backward."""
        return self.sessions.holds_graph(session_id)

    def sweep_expired(self) -> int:
        """Drop sessions idle longer than the TTL; returns how many."""
        return self.sessions.sweep()

    # ---- checks that run before anything else
    def _authenticate(self, token: str, node: str, *, trains: bool = False) -> str:
        """The node the token was issued to; ``trains``: the call keeps or uses a graph, which a forward-only
        (evaluation) token does not admit."""
        if not node:
            raise SplitRejected(grpc.StatusCode.UNAUTHENTICATED,
                                f"the call names no node: send the node id the token was issued to as "
                                f"metadata {NODE_ID_METADATA!r}")
        try:
            info = self.tokens.check(token, node)
        except TokenError as exc:
            raise SplitRejected(grpc.StatusCode.UNAUTHENTICATED, str(exc)) from None
        if trains and info.forward_only:
            raise SplitRejected(grpc.StatusCode.PERMISSION_DENIED,
                                "this token is forward-only (evaluation): it admits Forward without keep_graph, "
                                "no training steps")
        return info.node

    @staticmethod
    def _check_session_id(session_id: str) -> None:
        if not session_id or len(session_id) > _MAX_SESSION_ID_CHARS:
            raise SplitRejected(Invalid, f"session_id must be 1..{_MAX_SESSION_ID_CHARS} characters, "
                                         f"got {len(session_id)}")

    @staticmethod
    def _dtype_of(message: split_pb2.Tensor, name: str) -> torch.dtype:
        try:
            return declared_dtype(message, name=name)
        except TensorDecodeError as exc:
            raise SplitRejected(Invalid, str(exc)) from None

    def _admit_shapes(self, request: split_pb2.ForwardRequest) -> tuple[int, int]:
        """``(batch, seq)`` from the declared shapes, checked against the limits before anything is decoded."""
        shape, mask_shape = tuple(request.hidden.shape), tuple(request.attention_mask.shape)
        dtype = self._dtype_of(request.hidden, "hidden")
        if dtype not in _FLOAT_DTYPES or len(shape) != 3 or shape[2] != self.hidden_size:
            raise SplitRejected(Invalid, f"hidden has shape {shape} and dtype {dtype}, expected "
                                         f"(batch, seq, {self.hidden_size}) of float32/float16/bfloat16")
        batch, seq = shape[:2]
        if batch < 1 or seq < 1:
            raise SplitRejected(Invalid, f"hidden has shape {shape}: an empty batch; expected at least one "
                                         f"sequence of at least one position")
        if batch > self.limits.max_batch:
            raise SplitRejected(Invalid, f"batch of {batch} sequences exceeds max_batch={self.limits.max_batch}")
        if seq > self.max_seq_len:
            raise SplitRejected(Invalid, f"sequence of {seq} positions exceeds max_seq_len={self.max_seq_len} "
                                         f"(the configured cap or the model's maximum positions)")
        mask_dtype = self._dtype_of(request.attention_mask, "attention_mask")
        if mask_dtype not in _MASK_DTYPES or mask_shape != (batch, seq):
            raise SplitRejected(Invalid, f"attention_mask has shape {mask_shape} and dtype {mask_dtype}, "
                                         f"expected {(batch, seq)} of int64 or bool")
        need = self.graph_cost.estimate(batch, seq)
        if need > min(self.limits.client_activation_budget_bytes, self.limits.max_graph_bytes):
            raise SplitRejected(Invalid, f"a step of {batch} x {seq} positions needs ~{need} bytes of activations, "
                                         f"over client_activation_budget_bytes="
                                         f"{self.limits.client_activation_budget_bytes} or max_graph_bytes="
                                         f"{self.limits.max_graph_bytes}; send smaller batches")
        return batch, seq

    def _decode(self, message: split_pb2.Tensor, name: str) -> torch.Tensor:
        try:
            tensor = decode_tensor(message, name=name)
        except TensorDecodeError as exc:
            raise SplitRejected(Invalid, str(exc)) from None
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise SplitRejected(Invalid, f"{name} holds NaN or Inf values")
        return tensor

    # ---- the three calls, transport-free (raise SplitRejected); ``node`` is the node id the call names
    def handle_forward(self, request: split_pb2.ForwardRequest, node: str,
                       is_active: Callable[[], bool] = lambda: True) -> split_pb2.ForwardReply:
        """Run the body for one step; keeps the graph until Backward when ``keep_graph`` is set."""
        client_id = self._authenticate(request.token, node, trains=request.keep_graph)
        self._check_session_id(request.session_id)
        with self.sessions.one_call(client_id):  # first: a flood of one node is refused at the lowest cost
            batch, seq = self._admit_shapes(request)
            hidden = self._decode(request.hidden, "hidden")
            mask = self._decode(request.attention_mask, "attention_mask").to(torch.long)
            self.sessions.sweep()
            session = self.sessions.open(request.session_id, client_id)
            with session.lock:
                step = self._next_step(request, session)
                self.sessions.release(session)  # an abandoned step is replaced, not kept
                need = self.graph_cost.estimate(batch, seq)
                with self.sessions.reserving(client_id, need):
                    output, inputs, graph_bytes = self._run_body(hidden, mask, request.keep_graph)
                    if not is_active():
                        # The client cancelled or hit its deadline: it will never send this step's Backward.
                        raise SplitRejected(grpc.StatusCode.CANCELLED, "client cancelled the Forward call")
                    pending = (Pending(step, inputs, output, graph_bytes) if request.keep_graph
                               else Pending(step, None, None))
                    self.sessions.keep(request.session_id, session, pending, reserved=need)
        return split_pb2.ForwardReply(session_id=request.session_id, step_id=step,
                                      hidden=encode_tensor(output, hidden.dtype))

    @staticmethod
    def _next_step(request: split_pb2.ForwardRequest, session: Session) -> int:
        step = int(request.step_id)
        if step <= session.last_step:
            raise SplitRejected(grpc.StatusCode.FAILED_PRECONDITION,
                                f"step_id {step} of session {request.session_id!r} is not above the last step "
                                f"{session.last_step} (replayed or out of order)")
        return step

    def handle_backward(self, request: split_pb2.BackwardRequest, node: str) -> split_pb2.BackwardReply:
        """Gradient at the body input for the pending step; frees its graph."""
        client_id = self._authenticate(request.token, node, trains=True)
        self._check_session_id(request.session_id)
        with self.sessions.one_call(client_id):
            session = self.sessions.owned(request.session_id, client_id)
            with session.lock:
                pending = self._pending_for(request, session)
                grad = self._gradient(request.grad, tuple(pending.output.shape))
                self.sessions.release(session)
                wire_dtype = grad.dtype
                grad = grad.to(device=self._device, dtype=pending.output.dtype)
                try:
                    (grad_in,) = self.compute.run(lambda: torch.autograd.grad(pending.output, pending.inputs, grad),
                                                  backward=True)
                except Exception as exc:  # the body is user code: report, keep serving
                    logger.exception("split service: body backward failed")
                    raise SplitRejected(grpc.StatusCode.INTERNAL, f"body backward failed: {exc}") from exc
                self.sessions.touch(session)
        return split_pb2.BackwardReply(session_id=request.session_id, step_id=int(request.step_id),
                                       grad=encode_tensor(grad_in, wire_dtype))

    @staticmethod
    def _pending_for(request: split_pb2.BackwardRequest, session: Session) -> Pending:
        step, pending = int(request.step_id), session.pending
        if pending is None or pending.step_id != step:
            what = f"pending step is {pending.step_id}" if pending is not None else "no step is pending"
            raise SplitRejected(grpc.StatusCode.FAILED_PRECONDITION,
                                f"Backward for step {step} of session {request.session_id!r} but {what} "
                                f"(replayed, out of order, or its Forward was replaced)")
        if pending.output is None:
            raise SplitRejected(grpc.StatusCode.FAILED_PRECONDITION,
                                f"step {step} was run without keep_graph; it has no gradient")
        return pending

    def _gradient(self, message: split_pb2.Tensor, expected: tuple[int, ...]) -> torch.Tensor:
        dtype = self._dtype_of(message, "grad")
        if dtype not in _FLOAT_DTYPES or tuple(message.shape) != expected:
            raise SplitRejected(Invalid, f"grad has shape {tuple(message.shape)} and dtype {dtype}, expected "
                                         f"{expected} of float32/float16/bfloat16")
        return self._decode(message, "grad")

    def handle_close(self, request: split_pb2.CloseSessionRequest, node: str) -> split_pb2.CloseSessionReply:
        """Free a session's state; closing an unknown session is not an error (``existed=False``)."""
        client_id = self._authenticate(request.token, node)
        self._check_session_id(request.session_id)
        return split_pb2.CloseSessionReply(existed=self.sessions.close(request.session_id, client_id))

    # ---- the body
    def _run_body(self, hidden: torch.Tensor, mask: torch.Tensor, keep_graph: bool
                  ) -> tuple[torch.Tensor, torch.Tensor, int]:
        inputs = hidden.to(device=self._device, dtype=self._dtype).requires_grad_(keep_graph)
        mask = mask.to(self._device)
        saved: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            # Count what autograd keeps for backward (the real memory cost), not the frozen weights.
            storage = t.untyped_storage()
            if storage.data_ptr() not in self._param_storages:
                saved[storage.data_ptr()] = storage.nbytes()
            # Detached: a node that saves its own output would otherwise hold itself through the packed tensor's
            # grad_fn, a cycle Python's collector cannot see, and a graph dropped without Backward would leak.
            return t.detach()

        def forward() -> torch.Tensor:
            # Grad mode and saved-tensor hooks are per thread: set them where the body runs.
            if keep_graph:
                with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    return self.body(inputs, mask)
            with torch.no_grad():
                return self.body(inputs, mask)

        try:
            output = self.compute.run(forward)
        except Exception as exc:  # the body is user code: report, keep serving
            logger.exception("split service: body forward failed")
            raise SplitRejected(grpc.StatusCode.INTERNAL, f"body forward failed: {exc}") from exc
        return output, inputs, sum(saved.values())

    def _measure_graph_bytes(self, seq: int) -> int:
        """Activation bytes one padded sequence of ``seq`` positions keeps (calibrates ``GraphCost``)."""
        mask = torch.ones(1, seq, dtype=torch.long)
        mask[0, 0] = 0 if seq > 1 else 1  # a padded position makes the attention mask materialise
        devices = [self._device] if self._device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # the training run's random streams stay untouched
            try:
                _, _, nbytes = self._run_body(torch.zeros(1, seq, self.hidden_size), mask, keep_graph=True)
            except SplitRejected as exc:
                raise ValueError(f"could not measure the body's activation memory at seq={seq}: {exc.details}"
                                 ) from exc
        return nbytes

    # ---- gRPC entry points
    def Forward(self, request: split_pb2.ForwardRequest, context: grpc.ServicerContext  # noqa: N802
                ) -> split_pb2.ForwardReply:
        return _abort_on_reject(context, lambda: self.handle_forward(request, _node_of(context), context.is_active))

    def Backward(self, request: split_pb2.BackwardRequest, context: grpc.ServicerContext  # noqa: N802
                 ) -> split_pb2.BackwardReply:
        return _abort_on_reject(context, lambda: self.handle_backward(request, _node_of(context)))

    def CloseSession(self, request: split_pb2.CloseSessionRequest, context: grpc.ServicerContext  # noqa: N802
                     ) -> split_pb2.CloseSessionReply:
        return _abort_on_reject(context, lambda: self.handle_close(request, _node_of(context)))


def _node_of(context: grpc.ServicerContext) -> str:
    """The node id the call names in its metadata ('' when absent)."""
    return next((value for key, value in context.invocation_metadata() if key == NODE_ID_METADATA), "")


def _abort_on_reject(context: grpc.ServicerContext, call: Callable):
    try:
        return call()
    except SplitRejected as exc:
        context.abort(exc.code, exc.details)
