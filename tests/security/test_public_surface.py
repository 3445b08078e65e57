"""Issue 11, finding 1: the coordinator's public port answers the Fleet API only.

On 4033c4e a party holding only ca.crt submitted its own app with `flwr run` to the coordinator's address and
it ran on the coordinator and on the clients. Here the same calls go to the public port (refused: the SuperLink
binds loopback and the gateway forwards Fleet routes only) and to the SuperLink's loopback port (where the
operator's `flwr ls` keeps working), and a SuperNode joins through the gateway and completes a round.
"""

import json
import ssl
import subprocess
import threading
from pathlib import Path

import httpx
import pytest
import tomli_w

from pollinate.deploy.coordinator import Coordinator, CoordinatorSpec
from pollinate.deploy.join import JoinSpec, Node
from pollinate.deploy.keys import create_node_key, init_certs
from pollinate.deploy.processes import child_env, flwr_executable, free_loopback_port

FIXTURE_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "deploy_app"
FIXTURE_ENV = {"PYTHONPATH": str(FIXTURE_DIR)}
pytestmark = pytest.mark.slow


def _other_port(port: int) -> int:
    while (other := free_loopback_port()) == port:
        pass
    return other


def _flwr(home: Path, *args: str) -> subprocess.CompletedProcess:
    env = child_env({**FIXTURE_ENV, "FLWR_HOME": str(home)})
    return subprocess.run([flwr_executable("flwr"), *args], env=env, capture_output=True, text=True, timeout=90)


def _flwr_home(path: Path, address: str, ca: Path) -> Path:
    path.mkdir(parents=True)
    connection = {"address": address, "root-certificates": str(ca)}
    (path / "config.toml").write_text(tomli_w.dumps({"superlink": {"default": "c", "c": connection}}))
    return path


def _run_ids(home: Path) -> list[int]:
    listing = _flwr(home, "ls", "c", "--format", "json")
    assert listing.returncode == 0, listing.stdout + listing.stderr
    text = listing.stdout
    return [int(row["run-id"]) for row in json.loads(text[text.index("{"):])["runs"]]


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    """A TLS + node-auth coordinator running the fixture app; yields while its run waits for the node."""
    tmp = tmp_path_factory.mktemp("surface")
    certs = init_certs(tmp / "certs", ["coordinator.test"])
    private, public = create_node_key(tmp / "nodes", "n1")
    port = free_loopback_port()
    spec = CoordinatorSpec(
        run_dir=tmp / "run", server_app="pollinate_deploy_fixture:server_app",
        client_app="pollinate_deploy_fixture:client_app", port=port, superlink_port=_other_port(port),
        run_config={"num-rounds": 1, "min-nodes": 1, "result-path": str(tmp / "result.json")},
        certs_dir=certs.ca_cert.parent, node_public_keys=[public], env=FIXTURE_ENV, grace_s=3.0,
    )
    coordinator = Coordinator(spec, echo=None)
    outcome: dict = {}
    runner = threading.Thread(target=lambda: outcome.update(result=coordinator.run(timeout_s=180)), daemon=True)
    runner.start()
    try:
        assert coordinator.ready.wait(90), "coordinator did not become ready"
        yield {"tmp": tmp, "spec": spec, "certs": certs, "key": private, "outcome": outcome, "runner": runner,
               "public": _flwr_home(tmp / "outsider", f"127.0.0.1:{port}", certs.ca_cert),
               "loopback": _flwr_home(tmp / "operator", spec.local_address, certs.ca_cert)}
    finally:
        coordinator.stop()
        runner.join(30)


def test_control_api_through_the_public_port_is_refused(deployment):
    listing = _flwr(deployment["public"], "ls", "c")
    assert listing.returncode != 0
    app = deployment["spec"].run_dir / "flwr_app"
    submitted = _flwr(deployment["public"], "run", str(app), "c")
    assert submitted.returncode != 0 and "Successfully started run" not in submitted.stdout
    assert len(_run_ids(deployment["loopback"])) == 1  # only the coordinator's own run exists


def test_every_non_fleet_route_answers_404_on_the_public_port(deployment):
    from fastapi.routing import iter_route_contexts
    from flwr.superlink.main import create_app

    paths = {ctx.path for ctx in iter_route_contexts(create_app().routes)}
    others = sorted(p for p in paths if not p.startswith("/v1/fleet/"))
    verify = ssl.create_default_context(cafile=str(deployment["certs"].ca_cert))
    spec = deployment["spec"]
    with httpx.Client(base_url=f"https://127.0.0.1:{spec.port}", verify=verify, timeout=10) as public, \
            httpx.Client(base_url=f"https://{spec.local_address}", verify=verify, timeout=10) as loopback:
        assert {path: public.post(path).status_code for path in others} == {path: 404 for path in others}
        assert loopback.get("/health").status_code == 200  # the SuperLink itself still answers on loopback
        assert loopback.post("/v1/control/list-runs").status_code != 404


def test_a_node_joins_through_the_gateway_and_completes_the_round(deployment):
    tmp = deployment["tmp"]
    (tmp / "n1.txt").write_text("5")
    spec = deployment["spec"]
    node = Node(JoinSpec(coordinator=f"127.0.0.1:{spec.port}", work_dir=tmp / "n1", ca_cert=deployment["certs"]
                         .ca_cert, private_key=deployment["key"], data_path=tmp / "n1.txt", env=FIXTURE_ENV),
                echo=None)
    joined = threading.Thread(target=node.run, daemon=True)
    joined.start()
    try:
        deployment["runner"].join(150)
        assert deployment["outcome"]["result"].ok, deployment["outcome"]
    finally:
        node.stop()
        joined.join(30)
    assert json.loads((tmp / "result.json").read_text())["rounds"][0]["values"] == [6.0]
