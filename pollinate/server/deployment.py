"""What a server half knows of the deployment it runs in (absent in simulation)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Deployment:
    """The coordinator's network facts, passed to the ServerApp in Flower's run config.

    Parameters
    ----------
    host : str
        Interface the coordinator's services bind (``pollinate coordinator --host``).
    public_host : str
        Host name or address clients dial (``--public-address`` without its port, else ``host``).
    certs_dir : Path or None
        TLS material from ``pollinate keys init`` (``ca.crt``, ``server.crt``, ``server.key``); None when insecure.
    """

    host: str
    public_host: str
    certs_dir: Path | None = None

    def to_run_config(self) -> dict[str, str]:
        return {"deploy-host": self.host, "deploy-public-host": self.public_host,
                "deploy-certs-dir": str(self.certs_dir) if self.certs_dir else ""}

    @classmethod
    def from_run_config(cls, run_config: dict[str, Any]) -> Deployment | None:
        if "deploy-host" not in run_config:
            return None
        certs = str(run_config.get("deploy-certs-dir", ""))
        return cls(host=str(run_config["deploy-host"]), public_host=str(run_config.get("deploy-public-host") or
                   run_config["deploy-host"]), certs_dir=Path(certs) if certs else None)
