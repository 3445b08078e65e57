"""Node id -> client id: parsed from `flwr supernode register`, carried in the run config, read by the ServerApp."""

import tomllib

import pytest

from pollinate.deploy.coordinator import CoordinatorSpec, write_app_dir
from pollinate.deploy.identity import NODE_CLIENTS_KEY, NodeIdentities, registered_node_id
from pollinate.server.deployment import Deployment

BIG = 2**63 + 12345  # Flower node ids are uint64: beyond TOML's signed integers


def test_node_id_is_read_from_flwr_register_json_output():
    # As `flwr supernode register --format json` prints it (rich's indented JSON), after a log line.
    output = f'Loading connection "pollinate"\n{{\n  "success": true,\n  "node-id": {BIG}\n}}\n'
    assert registered_node_id(output) == BIG


@pytest.mark.parametrize("output", ["", "SuperNode registered", '{"success": false, "error-message": "in use"}',
                                    '{"success": true, "node-id": "12"}'])
def test_output_without_a_node_id_is_an_error(output):
    with pytest.raises(ValueError, match="no node id"):
        registered_node_id(output)


def test_identities_round_trip_through_the_run_config_and_deployment():
    identities = NodeIdentities({BIG: 0, 17: 1})
    facts = Deployment(host="127.0.0.1", public_host="coord", identities=identities)
    restored = Deployment.from_run_config(facts.to_run_config())
    assert restored.client_id_for_node(BIG) == 0 and restored.client_id_for_node(17) == 1
    assert restored.client_id_for_node(99) is None  # a node the coordinator did not register


def test_without_node_authentication_no_node_has_an_identity():
    facts = Deployment.from_run_config(Deployment(host="0.0.0.0", public_host="coord").to_run_config())
    assert facts.identities is None and facts.client_id_for_node(17) is None
    assert NodeIdentities.from_run_config({}) is None


def test_malformed_or_ambiguous_identities_are_refused():
    with pytest.raises(ValueError, match=NODE_CLIENTS_KEY):
        NodeIdentities.from_run_config({NODE_CLIENTS_KEY: "[1, 2]"})
    with pytest.raises(ValueError, match="one client id for two nodes"):
        NodeIdentities({1: 0, 2: 0})


def test_app_dir_carries_the_identities_in_its_run_config(tmp_path):
    spec = CoordinatorSpec(run_dir=tmp_path, insecure=True, run_config={"deploy-host": "127.0.0.1"})
    app_dir = write_app_dir(spec, NodeIdentities({BIG: 0, 17: 1}))
    config = tomllib.loads((app_dir / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert NodeIdentities.from_run_config(config).client_id_for_node(BIG) == 0
    assert Deployment.from_run_config(config).client_id_for_node(17) == 1


def test_one_key_registered_twice_is_refused_before_anything_starts(tmp_path):
    from pollinate.deploy.coordinator import Coordinator
    from pollinate.deploy.keys import create_node_key, init_certs

    init_certs(tmp_path / "certs", ["coord"])
    _, public = create_node_key(tmp_path, "edge-1")
    copy = tmp_path / "again.pub"
    copy.write_bytes(public.read_bytes())
    spec = CoordinatorSpec(run_dir=tmp_path / "run", certs_dir=tmp_path / "certs", node_public_keys=[public, copy])
    with pytest.raises(ValueError, match="again.pub is the same public key as .*edge-1.pub"):
        Coordinator(spec, echo=None).check()
