"""Which client a reply is from: decided by the node that sent it, never by what the reply says.

Flower gives every reply the id of the node it came from (in deployment, the node authenticated by its key;
Flower 1.42 keeps one node id per registered key). ``NodeIdentity`` binds each node to one client id:

- ``registered`` (deployment: ``Deployment.identities``, from the coordinator's node-key registration) fixes
  the bindings in advance: a registered node is its registered client whatever its reply says, and a node not
  in it is refused;
- otherwise (simulation, an insecure coordinator) a node is bound on first contact to the client id its reply
  names (the partition it holds); from then on the node is that client, and no other node can be. A reply
  that names another client than its node's, or a client already bound to another connected node, is refused
  with ``UpdateRejected`` (reason ``identity``). A client whose node left may come back on a new node (a
  restarted SuperNode without authentication gets a new node id): the binding moves only when the old node
  is no longer connected.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pollinate.common.checks import UpdateRejected
from pollinate.server.replies import integer_in


class NodeIdentity:
    """The node id <-> client id bindings of a run.

    Parameters
    ----------
    registered : dict of int to int, optional
        ``{node_id: client_id}`` known before the run (e.g. from the coordinator's registered keys); when given,
        only these nodes are clients and nothing is bound on first contact.
    """

    def __init__(self, registered: dict[int, int] | None = None) -> None:
        self.fixed = registered is not None
        self._client_of: dict[int, int] = dict(registered or {})
        self._node_of: dict[int, int] = {client: node for node, client in self._client_of.items()}
        self._connected: set[int] | None = None  # None: not known yet (every bound node counts as connected)

    def connected(self, node_ids: Iterable[int]) -> None:
        """The nodes connected now (the server says so each round)."""
        self._connected = set(node_ids)

    def client_of(self, node_id: int) -> int | None:
        """The client bound to ``node_id``, or None."""
        return self._client_of.get(node_id)

    def resolve(self, node_id: int, claimed: Any) -> int:
        """The client id of a reply from ``node_id`` that names ``claimed``; binds on first contact."""
        bound = self._client_of.get(node_id)
        if self.fixed:
            if bound is None:
                raise UpdateRejected(f"node {node_id} is not a registered client", reason="identity")
            return bound
        claimed_id = integer_in(claimed, 0, 2**53 - 1, "client id", reason="identity")
        if bound is not None:
            if claimed_id != bound:
                raise UpdateRejected(f"node {node_id} is client {bound}, but its reply names client {claimed_id}",
                                     reason="identity")
            return bound
        owner = self._node_of.get(claimed_id)
        if owner is not None and owner != node_id and self._is_connected(owner):
            raise UpdateRejected(f"node {node_id} names client {claimed_id}, which is node {owner}",
                                 reason="identity")
        if owner is not None:
            del self._client_of[owner]  # the client's old node left; it continues on this one
        self._client_of[node_id], self._node_of[claimed_id] = claimed_id, node_id
        return claimed_id

    def _is_connected(self, node_id: int) -> bool:
        return self._connected is None or node_id in self._connected
