"""The deployed node's long-lived worker, link side: a forwarded message gets the reply in-process handling gives,
the model is loaded once, the node state round-trips, and whatever a bad peer sends is refused while the worker
serves on. The worker runs in a thread of the test process on a socket in a fresh private directory."""

import os
import shutil
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import uuid
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.proto.message_pb2 import Message as ProtoMessage
from flwr.supercore.task_identity import TaskIdentity

import pollinate.client.app as client_app
from pollinate.client import runtime
from pollinate.client.worker_link import (
    WORKER_SOCKET_KEY,
    PeerRefused,
    WorkerError,
    check_peer,
    forward,
    forward_to_worker,
    peer_uid,
    recv_frame,
    send_frame,
)
from pollinate.common.config_io import build_config
from pollinate.common.wire import record_to_arrays
from pollinate.deploy.worker import worker_socket_path
from pollinate.deploy.worker_server import WorkerServer, private_dir

ROOT = Path(__file__).resolve().parents[2]
RUN = ["model.name=tiny-llama", "method=fedavg-lora", "federation.clients=1", "data.builtin_examples=16",
       "data.eval_examples=2", "train.local_steps=2"]
NODE = {"partition-id": 0, "num-partitions": 1}
TIMINGS = {"train_seconds", "compute_seconds", "peak_rss_bytes"}  # what two runs of the same work may differ in


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """Flower processes set their task identity; the worker sets it per request (restored after each test)."""
    for name, value in (("_run_id", 1), ("_node_id", 5), ("_task_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)


@pytest.fixture
def socket_path():
    """A socket in a fresh directory (tmp_path can be longer than a Unix socket path allows)."""
    directory = Path(tempfile.mkdtemp(prefix="pw-"))
    yield directory / "link" / "w.sock"
    shutil.rmtree(directory, ignore_errors=True)


class _Serving:
    """A WorkerServer answering in a background thread until the test ends."""

    def __init__(self, path: Path, **kwargs):
        self.server = WorkerServer(path, **kwargs)
        self.server.bind()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.server.serve_forever, args=(self.stop,), daemon=True)
        self.thread.start()

    def close(self):
        self.stop.set()
        self.thread.join(10)
        self.server.close()


@pytest.fixture
def serve(socket_path):
    started = []

    def start(**kwargs) -> WorkerServer:
        started.append(_Serving(socket_path, **kwargs))
        return started[-1].server

    yield start
    for serving in started:
        serving.close()


def _context(socket_path: Path | None, state: RecordDict | None = None) -> Context:
    node = {**NODE, WORKER_SOCKET_KEY: str(socket_path)} if socket_path else dict(NODE)
    return Context(run_id=1, node_id=5, node_config=node, state=state or RecordDict(), run_config={})


def _train_message(server_round: int = 1, run=RUN) -> Message:
    """The strategy's real round message for node 5."""
    from pollinate.common.report import RunRecorder
    from pollinate.methods.fedavg_lora.server import FedAvgLora

    cfg = build_config(None, run)
    scratch = Path(tempfile.mkdtemp(prefix="pw-run-"))
    try:
        strategy = FedAvgLora(cfg, RunRecorder(scratch, {"rounds_planned": 2}, quiet=True), scratch)

        class Grid:
            def get_node_ids(self):
                return [5]

        [msg] = list(strategy.configure_train(server_round, strategy.initial_arrays(), ConfigRecord(), Grid()))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
    return msg


def _config_message(method: str = "fedavg-lora") -> Message:
    cfg = build_config(None, [f"method={method}"])
    msg = Message(RecordDict({"config": ConfigRecord({"server-round": 1, "run-config": cfg.to_json()})}),
                  dst_node_id=5, message_type=MessageType.TRAIN)
    msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
    return msg


def _same_reply(a: Message, b: Message) -> None:
    arrays_a, arrays_b = record_to_arrays(a.content["arrays"]), record_to_arrays(b.content["arrays"])
    assert arrays_a.keys() == arrays_b.keys() and arrays_a
    assert all(np.array_equal(arrays_a[k], arrays_b[k]) for k in arrays_a)
    metrics_a, metrics_b = dict(a.content["metrics"]), dict(b.content["metrics"])
    assert {k: v for k, v in metrics_a.items() if k not in TIMINGS} == \
           {k: v for k, v in metrics_b.items() if k not in TIMINGS}


def test_a_forwarded_train_message_gets_the_in_process_reply_and_loads_the_model_once(monkeypatch, serve,
                                                                                      socket_path):
    loads = []
    real_load = runtime.load_model
    monkeypatch.setattr(runtime, "load_model", lambda *a, **kw: loads.append(a[0]) or real_load(*a, **kw))
    msg = _train_message()
    monkeypatch.setattr(runtime, "_CACHE", {})
    in_process = client_app.app(msg, _context(None))
    monkeypatch.setattr(runtime, "_CACHE", {})  # the worker starts as empty as a new process
    serve()
    first = client_app.app(msg, _context(socket_path))
    second = client_app.app(msg, _context(socket_path))
    _same_reply(in_process, first)
    _same_reply(in_process, second)  # the cached base gives the same update as a freshly loaded one
    assert first.metadata.reply_to_message_id == msg.metadata.message_id
    assert len(loads) == 2  # once in-process, once in the worker: its second message found the model cached


class _CountingHalf:
    """A client half that counts its messages in the node state and notes the node config it was given."""

    def __init__(self):
        self.node_configs = []

    def train(self, msg, cfg, context):
        self.node_configs.append(dict(context.node_config))
        seen = int(context.state["count"]["n"]) if "count" in context.state else 0
        context.state["count"] = ConfigRecord({"n": seen + 1})
        if seen + 1 == 3:
            raise ValueError("third message refused on purpose")
        return RecordDict({"metrics": ConfigRecord({"n": seen + 1})})


def test_node_state_round_trips_and_a_failing_message_fails_alone(monkeypatch, serve, socket_path):
    half = _CountingHalf()
    monkeypatch.setattr(client_app, "client_half", lambda method: half)
    server = serve()
    context = _context(socket_path)
    for expected in (1, 2):
        reply = client_app.app(_config_message(), context)
        assert reply.content["metrics"]["n"] == expected and context.state["count"]["n"] == expected
    with pytest.raises(WorkerError, match="ValueError: third message refused on purpose"):
        client_app.app(_config_message(), context)
    assert context.state["count"]["n"] == 2  # a failed message leaves the node state as it was
    context.state["count"] = ConfigRecord({"n": 10})
    assert client_app.app(_config_message(), context).content["metrics"]["n"] == 11  # and the worker serves on
    assert server.served == 4
    assert all(WORKER_SOCKET_KEY not in config and config["partition-id"] == 0 for config in half.node_configs)


def test_forwarding_comes_before_every_other_mod():
    # The worker runs this same app; a mod ahead of forward_to_worker would run in both processes (twice).
    assert client_app.app._mods[0] is forward_to_worker


def test_queries_stay_in_the_clientapp_process(tmp_path, serve, socket_path):
    from pollinate.common.run_end import RUN_END_FILE_KEY, RUN_END_MESSAGE_TYPE, read_run_end

    server = serve()
    marker = tmp_path / "run-finished.json"
    context = _context(socket_path)
    context.node_config[RUN_END_FILE_KEY] = str(marker)
    notice = Message(RecordDict({"run-end": ConfigRecord({"rounds": 2})}), dst_node_id=5,
                     message_type=RUN_END_MESSAGE_TYPE)
    notice.metadata.__dict__["_message_id"] = str(uuid.uuid4())
    client_app.app(notice, context)
    assert read_run_end(marker).rounds == 2 and server.served == 0


def _raw_exchange(path: Path, payload: bytes) -> ProtoMessage | None:
    """Send raw bytes as a peer would, then read the reply frame (None when the worker just closed)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        try:
            return ProtoMessage.FromString(recv_frame(sock))
        except WorkerError:
            return None


def test_garbled_oversized_and_truncated_requests_are_refused_and_the_worker_serves_on(monkeypatch, serve,
                                                                                      socket_path):
    monkeypatch.setattr(client_app, "client_half", lambda method: _CountingHalf())
    server = serve(max_bytes=4096, io_timeout_s=2)
    header = struct.Struct(">4sQ")
    garbled = _raw_exchange(socket_path, b"GET / HTTP/1.1\r\n\r\n")
    assert "bad request: frame starts with" in garbled.error.reason
    oversized = _raw_exchange(socket_path, header.pack(b"PWL1", 4097))
    assert "exceeds max_bytes=4096" in oversized.error.reason
    not_a_message = _raw_exchange(socket_path, header.pack(b"PWL1", 5) + b"\xff\xff\xff\xff\xff")
    assert "not a valid Message protobuf" in not_a_message.error.reason
    truncated = _raw_exchange(socket_path, header.pack(b"PWL1", 100) + b"x" * 10)
    assert "closed after 10 of 100 bytes" in truncated.error.reason
    assert server.refused == 4
    assert client_app.app(_config_message(), _context(socket_path)).content["metrics"]["n"] == 1
    assert server.served == 1
    left, right = socket.socketpair(socket.AF_UNIX)
    with left, right, pytest.raises(WorkerError, match="exceeds max_bytes=4096"):  # a sender refuses it too
        send_frame(left, b"x" * 4097, max_bytes=4096)


def test_a_peer_of_another_user_is_refused(serve, socket_path):
    other_uid = os.getuid() + 1
    server = serve(read_uid=lambda conn: other_uid)  # the seam: the kernel would report this uid
    with pytest.raises(WorkerError, match="worker dropped this train message"):
        forward(str(socket_path), _config_message(), _context(socket_path), connect_timeout_s=1)
    assert server.refused == 1 and server.served == 0
    left, right = socket.socketpair(socket.AF_UNIX)
    with left, right:
        assert peer_uid(left) == os.getuid()  # the real check reads the kernel's credentials
        check_peer(left, os.getuid())
        with pytest.raises(PeerRefused, match=f"peer uid {os.getuid()} is not {other_uid}"):
            check_peer(left, other_uid)


def test_socket_is_private_and_its_path_fits(socket_path, tmp_path):
    server = WorkerServer(socket_path)
    server.bind()
    try:
        assert stat.S_IMODE(os.stat(socket_path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(socket_path.parent).st_mode) == 0o700
    finally:
        server.close()
    assert not socket_path.exists()
    assert worker_socket_path(Path("/srv/node")) == Path("/srv/node/worker/worker.sock")
    long_dir = tmp_path / ("n" * 120)
    fallback = worker_socket_path(long_dir)
    assert fallback == worker_socket_path(long_dir) and len(str(fallback)) < 100  # stable per work dir
    assert fallback.parent.name.startswith(f"pollinate-{os.getuid()}-")
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(WorkerError, match="must be a real directory"):
        private_dir(tmp_path / "link")
    (tmp_path / "file.sock").write_text("not a socket")
    with pytest.raises(WorkerError, match="is not a socket"):
        WorkerServer(tmp_path / "file.sock").bind()


def test_forwarding_imports_no_torch(socket_path):
    script = textwrap.dedent(f"""
        import sys, threading, uuid
        from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
        from flwr.supercore.task_identity import TaskIdentity
        from pollinate.deploy.worker_server import WorkerServer
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 5, 0

        def echo(msg, context):
            return Message(RecordDict({{"metrics": ConfigRecord({{"seen": msg.metadata.message_type}})}}),
                           reply_to=msg)

        server = WorkerServer({str(socket_path)!r}, echo)
        server.bind()
        threading.Thread(target=server.serve_forever, args=(threading.Event(),), daemon=True).start()
        from pollinate.client.app import app
        msg = Message(RecordDict({{"config": ConfigRecord({{"server-round": 1}})}}), dst_node_id=5,
                      message_type=MessageType.TRAIN)
        msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
        context = Context(run_id=1, node_id=5, node_config={{"worker-socket": {str(socket_path)!r}}},
                          state=RecordDict(), run_config={{}})
        print(app(msg, context).content["metrics"]["seen"])
        print(sorted(m for m in ("torch", "transformers", "peft") if m in sys.modules))
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split("\n")[:2] == ["train", "[]"]
