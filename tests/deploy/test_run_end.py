"""The end of a deployed run: the coordinator's notice, the ClientApp's marker, and `join` exiting on it (only on it).

The `join` tests stand a scripted object in for `flower-supernode` (no processes); the loopback test with real
Flower processes is in test_deploy.py (`test_join_exits_when_the_coordinator_ends_the_run`).
"""

import threading
import uuid
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common.config import parse_config_args
from flwr.supercore.task_identity import TaskIdentity

from pollinate import cli
from pollinate.client.run_end import note_run_end
from pollinate.common.run_end import (
    RUN_END_FILE_KEY,
    RUN_END_MESSAGE_TYPE,
    RunEnd,
    read_run_end,
    write_run_end,
)
from pollinate.deploy import join as join_module
from pollinate.deploy.join import CoordinatorUnreachableError, JoinSpec, Node, supernode_argv
from pollinate.server.run_end import announce_run_end


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """Messages take their run and source from Flower's task identity, which a Flower process sets."""
    for name, value in (("_run_id", 11), ("_node_id", 1), ("_task_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)


def test_marker_round_trips_and_anything_else_reads_as_no_end(tmp_path):
    path = tmp_path / "node" / "run-finished.json"
    assert read_run_end(path) is None
    write_run_end(path, RunEnd(run_id=11, rounds=3))
    assert read_run_end(path) == RunEnd(run_id=11, rounds=3)
    path.write_text("{not json")
    assert read_run_end(path) is None
    path.write_text('{"run_id": 1}')
    assert read_run_end(path) is None


class _Grid:
    def __init__(self, nodes, answering):
        self.nodes, self.answering, self.sent = nodes, answering, []

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, *, timeout=None):
        self.sent, self.timeout = list(messages), timeout
        for message in self.sent:  # what the grid does when it pushes a message
            message.metadata.__dict__["_message_id"] = str(uuid.uuid4())
        return [Message(RecordDict(), reply_to=m) for m in self.sent if m.metadata.dst_node_id in self.answering]


def test_coordinator_tells_every_connected_node_and_counts_acknowledgements():
    grid = _Grid([5, 6, 7], answering={5, 7})
    assert announce_run_end(grid, rounds=3, timeout_s=4.0) == 2
    assert sorted(m.metadata.dst_node_id for m in grid.sent) == [5, 6, 7] and grid.timeout == 4.0
    assert {m.metadata.message_type for m in grid.sent} == {RUN_END_MESSAGE_TYPE}
    assert all(m.content["run-end"]["rounds"] == 3 for m in grid.sent)
    assert announce_run_end(_Grid([], answering=set()), rounds=3) == 0


class _FailingGrid(_Grid):
    def send_and_receive(self, messages, *, timeout=None):
        raise RuntimeError("SuperLink gone")


def test_a_failed_notice_does_not_fail_the_finished_run():
    assert announce_run_end(_FailingGrid([5], answering={5}), rounds=3) == 0


def _notice(rounds=3) -> Message:
    msg = Message(RecordDict({"run-end": ConfigRecord({"rounds": rounds})}), dst_node_id=5,
                  message_type=RUN_END_MESSAGE_TYPE)
    msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
    return msg


def test_client_writes_the_marker_only_where_its_node_config_says(tmp_path):
    marker = tmp_path / "run-finished.json"
    context = Context(run_id=11, node_id=5, node_config={RUN_END_FILE_KEY: str(marker)}, state=RecordDict(),
                      run_config={})
    reply = note_run_end(_notice(), context)
    assert reply.metadata.reply_to_message_id and read_run_end(marker) == RunEnd(run_id=11, rounds=3)
    simulated = Context(run_id=11, node_id=6, node_config={}, state=RecordDict(), run_config={})
    assert note_run_end(_notice(), simulated).metadata.reply_to_message_id  # acknowledges, writes nothing
    assert list(tmp_path.iterdir()) == [marker]


def test_the_supernode_hands_the_marker_path_to_the_clientapp(tmp_path):
    spec = JoinSpec(coordinator="127.0.0.1:9", work_dir=tmp_path / "node", insecure=True, partition_id=2)
    argv = supernode_argv(spec, runtime_port=9100, max_wait_s=5)
    config = parse_config_args([argv[argv.index("--node-config") + 1]])
    assert config == {RUN_END_FILE_KEY: str(spec.run_end_path), "partition-id": 2}
    assert spec.run_end_path.parent == spec.work_dir


class _ScriptedSuperNode:
    """Stands in for `flower-supernode`. Each start takes the next script step: "connect" (accepted, then runs
    until stopped), "connect-exit" (accepted, then exits 1 as against a restarted coordinator), "end" (accepted,
    then the ClientApp notes the end of the run; "end-exit": and the SuperNode exits 0 within the grace), "refused"
    (never accepted: exits 1)."""

    steps: list[str] = []
    started: list["_ScriptedSuperNode"] = []

    def __init__(self, name, argv, env, log_path, echo=None, on_line=None, **kwargs):
        self.step = self.steps.pop(0)
        self.stopped = False
        self.started.append(self)
        if self.step != "refused":
            on_line("INFO :      SuperNode ID: 123")
        if self.step.startswith("end"):
            config = parse_config_args([argv[argv.index("--node-config") + 1]])
            write_run_end(Path(config[RUN_END_FILE_KEY]), RunEnd(run_id=11, rounds=3))

    def wait(self, timeout=None):
        if self.step in ("connect-exit", "refused"):
            return 1
        if self.step == "end-exit":
            return 0
        raise join_module.subprocess.TimeoutExpired("flower-supernode", timeout)

    def tail(self, lines=15):
        return "connection refused"

    def stop(self, grace_s=5.0):
        self.stopped = True
        return -15


@pytest.fixture
def supernode(monkeypatch):
    monkeypatch.setattr(join_module, "ChildProcess", _ScriptedSuperNode)
    monkeypatch.setattr(_ScriptedSuperNode, "steps", [])
    monkeypatch.setattr(_ScriptedSuperNode, "started", [])
    monkeypatch.setattr(Node, "_warn_insecure", lambda self: None)
    return _ScriptedSuperNode


def _node(tmp_path, **kw) -> Node:
    spec = JoinSpec(coordinator="127.0.0.1:9", work_dir=tmp_path / "node", insecure=True, max_backoff_s=0.05,
                    finish_grace_s=0.2, **kw)
    return Node(spec, echo=None)


def test_join_returns_once_the_coordinator_ends_the_run_and_stops_its_supernode(tmp_path, supernode):
    supernode.steps = ["end"]
    assert _node(tmp_path).run() == RunEnd(run_id=11, rounds=3)
    assert [s.stopped for s in supernode.started] == [True]


class _NoBackoff(threading.Event):
    def wait(self, timeout=None):
        return self.is_set()


def test_a_restarted_coordinator_is_rejoined_and_a_stale_marker_ignored(tmp_path, supernode):
    node = _node(tmp_path)
    node._stop = _NoBackoff()
    write_run_end(node.spec.run_end_path, RunEnd(run_id=1, rounds=9))  # left by an earlier run in this work dir
    supernode.steps = ["connect-exit", "refused", "connect-exit", "end"]
    assert node.run() == RunEnd(run_id=11, rounds=3)
    assert len(supernode.started) == 4 and node.connections == 3


def test_without_the_notice_a_vanished_coordinator_still_ends_join_with_the_budget_error(tmp_path, supernode):
    supernode.steps = ["connect-exit"] + ["refused"] * 50
    with pytest.raises(CoordinatorUnreachableError, match="did not accept this node.* was not connected when the "
                                                          "coordinator said so"):
        _node(tmp_path, retry_budget_s=0.3).run()


def test_cli_join_says_the_run_finished_and_exits_0(tmp_path, supernode, capsys):
    supernode.steps = ["end-exit"]
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\n')
    code = cli.main(["join", "--coordinator", "127.0.0.1:9", "--insecure", "--partition-id", "0", "--data", str(data),
                     "--work-dir", str(tmp_path / "node")])
    err = capsys.readouterr().err
    assert code == 0 and "pollinate join: the run on 127.0.0.1:9 has finished (3 rounds); exiting" in err, err
