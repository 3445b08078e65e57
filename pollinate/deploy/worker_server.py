"""A deployed node's long-lived worker: runs Pollinate's ClientApp for the node's per-message ClientApp processes,
so the model, tokenizer and local data (client/runtime.py's per-process cache) survive across rounds.

``pollinate join`` starts it (``python -m pollinate.deploy.worker_server --socket PATH --parent-pid PID``) before
the SuperNode, restarts it if it dies and stops it by PID; it also exits on its own once that parent is gone. The
protocol and the ClientApp's side are in pollinate/client/worker_link.py. Requests are served one at a time (the
cache is not thread-safe, and a node trains one message at a time anyway); whatever goes wrong with one request
(garbled or oversized frames, a peer of another user, an exception while handling it) is refused or becomes that
request's error reply, and the worker serves the next one.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from flwr.app import Context, Message

from pollinate.client.worker_link import (
    MAX_FRAME_BYTES,
    WORKER_SOCKET_KEY,
    PeerRefused,
    WorkerError,
    check_peer,
    peer_uid,
    read_request,
    write_error,
    write_reply,
)

log = logging.getLogger(__name__)

IO_TIMEOUT_S = 60.0  # a peer that stalls mid-frame is cut off; handling a request has no limit of its own
Handler = Callable[[Message, Context], Message]


def private_dir(path: Path) -> Path:
    """``path`` as a directory only this user can enter: created with mode 0700, tightened to it if it exists,
    refused if it is a link or another user's."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise WorkerError(f"worker socket directory {path} must be a real directory owned by uid {os.getuid()}")
    os.chmod(path, 0o700)
    return path


class InProcessClientApp:
    """The worker's handler: Pollinate's ClientApp, run in this process.

    The per-process cache keeps models and data across requests of one run; the first request of another run (a
    coordinator that restarted, e.g. to resume) drops it, so that run starts as fresh as a new process would.
    """

    def __init__(self) -> None:
        self.run_id: int | None = None

    def __call__(self, msg: Message, context: Context) -> Message:
        from flwr.supercore.task_identity import TaskIdentity

        from pollinate.client import runtime
        from pollinate.client.app import app

        if self.run_id is not None and context.run_id != self.run_id:
            runtime.drop_cached(())
        self.run_id = context.run_id
        # What flwr-clientapp sets from its task before running the app (messages take their source from it).
        TaskIdentity.run_id, TaskIdentity.node_id = context.run_id, context.node_id
        TaskIdentity.task_id = msg.metadata.dst_task_id or 0
        return app(msg, context)


class WorkerServer:
    """Serves forwarded messages on a Unix socket, one connection (one request, one reply) at a time.

    Parameters
    ----------
    path : Path
        The socket; its directory is made private to this user (mode 0700), the socket file mode 0600.
    handler : callable, default InProcessClientApp()
        Runs one message with its context and returns the reply; it may update ``context.state``.
    expected_uid : int, default os.getuid()
        The only user whose processes are served.
    read_uid : callable, default peer_uid
        Reads a connection's peer uid (a seam for tests).
    max_bytes : int, default MAX_FRAME_BYTES
        Largest frame read or written.
    io_timeout_s : float, default IO_TIMEOUT_S
        How long one read or write on a connection may stall.
    """

    def __init__(self, path: Path, handler: Handler | None = None, *, expected_uid: int | None = None,
                 read_uid: Callable[[socket.socket], int] = peer_uid, max_bytes: int = MAX_FRAME_BYTES,
                 io_timeout_s: float = IO_TIMEOUT_S) -> None:
        self.path = Path(path)
        self.handler = handler or InProcessClientApp()
        self.expected_uid = os.getuid() if expected_uid is None else expected_uid
        self.read_uid, self.max_bytes, self.io_timeout_s = read_uid, max_bytes, io_timeout_s
        self.listener: socket.socket | None = None
        self.served = 0  # requests taken to handle (answered with a reply or an error reply)
        self.refused = 0  # connections turned away: another user, or a request that is not one

    def bind(self) -> None:
        """Listen on ``path`` (a socket left there by an earlier worker is replaced; anything else is refused)."""
        private_dir(self.path.parent)
        if self.path.is_symlink() or self.path.exists():
            if not stat.S_ISSOCK(os.lstat(self.path).st_mode):
                raise WorkerError(f"{self.path} exists and is not a socket; remove it or choose another work dir")
            self.path.unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(self.path))
        os.chmod(self.path, 0o600)
        listener.listen(8)
        listener.settimeout(0.5)  # accept wakes up to notice a stop request
        self.listener = listener

    def close(self) -> None:
        """Stop listening and remove the socket file."""
        if self.listener is not None:
            self.listener.close()
            self.listener = None
            self.path.unlink(missing_ok=True)

    def serve_forever(self, stop: threading.Event) -> None:
        """Answer connections until ``stop`` is set."""
        assert self.listener is not None, "bind() first"
        while not stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            self.serve_one(conn)

    def serve_one(self, conn: socket.socket) -> None:
        """Check the peer, read its request, answer it, close the connection."""
        with conn:
            conn.settimeout(self.io_timeout_s)
            try:
                check_peer(conn, self.expected_uid, self.read_uid)
                msg, context = read_request(conn, self.max_bytes)
            except PeerRefused as exc:
                self.refused += 1
                log.warning("worker: refused a connection: %s", exc)
                return
            except Exception as exc:  # noqa: BLE001 - garbled, oversized, truncated or stalled: not a request
                self.refused += 1
                log.warning("worker: refused a bad request: %s", exc)
                _send_quietly(write_error, conn, f"bad request: {exc}")
                return
            self._answer(conn, msg, context)

    def _answer(self, conn: socket.socket, msg: Message, context: Context) -> None:
        started = time.perf_counter()
        self.served += 1
        context.node_config = {k: v for k, v in context.node_config.items() if k != WORKER_SOCKET_KEY}
        try:
            reply = self.handler(msg, context)
        except Exception as exc:  # noqa: BLE001 - any failure is this request's error reply; the worker serves on
            log.exception("worker: %s message failed", msg.metadata.message_type)
            _send_quietly(write_error, conn, f"{type(exc).__name__}: {exc}")
        else:
            if reply.has_error():
                _send_quietly(write_error, conn, reply.error.reason, reply.error.code)
            else:
                _send_quietly(write_reply, conn, reply.content, context.state, self.max_bytes)
            log.info("worker: %s message of run %s answered in %.2f s%s", msg.metadata.message_type,
                     context.run_id, time.perf_counter() - started, _training_note(reply))


def _training_note(reply: Message) -> str:
    if reply.has_content() and "metrics" in reply.content.metric_records:
        if (seconds := reply.content["metrics"].get("train_seconds")) is not None:
            return f" (training {float(seconds):.2f} s)"
    return ""


def _send_quietly(write, conn: socket.socket, *args) -> None:
    """Send a reply; a ClientApp that went away (or a reply too large to frame) is logged, not fatal."""
    try:
        write(conn, *args)
    except WorkerError as exc:  # too large to frame: nothing went out, so an error reply still can
        log.warning("worker: reply not sent: %s", exc)
        if write is not write_error:
            _send_quietly(write_error, conn, f"reply not sent: {exc}")
    except OSError as exc:
        log.warning("worker: reply not sent, the ClientApp is gone: %s", exc)


def prewarm() -> None:
    """Import what requests need (torch, transformers, peft, the methods' client halves) before the first one."""
    started = time.perf_counter()
    import pollinate.client.app  # noqa: F401
    import pollinate.client.runtime  # noqa: F401
    import pollinate.common.adapters  # noqa: F401
    from pollinate.methods import METHODS

    for name, spec in METHODS.items():
        try:
            spec.client_half()
        except Exception as exc:  # noqa: BLE001 - a method that cannot load fails its own requests, clearly
            log.warning("worker: %s's client half does not import: %s", name, exc)
    log.info("worker: libraries imported in %.1f s", time.perf_counter() - started)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pollinate.deploy.worker_server",
                                     description="A pollinate join node's long-lived ClientApp worker.")
    parser.add_argument("--socket", required=True, help="Unix socket to serve on")
    parser.add_argument("--parent-pid", type=int, help="exit once this process (pollinate join) is gone")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Serve until SIGTERM/SIGINT or the parent's exit; 0 when stopped, 1 when the socket cannot be set up."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr, force=True)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))  # unwinds, so the socket file is removed
    if args.parent_pid is not None:
        from flwr.supercore.app_utils import start_parent_process_monitor

        start_parent_process_monitor(args.parent_pid)  # raises SIGINT here once pollinate join is gone
    server = WorkerServer(Path(args.socket))
    try:
        server.bind()
    except (WorkerError, OSError) as exc:
        log.error("worker: cannot serve on %s: %s", args.socket, exc)
        return 1
    try:
        prewarm()
        log.info("worker: serving %s (pid %d)", args.socket, os.getpid())
        server.serve_forever(threading.Event())
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
