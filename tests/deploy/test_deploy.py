"""Deployment mechanics on loopback: coordinator (SuperLink + `flwr run`) and joined SuperNodes.

The fixture app (tests/fixtures/deploy_app, torch-free) is imported from PYTHONPATH through the same
generated app directory a real deployment uses. Every process a test starts is stopped by PID.
"""

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from pollinate.deploy.coordinator import (
    Coordinator,
    CoordinatorSpec,
    PortInUseError,
    superlink_argv,
    write_app_dir,
)
from pollinate.deploy.identity import NodeIdentities
from pollinate.deploy.join import CoordinatorUnreachableError, JoinError, JoinSpec, Node
from pollinate.deploy.join_spec import node_config_arg
from pollinate.deploy.keyfiles import PASSPHRASE_ENV
from pollinate.deploy.keys import create_node_key, init_certs
from pollinate.deploy.processes import free_loopback_port

FIXTURE_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "deploy_app"
FIXTURE_ENV = {"PYTHONPATH": str(FIXTURE_DIR)}
SERVER_APP = "pollinate_deploy_fixture:server_app"
CLIENT_APP = "pollinate_deploy_fixture:client_app"


def _spec(tmp: Path, port: int, keys: list[Path], certs: Path | None, **run_config) -> CoordinatorSpec:
    config = {"num-rounds": 2, "min-nodes": 2, "result-path": str(tmp / "result.json"), **run_config}
    return CoordinatorSpec(
        run_dir=tmp / "run", server_app=SERVER_APP, client_app=CLIENT_APP, run_config=config, port=port,
        certs_dir=certs, insecure=certs is None, node_public_keys=keys, env=FIXTURE_ENV, grace_s=3.0,
    )


class _Background:
    """Run `fn` in a thread and keep its result or exception."""

    def __init__(self, fn):
        self.result = self.error = None

        def target():
            try:
                self.result = fn()
            except BaseException as err:  # noqa: BLE001 - handed to the test thread
                self.error = err

        self.thread = threading.Thread(target=target, daemon=True)
        self.thread.start()

    def join(self, timeout: float):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "background task did not finish in time"
        return self


def _node(tmp: Path, name: str, port: int, ca: Path, key: Path | None, value: float, **kw) -> Node:
    data = tmp / f"{name}.txt"
    data.write_text(str(value))
    spec = JoinSpec(coordinator=f"127.0.0.1:{port}", work_dir=tmp / name, ca_cert=ca, private_key=key,
                    data_path=data, partition_id=0, env=FIXTURE_ENV, **kw)
    return Node(spec, echo=None)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    root = tmp_path_factory.mktemp("pki")
    certs = init_certs(root / "certs", ["coordinator.test"])
    other = init_certs(root / "other-ca", ["coordinator.test"])
    keys = {name: create_node_key(root / "nodes", name) for name in ("n1", "intruder")}
    with pytest.MonkeyPatch.context() as env:
        env.setenv(PASSPHRASE_ENV, "n2's passphrase")  # n2 joins with an encrypted key
        keys["n2"] = create_node_key(root / "nodes", "n2")
    return {"certs": root / "certs", "ca": certs.ca_cert, "other_ca": other.ca_cert, "keys": keys}


@pytest.fixture(scope="module")
def deployment(pki, tmp_path_factory):
    """One TLS + node-auth coordinator running the fixture app with n1 and n2, while an unregistered key
    and a client trusting another CA try to join. Returns everything the tests below look at."""
    tmp = tmp_path_factory.mktemp("deploy")
    port = free_loopback_port()
    keys = pki["keys"]
    spec = _spec(tmp, port, [keys["n1"][1], keys["n2"][1]], pki["certs"])
    coordinator = Coordinator(spec, echo=None)
    started = time.monotonic()
    run = _Background(lambda: coordinator.run(timeout_s=120))
    nodes = []
    passphrase = pytest.MonkeyPatch()
    passphrase.setenv(PASSPHRASE_ENV, "n2's passphrase")
    try:
        assert coordinator.ready.wait(60), "coordinator did not become ready"
        nodes = [
            _node(tmp, "n1", port, pki["ca"], keys["n1"][0], 5),
            _node(tmp, "n2", port, pki["ca"], keys["n2"][0], 7),
        ]
        intruder = _node(tmp, "intruder", port, pki["ca"], keys["intruder"][0], 100, retry_budget_s=4)
        wrong_ca = _node(tmp, "wrong-ca", port, pki["other_ca"], keys["n1"][0], 100, retry_budget_s=30)
        runners = [_Background(n.run) for n in [*nodes, intruder, wrong_ca]]
        run.join(150)
        elapsed = time.monotonic() - started
        rejected = {"intruder": runners[2].join(60).error, "wrong_ca": runners[3].join(60).error}
        for runner in runners[:2]:  # told by the coordinator that the run has ended, each returns on its own
            runner.thread.join(60)
        ended = [runner.result for runner in runners[:2]]
    finally:
        coordinator.stop()
        for node in nodes:
            node.stop()
        passphrase.undo()
    for runner in runners[:2]:
        runner.join(30)
    yield {"run": run, "tmp": tmp, "elapsed": elapsed, "rejected": rejected, "nodes": nodes, "spec": spec,
           "coordinator": coordinator, "ended": ended}


@pytest.mark.slow
def test_two_authenticated_nodes_complete_two_rounds_over_tls(deployment):
    assert deployment["run"].error is None, deployment["run"].error
    outcome = deployment["run"].result
    assert outcome.ok and outcome.status == "finished:completed"
    result = json.loads((deployment["tmp"] / "result.json").read_text())
    assert result["nodes"] == 2
    # Each node adds its local number (read from its data-path) to the round number.
    assert [r["values"] for r in result["rounds"]] == [[6.0, 8.0], [7.0, 9.0]]
    assert result["run_config"]["num-rounds"] == 2
    print(f"coordinator start to run completed: {deployment['elapsed']:.1f} s")


@pytest.mark.slow
def test_replies_resolve_to_the_client_id_of_the_registered_key(deployment, pki):
    assert pki["keys"]["n2"][0].read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    result = json.loads((deployment["tmp"] / "result.json").read_text())
    identities = NodeIdentities.from_run_config(result["run_config"])
    assert identities is not None and identities == deployment["coordinator"].identities
    # n1 (data 5) was registered first, n2 (data 7) second: round 1 values 6 and 8.
    by_node = result["rounds"][0]["by_node"]
    clients = {value: identities.client_id_for_node(int(node)) for node, value in by_node.items()}
    assert clients == {6.0: 0, 8.0: 1}


@pytest.mark.slow
def test_supernode_with_unregistered_key_is_refused(deployment):
    err = deployment["rejected"]["intruder"]
    assert isinstance(err, CoordinatorUnreachableError), err
    assert "Failed to activate SuperNode" in str(err) and "registered" in str(err)


@pytest.mark.slow
def test_client_trusting_another_ca_is_refused_without_retrying(deployment):
    err = deployment["rejected"]["wrong_ca"]
    assert isinstance(err, JoinError) and not isinstance(err, CoordinatorUnreachableError), err
    assert "TLS verification" in str(err) and "ca.crt" in str(err)


@pytest.mark.slow
def test_joined_nodes_return_when_the_coordinator_ends_the_run(deployment):
    assert deployment["run"].error is None
    assert [end and end.rounds for end in deployment["ended"]] == [2, 2]
    assert all(node.child is not None and node.child.poll() is not None for node in deployment["nodes"])
    assert "2 of 2 connected clients acknowledged" in (deployment["spec"].run_dir / "logs" / "flwr-run.log").read_text()


@pytest.mark.slow
def test_coordinator_leaves_no_process_behind(deployment):
    leftovers = [
        p for p in psutil.Process().children(recursive=True)
        if p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    ]
    assert leftovers == [], [_cmdline(p)[:2] for p in leftovers]


def _cmdline(proc: psutil.Process) -> list[str]:
    """A process's command line, or [] for one that exited or is a zombie (a short-lived helper of the tree)."""
    try:
        return proc.cmdline()
    except psutil.Error:
        return []


@pytest.mark.slow
def test_sigterm_stops_coordinator_tree_and_node_rejoins_restarted_coordinator(pki, tmp_path):
    port = free_loopback_port()
    keys = pki["keys"]
    spec = _spec(tmp_path, port, [keys["n1"][1]], pki["certs"], **{"min-nodes": 5})
    script = (
        "import json, sys; from pathlib import Path; from pollinate.deploy.coordinator import *; "
        "spec = CoordinatorSpec(**{**json.loads(sys.argv[1]), 'run_dir': Path(sys.argv[2]), "
        "'certs_dir': Path(sys.argv[3]), 'node_public_keys': [Path(sys.argv[4])]}); "
        "Coordinator(spec, echo=None).run()"
    )
    plain = {k: getattr(spec, k) for k in ("server_app", "client_app", "port", "env", "grace_s")}
    plain["run_config"] = dict(spec.run_config)
    proc = subprocess.Popen(
        [sys.executable, "-c", script, json.dumps(plain), str(spec.run_dir), str(spec.certs_dir),
         str(keys["n1"][1])],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    node = _node(tmp_path, "n1", port, pki["ca"], keys["n1"][0], 1, retry_budget_s=60)
    joined = _Background(node.run)
    restarted = None
    try:
        assert node.connected.wait(60), "node never joined the first coordinator"
        # The run is waiting for 5 nodes, so `flwr run` and the ServerApp are alive now.
        tree = psutil.Process(proc.pid).children(recursive=True)
        names = " ".join(" ".join(_cmdline(p)[:2]) for p in tree)
        assert "flower-superlink" in names and "flwr" in names
        proc.terminate()
        assert proc.wait(30) != 0
        gone, alive = psutil.wait_procs(tree, timeout=10)
        assert alive == [], [_cmdline(p)[:2] for p in alive]

        # A new coordinator on the same port: the SuperNode is rejected (unknown node id), exits, and
        # `join` starts a fresh one that registers again.
        restarted = Coordinator(_spec(tmp_path / "again", port, [keys["n1"][1]], pki["certs"]), echo=None)
        restarted.prepare()
        restarted.start_superlink()
        restarted.register_nodes()
        deadline = time.monotonic() + 60
        while node.connections < 2 and time.monotonic() < deadline and joined.thread.is_alive():
            time.sleep(0.2)
        assert node.connections >= 2, f"node did not rejoin; join error: {joined.error}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        node.stop()
        if restarted is not None:
            restarted.stop()
    joined.join(30)
    assert joined.error is None


def test_port_in_use_is_named(tmp_path, pki):
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        coordinator = Coordinator(_spec(tmp_path, port, [pki["keys"]["n1"][1]], pki["certs"]), echo=None)
        with pytest.raises(PortInUseError, match=f"port {port} "):
            coordinator.prepare()


def test_missing_cert_file_is_named(tmp_path, pki):
    certs = tmp_path / "certs"
    init_certs(certs, ["coordinator.test"])
    (certs / "server.key").unlink()
    coordinator = Coordinator(_spec(tmp_path, free_loopback_port(), [], certs), echo=None)
    with pytest.raises(FileNotFoundError, match="server private key .*server.key"):
        coordinator.prepare()


def test_superlink_command_has_tls_auth_and_no_dependency_installation(tmp_path, pki):
    argv = superlink_argv(_spec(tmp_path, 9092, [], pki["certs"]))
    assert "--disable-runtime-dependency-installation" in argv and "--enable-supernode-auth" in argv
    assert argv[argv.index("--ssl-ca-certfile") + 1].endswith("ca.crt")
    insecure = superlink_argv(_spec(tmp_path, 9092, [], None))
    assert "--insecure" in insecure and "--enable-supernode-auth" not in insecure
    assert "--disable-runtime-dependency-installation" in insecure


def test_generated_app_dir_holds_only_a_pyproject_naming_the_components(tmp_path, pki):
    import tomllib

    spec = _spec(tmp_path, 9092, [], pki["certs"], **{"model": {"name": "tiny"}})
    app_dir = write_app_dir(spec)
    assert [p.name for p in app_dir.iterdir()] == ["pyproject.toml"]
    app = tomllib.loads((app_dir / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": SERVER_APP, "clientapp": CLIENT_APP}
    assert app["config"]["num-rounds"] == 2 and app["config"]["model"] == {"name": "tiny"}


def test_bad_specs_are_refused_with_the_field_named(tmp_path):
    with pytest.raises(ValueError, match="server_app"):
        CoordinatorSpec(run_dir=tmp_path, server_app="no_colon", insecure=True)
    with pytest.raises(ValueError, match="certs_dir"):
        CoordinatorSpec(run_dir=tmp_path)
    with pytest.raises(ValueError, match=r"run_config\['bad'\]"):
        CoordinatorSpec(run_dir=tmp_path, insecure=True, run_config={"bad": [1, 2]})
    with pytest.raises(ValueError, match="coordinator="):
        JoinSpec(coordinator="nohost", work_dir=tmp_path, insecure=True)
    with pytest.raises(ValueError, match="ca_cert is required"):
        JoinSpec(coordinator="h:1", work_dir=tmp_path)


def test_node_config_renders_paths_as_toml_literal_strings():
    from flwr.common.config import parse_config_args

    text = node_config_arg({"data-path": r"C:\data\my set", "partition-id": 3, "fast": True, "lr": 0.5})
    assert parse_config_args([text]) == {
        "data-path": r"C:\data\my set", "partition-id": 3, "fast": True, "lr": 0.5
    }
    with pytest.raises(ValueError, match="single quote"):
        node_config_arg({"data-path": "it's"})


@pytest.mark.slow
def test_unreachable_coordinator_gives_clear_error_after_budget(tmp_path, pki):
    port = free_loopback_port()  # nothing listens there
    node = _node(tmp_path, "lonely", port, pki["ca"], pki["keys"]["n1"][0], 1, retry_budget_s=3)
    started = time.monotonic()
    with pytest.raises(CoordinatorUnreachableError, match=f"127.0.0.1:{port} did not accept this node"):
        node.run()
    assert time.monotonic() - started < 30
