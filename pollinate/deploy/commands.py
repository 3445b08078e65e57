"""What `pollinate coordinator`, `pollinate join` and `pollinate keys` do once their flags are parsed.

Each function takes the command's options as arguments, runs it and prints what the user needs next (join
commands, where the keys went); bad input raises `ConfigError` or `ValueError` naming the flag.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from pollinate.common.config import ConfigError, RunConfig
from pollinate.common.config_io import to_toml
from pollinate.deploy.coordinator import Coordinator, CoordinatorSpec
from pollinate.deploy.join import JoinSpec, join
from pollinate.deploy.keyfiles import PASSPHRASE_ENV, key_passphrase
from pollinate.deploy.keys import CertPaths, create_node_key, init_certs
from pollinate.server.deployment import Deployment

if TYPE_CHECKING:
    from pollinate.dashboard.launch import DashboardOptions


def deployment_facts(host: str, public_address: str | None, certs_dir: Path | None) -> Deployment:
    """What the ServerApp's method halves need to know of the coordinator's network (e.g. SFPrompt's service)."""
    public_host = public_address.rsplit(":", 1)[0] if public_address else host
    certs = certs_dir.expanduser().resolve() if certs_dir else None
    return Deployment(host=host, public_host=public_host.strip("[]"), certs_dir=certs)


def coordinate(
    cfg: RunConfig, resume_dir: Path | None, *, host: str, port: int, certs_dir: Path | None,
    node_keys: Sequence[Path], insecure: bool, public_address: str | None, echo: TextIO | None = None,
    dashboard: DashboardOptions | None = None,
) -> Path:
    """Run ``cfg`` for clients joining from other machines until it completes; return the run directory.

    ``resume_dir`` continues that run after its last complete round; otherwise a run directory that already holds
    checkpoints is refused. Certificates, node keys and the port are checked before the model and data load.
    ``dashboard`` serves a live dashboard of the run while it runs.
    """
    from pollinate.dashboard.launch import dashboard_running
    from pollinate.server.checkpoint import latest_round
    from pollinate.simulations.run import default_run_dir, preflight

    run_dir = (resume_dir or default_run_dir(cfg)).expanduser().resolve()
    if resume_dir is None and latest_round(run_dir) is not None:
        raise ConfigError(f"run directory '{run_dir}' already holds checkpoints; continue it with --resume "
                          f"{run_dir} or choose another --out")
    certs = None if insecure else certs_dir
    spec = CoordinatorSpec(
        run_dir=run_dir, host=host, port=port, insecure=insecure, certs_dir=certs_dir,
        node_public_keys=list(node_keys), public_address=public_address,
        # The ServerApp builds its RunConfig from this text; clients get their sections inside every message.
        run_config={"config-toml": to_toml(cfg), "run-dir": str(run_dir), "resume": resume_dir is not None,
                    **deployment_facts(host, public_address, certs).to_run_config()},
    )
    coordinator = Coordinator(spec, echo or sys.stdout)
    coordinator.check()
    preflight(cfg)  # the model resolves (building a preset cache once) and the server's eval data loads
    print(f"pollinate coordinator: {cfg.method} on {cfg.model.name}, {cfg.federation.clients} clients x "
          f"{cfg.federation.rounds} rounds{' (resumed)' if resume_dir else ''} -> {run_dir}", file=sys.stderr)
    with dashboard_running(run_dir, dashboard):
        coordinator.run()
    return run_dir


def join_coordinator(
    coordinator: str, data: Path, *, certs: Path | None, key: Path | None, insecure: bool, partition_id: int | None,
    profile: Path | None, work_dir: Path | None, retry_budget_s: float, echo: TextIO | None = None,
    worker: bool = True,
) -> None:
    """Join ``coordinator`` as a client training on ``data`` until the coordinator ends the run (says so and
    returns) or SIGINT/SIGTERM.

    ``certs`` is the coordinator's ``ca.crt`` or a directory holding it (required unless ``insecure``);
    ``worker`` False runs every message in its own ClientApp process instead of the node's long-lived worker.
    """
    ca_cert = None
    if certs is not None:
        ca_cert = certs.expanduser()
        ca_cert = ca_cert / "ca.crt" if ca_cert.is_dir() else ca_cert
    if ca_cert is None and not insecure:
        raise ConfigError("--certs (the coordinator's ca.crt) is required unless --insecure")
    if partition_id is None:
        print("pollinate join: no --partition-id given: this client reports as client 0; give every client a "
              "distinct id (the coordinator prints one per node key)", file=sys.stderr)
    elif partition_id < 0:
        raise ConfigError(f"--partition-id {partition_id} must be >= 0")
    spec = JoinSpec(
        coordinator=coordinator, insecure=insecure, ca_cert=ca_cert, private_key=key, data_path=data,
        profile_path=profile, partition_id=partition_id,
        work_dir=work_dir or Path(f"pollinate-node-{partition_id or 0}"), retry_budget_s=retry_budget_s,
        worker=worker,
    )
    if (end := join(spec, echo or sys.stdout)) is not None:
        print(f"pollinate join: the run on {coordinator} has finished ({end.rounds} rounds); exiting", file=sys.stderr)


def _encryption_note() -> str:
    return f" Private keys are encrypted with {PASSPHRASE_ENV}." if key_passphrase() else ""


def make_certs(directory: Path, hosts: Sequence[str], *, days: int, overwrite: bool,
               out: TextIO | None = None) -> CertPaths:
    """``pollinate keys init``: the private CA and the coordinator's server certificate, and where they go."""
    paths = init_certs(directory, hosts, valid_days=days, overwrite=overwrite)
    print(f"wrote {paths.ca_cert}, {paths.server_cert}, {paths.server_key} and {paths.ca_key}.\n"
          f"Coordinator: pollinate coordinator --certs {directory} ...; give clients {paths.ca_cert} and "
          f"{Path(directory) / 'app-signing.pub'} (never ca.key, server.key or app-signing.key)."
          f"{_encryption_note()}", file=out or sys.stdout)
    return paths


def make_node_key(directory: Path, name: str, *, overwrite: bool, out: TextIO | None = None) -> tuple[Path, Path]:
    """``pollinate keys node``: a client's key pair, and which half goes where."""
    private, public = create_node_key(directory, name, overwrite=overwrite)
    print(f"wrote {private} (stays on the client: pollinate join --key {private}) and {public} "
          f"(for the coordinator: pollinate coordinator --node-key {public}).{_encryption_note()}",
          file=out or sys.stdout)
    return private, public
