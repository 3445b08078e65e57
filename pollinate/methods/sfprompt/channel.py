"""Client of the split-learning body service: a differentiable ``body(hidden, mask)`` over gRPC.

``SplitChannel.body`` is a ``torch.autograd.Function``: its forward sends the head activations up and
returns the body output; its backward sends the gradient at the body output up and returns the gradient at
the body input, so ``loss.backward()`` on the client trains prompts and tail as if the body were local.
The server-side ``LocalBody`` (``pollinate.methods.sfprompt.service``) has the same interface and runs the
service's own handlers in process (tests, simulations).

Every call names the Flower node it comes from (metadata ``pollinate-node-id``); the service refuses a token
presented under another node id. Step ids make calls non-idempotent (a replay is refused), so the only calls
retried are those refused with RESOURCE_EXHAUSTED, which the service answers before changing anything.
"""

from __future__ import annotations

import random
import time
import uuid
from typing import Any

import grpc
import torch

from pollinate.common.limits import MAX_MESSAGE_BYTES
from pollinate.methods.sfprompt.split import WIRE_DTYPES, WireDType, decode_tensor, encode_tensor
from pollinate.protos import split_pb2, split_pb2_grpc

DEFAULT_MAX_MESSAGE_BYTES = MAX_MESSAGE_BYTES
NODE_ID_METADATA = "pollinate-node-id"  # the Flower node id the call's token was issued to
_RETRY_FIRST_S, _RETRY_MAX_S = 0.02, 0.5


class SplitCallError(RuntimeError):
    """A split-service call that failed; ``code`` is the gRPC status, ``details`` the server's reason."""

    def __init__(self, method: str, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"split service {method} failed with {code.name}: {details}")
        self.method = method
        self.code = code
        self.details = details


class _RemoteBody(torch.autograd.Function):
    """Autograd bridge: forward/backward of the body happen on the other side of ``client``."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, attention_mask: torch.Tensor, client: SplitBodyClient,
                keep_graph: bool) -> torch.Tensor:
        step, output = client._forward(hidden, attention_mask, keep_graph)
        ctx.client, ctx.step, ctx.dtype = client, step, hidden.dtype
        return output.to(device=hidden.device, dtype=hidden.dtype)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        grad_input = ctx.client._backward(ctx.step, grad_output)
        return grad_input.to(device=grad_output.device, dtype=ctx.dtype), None, None, None


class SplitBodyClient:
    """One session's client side: step numbering, tensor encoding, byte accounting. Subclasses implement
    ``_invoke(method, request)``, how a request reaches the service (``SplitChannel``: gRPC; the server-side
    ``LocalBody``: the service's handlers in process).

    Parameters
    ----------
    token : str
        The per-round token sent with every request.
    session_id : str or None
        The session's id; None draws a random UUID.
    wire_dtype : {"fp32", "fp16", "bf16"}
        Dtype of activations and gradients on the wire.
    """

    def __init__(self, token: str, session_id: str | None, wire_dtype: WireDType) -> None:
        if wire_dtype not in WIRE_DTYPES:
            raise ValueError(f"wire_dtype={wire_dtype!r}: expected one of {sorted(WIRE_DTYPES)}")
        self.token = token
        self.session_id = session_id or uuid.uuid4().hex
        self.wire_dtype: WireDType = wire_dtype
        self.bytes_up = 0  # serialized request sizes, client -> server
        self.bytes_down = 0  # serialized reply sizes, server -> client
        self.steps = 0
        self._closed = False

    def body(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Body output for ``hidden`` (B, S, H) and ``attention_mask`` (B, S); differentiable in hidden."""
        if self._closed:
            raise RuntimeError(f"split session {self.session_id!r} is closed")
        keep_graph = torch.is_grad_enabled() and hidden.requires_grad
        return _RemoteBody.apply(hidden, attention_mask, self, keep_graph)

    __call__ = body

    def _forward(
        self, hidden: torch.Tensor, mask: torch.Tensor, keep_graph: bool
    ) -> tuple[int, torch.Tensor]:
        self.steps += 1
        request = split_pb2.ForwardRequest(
            session_id=self.session_id, step_id=self.steps, token=self.token, keep_graph=keep_graph,
            hidden=encode_tensor(hidden, WIRE_DTYPES[self.wire_dtype]),
            attention_mask=encode_tensor(mask.to(torch.bool)),  # 1 byte per position is enough
        )
        reply = self._call("Forward", request)
        return self.steps, decode_tensor(reply.hidden, name="body output")

    def _backward(self, step: int, grad: torch.Tensor) -> torch.Tensor:
        request = split_pb2.BackwardRequest(session_id=self.session_id, step_id=step, token=self.token,
                                            grad=encode_tensor(grad, WIRE_DTYPES[self.wire_dtype]))
        reply = self._call("Backward", request)
        return decode_tensor(reply.grad, name="body input gradient")

    def _call(self, method: str, request: Any) -> Any:
        self.bytes_up += request.ByteSize()
        reply = self._invoke(method, request)
        self.bytes_down += reply.ByteSize()
        return reply

    def _invoke(self, method: str, request: Any) -> Any:
        raise NotImplementedError

    def close(self) -> None:
        """Tell the server to free this session (idempotent)."""
        if self._closed:
            return
        self._closed = True
        request = split_pb2.CloseSessionRequest(session_id=self.session_id, token=self.token)
        self._call("CloseSession", request)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class SplitChannel(SplitBodyClient):
    """A session with a remote ``SplitBody`` service.

    Parameters
    ----------
    address : str
        ``host:port`` of the split service.
    token : str
        The per-round token from the coordinator (replace with ``channel.token = ...`` for a new round).
    node_id : str
        This client's Flower node id (``context.node_id``), the node the token was issued to.
    session_id : str, optional
        Defaults to a random UUID.
    wire_dtype : {"fp32", "fp16", "bf16"}, default "fp32"
        Dtype of activations and gradients on the wire (both directions); the server computes in its own.
    timeout_s : float, default 60
        Deadline of each call, retries of a RESOURCE_EXHAUSTED answer included.
    root_certificates : bytes, optional
        PEM roots to verify the server's TLS certificate; without them the channel is plaintext.
    max_message_bytes : int, default 64 MiB
        Largest message sent or received.
    """

    def __init__(
        self,
        address: str,
        token: str,
        *,
        node_id: str,
        session_id: str | None = None,
        wire_dtype: WireDType = "fp32",
        timeout_s: float = 60.0,
        root_certificates: bytes | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        super().__init__(token, session_id, wire_dtype)
        if timeout_s <= 0:
            raise ValueError(f"timeout_s={timeout_s}: expected a positive deadline in seconds")
        self.address = address
        self.timeout_s = timeout_s
        self._metadata = ((NODE_ID_METADATA, str(node_id)),)
        self._jitter = random.Random()  # private: the global generators are seeded for training
        options = [("grpc.max_send_message_length", max_message_bytes),
                   ("grpc.max_receive_message_length", max_message_bytes)]
        if root_certificates is not None:
            self._channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates),
                                                options=options)
        else:
            self._channel = grpc.insecure_channel(address, options=options)
        self._stub = split_pb2_grpc.SplitBodyStub(self._channel)

    def _invoke(self, method: str, request: Any) -> Any:
        deadline = time.monotonic() + self.timeout_s
        backoff = _RETRY_FIRST_S
        while True:
            try:
                return getattr(self._stub, method)(request, timeout=max(deadline - time.monotonic(), 1e-3),
                                                   metadata=self._metadata)
            except grpc.RpcError as exc:
                code, details = exc.code(), exc.details() or ""
                # The service (or gRPC's concurrent-call cap) refused before doing anything: wait and resend.
                # A message over the size limit is refused with the same code but would never pass.
                busy = code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" not in details
                pause = backoff * self._jitter.uniform(0.5, 1.0)
                if not busy or time.monotonic() + pause >= deadline:
                    raise SplitCallError(method, code, details) from exc
            time.sleep(pause)
            backoff = min(2 * backoff, _RETRY_MAX_S)

    def close(self) -> None:
        """Close the session on the server (best effort) and the channel."""
        if self._closed:
            return
        try:
            super().close()
        except SplitCallError:
            pass  # the server may be gone or the session expired; nothing is left to free
        finally:
            self._channel.close()
