"""What a server half knows of the deployment it runs in (absent in simulation)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pollinate.deploy.identity import NodeIdentities


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
    identities : NodeIdentities or None
        Client id of each authenticated Flower node (from the coordinator's node-key registration); None when
        nodes are not authenticated (an insecure coordinator).
    """

    host: str
    public_host: str
    certs_dir: Path | None = None
    identities: NodeIdentities | None = None

    def client_id_for_node(self, node_id: int) -> int | None:
        """The client id of authenticated node ``node_id``; None for an unregistered node or without node auth."""
        return None if self.identities is None else self.identities.client_id_for_node(node_id)

    def to_run_config(self) -> dict[str, str]:
        identities = self.identities.to_run_config() if self.identities is not None else {}
        return {"deploy-host": self.host, "deploy-public-host": self.public_host,
                "deploy-certs-dir": str(self.certs_dir) if self.certs_dir else "", **identities}

    @classmethod
    def from_run_config(cls, run_config: dict[str, Any]) -> Deployment | None:
        if "deploy-host" not in run_config:
            return None
        certs = str(run_config.get("deploy-certs-dir", ""))
        return cls(host=str(run_config["deploy-host"]), public_host=str(run_config.get("deploy-public-host") or
                   run_config["deploy-host"]), certs_dir=Path(certs) if certs else None,
                   identities=NodeIdentities.from_run_config(run_config))
