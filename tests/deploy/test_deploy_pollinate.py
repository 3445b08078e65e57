"""`pollinate coordinator` / `pollinate join` / `pollinate keys` end to end on 127.0.0.1, as a user runs them.

One deployment (TLS + node authentication, 3 clients, 3 rounds of fedavg-lora on tiny-llama) goes through
what deployment must survive: after round 1 the whole coordinator tree is SIGKILLed and restarted with
`--resume`; the clients' `join` supervisors rejoin on their own; as round 3 starts one client is SIGKILLed
and the round completes with the other two. Every process a test starts is stopped by PID.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from pollinate.cli import main
from pollinate.common.data import generate_skills
from pollinate.deploy.processes import free_loopback_port

ROOT = Path(__file__).resolve().parents[2]
ROUND_TIMEOUT_S = 90  # long enough for a healthy client on a busy 2-core machine, short for the dropped one
RUN_OPTIONS = [
    "--model", "tiny-llama", "--clients", "3", "--rounds", "3", "--set", "data.eval_examples=8",
    "--set", "train.local_steps=2", "--set", f"federation.round_timeout_s={ROUND_TIMEOUT_S}",
    "--set", "federation.min_clients=2", "--set", "output.plots=false",
]


def _start(args: list[str], log: Path) -> subprocess.Popen:
    """`python -m pollinate.cli ARGS` with output to a file (a pipe nobody reads would block it)."""
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "pollinate.cli", *args], cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT, env=os.environ.copy())


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _signal_tree(procs: list[psutil.Process], sig: signal.Signals) -> None:
    for proc in procs:
        try:
            proc.send_signal(sig)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=15)


def _events(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def _wait_for(what: str, predicate, timeout: float, alive: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (value := predicate()):
            return value
        if alive is not None and alive.poll() is not None:
            break
        time.sleep(0.3)
    tail = log.read_text(errors="replace")[-3000:] if log and log.is_file() else ""
    pytest.fail(f"timed out waiting for {what}\n{tail}")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """Certificates and three node keys, made with the CLI."""
    root = tmp_path_factory.mktemp("pki")
    assert main(["keys", "init", str(root / "certs"), "--host", "coordinator.test"]) == 0
    for i in range(3):
        assert main(["keys", "node", str(root / "nodes"), f"client{i}"]) == 0
    return root


def _coordinator_args(pki: Path, port: int) -> list[str]:
    keys = [arg for i in range(3) for arg in ("--node-key", str(pki / "nodes" / f"client{i}.pub"))]
    return ["coordinator", "--host", "127.0.0.1", "--port", str(port), "--certs", str(pki / "certs"), *keys]


@pytest.fixture(scope="module")
def deployment(pki, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("deployment")
    run_dir, port = tmp / "run", free_loopback_port()
    coordinator_log = tmp / "coordinator.log"
    coordinator = _start([*_coordinator_args(pki, port), *RUN_OPTIONS, "--out", str(run_dir)], coordinator_log)
    clients: list[subprocess.Popen] = []
    resumed = None
    started = time.monotonic()
    try:
        for i in range(3):
            data = tmp / f"client{i}.jsonl"
            data.write_text("".join(json.dumps(row) + "\n" for row in generate_skills(30, seed=100 + i)))
            clients.append(_start(["join", "--coordinator", f"127.0.0.1:{port}", "--certs", str(pki / "certs"),
                                   "--key", str(pki / "nodes" / f"client{i}"), "--partition-id", str(i),
                                   "--data", str(data), "--work-dir", str(tmp / f"node{i}")],
                                  tmp / f"client{i}.log"))
        # Round 1 checkpointed: the coordinator machine "crashes" (every process of it, SIGKILL).
        _wait_for("round 1 checkpoint", lambda: (run_dir / "checkpoints" / "round-0001" / "state.json").is_file(),
                  240, coordinator, coordinator_log)
        _signal_tree(_tree(coordinator.pid), signal.SIGKILL)
        crashed_at = time.monotonic()
        resumed = _start([*_coordinator_args(pki, port), "--resume", str(run_dir)], coordinator_log)
        # Round 2 recorded: Flower sends round 3's messages next, to every node still online (a node is marked
        # offline only after missing heartbeats, tens of seconds). Client 2 is SIGKILLed now, so it dies with a
        # round-3 message addressed to it. (Waiting for its round-3 ClientApp process first raced tiny-llama's
        # few-second training: on a loaded machine the reply could leave before the kill.)
        _wait_for("round 2 of the resumed run",
                  lambda: any(e["type"] == "round" and e["round"] == 2 for e in _events(run_dir)),
                  300, resumed, coordinator_log)
        _signal_tree(_tree(clients[2].pid), signal.SIGKILL)
        code = resumed.wait(ROUND_TIMEOUT_S + 180)
        elapsed = time.monotonic() - started
    finally:
        for proc in [coordinator, *([resumed] if resumed else []), *clients]:
            if proc.poll() is None:
                _signal_tree([psutil.Process(proc.pid)], signal.SIGTERM)  # join/coordinator stop their children
            _signal_tree(_tree(proc.pid), signal.SIGKILL)
    yield {"run_dir": run_dir, "code": code, "log": coordinator_log, "elapsed": elapsed,
           "restart_s": time.monotonic() - crashed_at, "tmp": tmp}


@pytest.mark.slow
def test_three_authenticated_clients_complete_a_resumed_run_and_report_it(deployment):
    run_dir = deployment["run_dir"]
    log = deployment["log"].read_text(errors="replace")
    assert deployment["code"] == 0, log[-4000:]
    report = json.loads((run_dir / "report.json").read_text())
    assert report["method"] == "fedavg-lora" and report["num_clients"] == 3
    assert [r["round"] for r in report["rounds"]] == [1, 2, 3]
    assert [sorted(c["client_id"] for c in r["clients"]) for r in report["rounds"][:2]] == [[0, 1, 2], [0, 1, 2]]
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["round-0001", "round-0002", "round-0003"]
    # TLS and node authentication were on, and the coordinator told clients how to join.
    superlink_log = (run_dir / "logs" / "superlink.log").read_text(errors="replace")
    assert "--insecure" not in superlink_log
    assert "--partition-id 2" in log and "--key <private key client2>" in log
    assert any(e["type"] == "resumed" and e["from_round"] == 1 for e in _events(run_dir))
    print(f"deployment: {deployment['elapsed']:.0f} s in all, {deployment['restart_s']:.0f} s from crash to end")


@pytest.mark.slow
def test_client_killed_mid_round_is_dropped_and_named_while_the_others_complete_the_round(deployment):
    report = json.loads((deployment["run_dir"] / "report.json").read_text())
    last = report["rounds"][2]
    assert sorted(c["client_id"] for c in last["clients"]) == [0, 1]
    assert last["train_loss"] is not None  # aggregated, not skipped
    dropped = [r for r in report["rejected"] if r["round"] == 3]
    assert [r["client_id"] for r in dropped] == [2], report["rejected"]
    assert "dropped" in dropped[0]["reason"] or "Node Unavailable" in dropped[0]["reason"]


# --- bad input: clear errors, nothing left running -----------------------------------------------------------
def test_missing_cert_files_are_named(tmp_path, pki, capsys):
    code = main([*_coordinator_args(pki, free_loopback_port())[:-6], "--certs", str(tmp_path / "nocerts"),
                 "--out", str(tmp_path / "run"), "--model", "tiny-llama"])
    assert code == 2
    err = capsys.readouterr().err
    assert "missing TLS file(s)" in err and "ca.crt" in err and "pollinate keys init" in err


def test_port_in_use_is_named(tmp_path, pki, capsys):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        code = main([*_coordinator_args(pki, port), "--out", str(tmp_path / "run"), "--model", "tiny-llama"])
    assert code == 2
    assert f"port {port} on 127.0.0.1 is already in use" in capsys.readouterr().err


def test_coordinator_refuses_to_overwrite_a_run_with_checkpoints(tmp_path, pki, capsys):
    (tmp_path / "run" / "checkpoints" / "round-0001").mkdir(parents=True)
    for name in ("state.json", "global.safetensors"):
        (tmp_path / "run" / "checkpoints" / "round-0001" / name).write_text("{}")
    code = main([*_coordinator_args(pki, free_loopback_port()), "--out", str(tmp_path / "run")])
    assert code == 2 and "--resume" in capsys.readouterr().err


def test_join_with_missing_data_or_ca_is_refused(tmp_path, pki, capsys):
    base = ["join", "--coordinator", "127.0.0.1:9", "--key", str(pki / "nodes" / "client0"),
            "--work-dir", str(tmp_path / "node")]
    assert main([*base, "--certs", str(pki / "certs"), "--data", str(tmp_path / "none.jsonl")]) == 2
    assert "data path not found" in capsys.readouterr().err
    (tmp_path / "d.jsonl").write_text("{}\n")
    assert main([*base, "--data", str(tmp_path / "d.jsonl")]) == 2
    assert "--certs" in capsys.readouterr().err
    assert main([*base, "--certs", str(tmp_path), "--data", str(tmp_path / "d.jsonl")]) == 2
    assert "CA certificate not found" in capsys.readouterr().err


def test_keys_refuse_to_overwrite_without_force(pki, capsys):
    assert main(["keys", "node", str(pki / "nodes"), "client0"]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err


@pytest.mark.slow
def test_unreachable_coordinator_gives_a_clear_error(tmp_path, pki, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n")
    port = free_loopback_port()  # nothing listens there
    started = time.monotonic()
    code = main(["join", "--coordinator", f"127.0.0.1:{port}", "--certs", str(pki / "certs"), "--key",
                 str(pki / "nodes" / "client0"), "--partition-id", "0", "--data", str(data), "--retry-budget", "3",
                 "--work-dir", str(tmp_path / "node")])
    assert code == 1
    assert f"coordinator at 127.0.0.1:{port} did not accept this node" in capsys.readouterr().err
    assert time.monotonic() - started < 60
    leftovers = [p for p in psutil.Process().children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE]
    assert leftovers == []
