"""A reply whose Flower Array is garbled (bogus ``stype``, broken ``.npy`` bytes, a header declaring a huge shape)
is refused while its arrays are read: ``UpdateRejected`` with reason ``garbled`` and a short message, before numpy
is asked to load (or reserve memory for) anything the declared sizes do not account for."""

import io
import json
import uuid

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from rich.console import Console

from pollinate.common.checks import UpdateRejected
from pollinate.common.config_io import build_config
from pollinate.common.report import RunRecorder
from pollinate.common.wire import (
    arrays_to_record,
    bytes_to_record,
    read_array,
    record_to_arrays,
    record_to_bytes,
)
from pollinate.server.replies import reply_arrays
from pollinate.server.state_fedavg import StateFedAvg

SHAPE = (4, 8)
NODES = [101, 102, 103]


def npy(header: dict, data: bytes) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue() + data


def npy_array(header: dict, data: bytes, *, dtype: str = "float32", shape: tuple = SHAPE) -> Array:
    """An Array whose metadata says ``dtype``/``shape`` and whose .npy bytes hold ``header`` then ``data``."""
    return Array(dtype=dtype, shape=shape, stype="numpy.ndarray", data=npy(header, data))


HONEST = np.arange(32, dtype=np.float32).reshape(SHAPE)
F4 = {"descr": "<f4", "fortran_order": False, "shape": SHAPE}
GARBLED = {
    "bogus stype": Array(dtype="float32", shape=SHAPE, stype="[bold]torch.Tensor[/]", data=Array(HONEST).data),
    "bogus dtype metadata": Array(dtype="not-a-dtype", shape=SHAPE, stype="numpy.ndarray", data=Array(HONEST).data),
    "no .npy magic": Array(dtype="float32", shape=SHAPE, stype="numpy.ndarray", data=b"\x00" * 200),
    "truncated data": npy_array(F4, HONEST.tobytes()[:-4]),
    "trailing bytes": npy_array(F4, HONEST.tobytes() + b"junk"),
    "header dtype differs": npy_array({**F4, "descr": "<f8"}, np.zeros(SHAPE).tobytes()),
    "huge header shape": npy_array({**F4, "shape": (2**40,)}, HONEST.tobytes()),
    "huge 2-d header shape": npy_array({**F4, "shape": (2**31, 2**31)}, HONEST.tobytes()),
    "huge shape in header and metadata": npy_array({**F4, "shape": (2**40,)}, HONEST.tobytes(), shape=(2**40,)),
    "negative header shape": npy_array({**F4, "shape": (-1,)}, HONEST.tobytes()),
    "pickled objects": npy_array({**F4, "descr": "|O"}, b"\x80" * 256, dtype="object"),
}


@pytest.fixture
def loads(monkeypatch) -> list[int]:
    """How many times numpy was asked to load an Array's bytes."""
    calls = []
    real = Array.numpy

    def counted(self):
        calls.append(1)
        return real(self)

    monkeypatch.setattr(Array, "numpy", counted)
    return calls


def test_an_honest_array_reads_back_exactly_also_after_flowers_own_transport():
    sent = Array(HONEST)
    received = Array.inflate(sent.deflate(), sent.children)  # the metadata round-trips through Flower's JSON
    for array in (sent, received):
        value = read_array("w", array, SHAPE)
        assert value.dtype == np.float32 and np.array_equal(value, HONEST)
    assert record_to_bytes(bytes_to_record(b"\x01\x02payload")) == b"\x01\x02payload"


@pytest.mark.parametrize("case", sorted(GARBLED))
def test_a_garbled_array_is_rejected_as_garbled_with_a_short_message(case):
    with pytest.raises(UpdateRejected) as caught:
        record_to_arrays(ArrayRecord({"w": GARBLED[case]}))
    assert caught.value.reason == "garbled" and caught.value.tensor == "w"
    assert str(caught.value).startswith("array 'w' ") and len(str(caught.value)) <= 400


@pytest.mark.parametrize("case", ["huge header shape", "huge 2-d header shape", "huge shape in header and metadata",
                                  "truncated data", "trailing bytes"])
def test_a_header_not_accounting_for_the_bytes_sent_is_refused_before_numpy_loads_it(case, loads):
    for read in (lambda: record_to_arrays(ArrayRecord({"w": GARBLED[case]})),
                 lambda: record_to_bytes(ArrayRecord({"payload": GARBLED[case]}))):
        with pytest.raises(UpdateRejected, match="header declares|metadata") as caught:
            read()
        assert caught.value.reason == "garbled"
    assert loads == []


def test_a_declared_shape_other_than_the_expected_one_is_refused_before_anything_loads(loads):
    huge = npy_array({**F4, "shape": (2**40,)}, HONEST.tobytes(), shape=(2**40,))
    with pytest.raises(UpdateRejected, match=r"has shape \(1099511627776,\), expected \(4, 8\)") as caught:
        record_to_arrays(ArrayRecord({"w": huge}), {"w": SHAPE})
    assert caught.value.reason == "shape"
    with pytest.raises(UpdateRejected, match="unknown tensor name 'x'"):
        record_to_arrays(ArrayRecord({"w": Array(HONEST), "x": huge}), {"w": SHAPE})
    assert loads == []


def test_peer_text_quoted_in_a_garbled_reason_is_cut_short():
    array = Array(dtype="float32", shape=SHAPE, stype="s" * 5000, data=b"")
    with pytest.raises(UpdateRejected, match="has stype 'sss") as caught:
        record_to_arrays(ArrayRecord({"w" * 5000: array}))
    assert len(str(caught.value)) <= 450


def test_a_reply_without_an_array_record_or_payload_is_garbled():
    with pytest.raises(UpdateRejected, match="no 'arrays' ArrayRecord") as caught:
        reply_arrays(RecordDict({"arrays": ConfigRecord({"w": 1})}), {"w": SHAPE})
    assert caught.value.reason == "garbled"
    for record in (ArrayRecord({"other": Array(HONEST)}), ConfigRecord({"payload": b"x"})):
        with pytest.raises(UpdateRejected, match="'payload' Array"):
            record_to_bytes(record)
    with pytest.raises(UpdateRejected, match="expected a uint8 vector") as caught:
        record_to_bytes(ArrayRecord({"payload": Array(HONEST)}))
    assert caught.value.reason == "garbled"


# --- the whole dense reply path: what metrics.jsonl records --------------------------------------------------
class ToyState(StateFedAvg):
    """A state-averaging method on one (4, 8) tensor: the base's checks and aggregation, no model."""

    shapes = {"w": SHAPE}

    def initial_arrays(self) -> ArrayRecord:
        return arrays_to_record({"w": np.zeros(SHAPE, np.float32)})

    def evaluate_global(self, arrays: ArrayRecord) -> dict:
        return {"eval_loss": 0.0, "eval_metrics": {}}

    def save_final(self, arrays: ArrayRecord) -> dict:
        return {}


class FakeGrid:
    def get_node_ids(self) -> list[int]:
        return list(NODES)


@pytest.fixture
def task_identity(monkeypatch):
    for name, value in (("_run_id", 1), ("_node_id", 1), ("_task_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)


def rejected_reasons(tmp_path, attacker_array: Array) -> list[str]:
    """One round of three clients, the last replying ``attacker_array``; metrics.jsonl's rejection reasons."""
    cfg = build_config(None, ["federation.clients=3", "federation.min_clients=2"])
    recorder = RunRecorder(tmp_path, {"rounds_planned": 1}, console=Console(file=io.StringIO()), quiet=True)
    strategy = ToyState(cfg, recorder, tmp_path)
    messages = list(strategy.configure_train(1, strategy.initial_arrays(), ConfigRecord(), FakeGrid()))
    replies = []
    for message in messages:
        message.metadata.__dict__["_message_id"] = str(uuid.uuid4())
        client = NODES.index(message.metadata.dst_node_id)
        array = attacker_array if client == 2 else Array(np.full(SHAPE, 0.1, np.float32))
        metrics = MetricRecord({"client_id": client, "num-examples": 10})
        replies.append(Message(RecordDict({"arrays": ArrayRecord({"w": array}), "metrics": metrics}),
                               reply_to=message))
    new, _ = strategy.aggregate_train(1, replies)
    assert new is not None  # the honest clients' round went on
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    return [event["reason"] for event in events if event["type"] == "rejected"]


@pytest.mark.parametrize("case", ["bogus stype", "truncated data", "huge header shape", "pickled objects"])
def test_the_strategy_records_a_garbled_reply_with_a_uniform_reason(tmp_path, task_identity, case):
    reasons = rejected_reasons(tmp_path, GARBLED[case])
    assert len(reasons) == 1 and reasons[0].startswith("array 'w' "), reasons  # not the catch-all's "TypeError: ..."
