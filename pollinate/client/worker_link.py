"""The ClientApp's side of a deployed node's worker: hand a message to the long-lived process, return its reply.

Flower 1.42's SuperNode runs every message in a fresh ``flwr-clientapp`` process, which would import torch, load
the model and prepare the data again every round. ``pollinate join`` keeps one worker process per node
(``pollinate.deploy.worker_server``) that holds them across rounds, and names its socket in the node config
(``worker-socket``); this ClientApp then forwards train and evaluate messages to it (``forward_to_worker``, a
Flower mod). Without that key (simulation, ``pollinate join --no-worker``) every message runs in-process.

The link is a Unix-domain socket only this user can reach (mode 0600 in a 0700 directory; each side checks the
other's uid with ``SO_PEERCRED``). One connection carries one request and one reply, each a few length-prefixed
frames of Flower's own protobuf: request = ``Message`` + ``Context``; reply = ``Message`` holding the reply's
content, then the node state (``RecordDict``) after it, or a ``Message`` holding only an ``Error``. Nothing is
pickled, and this module imports no torch.
"""

from __future__ import annotations

import os
import socket
import struct
import time

from flwr.app import Context, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.common.serde import (
    context_from_proto,
    context_to_proto,
    message_from_proto,
    message_to_proto,
    recorddict_from_proto,
    recorddict_to_proto,
)
from flwr.proto.error_pb2 import Error as ProtoError  # pylint: disable=E0611
from flwr.proto.message_pb2 import Context as ProtoContext  # pylint: disable=E0611
from flwr.proto.message_pb2 import Message as ProtoMessage  # pylint: disable=E0611
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict  # pylint: disable=E0611
from google.protobuf.message import DecodeError

from pollinate.common.limits import MAX_MESSAGE_BYTES

# Node config key: the worker's socket (set by `pollinate join`; absent in simulation and with --no-worker).
WORKER_SOCKET_KEY = "worker-socket"
# Message categories the worker runs; queries (the run-end notice) stay in the ClientApp process.
FORWARDED_CATEGORIES = ("train", "evaluate")
# One frame is one serialized protobuf: at most 32 x the gRPC planes' cap, less a byte (protobuf's own ceiling).
MAX_FRAME_BYTES = min(32 * MAX_MESSAGE_BYTES, 2**31 - 1)
# How long a message waits for a worker that is (re)starting before it fails.
CONNECT_TIMEOUT_S = 60.0
_MAGIC = b"PWL1"
_HEADER = struct.Struct(">4sQ")
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_CHUNK = 1 << 20


class WorkerError(RuntimeError):
    """The worker could not be reached, broke the protocol, or failed to handle the request."""


class PeerRefused(WorkerError):
    """The process at the other end of the socket runs as another user."""


def send_frame(sock: socket.socket, payload: bytes, max_bytes: int = MAX_FRAME_BYTES) -> None:
    """Write one frame (magic, length, payload); refuse a payload over ``max_bytes`` before sending anything."""
    if len(payload) > max_bytes:
        raise WorkerError(f"frame of {len(payload)} bytes exceeds max_bytes={max_bytes} (for larger messages run "
                          "pollinate join with --no-worker)")
    sock.sendall(_HEADER.pack(_MAGIC, len(payload)))
    if payload:  # after an empty frame's header the peer may already be gone
        sock.sendall(payload)


def recv_frame(sock: socket.socket, max_bytes: int = MAX_FRAME_BYTES) -> bytearray:
    """Read one frame; a wrong magic or a declared length over ``max_bytes`` is refused before the body is read."""
    magic, size = _HEADER.unpack(_recv_exact(sock, _HEADER.size))
    if magic != _MAGIC:
        raise WorkerError(f"frame starts with {bytes(magic)!r}, expected {_MAGIC!r}")
    if size > max_bytes:
        raise WorkerError(f"frame of {size} bytes exceeds max_bytes={max_bytes}")
    return _recv_exact(sock, size)


def _recv_exact(sock: socket.socket, size: int) -> bytearray:
    buf = bytearray(size)
    view, got = memoryview(buf), 0
    while got < size:
        count = sock.recv_into(view[got:], min(size - got, _CHUNK))
        if count == 0:
            raise WorkerError(f"connection closed after {got} of {size} bytes")
        got += count
    return buf


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end of a connected Unix socket (Linux ``SO_PEERCRED``)."""
    _, uid, _ = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return uid


def check_peer(sock: socket.socket, expected_uid: int, read_uid=peer_uid) -> None:
    """Raise ``PeerRefused`` unless the peer runs as ``expected_uid``."""
    if (uid := read_uid(sock)) != expected_uid:
        raise PeerRefused(f"peer uid {uid} is not {expected_uid}, the worker's user")


def _parse(proto_cls, payload: bytearray):
    try:
        return proto_cls.FromString(payload)
    except DecodeError as exc:
        raise WorkerError(f"frame is not a valid {proto_cls.DESCRIPTOR.name} protobuf: {exc}") from exc


def read_request(sock: socket.socket, max_bytes: int = MAX_FRAME_BYTES) -> tuple[Message, Context]:
    """The worker's side: the forwarded message and the ClientApp's context."""
    message = message_from_proto(_parse(ProtoMessage, recv_frame(sock, max_bytes)))
    context = context_from_proto(_parse(ProtoContext, recv_frame(sock, max_bytes)))
    if not message.has_content():
        raise WorkerError("forwarded message has no content")
    return message, context


def write_reply(sock: socket.socket, content: RecordDict, state: RecordDict, max_bytes: int = MAX_FRAME_BYTES) -> None:
    """The worker's side: the reply's content, then the node state after handling the message (both sized before
    either is sent, so a reply too large to frame can still be answered with an error)."""
    frames = [ProtoMessage(content=recorddict_to_proto(content)).SerializeToString(),
              recorddict_to_proto(state).SerializeToString()]
    if (largest := max(len(frame) for frame in frames)) > max_bytes:
        raise WorkerError(f"reply frame of {largest} bytes exceeds max_bytes={max_bytes}")
    for frame in frames:
        send_frame(sock, frame, max_bytes)


def write_error(sock: socket.socket, reason: str, code: int = ErrorCode.CLIENT_APP_RAISED_EXCEPTION) -> None:
    """The worker's side: this request failed (the ClientApp raises it, so Flower reports the failure)."""
    send_frame(sock, ProtoMessage(error=ProtoError(code=code, reason=reason[:4000])).SerializeToString())


def _connect(path: str, timeout_s: float) -> socket.socket:
    deadline = time.monotonic() + timeout_s
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
            return sock
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            if time.monotonic() >= deadline:
                raise WorkerError(f"no worker answers on {path} after {timeout_s:.0f} s ({exc}); is the node's "
                                  "`pollinate join` running?") from exc
            time.sleep(0.2)


def forward(path: str, msg: Message, context: Context, *, connect_timeout_s: float = CONNECT_TIMEOUT_S,
            max_bytes: int = MAX_FRAME_BYTES) -> tuple[RecordDict, RecordDict]:
    """Hand ``msg`` and ``context`` to the worker at ``path``; its reply content and the node state after it."""
    with _connect(path, connect_timeout_s) as sock:
        try:
            check_peer(sock, os.getuid())
            send_frame(sock, message_to_proto(msg).SerializeToString(), max_bytes)
            send_frame(sock, context_to_proto(context).SerializeToString(), max_bytes)
            reply = _parse(ProtoMessage, recv_frame(sock, max_bytes))
            state = None if reply.HasField("error") else _parse(ProtoRecordDict, recv_frame(sock, max_bytes))
        except OSError as exc:  # e.g. the worker died mid-message, or refused this peer
            raise WorkerError(f"the node's worker dropped this {msg.metadata.message_type} message: {exc}") from exc
    if reply.HasField("error"):
        raise WorkerError(f"the node's worker failed on this {msg.metadata.message_type} message: "
                          f"{reply.error.reason}")
    if not reply.HasField("content"):
        raise WorkerError("the worker's reply holds neither content nor an error")
    return recorddict_from_proto(reply.content), recorddict_from_proto(state)


def forward_to_worker(msg: Message, context: Context, call_next) -> Message:
    """Flower mod: run train and evaluate messages in the worker the node config names, the rest here; the
    worker's node state replaces this Context's, which Flower keeps for the next message."""
    path = context.node_config.get(WORKER_SOCKET_KEY)
    if not path or msg.metadata.message_type.split(".")[0] not in FORWARDED_CATEGORIES:
        return call_next(msg, context)
    content, context.state = forward(str(path), msg, context)
    return Message(content=content, reply_to=msg)
