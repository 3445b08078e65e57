"""A deployed run on 127.0.0.1 with the node's long-lived worker: `pollinate coordinator --insecure` and one
`pollinate join`, as a user runs them. Every train and evaluate message is answered by the one worker process,
the run completes, and join leaves nothing running. Every process the test starts is stopped by PID."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from pollinate.common.data import generate_skills
from pollinate.deploy.processes import free_loopback_port
from pollinate.deploy.worker import worker_socket_path

ROOT = Path(__file__).resolve().parents[2]
RUN = ["--model", "tiny-llama", "--clients", "1", "--rounds", "2", "--set", "data.eval_examples=8",
       "--set", "train.local_steps=2", "--set", "output.plots=false", "--set", "eval.client_fraction=0.2"]


def _start(args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "pollinate.cli", *args], cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT, env=os.environ.copy())


def _stop_tree(proc: subprocess.Popen) -> None:
    """SIGTERM (join and the coordinator stop their children), then SIGKILL whatever of the tree is left."""
    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in tree:
            try:
                p.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
        _, tree = psutil.wait_procs(tree, timeout=15)


@pytest.mark.slow
def test_a_deployed_client_answers_every_round_from_one_worker(tmp_path):
    port, run_dir = free_loopback_port(), tmp_path / "run"
    data = tmp_path / "client.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in generate_skills(30, seed=100)))
    coordinator = _start(["coordinator", "--insecure", "--host", "127.0.0.1", "--port", str(port), *RUN,
                          "--out", str(run_dir)], tmp_path / "coordinator.log")
    client = _start(["join", "--coordinator", f"127.0.0.1:{port}", "--insecure", "--partition-id", "0", "--data",
                     str(data), "--work-dir", str(tmp_path / "node")], tmp_path / "client.log")
    try:
        coordinator_code = coordinator.wait(600)
        client_code = client.wait(120)
        socket_path = str(worker_socket_path(tmp_path / "node"))
        leftovers = [p.pid for p in psutil.process_iter(["cmdline"]) if socket_path in (p.info["cmdline"] or [])]
    finally:
        _stop_tree(coordinator)
        _stop_tree(client)
    log = (tmp_path / "coordinator.log").read_text(errors="replace")
    assert coordinator_code == 0, log[-4000:]
    assert client_code == 0 and leftovers == [], (tmp_path / "client.log").read_text(errors="replace")[-4000:]
    report = json.loads((run_dir / "report.json").read_text())
    assert [r["round"] for r in report["rounds"]] == [1, 2] and report["rejected"] == []
    worker_log = (tmp_path / "node" / "logs" / "worker.log").read_text(errors="replace")
    assert len(re.findall(r"worker: serving .* \(pid \d+\)", worker_log)) == 1  # one worker, never restarted
    assert len(re.findall(r"worker: train message of run \d+ answered", worker_log)) == 2
    assert len(re.findall(r"worker: evaluate message of run \d+ answered", worker_log)) == 2
    assert not Path(socket_path).exists()
