"""`pollinate coordinator`: run one federated job on Flower's deployment engine.

It starts a `flower-superlink` (TLS and SuperNode authentication unless insecure), registers the node public
keys it was given, submits the run with `flwr run <app dir> --stream`, waits for it to finish and stops
everything it started. No Pollinate code is copied: the app directory holds only a generated
`pyproject.toml` whose components name the installed ServerApp/ClientApp modules, and the run config
travels in its `[tool.flwr.app.config]` table (which `flwr run` sends to the SuperLink; the ServerApp
reads it as `context.run_config`).

Flower 1.42 serves the Fleet, Control and Runtime APIs on one port and does not authenticate Control calls, so
the SuperLink binds loopback only (`superlink_port`), where the operator's `flwr ls`/`flwr log` and Flower's
own helper processes reach it, and the public `host:port` is the Fleet gateway (gateway.py), which answers
only what SuperNodes call. With TLS the coordinator signs the FAB it submits and its clients refuse any other
app (app_trust.py).
"""

from __future__ import annotations

import json
import logging
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

import httpx

from pollinate.deploy.app_trust import app_signing_paths, approve_app, ensure_app_signing_key
from pollinate.deploy.coordinator_spec import (  # noqa: F401  (CoordinatorSpec & co. are this module's API too)
    _RUN_STARTED,
    CONNECTION_NAME,
    DEFAULT_PORT,
    CoordinatorError,
    CoordinatorSpec,
    PortInUseError,
    RunOutcome,
    app_approval_path,
    gateway_argv,
    join_instructions,
    superlink_argv,
    write_app_dir,
    write_flwr_home,
)
from pollinate.deploy.identity import NodeIdentities, registered_node_id
from pollinate.deploy.keys import check_cert_paths, load_node_public_key
from pollinate.deploy.processes import ChildProcess, child_env, flwr_executable, port_in_use, stop_on_signals

log = logging.getLogger(__name__)

class Coordinator:
    """Owns the SuperLink of one run and every process it starts; a context manager that stops them.

    Parameters
    ----------
    spec : CoordinatorSpec
        What to run.
    echo : TextIO or None, default sys.stdout
        Where to copy the run's streamed log and the join instructions; None for silence (logs still go
        to `run_dir/logs/`).
    """

    def __init__(self, spec: CoordinatorSpec, echo: TextIO | None = sys.stdout) -> None:
        self.spec = spec
        self.echo = echo
        self.log_dir = spec.run_dir / "logs"
        self.superlink: ChildProcess | None = None
        self._children: list[ChildProcess] = []
        self._env: dict[str, str] = {}
        self._stop = threading.Event()
        self.ready = threading.Event()  # set once the SuperLink answers and node keys are registered
        self.identities: NodeIdentities | None = None  # client id of each registered node, once registered

    # -- preparation ---------------------------------------------------------------------------------
    def check(self) -> None:
        """Fail early, naming the culprit: cert files, node keys, ports."""
        if (paths := self.spec.cert_paths) is not None:
            check_cert_paths(paths)
        seen: dict[object, Path] = {}
        for key in self.spec.node_public_keys:
            numbers = load_node_public_key(key).public_numbers()
            if numbers in seen:  # one key, two client ids: the SuperLink would refuse the second registration
                raise ValueError(f"node key {key} is the same public key as {seen[numbers]}; each client needs "
                                 "its own key (`pollinate keys node`)")
            seen[numbers] = key
        for host, port in ((self.spec.host, self.spec.port), ("127.0.0.1", self.spec.superlink_port)):
            if port_in_use(host, port):
                raise PortInUseError(
                    f"port {port} on {host} is already in use; stop what holds it or pick another with --port "
                    f"(the public gateway takes --port, the SuperLink {self.spec.superlink_port} on loopback)"
                )

    def prepare(self) -> None:
        """Check inputs and write Flower's home (the app directory follows node registration)."""
        self.check()
        home = write_flwr_home(self.spec)
        self._env = child_env({**(self.spec.env or {}), "FLWR_HOME": str(home)})
        # This internal switch adds a legacy gRPC Fleet server on 0.0.0.0:9092 that 1.42 SuperNodes cannot
        # use (they speak HTTP only); keep it off so it never binds beside the SuperLink port.
        self._env.pop("FLWR_INTERNAL_GRPC_FLEET_API", None)
        if self.spec.certs_dir is not None and not self.spec.insecure:
            ensure_app_signing_key(self.spec.certs_dir)
            app_approval_path(self.spec).unlink(missing_ok=True)  # a previous run's signature in this run dir

    # -- processes -----------------------------------------------------------------------------------
    def _start(
        self, name: str, argv: list[str], *, echo: bool = False, on_line: Callable[[str], None] | None = None
    ) -> ChildProcess:
        child = ChildProcess(
            name, argv, self._env, self.log_dir / f"{name}.log",
            echo=self.echo if echo else None, on_line=on_line, cwd=self.spec.run_dir,
        )
        self._children.append(child)
        return child

    def start_superlink(self) -> None:
        """Start the SuperLink and wait until it answers on its port."""
        if self.spec.insecure:
            warning = (
                f"WARNING: INSECURE coordinator: no TLS, no SuperNode authentication and no app signature on "
                f"{self.spec.host}:{self.spec.port}. Anyone who can reach this port can join, read the model and "
                "send updates. Use only on a trusted local network."
            )
            if self.echo is not None:
                self.echo.write(warning + "\n")
            else:
                log.warning(warning)
        self.superlink = self._start("superlink", superlink_argv(self.spec))
        self._wait_ready()
        self._start_gateway()

    def _start_gateway(self) -> None:
        """Start the public Fleet gateway and wait until it answers (any HTTP status: it is up)."""
        gateway = self._start("gateway", gateway_argv(self.spec))
        host = {"0.0.0.0": "127.0.0.1", "::": "[::1]"}.get(self.spec.host, self.spec.public_listen.rsplit(":", 1)[0])
        url = f"{'http' if self.spec.cert_paths is None else 'https'}://{host}:{self.spec.port}/"
        deadline = time.monotonic() + self.spec.ready_timeout_s
        while time.monotonic() < deadline and not self._stop.is_set():
            if (code := gateway.poll()) is not None:
                raise CoordinatorError(f"the Fleet gateway exited with code {code} during startup "
                                       f"(log: {gateway.log_path}):\n{gateway.tail()}")
            try:
                # Only "does it answer": its certificate is checked by every client that joins.
                httpx.get(url, verify=False, timeout=2.0)
                return
            except httpx.HTTPError:
                time.sleep(0.2)
        if self._stop.is_set():
            raise KeyboardInterrupt
        raise CoordinatorError(f"the Fleet gateway did not answer on {url} within {self.spec.ready_timeout_s:.0f} s "
                               f"(log: {gateway.log_path}):\n{gateway.tail()}")

    def _wait_ready(self) -> None:
        assert self.superlink is not None
        paths = self.spec.cert_paths
        scheme = "http" if paths is None else "https"
        verify: ssl.SSLContext | bool = False
        if paths is not None:
            verify = ssl.create_default_context(cafile=str(paths.ca_cert))
        url = f"{scheme}://{self.spec.local_address}/health"
        deadline = time.monotonic() + self.spec.ready_timeout_s
        while time.monotonic() < deadline and not self._stop.is_set():
            if (code := self.superlink.poll()) is not None:
                raise CoordinatorError(
                    f"flower-superlink exited with code {code} during startup "
                    f"(log: {self.superlink.log_path}):\n{self.superlink.tail()}"
                )
            try:
                if httpx.get(url, verify=verify, timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        if self._stop.is_set():
            raise KeyboardInterrupt
        raise CoordinatorError(
            f"flower-superlink did not answer on {url} within {self.spec.ready_timeout_s:.0f} s "
            f"(log: {self.superlink.log_path}):\n{self.superlink.tail()}"
        )

    def _flwr(
        self, name: str, *args: str, timeout: float | None = 60.0, echo: bool = False,
        on_line: Callable[[str], None] | None = None,
    ) -> int:
        child = self._start(name, [flwr_executable("flwr"), *args], echo=echo, on_line=on_line)
        try:
            return self._wait_child(child, timeout)
        finally:
            self._children.remove(child)

    def _wait_child(self, child: ChildProcess, timeout: float | None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._stop.is_set():
                child.stop(self.spec.grace_s)
                raise KeyboardInterrupt
            try:
                return child.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                if deadline is not None and time.monotonic() > deadline:
                    child.stop(self.spec.grace_s)
                    raise CoordinatorError(
                        f"`{' '.join(child.argv[1:3])}` did not finish within {timeout:.0f} s "
                        f"(log: {child.log_path}):\n{child.tail()}"
                    ) from None

    def register_nodes(self) -> NodeIdentities | None:
        """Register every node public key with the SuperLink (`flwr supernode register`, in parallel).

        Returns (and keeps as `identities`) the node id the SuperLink bound to each key -> the key's position
        in `node_public_keys` as client id; None for an insecure coordinator, whose nodes are anonymous.
        """
        flwr = flwr_executable("flwr")
        outputs: dict[Path, list[str]] = {key: [] for key in self.spec.node_public_keys}
        pending = {
            key: self._start(f"register-{key.stem}",
                             [flwr, "supernode", "register", str(key), CONNECTION_NAME, "--format", "json"],
                             on_line=outputs[key].append)
            for key in self.spec.node_public_keys
        }
        try:
            for key, child in pending.items():
                code = self._wait_child(child, timeout=60.0)
                if code != 0:
                    raise CoordinatorError(
                        f"registering node key {key} failed (exit {code}); "
                        f"see {child.log_path}:\n{child.tail()}"
                    )
        finally:
            for child in pending.values():
                self._children.remove(child)
                child.stop(self.spec.grace_s)
        if self.spec.insecure:
            return None
        try:
            node_ids = [registered_node_id("\n".join(outputs[key])) for key in self.spec.node_public_keys]
        except ValueError as err:
            raise CoordinatorError(f"registering node keys: {err}") from err
        self.identities = NodeIdentities({node: client for client, node in enumerate(node_ids)})
        return self.identities

    def submit_run(self, app_dir: Path, timeout_s: float | None = None) -> RunOutcome:
        """Submit the run with `flwr run --stream`, wait until it ends and return Flower's final status.

        With TLS the FAB `flwr run` is about to send is signed first; the gateway attaches the signature to
        that FAB only, and clients refuse any app without it.
        """
        if self.spec.certs_dir is not None and not self.spec.insecure:
            signing_key, _ = app_signing_paths(self.spec.certs_dir)
            approve_app(app_dir, signing_key).write(app_approval_path(self.spec))
        run_ids: list[int] = []

        def grab_run_id(line: str) -> None:
            if match := _RUN_STARTED.search(line):
                run_ids.append(int(match.group(1)))

        code = self._flwr(
            "flwr-run", "run", str(app_dir), CONNECTION_NAME, "--stream",
            timeout=timeout_s, echo=True, on_line=grab_run_id,
        )
        if self.superlink is not None and (sl_code := self.superlink.poll()) is not None:
            raise CoordinatorError(
                f"flower-superlink exited with code {sl_code} during the run "
                f"(log: {self.superlink.log_path}):\n{self.superlink.tail()}"
            )
        if not run_ids:
            log_path = self.log_dir / "flwr-run.log"
            raise CoordinatorError(
                f"`flwr run` did not start a run (exit {code}); see {log_path}:\n"
                f"{log_path.read_text(errors='replace')[-2000:]}"
            )
        return self.run_status(run_ids[-1])

    def run_status(self, run_id: int) -> RunOutcome:
        """Flower's status of `run_id` (`flwr ls --run-id ID --format json`)."""
        lines: list[str] = []
        self._flwr("flwr-ls", "ls", CONNECTION_NAME, "--run-id", str(run_id), "--format", "json",
                   on_line=lines.append)
        text = "\n".join(lines)
        try:
            runs = json.loads(text[text.index("{"):])["runs"]
            row = next(r for r in runs if int(r["run-id"]) == run_id)
        except (ValueError, KeyError, StopIteration) as err:
            raise CoordinatorError(
                f"could not read the status of run {run_id} from `flwr ls`: {text}"
            ) from err
        return RunOutcome(run_id, str(row.get("status", "")), str(row.get("status-details", "") or ""))

    def stop(self) -> None:
        """Stop every child still running, newest first (the SuperLink last)."""
        self._stop.set()
        for child in reversed(self._children):
            child.stop(self.spec.grace_s)
        self._children.clear()

    def __enter__(self) -> Coordinator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- all together ---------------------------------------------------------------------------------
    def run(self, timeout_s: float | None = None) -> RunOutcome:
        """Prepare, start the SuperLink, register nodes, run the job to completion, stop everything.

        SIGINT/SIGTERM (when called from the main thread) stop the children and raise KeyboardInterrupt.
        """
        with self, stop_on_signals(self._stop):
            self.prepare()
            self.start_superlink()
            app_dir = write_app_dir(self.spec, self.register_nodes())
            self.ready.set()
            if self.echo is not None:
                self.echo.write(f"Coordinator listening on {self.spec.public_listen} (Fleet API only); "
                                f"operator's flwr CLI: SuperLink on {self.spec.local_address}.\n")
                self.echo.write(join_instructions(self.spec) + "\n")
                self.echo.flush()
            outcome = self.submit_run(app_dir, timeout_s)
            if not outcome.ok:
                raise CoordinatorError(
                    f"run {outcome.run_id} ended with status {outcome.status}: {outcome.details} "
                    f"(logs in {self.log_dir})"
                )
            return outcome

