"""How a node joins a coordinator (`JoinSpec`) and the `flower-supernode` command line that does it."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pollinate.client.worker_link import WORKER_SOCKET_KEY
from pollinate.common.run_end import RUN_END_FILE_KEY
from pollinate.deploy.app_trust import APP_SIGNING_PUB_FILE, TRUSTED_ENTITIES_FILE
from pollinate.deploy.processes import flwr_executable

NodeConfigValue = str | int | float | bool
_ADDRESS = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):(\d{1,5})$")


@dataclass
class JoinSpec:
    """How this node joins a coordinator.

    Parameters
    ----------
    coordinator : str
        Coordinator address `host:port` (as printed by `pollinate coordinator`).
    work_dir : Path
        Logs (`logs/supernode.log`) and this node's Flower home (installed app metadata).
    ca_cert : Path or None
        CA certificate to trust (`ca.crt` from the coordinator's `pollinate keys init`). Required unless
        insecure.
    private_key : Path or None
        This node's OpenSSH private key (`pollinate keys node`); required by a coordinator with node auth.
    insecure : bool, default False
        Plain HTTP (only against an insecure coordinator).
    data_path : Path or None
        Local data the ClientApp trains on; reaches it as `context.node_config["data-path"]`.
    profile_path : Path or None
        Edge resource profile; reaches the ClientApp as `context.node_config["profile"]`.
    partition_id : int or None
        Reaches the ClientApp as `context.node_config["partition-id"]` (for pre-partitioned data).
    node_config : mapping, default {}
        Further node config entries.
    retry_budget_s : float, default 300
        Give up when the coordinator has not accepted this node for this long.
    max_backoff_s : float, default 30
        Longest wait between SuperNode restarts.
    env : mapping or None
        Extra environment for the SuperNode and its ClientApp processes.
    app_signing_key : Path or None
        The coordinator's `app-signing.pub`; default: the one beside `ca_cert`. With TLS the SuperNode runs
        only apps signed by it (Flower's `--trusted-entities`, checked before any code of a run starts; see
        app_trust.py); required unless insecure.
    finish_grace_s : float, default 5
        Once the coordinator has said the run ended, how long the SuperNode may run on to deliver the
        acknowledgement before it is stopped.
    worker : bool, default True
        Run train and evaluate messages in one long-lived worker process that keeps the model and data across
        rounds (deploy/worker.py); False runs each in its own ClientApp process.
    """

    coordinator: str
    work_dir: Path
    ca_cert: Path | None = None
    private_key: Path | None = None
    insecure: bool = False
    data_path: Path | None = None
    profile_path: Path | None = None
    partition_id: int | None = None
    node_config: Mapping[str, NodeConfigValue] = field(default_factory=dict)
    retry_budget_s: float = 300.0
    max_backoff_s: float = 30.0
    env: Mapping[str, str] | None = None
    app_signing_key: Path | None = None
    finish_grace_s: float = 5.0
    worker: bool = True

    def __post_init__(self) -> None:
        match = _ADDRESS.match(self.coordinator)
        if not match or not 1 <= int(match.group(2)) <= 65535:
            raise ValueError(
                f"coordinator={self.coordinator!r} must be host:port, e.g. coord.example.org:9092"
            )
        if self.insecure and self.ca_cert is not None:
            raise ValueError("ca_cert and insecure=True contradict each other; pass one")
        if not self.insecure and self.ca_cert is None:
            raise ValueError("ca_cert is required unless insecure=True (the coordinator's ca.crt)")
        if self.insecure and self.private_key is not None:
            raise ValueError("private_key needs TLS: SuperNode auth does not work with insecure=True")
        if self.insecure and self.app_signing_key is not None:
            raise ValueError("app_signing_key needs TLS: an insecure coordinator signs no app")
        if not self.insecure and self.app_signing_key is None and self.ca_cert is not None:
            self.app_signing_key = Path(self.ca_cert).expanduser().parent / APP_SIGNING_PUB_FILE
        if self.retry_budget_s <= 0:
            raise ValueError(f"retry_budget_s={self.retry_budget_s} must be > 0")
        if self.finish_grace_s < 0:
            raise ValueError(f"finish_grace_s={self.finish_grace_s} must be >= 0")
        self.work_dir = Path(self.work_dir).expanduser().resolve()
        for name in ("ca_cert", "private_key", "data_path", "profile_path", "app_signing_key"):
            if (value := getattr(self, name)) is not None:
                setattr(self, name, Path(value).expanduser().resolve())

    @property
    def run_end_path(self) -> Path:
        """Where the ClientApp notes that the coordinator ended the run (node config `run-end-file`)."""
        return self.work_dir / "run-finished.json"

    @property
    def trusted_entities_path(self) -> Path:
        """Flower's `--trusted-entities` file, written from `app_signing_key` when the node starts."""
        return self.work_dir / TRUSTED_ENTITIES_FILE

    def full_node_config(self) -> dict[str, NodeConfigValue]:
        """Node config handed to the ClientApp: data/profile paths, partition id, run-end marker, then extras."""
        config: dict[str, NodeConfigValue] = {RUN_END_FILE_KEY: str(self.run_end_path)}
        if self.data_path is not None:
            config["data-path"] = str(self.data_path)
        if self.profile_path is not None:
            config["profile"] = str(self.profile_path)
        if self.partition_id is not None:
            config["partition-id"] = self.partition_id
        config.update(self.node_config)
        return config


def node_config_arg(config: Mapping[str, NodeConfigValue]) -> str:
    """Render node config as Flower's `--node-config` string (space-separated TOML `key=value`).

    Strings are written as TOML literal strings ('...'): backslashes in Windows paths stay as they are.
    """
    parts = []
    for key, value in config.items():
        if not re.fullmatch(r"[A-Za-z0-9_-]+", key):
            raise ValueError(f"node config key {key!r} must be letters, digits, '-' or '_'")
        if isinstance(value, bool):
            rendered = "true" if value else "false"
        elif isinstance(value, int | float):
            rendered = repr(value)
        elif isinstance(value, str):
            # Flower splits the string with a regex that cannot see escaped quotes.
            if "'" in value or "\n" in value:
                raise ValueError(f"node config {key}={value!r} must not contain a single quote or newline")
            rendered = f"'{value}'"
        else:
            raise ValueError(f"node config {key}={value!r} must be str, int, float or bool")
        parts.append(f"{key}={rendered}")
    return " ".join(parts)


def supernode_argv(spec: JoinSpec, runtime_port: int, max_wait_s: float, private_key: Path | None = None,
                   worker_socket: Path | None = None) -> list[str]:
    """The `flower-supernode` command line for `spec`, with its local Runtime API on `runtime_port`.

    `private_key` replaces `spec.private_key` in the command (a decrypted copy of an encrypted key);
    `worker_socket` tells the ClientApp where the node's worker listens.
    """
    argv = [flwr_executable("flower-supernode"), "--superlink", spec.coordinator]
    if spec.insecure:
        argv.append("--insecure")
    else:
        argv += ["--root-certificates", str(spec.ca_cert)]
    if (key := private_key or spec.private_key) is not None:
        argv += ["--auth-supernode-private-key", str(key)]
    if spec.app_signing_key is not None:
        argv += ["--trusted-entities", str(spec.trusted_entities_path)]
    # The Runtime API (SuperNode <-> ClientApp processes) stays on loopback, on a port of its own so
    # several nodes can share a machine.
    argv += ["--host", "127.0.0.1", "--port", str(runtime_port)]
    argv += ["--max-wait-time", f"{max(max_wait_s, 1.0):.0f}"]
    config = spec.full_node_config()
    if worker_socket is not None:
        config[WORKER_SOCKET_KEY] = str(worker_socket)
    if config:
        argv += ["--node-config", node_config_arg(config)]
    return argv
