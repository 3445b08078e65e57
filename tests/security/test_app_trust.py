"""Clients run only the coordinator's app: the signature is checked with Flower's own SuperNode code.

The fast tests call `_verify_fab` and `_try_obtain_trusted_entities` from flwr/supernode (what the SuperNode
runs before any code of a new run); the slow one runs a TLS deployment where a client refuses a foreign app
submitted on the coordinator's loopback, and a client trusting another key refuses the coordinator's app.
"""

import json
import subprocess
import threading
from pathlib import Path

import httpx
import pytest
import uvicorn
import yaml
from flwr.proto.fab_pb2 import Fab as FabProto  # pylint: disable=E0611
from flwr.proto.fab_pb2 import GetFabRequest, GetFabResponse  # pylint: disable=E0611
from flwr.proto.run_pb2 import GetRunResponse, Run  # pylint: disable=E0611
from flwr.proto.transport_pb2 import Scalar  # pylint: disable=E0611
from flwr.supercore.fab import Fab
from flwr.supernode.cli.flower_supernode import _try_obtain_trusted_entities, _validate_public_keys_ed25519
from flwr.supernode.start_client_internal import _verify_fab

from pollinate.deploy.app_trust import (
    AppApproval,
    FabApprover,
    app_signing_paths,
    approve_app,
    build_fab,
    create_app_signing_key,
    load_signing_key,
    sign_fab,
    write_trusted_entities,
)
from pollinate.deploy.coordinator import Coordinator, CoordinatorSpec, write_app_dir
from pollinate.deploy.gateway import FleetGateway, GatewayConfig, GatewayThread
from pollinate.deploy.join import JoinSpec, Node, supernode_argv
from pollinate.deploy.keys import create_node_key, init_certs
from pollinate.deploy.processes import child_env, flwr_executable, free_loopback_port

FIXTURE_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "deploy_app"
FIXTURE_ENV = {"PYTHONPATH": str(FIXTURE_DIR)}
REFUSED = "The FAB could not be verified."


def _app_dir(tmp: Path, name: str, **config) -> Path:
    spec = CoordinatorSpec(run_dir=tmp / name, insecure=True, server_app="pollinate_deploy_fixture:server_app",
                           client_app="pollinate_deploy_fixture:client_app",
                           run_config={"num-rounds": 1, "min-nodes": 1, **config})
    return write_app_dir(spec)


@pytest.fixture
def signed(tmp_path):
    """The coordinator's key, its generated app, the app's FAB and approval, and a client's trust file."""
    private, public = create_app_signing_key(tmp_path / "certs")
    app = _app_dir(tmp_path, "run", **{"result-path": "r.json"})
    trusted = yaml.safe_load(write_trusted_entities(public, tmp_path / "node" / "trusted.yaml").read_text())
    return {"key": private, "app": app, "fab": build_fab(app), "approval": approve_app(app, private),
            "trusted": trusted, "tmp": tmp_path}


def _flower_accepts(fab: bytes, approval: AppApproval, trusted: dict) -> bool:
    """What Flower's SuperNode decides for a FAB with these verifications (start_client_internal.py)."""
    if not approval.verifications.get("valid_license"):
        return False
    return _verify_fab(Fab(approval.fab_hash, fab, approval.verifications), trusted)


def test_flower_supernode_accepts_the_coordinators_signed_app(signed):
    assert _flower_accepts(signed["fab"], signed["approval"], signed["trusted"])


def test_modified_app_is_refused(signed, tmp_path):
    other = build_fab(_app_dir(tmp_path, "other", **{"result-path": "/tmp/elsewhere.json"}))
    assert other != signed["fab"]
    assert not _flower_accepts(other, signed["approval"], signed["trusted"])
    assert not _flower_accepts(signed["fab"] + b"\0", signed["approval"], signed["trusted"])


def test_app_signed_by_another_key_is_refused(signed, tmp_path):
    foreign_key, _ = create_app_signing_key(tmp_path / "attacker")
    forged = sign_fab(signed["fab"], load_signing_key(foreign_key))
    assert not _flower_accepts(signed["fab"], forged, signed["trusted"])
    # The same key id with another key's signature: the key id is only a name, the signature decides.
    (kid,) = signed["trusted"]
    stolen_name = AppApproval(forged.fab_hash, {"valid_license": "Valid", kid: next(
        v for k, v in forged.verifications.items() if k != "valid_license")})
    assert not _flower_accepts(signed["fab"], stolen_name, signed["trusted"])


def test_unsigned_app_is_refused_as_flower_does_for_the_open_source_superlink(signed):
    assert not _flower_accepts(signed["fab"], AppApproval(signed["approval"].fab_hash, {}), signed["trusted"])


def test_fab_is_the_one_flwr_run_sends(signed):
    from flwr.cli.build import build_fab_from_disk

    assert build_fab(signed["app"]) == signed["fab"] == build_fab_from_disk(signed["app"])


def test_trusted_entities_file_is_what_flower_supernode_loads(signed):
    path = signed["tmp"] / "node" / "trusted.yaml"
    loaded = _try_obtain_trusted_entities(path)
    _validate_public_keys_ed25519(loaded)
    assert loaded == signed["trusted"] and len(loaded) == 1


def test_signing_key_files_are_created_exclusively(tmp_path):
    (tmp_path / "certs").mkdir()
    target = tmp_path / "attacker-owned"
    (tmp_path / "certs" / "app-signing.key").symlink_to(target)
    with pytest.raises(FileExistsError, match="symbolic link"):
        create_app_signing_key(tmp_path / "certs")
    assert not target.exists()
    private, public = create_app_signing_key(tmp_path / "fresh")
    assert private.stat().st_mode & 0o777 == 0o600
    with pytest.raises(FileExistsError):
        create_app_signing_key(tmp_path / "fresh")


def test_keys_init_makes_the_signing_key_beside_the_ca(tmp_path):
    init_certs(tmp_path / "certs", ["coordinator.test"])
    private, public = app_signing_paths(tmp_path / "certs")
    assert load_signing_key(private) and public.read_text().startswith("ssh-ed25519 ")


def test_encrypted_signing_key_needs_the_passphrase(tmp_path, monkeypatch):
    monkeypatch.setenv("POLLINATE_KEY_PASSPHRASE", "s3cret")
    private, _ = create_app_signing_key(tmp_path / "certs")
    assert b"ENCRYPTED" in private.read_bytes()
    assert load_signing_key(private)
    monkeypatch.delenv("POLLINATE_KEY_PASSPHRASE")
    with pytest.raises(ValueError, match="POLLINATE_KEY_PASSPHRASE"):
        load_signing_key(private)


def test_join_trusts_only_the_coordinators_key_and_needs_it(tmp_path):
    certs = init_certs(tmp_path / "certs", ["coordinator.test"])
    spec = JoinSpec(coordinator="c.test:9092", work_dir=tmp_path / "node", ca_cert=certs.ca_cert)
    assert spec.app_signing_key == certs.ca_cert.parent / "app-signing.pub"
    argv = supernode_argv(spec, 9999, 10)
    assert argv[argv.index("--trusted-entities") + 1] == str(spec.trusted_entities_path)
    lonely = tmp_path / "only-ca"
    lonely.mkdir()
    (lonely / "ca.crt").write_bytes(certs.ca_cert.read_bytes())
    node = Node(JoinSpec(coordinator="c.test:9092", work_dir=tmp_path / "n2", ca_cert=lonely / "ca.crt"), echo=None)
    with pytest.raises(FileNotFoundError, match="app-signing.pub"):
        node.check()
    assert "--trusted-entities" not in supernode_argv(
        JoinSpec(coordinator="c.test:9092", work_dir=tmp_path / "n3", insecure=True), 9999, 10)


def _get_run(run_id: int, **overrides) -> bytes:
    config = {k: Scalar(string=v) for k, v in overrides.items()}
    return GetRunResponse(run=Run(run_id=run_id, override_config=config)).SerializeToString()


def _get_fab(fab: bytes, fab_hash: str) -> bytes:
    return GetFabResponse(fab=FabProto(hash_str=fab_hash, content=fab)).SerializeToString()


def _verifications_after(approver: FabApprover, run_id: int, fab: bytes, fab_hash: str) -> dict:
    answer = approver.on_get_fab(GetFabRequest(run_id=run_id).SerializeToString(), _get_fab(fab, fab_hash))
    return dict(GetFabResponse.FromString(answer).fab.verifications)


def test_gateway_signs_only_the_approved_fab_of_runs_without_overrides(signed, tmp_path):
    approval = signed["approval"]
    approver = FabApprover(approval.write(tmp_path / "approval.json"))
    approver.on_get_run(_get_run(1))
    approver.on_get_run(_get_run(2, **{"result-path": "/etc/x"}))
    assert _verifications_after(approver, 1, signed["fab"], approval.fab_hash) == approval.verifications
    assert _verifications_after(approver, 2, signed["fab"], approval.fab_hash) == {}  # overridden config
    assert _verifications_after(approver, 3, signed["fab"], approval.fab_hash) == {}  # run never seen
    other = build_fab(_app_dir(tmp_path, "other", **{"result-path": "x"}))
    approver.on_get_run(_get_run(4))
    assert _verifications_after(approver, 4, other, approval.fab_hash) == {}  # hash claimed, content differs
    assert FabApprover(tmp_path / "missing.json").on_get_fab(b"", _get_fab(signed["fab"], approval.fab_hash)) \
        == _get_fab(signed["fab"], approval.fab_hash)


def test_gateway_applies_the_approver_to_get_run_and_get_fab(signed):
    approval, fab = signed["approval"], signed["fab"]

    async def superlink(scope, receive, send):
        if scope["type"] != "http":
            return
        body = _get_run(7) if scope["path"].endswith("get-run") else _get_fab(fab, approval.fab_hash)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/protobuf")]})
        await send({"type": "http.response.body", "body": body})

    upstream_port = free_loopback_port()
    port = _other_port(upstream_port)
    server = uvicorn.Server(uvicorn.Config(superlink, host="127.0.0.1", port=upstream_port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    gateway = GatewayThread(FleetGateway(GatewayConfig("127.0.0.1", port, f"127.0.0.1:{upstream_port}"),
                                         FabApprover(approval))).start()
    try:
        base = f"http://127.0.0.1:{port}/v1/fleet"
        headers = {"content-type": "application/protobuf"}
        httpx.post(f"{base}/get-run", content=b"", headers=headers).raise_for_status()
        answer = httpx.post(f"{base}/get-fab", content=GetFabRequest(run_id=7).SerializeToString(), headers=headers)
        got = GetFabResponse.FromString(answer.content).fab
        assert got.content == fab and dict(got.verifications) == approval.verifications
        assert int(answer.headers["content-length"]) == len(answer.content)
    finally:
        gateway.stop()
        server.should_exit = True
        thread.join(10)


# -- end to end ---------------------------------------------------------------------------------------------
def _other_port(port: int) -> int:
    while (other := free_loopback_port()) == port:
        pass
    return other


def _spec(tmp: Path, port: int, certs: Path, keys: list[Path], name: str, **config) -> CoordinatorSpec:
    run_config = {"num-rounds": 1, "min-nodes": 1, "result-path": str(tmp / f"{name}.json"), **config}
    return CoordinatorSpec(
        run_dir=tmp / "run", server_app="pollinate_deploy_fixture:server_app",
        client_app="pollinate_deploy_fixture:client_app", run_config=run_config, port=port,
        superlink_port=_other_port(port), certs_dir=certs, node_public_keys=keys, env=FIXTURE_ENV, grace_s=3.0,
    )


def _join(tmp: Path, name: str, port: int, ca: Path, key: Path, signing_pub: Path) -> tuple[Node, threading.Thread]:
    data = tmp / f"{name}.txt"
    data.write_text("5")
    node = Node(JoinSpec(coordinator=f"127.0.0.1:{port}", work_dir=tmp / name, ca_cert=ca, private_key=key,
                         data_path=data, env=FIXTURE_ENV, app_signing_key=signing_pub, retry_budget_s=60), echo=None)
    thread = threading.Thread(target=node.run, daemon=True)
    thread.start()
    assert node.connected.wait(60), f"{name} did not join"
    return node, thread


@pytest.mark.slow
def test_clients_refuse_foreign_apps_and_apps_signed_by_another_key(tmp_path):
    certs = init_certs(tmp_path / "certs", ["coordinator.test"])
    attacker_pub = create_app_signing_key(tmp_path / "attacker")[1]
    keys = {name: create_node_key(tmp_path / "nodes", name) for name in ("n1", "n2")}
    port = free_loopback_port()
    spec = _spec(tmp_path, port, certs.ca_cert.parent, [keys["n1"][1], keys["n2"][1]], "own")
    coordinator, nodes = Coordinator(spec, echo=None), []
    try:
        coordinator.prepare()
        coordinator.start_superlink()
        identities = coordinator.register_nodes()
        own_pub = app_signing_paths(certs.ca_cert.parent)[1]
        nodes.append(_join(tmp_path, "n1", port, certs.ca_cert, keys["n1"][0], own_pub))

        # The coordinator's own app runs on a client that trusts the coordinator's key.
        outcome = coordinator.submit_run(write_app_dir(spec, identities), timeout_s=120)
        assert outcome.ok, outcome
        assert json.loads((tmp_path / "own.json").read_text())["rounds"][0]["values"] == [6.0]
        # The finished run told its client so, and `join` returned: join again for the next run.
        nodes[0][1].join(60)
        assert not nodes[0][1].is_alive(), "n1 did not return when its run ended"
        nodes.append(_join(tmp_path, "n1-again", port, certs.ca_cert, keys["n1"][0], own_pub))

        # A modified app submitted on the coordinator's loopback (the public port refuses submissions):
        # the client answers INVALID_FAB and none of that app's code runs there.
        foreign = _app_dir(tmp_path, "foreign", **{"result-path": str(tmp_path / "foreign.json")})
        env = child_env({**FIXTURE_ENV, "FLWR_HOME": str(spec.run_dir / "flwr_home")})
        flwr_run = subprocess.run([flwr_executable("flwr"), "run", str(foreign), "pollinate", "--stream"],
                                  env=env, capture_output=True, text=True, timeout=120)
        run_id = int(flwr_run.stdout.split("Successfully started run ")[1].split()[0])
        refused = coordinator.run_status(run_id)
        assert refused.status == "finished:failed" and REFUSED in refused.details, refused

        # A client that trusts another key refuses the coordinator's own app.
        nodes.append(_join(tmp_path, "n2", port, certs.ca_cert, keys["n2"][0], attacker_pub))
        spec.run_config = {**spec.run_config, "min-nodes": 2}
        outcome = coordinator.submit_run(write_app_dir(spec, identities), timeout_s=120)
        assert outcome.status == "finished:failed" and outcome.details.count(REFUSED) == 1, outcome
        n2_log = (tmp_path / "n2" / "logs" / "supernode.log").read_text()
        assert "FAB verification failed" in n2_log
    finally:
        for node, _ in nodes:
            node.stop()
        coordinator.stop()
    for _, thread in nodes:
        thread.join(30)
