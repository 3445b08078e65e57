"""Who sent a reply is decided by its node: bound on first contact in simulation, fixed by registration in
deployment; a node naming another client, or a second node naming a bound client, is refused."""

import pytest

from pollinate.common.checks import UpdateRejected
from pollinate.server.identity import NodeIdentity


def test_a_node_is_bound_to_the_client_it_names_first_and_cannot_change():
    identity = NodeIdentity()
    assert identity.resolve(11, 0) == 0 and identity.resolve(11, 0.0) == 0
    with pytest.raises(UpdateRejected, match="node 11 is client 0, but its reply names client 3"):
        identity.resolve(11, 3)
    assert identity.client_of(11) == 0


def test_a_second_node_naming_a_bound_client_is_refused_while_the_first_is_connected():
    identity = NodeIdentity()
    identity.connected([11, 12])
    identity.resolve(11, 0)
    with pytest.raises(UpdateRejected, match="node 12 names client 0, which is node 11"):
        identity.resolve(12, 0)
    identity.connected([12])  # node 11 left: client 0 may come back on a new node
    assert identity.resolve(12, 0) == 0 and identity.client_of(11) is None


@pytest.mark.parametrize("claimed", [None, -1, 1.5, float("nan"), float("inf"), True, "0", 2**60])
def test_a_client_id_that_is_not_a_non_negative_integer_is_refused(claimed):
    with pytest.raises(UpdateRejected, match="client id"):
        NodeIdentity().resolve(11, claimed)


def test_registered_nodes_are_their_registered_clients_whatever_they_claim():
    identity = NodeIdentity({11: 4, 12: 7})
    assert identity.resolve(11, 0) == 4 and identity.resolve(12, None) == 7
    with pytest.raises(UpdateRejected, match="node 13 is not a registered client"):
        identity.resolve(13, 4)
