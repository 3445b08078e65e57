"""Ctrl-C / SIGTERM stop a simulation cleanly: one line saying how to resume, exit 128 + signal, the last checkpoint
resumable, no Ray process left behind. Unit tests of the pieces, then one `pollinate simulate` stopped by SIGTERM."""

import os
import signal
import subprocess
import sys
import time
import tomllib
import uuid
from pathlib import Path

import psutil
import pytest
from flwr.app import Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from pollinate.common.config import RunConfig
from pollinate.server.checkpoint import find_resume_point, latest_round
from pollinate.simulations.process_trees import is_alive, kill_tree, process_tree
from pollinate.simulations.stopping import SimulationInterrupted, SimulationStopped, StoppableGrid, StopRequest

ROOT = Path(__file__).resolve().parents[2]


def test_interrupted_says_where_it_stopped_and_how_to_resume(tmp_path):
    stopped = SimulationInterrupted(signal.SIGTERM, tmp_path, 3)
    assert stopped.exit_code == 143 and isinstance(stopped, KeyboardInterrupt)
    assert str(stopped) == f"stopped after round 3; resume with: pollinate simulate --resume {tmp_path}"
    early = SimulationInterrupted(signal.SIGINT, tmp_path, None)
    assert early.exit_code == 130 and str(early) == "stopped before round 1 completed; nothing to resume"


def test_first_signal_asks_for_a_graceful_stop_and_a_second_forces_it():
    stop = StopRequest()
    with pytest.raises(KeyboardInterrupt):  # before the federation runs there is nothing to wind down
        stop.handle(signal.SIGINT)
    assert stop.signum == signal.SIGINT
    stop = StopRequest()
    stop.graceful = True
    stop.handle(signal.SIGTERM)
    assert stop.requested and stop.signum == signal.SIGTERM
    with pytest.raises(KeyboardInterrupt):
        stop.handle(signal.SIGINT)
    assert stop.signum == signal.SIGTERM  # the first signal names the exit code


def test_signals_reach_the_request_inside_the_block_and_handlers_come_back_after():
    before = signal.getsignal(signal.SIGTERM)
    stop = StopRequest()
    with stop.handling_signals():
        stop.graceful = True
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.event.wait(5) and stop.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.fixture
def task_identity(monkeypatch):
    for name, value in (("_run_id", 1), ("_node_id", 1), ("_task_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)


class _Grid:
    """Answers each pushed message on the second pull; ``on_pull`` runs at every pull."""

    def __init__(self, on_pull=lambda: None):
        self.pushed, self.pulls, self.on_pull = [], 0, on_pull

    def get_node_ids(self):
        return [5, 6]

    def push_messages(self, messages):
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            self.pushed.append(message)
        return [m.metadata.message_id for m in self.pushed]

    def pull_messages(self, message_ids):
        self.pulls += 1
        self.on_pull()
        if self.pulls < 2:
            return []
        return [Message(RecordDict(), reply_to=m) for m in self.pushed if m.metadata.message_id in set(message_ids)]


def _messages():
    return [Message(RecordDict(), dst_node_id=node, message_type="train") for node in (5, 6)]


def test_grid_relays_until_a_stop_is_asked_for_even_while_it_waits_for_replies(task_identity):
    stop = StopRequest()
    grid = StoppableGrid(_Grid(), stop)
    assert list(grid.get_node_ids()) == [5, 6]
    assert len(list(grid.send_and_receive(_messages(), timeout=10))) == 2
    waiting = StoppableGrid(_Grid(on_pull=stop.event.set), stop)  # the signal comes while replies are awaited
    with pytest.raises(SimulationStopped):
        waiting.send_and_receive(_messages(), timeout=10)
    with pytest.raises(SimulationStopped):
        grid.get_node_ids()


def _survivors(procs: dict[int, psutil.Process], group: int) -> list[str]:
    alive = [p for p in procs.values() if is_alive(p)]
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == group and is_alive(proc) and proc.pid not in procs:
                alive.append(proc)
        except (ProcessLookupError, psutil.Error):
            pass
    names = []
    for proc in alive:
        try:
            names.append(f"{proc.pid} {' '.join(proc.cmdline()[:2])}")
        except psutil.Error:
            pass
    return names


@pytest.mark.slow
def test_sigterm_stops_a_simulation_cleanly_and_leaves_it_resumable(tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "simulate.log"
    argv = [sys.executable, "-m", "pollinate.cli", "simulate", "--model", "tiny-llama", "--clients", "2",
            "--rounds", "50", "--out", str(run_dir), "--quiet"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    seen: dict[int, psutil.Process] = {}
    try:
        deadline = time.monotonic() + 600
        while latest_round(run_dir) is None:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
            seen.update((p.pid, p) for p in process_tree(proc.pid))
            time.sleep(0.5)
        seen.update((p.pid, p) for p in process_tree(proc.pid))
        commands = " ".join(" ".join(p.cmdline()[:1]) for p in seen.values() if is_alive(p))
        assert "raylet" in commands, commands  # Ray is running under it: what must not be left behind
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(300)
        deadline = time.monotonic() + 30
        while (left := _survivors(seen, proc.pid)) and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:  # whatever the outcome, nothing this test started survives it
        if proc.poll() is None:
            kill_tree(proc.pid)
            proc.wait()
        for member in seen.values():
            if is_alive(member):
                kill_tree(member)
    output = log.read_text(errors="replace")
    last = latest_round(run_dir)
    assert code == 143, output[-3000:]
    assert output.strip().splitlines()[-1] == (
        f"pollinate simulate: stopped after round {last}; resume with: pollinate simulate --resume {run_dir}")
    assert "Traceback" not in output and "Aborted" not in output, output[-3000:]
    assert left == [], left
    cfg = RunConfig.from_dict(tomllib.loads((run_dir / "config.toml").read_text()))
    assert find_resume_point(run_dir, cfg).server_round == last
    assert not list((run_dir / "checkpoints").glob("*.tmp"))


@pytest.mark.slow
def test_a_run_whose_updates_are_all_rejected_stops_with_one_line_and_stays_resumable(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "pollinate.cli", "simulate", "--model", "tiny-llama", "--clients", "2", "--rounds", "5",
         "--set", "federation.update_norm_bound=1e-9", "--set", "federation.max_skipped_rounds=2", "--out", str(out),
         "--quiet"], cwd=ROOT, capture_output=True, text=True, timeout=600, env=os.environ.copy())
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("pollinate simulate: stopped: rounds 1-2 had no accepted update"), proc.stderr[-3000:]
    assert "exceeds federation.update_norm_bound" in last and last.endswith(f"--resume {out}")
    assert "Traceback" not in proc.stderr and latest_round(out) == 1  # round 1's (unchanged) global is kept
