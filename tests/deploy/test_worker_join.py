"""The deployed node's long-lived worker, `pollinate join` side: started before the SuperNode and named in its node
config, restarted when it dies, stopped by PID when the run ends or join is stopped, spared when a dead
SuperNode's leftovers are stopped; `--no-worker` keeps Flower's process per message. A scripted object stands in
for `flower-supernode`; the worker is the real process."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest
from flwr.common.config import parse_config_args

from pollinate import cli
from pollinate.client.worker_link import WORKER_SOCKET_KEY
from pollinate.common.run_end import RunEnd, write_run_end
from pollinate.deploy import commands
from pollinate.deploy import join as join_module
from pollinate.deploy import worker as worker_module
from pollinate.deploy.join import JoinSpec, Node


class _SuperNode:
    """Stands in for `flower-supernode`: notes its node config, environment and the worker it found running,
    reports itself joined, then runs until stopped."""

    node: Node | None = None
    started: list[dict] = []

    def __init__(self, name, argv, env, log_path, echo=None, on_line=None, **kwargs):
        worker_pid = self.node.worker.pid if self.node.worker is not None else None
        self.started.append({"config": parse_config_args([argv[argv.index("--node-config") + 1]]), "env": env,
                             "worker_pid": worker_pid, "worker_alive": worker_pid and psutil.pid_exists(worker_pid)})
        on_line("INFO :      SuperNode ID: 7")

    def wait(self, timeout=None):
        time.sleep(timeout or 0)
        raise subprocess.TimeoutExpired("flower-supernode", timeout)

    def tail(self, lines=15):
        return ""

    def stop(self, grace_s=5.0):
        return -15


@pytest.fixture
def supernode(monkeypatch):
    monkeypatch.setattr(join_module, "ChildProcess", _SuperNode)
    monkeypatch.setattr(_SuperNode, "started", [])
    monkeypatch.setattr(Node, "_warn_insecure", lambda self: None)
    monkeypatch.delenv("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", raising=False)
    return _SuperNode


def _running(tmp_path, **kw) -> tuple[Node, threading.Thread, dict]:
    spec = JoinSpec(coordinator="127.0.0.1:9", work_dir=tmp_path / "node", insecure=True, finish_grace_s=0.1, **kw)
    node = Node(spec, echo=None)
    _SuperNode.node = node
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.setdefault("end", node.run()), daemon=True)
    thread.start()
    _wait_for(lambda: _SuperNode.started, "the SuperNode to start")
    return node, thread, outcome


def _wait_for(predicate, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_join_starts_the_worker_first_names_its_socket_and_stops_it_by_pid_when_the_run_ends(tmp_path, supernode):
    node, thread, outcome = _running(tmp_path)
    [started] = supernode.started
    socket_path = node.worker.socket_path
    assert started["worker_alive"] and started["config"][WORKER_SOCKET_KEY] == str(socket_path)
    assert started["env"]["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] == "0.2"
    assert psutil.Process(started["worker_pid"]).cmdline()[1:4] == ["-m", "pollinate.deploy.worker_server",
                                                                   "--socket"]
    _wait_for(socket_path.exists, "the worker to listen")
    write_run_end(node.spec.run_end_path, RunEnd(run_id=3, rounds=2))
    thread.join(30)
    assert outcome["end"] == RunEnd(run_id=3, rounds=2)
    assert _gone(started["worker_pid"]) and node.worker is None and not socket_path.exists()


def test_a_worker_that_dies_is_restarted_and_stop_ends_both(tmp_path, supernode, monkeypatch):
    monkeypatch.setattr(worker_module, "RESTART_DELAY_S", 0.0)
    node, thread, outcome = _running(tmp_path)
    first = node.worker.pid
    os.kill(first, signal.SIGKILL)  # the worker this test's join started
    second = _wait_for(lambda: node.worker.pid if node.worker.pid != first else None, "a new worker")
    assert node.worker.restarts == 1 and len(supernode.started) == 1  # the SuperNode was left alone
    node.stop()
    thread.join(30)
    assert outcome["end"] is None and _gone(first) and _gone(second)


def test_no_worker_keeps_a_clientapp_process_per_message(tmp_path, supernode):
    node, thread, _ = _running(tmp_path, worker=False)
    assert node.worker is None and WORKER_SOCKET_KEY not in supernode.started[0]["config"]
    node.stop()
    thread.join(30)


def test_cli_no_worker_reaches_the_join_spec(tmp_path, monkeypatch):
    specs = []
    monkeypatch.setattr(commands, "join", lambda spec, echo: specs.append(spec))
    data = tmp_path / "d.jsonl"
    data.write_text("{}\n")
    base = ["join", "--coordinator", "127.0.0.1:9", "--insecure", "--partition-id", "0", "--data", str(data)]
    assert cli.main([*base, "--no-worker"]) == 0 and cli.main(base) == 0
    assert [spec.worker for spec in specs] == [False, True]


STRAYS = """
import subprocess, sys
from types import SimpleNamespace
from pollinate.deploy.worker import stop_strays
worker = subprocess.Popen(["sleep", "300"])
stray = subprocess.Popen([sys.executable, "-c", "import subprocess; subprocess.Popen(['sleep', '300']).wait()"])
import time; time.sleep(0.5)
count = stop_strays(SimpleNamespace(pid=worker.pid), grace_s=2)
print(count, stray.poll() is not None, worker.poll() is None)
worker.kill()
worker.wait()
"""


def test_leftovers_of_a_dead_supernode_are_stopped_and_the_worker_spared():
    out = subprocess.run([sys.executable, "-c", STRAYS], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split() == ["2", "True", "True"]  # the stray and its child; the worker still runs


def test_the_worker_exits_on_its_own_once_join_is_gone():
    """A join that is SIGKILLed cannot stop its worker: the worker watches its parent and leaves with it."""
    directory = Path(tempfile.mkdtemp(prefix="pw-"))
    socket_path = directory / "w" / "worker.sock"
    stand_in = subprocess.Popen(["sleep", "120"])  # plays the pollinate join process
    worker = subprocess.Popen([sys.executable, "-m", "pollinate.deploy.worker_server", "--socket", str(socket_path),
                               "--parent-pid", str(stand_in.pid)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        _wait_for(socket_path.exists, "the worker to listen")
        stand_in.kill()
        stand_in.wait()
        assert worker.wait(30) == 0 and not socket_path.exists()
    finally:
        for proc in (stand_in, worker):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        shutil.rmtree(directory, ignore_errors=True)
