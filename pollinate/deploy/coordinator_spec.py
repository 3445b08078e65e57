"""What the coordinator is told and what it writes before anything starts: its spec, the Flower app directory
(a generated pyproject.toml naming Pollinate's installed apps, with the run config), the `flwr` CLI's home, the
SuperLink's and the gateway's command lines, and the join instructions it prints."""

from __future__ import annotations

import re
import socket
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w

from pollinate.deploy.identity import NodeIdentities
from pollinate.deploy.keys import CertPaths
from pollinate.deploy.processes import flwr_executable

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
