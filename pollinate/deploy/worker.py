"""`pollinate join`'s side of the node's long-lived worker (worker_server.py, client/worker_link.py): where its
socket goes, starting it before the SuperNode, restarting it when it dies, stopping it by PID, and sparing it when
the processes a dead SuperNode left behind are stopped.

The worker lives as long as ``join``: across SuperNode restarts (a restarted coordinator) it keeps its imports,
and its first request of a new run drops what it cached for the old one.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TextIO

import psutil

from pollinate.deploy.processes import ChildProcess

log = logging.getLogger(__name__)

# The worker link needs Unix sockets and SO_PEERCRED (Linux); elsewhere join runs every message in-process.
WORKER_SUPPORTED = hasattr(socket, "AF_UNIX") and hasattr(socket, "SO_PEERCRED")
RESTART_DELAY_S = 5.0  # a worker that keeps dying at start is restarted at most this often
_MAX_SOCKET_PATH = 100  # a Unix socket path holds at most 107 bytes on Linux (103 on macOS)


def worker_socket_path(work_dir: Path) -> Path:
    """The worker's socket: ``worker/worker.sock`` in the node's work dir, or, where that path is too long for a
    Unix socket, in a directory of this user's under the system temp dir named after the work dir."""
    path = Path(work_dir) / "worker" / "worker.sock"
    if len(os.fsencode(path)) <= _MAX_SOCKET_PATH:
        return path
    digest = hashlib.sha256(os.fsencode(Path(work_dir))).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"pollinate-{os.getuid()}-{digest}" / "worker.sock"


def worker_argv(socket_path: Path) -> list[str]:
    """The worker's command line: this interpreter, this process as the parent it must not outlive."""
    return [sys.executable, "-m", "pollinate.deploy.worker_server", "--socket", str(socket_path),
            "--parent-pid", str(os.getpid())]


class LocalWorker:
    """One node's worker process, as ``pollinate join`` runs it.

    Parameters
    ----------
    socket_path : Path
        Where it serves (``worker_socket_path``); the SuperNode's node config names it.
    env : mapping
        Its full environment (the one the SuperNode's ClientApp processes get).
    log_path : Path
        Its output is appended here.
    echo : TextIO or None, default None
        Also copy its output lines here, prefixed with ``[worker]``.
    """

    def __init__(self, socket_path: Path, env: Mapping[str, str], log_path: Path, echo: TextIO | None = None) -> None:
        self.socket_path, self.env, self.log_path, self.echo = Path(socket_path), dict(env), log_path, echo
        self.child: ChildProcess | None = None
        self.restarts = 0
        self._started_at = 0.0

    @property
    def pid(self) -> int | None:
        return self.child.pid if self.child is not None else None

    def start(self) -> None:
        """Start the worker (it listens at once and imports the libraries while the SuperNode connects)."""
        self.child = ChildProcess("worker", worker_argv(self.socket_path), self.env, self.log_path, echo=self.echo)
        self._started_at = time.monotonic()

    def ensure_running(self) -> bool:
        """Restart the worker if it has exited; True when it was restarted. A message it was handling fails (its
        ClientApp sees the connection close); the next waits for the new worker."""
        if self.child is None or self.child.poll() is None:
            return False
        if time.monotonic() - self._started_at < RESTART_DELAY_S:
            return False
        log.warning("worker (pid %d) exited with code %s; restarting it. Its last lines:\n%s",
                    self.child.pid, self.child.poll(), self.child.tail(8))
        self.restarts += 1
        self.start()
        return True

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop the worker by PID (SIGTERM, then SIGKILL after ``grace_s``) and remove its socket (and the socket's
        directory, once empty)."""
        if self.child is not None:
            self.child.stop(grace_s)
            self.child = None
        self.socket_path.unlink(missing_ok=True)
        try:
            self.socket_path.parent.rmdir()
        except OSError:
            pass


def start_worker(work_dir: Path, env: Mapping[str, str], echo: TextIO | None = None) -> LocalWorker | None:
    """Start the worker of the node whose work dir is ``work_dir`` (output in ``logs/worker.log``); None where the
    platform lacks what the link needs, and every message runs in its own process."""
    if not WORKER_SUPPORTED:
        log.warning("no Unix-socket peer credentials on this platform: every message runs in its own process")
        return None
    worker = LocalWorker(worker_socket_path(work_dir), env, Path(work_dir) / "logs" / "worker.log", echo=echo)
    worker.start()
    return worker


def stop_strays(worker: LocalWorker | None, grace_s: float = 5.0) -> int:
    """Terminate (then kill) every descendant of this process except ``worker`` and its children: what a dead
    SuperNode left behind. Returns how many there were. Only for the ``pollinate join`` process."""
    spared: set[int] = set()
    if worker is not None and worker.pid is not None:
        try:
            root = psutil.Process(worker.pid)
            spared = {root.pid, *(child.pid for child in root.children(recursive=True))}
        except psutil.NoSuchProcess:
            pass
    strays = [proc for proc in psutil.Process().children(recursive=True) if proc.pid not in spared]
    for proc in strays:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(strays, timeout=grace_s)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=2.0)
    return len(strays)
