"""Which Pollinate client an authenticated Flower node is: node id -> client id, decided by the coordinator.

With SuperNode authentication on, the coordinator registers each ``--node-key`` with ``flwr supernode register``
and the SuperLink answers with the node id it bound to that public key. From then on the SuperLink accepts a
Fleet call for that node id only when it is signed by the matching private key (``node_auth.authenticate_node``),
so only the key holder pulls that node's messages, and a reply is stored only when its ``src_node_id`` is the
destination of the message it answers (``store_message_res``). A reply's ``metadata.src_node_id`` therefore names
the key holder, and the key's position among ``--node-key`` (the partition id the coordinator prints for it) is
its client id. What a node says of itself (its ``partition-id`` node config, a ``client_id`` in a reply) is not
trusted. The mapping reaches the ServerApp in Flower's run config; a coordinator restarted with ``--resume``
registers the keys again, gets new node ids and passes the new mapping.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field

NODE_CLIENTS_KEY = "deploy-node-clients"


@dataclass(frozen=True)
class NodeIdentities:
    """The client id of every registered Flower node.

    Parameters
    ----------
    clients : mapping of int to int
        Flower node id (as the SuperLink assigned it at registration) -> Pollinate client id.
    """

    clients: Mapping[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        ids = list(self.clients.values())
        if len(set(ids)) != len(ids):
            raise ValueError(f"node identities {dict(self.clients)}: one client id for two nodes")
        object.__setattr__(self, "clients", {int(node): int(client) for node, client in self.clients.items()})

    def client_id_for_node(self, node_id: int) -> int | None:
        """The client id registered for ``node_id``, or None for a node the coordinator did not register."""
        return self.clients.get(int(node_id))

    def to_run_config(self) -> dict[str, str]:
        # JSON text: node ids are uint64, beyond TOML's (and so the run config's) signed 64-bit integers.
        return {NODE_CLIENTS_KEY: json.dumps({str(node): client for node, client in self.clients.items()})}

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, object]) -> NodeIdentities | None:
        """The identities the coordinator passed, or None where none were (simulation, an insecure coordinator)."""
        text = run_config.get(NODE_CLIENTS_KEY)
        if text is None or text == "":
            return None
        try:
            pairs = json.loads(str(text))
            return cls({int(node): int(client) for node, client in pairs.items()})
        except (ValueError, TypeError, AttributeError) as err:
            raise ValueError(f"run config {NODE_CLIENTS_KEY}={text!r} is not a JSON object of node id -> client "
                             f"id: {err}") from err


def registered_node_id(output: str) -> int:
    """The node id in the output of ``flwr supernode register --format json`` (``{"success": true, "node-id": N}``).

    Raises
    ------
    ValueError
        When the output holds no such JSON object.
    """
    start = output.find("{")
    while start != -1:
        try:
            reply, _ = json.JSONDecoder().raw_decode(output, start)
        except ValueError:
            reply = None
        if isinstance(reply, dict) and reply.get("success") is True and type(reply.get("node-id")) is int:
            return int(reply["node-id"])
        start = output.find("{", start + 1)
    raise ValueError(f"no node id in the output of `flwr supernode register`: {output[-500:]!r}")
