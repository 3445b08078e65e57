"""Child processes for deployment: Flower's own executables started in their own process group, logged
line by line, and stopped with their whole process tree (terminate, then kill after a grace period).

Used by both `pollinate coordinator` (SuperLink, `flwr` CLI) and `pollinate join` (SuperNode), so it knows
neither side.
"""

from __future__ import annotations

import collections
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

import psutil

from pollinate.deploy.keyfiles import PASSPHRASE_ENV

# Terminal colour/cursor codes: Flower colours its log levels even into a pipe.
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def plain_line(line: str) -> str:
    """``line`` without terminal escape codes (for log files, and consoles that are not a terminal)."""
    return _ANSI_ESCAPE.sub("", line)


def flwr_executable(name: str) -> str:
    """Path of a Flower console script installed beside this interpreter (works without an active venv)."""
    candidate = Path(sys.executable).with_name(name)
    if candidate.is_file():
        return str(candidate)
    raise FileNotFoundError(
        f"Flower executable {name!r} not found next to {sys.executable}; "
        "is flwr installed in this environment?"
    )


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for Flower children: this interpreter's bin dir first on PATH, because the SuperLink
    and SuperNode start `flower-superexec`, `flwr-serverapp` and `flwr-clientapp` by bare name. The key
    passphrase stays behind: those processes run the app a coordinator sent, and need no key of ours."""
    env = dict(os.environ)
    env.pop(PASSPHRASE_ENV, None)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    env.update(extra or {})
    return env


def port_in_use(host: str, port: int) -> bool:
    """True if something already listens on `host:port` (a socket in TIME_WAIT does not count)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # Same option uvicorn sets, so the check agrees with the server that will bind the port.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def free_loopback_port() -> int:
    """An ephemeral TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ChildProcess:
    """One child command in its own session; its output goes to a log file (and optionally a stream).

    Parameters
    ----------
    name : str
        Short name used in log prefixes and error messages.
    argv : sequence of str
        Command line.
    env : mapping
        Full environment of the child.
    log_path : Path
        Output (stdout and stderr merged) is appended here.
    echo : TextIO or None, default None
        Also copy each output line here (e.g. `sys.stdout`), prefixed with `[name]`.
    on_line : callable or None, default None
        Called with each output line (from a reader thread).
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str],
        log_path: Path,
        *,
        echo: TextIO | None = None,
        on_line: Callable[[str], None] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self._tail: collections.deque[str] = collections.deque(maxlen=40)
        self._echo = echo
        self._echo_colour = bool(getattr(echo, "isatty", lambda: False)())
        self._on_line = on_line
        log_path.parent.mkdir(parents=True, exist_ok=True)
        # Own session: a terminal Ctrl-C reaches only Pollinate, which then stops the tree in order.
        self.popen = subprocess.Popen(
            self.argv,
            env=dict(env),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._pump, name=f"{name}-output", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def _pump(self) -> None:
        assert self.popen.stdout is not None
        with open(self.log_path, "a", encoding="utf-8", errors="replace") as log:
            for raw in self.popen.stdout:
                coloured = raw.decode("utf-8", errors="replace").rstrip("\n")
                line = plain_line(coloured)
                log.write(line + "\n")
                log.flush()
                self._tail.append(line)
                if self._echo is not None:
                    self._echo.write(f"[{self.name}] {coloured if self._echo_colour else line}\n")
                    self._echo.flush()
                if self._on_line is not None:
                    self._on_line(line)

    def poll(self) -> int | None:
        return self.popen.poll()

    def wait(self, timeout: float | None = None) -> int:
        """Wait for exit (raises `subprocess.TimeoutExpired`) and for its output to be read."""
        code = self.popen.wait(timeout)
        # Grandchildren may still hold the pipe open: don't wait for them, the output we need is in.
        self._reader.join(timeout=2.0)
        return code

    def tail(self, lines: int = 15) -> str:
        """The last output lines, for error messages."""
        return "\n".join(list(self._tail)[-lines:])

    def stop(self, grace_s: float = 5.0) -> int | None:
        """Stop the child and every descendant: SIGTERM, then SIGKILL what is left after `grace_s`."""
        try:
            # Flower detaches SuperExec into its own session, so the process group alone is not enough.
            descendants = psutil.Process(self.popen.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            descendants = []
        self._signal_group(signal.SIGTERM)
        _each(descendants, psutil.Process.terminate)
        # The root is reaped through Popen (not psutil) so its exit code is kept.
        try:
            self.popen.wait(grace_s)
        except subprocess.TimeoutExpired:
            self._signal_group(signal.SIGKILL)
        _kill_survivors(descendants, grace_s=1.0)
        try:
            return self.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            return None

    def _signal_group(self, sig: signal.Signals) -> None:
        if self.popen.poll() is not None:
            return
        try:
            os.killpg(self.popen.pid, sig)
        except ProcessLookupError:
            pass


def adopt_orphans() -> bool:
    """Make this process a child subreaper (Linux): descendants orphaned when their parent dies (a ClientApp
    whose SuperNode exited) are re-parented here instead of to init, so `stop_descendants` can reach them.
    Returns False where the kernel does not support it."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    pr_set_child_subreaper = 36
    return ctypes.CDLL(None, use_errno=True).prctl(pr_set_child_subreaper, 1, 0, 0, 0) == 0


def stop_descendants(grace_s: float = 5.0) -> int:
    """Terminate (then kill) every live descendant of this process; returns how many there were. Only for a
    process whose every child is its own to stop (the `pollinate join` process)."""
    descendants = psutil.Process().children(recursive=True)
    _each(descendants, psutil.Process.terminate)
    _kill_survivors(descendants, grace_s)
    return len(descendants)


def _each(procs: Sequence[psutil.Process], signal_one: Callable[[psutil.Process], None]) -> None:
    for proc in procs:
        try:
            signal_one(proc)
        except psutil.NoSuchProcess:
            pass


def _kill_survivors(procs: Sequence[psutil.Process], grace_s: float) -> None:
    """SIGKILL whatever of ``procs`` is still alive after ``grace_s``, and reap it."""
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    _each(alive, psutil.Process.kill)
    psutil.wait_procs(alive, timeout=2.0)


@contextmanager
def stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """Turn SIGINT/SIGTERM into `stop.set()` for the wait loops to act on (main thread only: elsewhere
    signal handlers cannot be installed and the owner calls stop itself)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
