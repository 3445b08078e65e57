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
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import httpx
import tomli_w

from pollinate.deploy.app_trust import app_signing_paths, approve_app, ensure_app_signing_key
from pollinate.deploy.identity import NodeIdentities, registered_node_id
from pollinate.deploy.keys import CertPaths, check_cert_paths, load_node_public_key
from pollinate.deploy.processes import ChildProcess, child_env, flwr_executable, port_in_use, stop_on_signals

log = logging.getLogger(__name__)

RunConfigValue = str | int | float | bool
CONNECTION_NAME = "pollinate"
DEFAULT_PORT = 9092
# Module reference accepted by Flower: "package.module:attribute".
_APP_REF = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
_RUN_STARTED = re.compile(r"Successfully started run (\d+)")


class CoordinatorError(RuntimeError):
    """The coordinator could not start, or its run did not complete."""


class PortInUseError(CoordinatorError):
    """The SuperLink port is already taken by another process."""


@dataclass
class CoordinatorSpec:
    """What the coordinator runs and how it is reached.

    Parameters
    ----------
    run_dir : Path
        Output directory of the run; the generated app (`flwr_app/`), Flower's home (`flwr_home/`) and
        logs (`logs/`) go inside it.
    server_app, client_app : str
        Flower component references (`module:attribute`) importable in the coordinator's and clients'
        environments, default the Pollinate apps.
    run_config : mapping, default {}
        Run config the ServerApp (and ClientApp) receive as `context.run_config`: str/int/float/bool
        values, or nested tables (Flower flattens them to dotted keys).
    host : str, default "127.0.0.1"
        Address the public Fleet gateway binds; "0.0.0.0" to accept clients from other machines.
    port : int, default 9092
        Public port: the Fleet gateway, which answers only the Fleet API SuperNodes use.
    superlink_port : int or None
        Port of the SuperLink itself on 127.0.0.1 (its Fleet, Control and Runtime APIs, which Flower 1.42
        serves on one port), where the operator's `flwr` CLI reaches it; default `port + 1`.
    certs_dir : Path or None
        Directory made by `pollinate keys init` (ca.crt, server.crt, server.key). Required unless insecure.
    insecure : bool, default False
        Plain HTTP and no SuperNode authentication; for local experiments only.
    node_public_keys : sequence of Path, default ()
        OpenSSH public keys of the nodes allowed to join (required with TLS: without any, none can join).
    public_address : str or None
        `host:port` clients should dial, shown in the join instructions; default derived from host.
    env : mapping or None
        Extra environment for the Flower processes (e.g. PYTHONPATH for apps outside the venv).
    ready_timeout_s : float, default 60
        How long to wait for the SuperLink to answer.
    grace_s : float, default 5
        Time children get to exit after SIGTERM before SIGKILL.
    """

    run_dir: Path
    server_app: str = "pollinate.server.app:app"
    client_app: str = "pollinate.client.app:app"
    run_config: Mapping[str, object] = field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    superlink_port: int | None = None
    certs_dir: Path | None = None
    insecure: bool = False
    node_public_keys: Sequence[Path] = ()
    public_address: str | None = None
    env: Mapping[str, str] | None = None
    ready_timeout_s: float = 60.0
    grace_s: float = 5.0

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir).expanduser().resolve()
        for name in ("server_app", "client_app"):
            ref = getattr(self, name)
            if not _APP_REF.match(ref):
                raise ValueError(f"{name}={ref!r} is not a Flower component reference 'module:attribute'")
        if not 1 <= self.port <= 65535:
            raise ValueError(f"port={self.port} must be in 1..65535")
        if self.superlink_port is None:
            self.superlink_port = self.port + 1 if self.port < 65535 else self.port - 1
        if not 1 <= self.superlink_port <= 65535 or self.superlink_port == self.port:
            raise ValueError(f"superlink_port={self.superlink_port} must be in 1..65535 and differ from port")
        if not self.insecure and self.certs_dir is None:
            raise ValueError(
                "certs_dir is required unless insecure=True (create it with `pollinate keys init`)"
            )
        if self.insecure and self.node_public_keys:
            raise ValueError("node_public_keys need TLS: SuperNode authentication is off with insecure=True")
        self.node_public_keys = [Path(p).expanduser().resolve() for p in self.node_public_keys]
        if self.certs_dir is not None:
            self.certs_dir = Path(self.certs_dir).expanduser().resolve()
        _check_run_config(self.run_config)

    @property
    def cert_paths(self) -> CertPaths | None:
        return None if self.insecure or self.certs_dir is None else CertPaths.in_dir(self.certs_dir)

    @property
    def local_address(self) -> str:
        """The SuperLink's loopback address (all its APIs): the coordinator's `flwr` CLI and Flower's helpers."""
        return f"127.0.0.1:{self.superlink_port}"

    @property
    def public_listen(self) -> str:
        """`host:port` the Fleet gateway binds."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def join_address(self) -> str:
        if self.public_address:
            return self.public_address
        if self.host in ("0.0.0.0", "::"):
            return f"{socket.getfqdn()}:{self.port}"
        return self.public_listen


def _check_run_config(config: Mapping[str, object], prefix: str = "") -> None:
    for key, value in config.items():
        if isinstance(value, Mapping):
            _check_run_config(value, f"{prefix}{key}.")
        elif not isinstance(value, str | int | float | bool):
            raise ValueError(
                f"run_config[{prefix}{key!r}] is {type(value).__name__}; Flower run config values must be "
                "str, int, float, bool or a table of those"
            )


@dataclass
class RunOutcome:
    """How the Flower run ended.

    Parameters
    ----------
    run_id : int
        Flower's run id.
    status : str
        Flower's final status, e.g. "finished:completed" or "finished:failed".
    details : str
        Flower's status details (the error for a failed run).
    """

    run_id: int
    status: str
    details: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "finished:completed"


def write_app_dir(spec: CoordinatorSpec, identities: NodeIdentities | None = None) -> Path:
    """Write the Flower app directory `flwr run` needs: only a pyproject.toml naming installed modules.

    The SuperLink runs with runtime dependency installation disabled, so the FAB built from this directory
    is never `uv sync`ed; the ServerApp/ClientApp processes import the components from their environment.
    `identities` (the registered nodes' client ids) join the run config.
    """
    app_dir = spec.run_dir / "flwr_app"
    app_dir.mkdir(parents=True, exist_ok=True)
    pyproject = {
        "project": {
            "name": "pollinate-run",
            "version": "0.1.0",
            "description": "Pollinate run (generated by `pollinate coordinator`; components are installed)",
            "license": "Apache-2.0",
            "dependencies": [],
        },
        "tool": {
            "flwr": {
                "app": {
                    "publisher": "pollinate",
                    "components": {"serverapp": spec.server_app, "clientapp": spec.client_app},
                    "config": {**spec.run_config, **(identities.to_run_config() if identities else {})},
                }
            }
        },
    }
    (app_dir / "pyproject.toml").write_text(tomli_w.dumps(pyproject), encoding="utf-8")
    return app_dir


def write_flwr_home(spec: CoordinatorSpec) -> Path:
    """Write `$FLWR_HOME/config.toml` with one SuperLink connection named `pollinate` for the `flwr` CLI."""
    home = spec.run_dir / "flwr_home"
    home.mkdir(parents=True, exist_ok=True)
    connection: dict[str, object] = {"address": spec.local_address}
    paths = spec.cert_paths
    if paths is None:
        connection["insecure"] = True
    else:
        connection["root-certificates"] = str(paths.ca_cert)
    config = {"superlink": {"default": CONNECTION_NAME, CONNECTION_NAME: connection}}
    (home / "config.toml").write_text(tomli_w.dumps(config), encoding="utf-8")
    return home


def superlink_argv(spec: CoordinatorSpec) -> list[str]:
    """The `flower-superlink` command line for `spec`."""
    argv = [
        flwr_executable("flower-superlink"),
        # Loopback only: its Control API takes runs from anyone who reaches it (the gateway faces clients).
        "--host", "127.0.0.1",
        "--port", str(spec.superlink_port),
        # Without it the SuperLink `uv sync`s each app's dependencies (a CUDA torch download).
        "--disable-runtime-dependency-installation",
    ]
    paths = spec.cert_paths
    if paths is None:
        argv.append("--insecure")
    else:
        argv += [
            "--ssl-certfile", str(paths.server_cert),
            "--ssl-keyfile", str(paths.server_key),
            "--ssl-ca-certfile", str(paths.ca_cert),
            "--enable-supernode-auth",
        ]
    return argv


def gateway_argv(spec: CoordinatorSpec) -> list[str]:
    """The command line of the public Fleet gateway for `spec` (TLS with the server certificate, forwarding
    to the SuperLink over TLS, attaching the coordinator's app signature when there are certificates)."""
    argv = [sys.executable, "-m", "pollinate.deploy.gateway", "--listen", spec.public_listen,
            "--upstream", spec.local_address]
    if (paths := spec.cert_paths) is not None:
        argv += ["--certfile", str(paths.server_cert), "--keyfile", str(paths.server_key),
                 "--upstream-ca", str(paths.ca_cert), "--app-approval", str(app_approval_path(spec))]
    return argv


def app_approval_path(spec: CoordinatorSpec) -> Path:
    """Where the coordinator writes its signature over the FAB it submits (the gateway reads it)."""
    return spec.run_dir / "app-approval.json"


def join_instructions(spec: CoordinatorSpec) -> str:
    """What clients run to join, as shell text: one command per registered node key, each with its own
    partition id (the client id in reports); a generic one for an insecure coordinator."""
    base = f"pollinate join --coordinator {spec.join_address}"
    if spec.insecure:
        return (f"Clients join with (N = 0, 1, ... one per client):\n  {base} --insecure --partition-id N "
                "--data <local data> [--profile <edge profile .toml>]")
    if not spec.node_public_keys:
        return "No node key registered (--node-key): no client can join this coordinator."
    lines = ["Clients join with (copy ca.crt, app-signing.pub and the node's private key to it):"]
    for partition_id, key in enumerate(spec.node_public_keys):
        lines.append(f"  {base} --certs <dir holding ca.crt and app-signing.pub> --key <private key {key.stem}> "
                     f"--partition-id {partition_id} --data <local data> [--profile <edge profile .toml>]")
    return "\n".join(lines)


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

