"""`pollinate join`: run a Flower SuperNode that connects this machine to a coordinator.

Reconnection: `flower-supernode` itself retries transport errors with exponential backoff (bounded here by
`--max-wait-time`), which covers a coordinator that is briefly unreachable. It does not survive a
coordinator *restart*: the new SuperLink does not know its node id, the SuperNode gets 401 and exits. So
`join` supervises it and starts a fresh SuperNode (new node id, same key) with backoff, until the coordinator
has been unreachable for the whole retry budget.

End of the run: the coordinator's ServerApp tells every connected client once all rounds are done, and the
ClientApp writes a marker in the work dir (`pollinate.common.run_end`); `join` sees it and returns. Only that
explicit notice ends `join`: a coordinator that crashes or restarts sends none, so its clients rejoin.

The worker: Flower's SuperNode runs each message in a new ClientApp process, so `join` also runs one long-lived
worker process (deploy/worker.py) that the ClientApp hands train and evaluate messages to, and that keeps the
model and data across rounds; `--no-worker` runs every message in its own process as Flower does.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

from pollinate.common.run_end import RunEnd, read_run_end
from pollinate.deploy.app_trust import (
    load_verify_key,
    write_trusted_entities,
)
from pollinate.deploy.join_spec import JoinSpec, supernode_argv
from pollinate.deploy.keys import check_ca_cert, flower_node_key, load_node_private_key
from pollinate.deploy.processes import (
    ChildProcess,
    adopt_orphans,
    child_env,
    free_loopback_port,
    stop_on_signals,
)
from pollinate.deploy.worker import LocalWorker, start_worker, stop_strays

log = logging.getLogger(__name__)

_CONNECTED = "SuperNode ID:"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_TLS_MARKERS = ("CERTIFICATE_VERIFY_FAILED", "SSL/TLS handshake error", "certificate verify failed")
# Flower exit codes that retrying cannot fix (ref-exit-codes): bad key, auth without TLS, bad trusted
# entities; 2 is argparse's usage error.
_PERMANENT_EXIT_CODES = {2: "invalid arguments", 302: "invalid node private key",
                         303: "node authentication requires TLS", 304: "invalid trusted entities"}
# The SuperNode's SuperExec looks for new ClientApp tasks every second by default: a second of every round.
_TASK_POLL_ENV = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2"}


def flower_error(output: str) -> str:
    """The error Flower printed before exiting ("Exit Code: N" and the lines explaining it), or ""."""
    lines = [_ANSI.sub("", line).strip() for line in output.splitlines()]
    for i, line in enumerate(lines):
        if "Exit Code:" in line:
            reason = [line[line.index("Exit Code:"):]]
            reason += [text for text in lines[i + 1 : i + 6] if text and not text.startswith("For more")]
            return " ".join(reason[:4])
    return ""


# A node that was in, then lost the coordinator for the whole budget, may have missed the run-end notice.
_MISSED_END = "If its run has finished, this node was not connected when the coordinator said so. "


class JoinError(RuntimeError):
    """The node cannot join, and retrying will not help (TLS trust, key, arguments)."""


class CoordinatorUnreachableError(JoinError):
    """The coordinator did not accept this node within the retry budget."""


class Node:
    """Runs and supervises one SuperNode; `stop()` (any thread) or SIGINT/SIGTERM ends it.

    Parameters
    ----------
    spec : JoinSpec
        How to join.
    echo : TextIO or None, default sys.stdout
        Where to copy the SuperNode's log lines (always also in `work_dir/logs/supernode.log`).
    """

    def __init__(self, spec: JoinSpec, echo: TextIO | None = sys.stdout, owns_process: bool = False) -> None:
        self.spec = spec
        self.echo = echo
        # As the `pollinate join` process, every descendant is this node's: a ClientApp orphaned when its
        # SuperNode died (e.g. the coordinator crashed mid-start) is adopted and stopped, never left running.
        self.owns_process = owns_process and adopt_orphans()
        self.child: ChildProcess | None = None
        self.connections = 0
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._key_copy: Path | None = None  # decrypted key of the running SuperNode, removed once it is in
        self.run_end: RunEnd | None = None  # set once the coordinator has said the run is complete
        self.worker: LocalWorker | None = None  # the long-lived worker, while `run` runs

    def check(self) -> None:
        """Fail early on unreadable/invalid CA certificate, node key or data/profile paths."""
        if self.spec.ca_cert is not None:
            check_ca_cert(self.spec.ca_cert)
        if self.spec.private_key is not None:
            load_node_private_key(self.spec.private_key)
        if (signing := self.spec.app_signing_key) is not None:
            if not signing.is_file():
                raise FileNotFoundError(
                    f"app-signing public key not found: {signing}. Copy app-signing.pub from the coordinator's "
                    "certs directory (beside ca.crt): without it this node would run any app it is sent"
                )
            load_verify_key(signing)
        for what, path in (("data path", self.spec.data_path), ("profile", self.spec.profile_path)):
            if path is not None and not path.exists():
                raise FileNotFoundError(f"{what} not found: {path}")

    def stop(self) -> None:
        self._stop.set()

    @property
    def connected(self) -> threading.Event:
        """Set once a SuperNode has been accepted by the coordinator."""
        return self._connected

    def _on_line(self, line: str) -> None:
        if _CONNECTED in line:
            if self._key_copy is not None:  # read at the SuperNode's start; no need to keep it around
                self._key_copy.unlink(missing_ok=True)
            self.connections += 1
            self._connected.set()
            self._last_connected = time.monotonic()

    @contextmanager
    def _readable_key(self) -> Iterator[Path | None]:
        if self.spec.private_key is None:
            yield None
            return
        with flower_node_key(self.spec.private_key) as key:
            self._key_copy = None if key == self.spec.private_key else key
            try:
                yield key
            finally:
                self._key_copy = None

    def _warn_insecure(self) -> None:
        warning = (f"WARNING: INSECURE join of {self.spec.coordinator}: no TLS, so the coordinator is not "
                   "authenticated; anyone on the network path can read this client's updates and send it code "
                   "to run. Use only on a trusted local network.")
        if self.echo is not None:
            self.echo.write(warning + "\n")
        else:
            log.warning(warning)

    def run(self) -> RunEnd | None:
        """Join and keep the node joined until the coordinator ends the run (returns how it ended) or until
        stopped (returns None); raise if the coordinator stays unreachable."""
        self.check()
        if self.spec.insecure:
            self._warn_insecure()
        if self.spec.app_signing_key is not None:
            write_trusted_entities(self.spec.app_signing_key, self.spec.trusted_entities_path)
        home = self.spec.work_dir / "flwr_home"
        home.mkdir(parents=True, exist_ok=True)
        poll = {key: value for key, value in _TASK_POLL_ENV.items() if key not in os.environ}
        env = child_env({**poll, **(self.spec.env or {}), "FLWR_HOME": str(home)})
        self._last_connected = time.monotonic()
        self.spec.run_end_path.unlink(missing_ok=True)  # a previous join's run, not this one
        with stop_on_signals(self._stop):
            # Before the first SuperNode: it imports the libraries while the SuperNode connects.
            self.worker = start_worker(self.spec.work_dir, env, self.echo) if self.spec.worker else None
            try:
                return self._supervise(env, self.spec.work_dir / "logs" / "supernode.log")
            finally:
                self._stop_worker()

    def _stop_worker(self) -> None:
        if self.worker is not None:
            self.worker.stop()
            self.worker = None

    def _supervise(self, env: Mapping[str, str], log_path: Path) -> RunEnd | None:
        """Start SuperNodes until the run ends (returns how), `stop()` (None) or the retry budget runs out."""
        backoff = 1.0
        while not self._stop.is_set():
            remaining = self.spec.retry_budget_s - (time.monotonic() - self._last_connected)
            connections_before = self.connections
            worker_socket = self.worker.socket_path if self.worker is not None else None
            with self._readable_key() as key:
                argv = supernode_argv(self.spec, free_loopback_port(), remaining, key, worker_socket)
                self.child = ChildProcess(
                    "supernode", argv, env, log_path, echo=self.echo, on_line=self._on_line
                )
                code = self._wait_child()
            self._stop_orphans()
            if code is None or self.run_end is not None:  # stop requested, or the run is over
                return self.run_end
            output = self.child.tail(40)
            reason = flower_error(output) or _ANSI.sub("", self.child.tail(8))
            if any(marker in output for marker in _TLS_MARKERS):
                raise JoinError(
                    f"TLS verification of the coordinator at {self.spec.coordinator} failed: its "
                    f"certificate is not signed by the CA in {self.spec.ca_cert}, or does not name "
                    f"this host. Get the coordinator's ca.crt. Flower: {reason} (log: {log_path})"
                )
            if code in _PERMANENT_EXIT_CODES:
                raise JoinError(
                    f"flower-supernode exited with code {code} ({_PERMANENT_EXIT_CODES[code]}): "
                    f"{reason} (log: {log_path})"
                )
            if self.connections > connections_before:
                # It was in until just now (a restarted coordinator rejects its old node id):
                # rejoin promptly and measure the budget from here.
                backoff = 1.0
                self._last_connected = time.monotonic()
            unreachable_for = time.monotonic() - self._last_connected
            if unreachable_for + backoff > self.spec.retry_budget_s:
                raise CoordinatorUnreachableError(
                    f"coordinator at {self.spec.coordinator} did not accept this node for "
                    f"{unreachable_for:.0f} s (retry budget {self.spec.retry_budget_s:.0f} s). Is it "
                    f"running, is the address right and is this node's public key registered there? "
                    f"{_MISSED_END if self.connections else ''}Last error: {reason} (log: {log_path})"
                )
            log.warning("SuperNode exited with code %s (%s); rejoining %s in %.0f s",
                        code, reason, self.spec.coordinator, backoff)
            if self._stop.wait(backoff):
                return None
            backoff = min(backoff * 2, self.spec.max_backoff_s)

    def _wait_child(self) -> int | None:
        """The SuperNode's exit code; None once it was stopped (stop requested, or the run ended and the grace
        for its acknowledgement is over)."""
        assert self.child is not None
        ended_at = None
        while True:
            if ended_at is None and (end := read_run_end(self.spec.run_end_path)) is not None:
                self.run_end, ended_at = end, time.monotonic()
            if self._stop.is_set() or (ended_at is not None
                                       and time.monotonic() - ended_at >= self.spec.finish_grace_s):
                self.child.stop()
                return None
            if self.worker is not None:
                self.worker.ensure_running()
            try:
                code = self.child.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                continue
            self.run_end = self.run_end or read_run_end(self.spec.run_end_path)  # noted just before it exited
            return code

    def _stop_orphans(self) -> None:
        if self.owns_process and (count := stop_strays(self.worker)):
            log.warning("stopped %d process(es) left behind by the previous SuperNode", count)

    def __enter__(self) -> Node:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        if self.child is not None:
            self.child.stop()
        self._stop_worker()
        self._stop_orphans()


def join(spec: JoinSpec, echo: TextIO | None = sys.stdout) -> RunEnd | None:
    """Join the coordinator and stay joined until it ends the run (returns how) or SIGINT/SIGTERM (None)."""
    with Node(spec, echo, owns_process=True) as node:
        return node.run()

