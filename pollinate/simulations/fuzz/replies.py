"""Record-level edits of a training reply (values, shapes, dtypes, ``.npy`` bytes, names, records, metrics, profile,
error or duplicate replies) and the Messages a client would send after them."""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from pollinate.simulations.fuzz.mutations import FLOATS, INTS, TEXT, Mutator


# Record-level edits of a reply: each takes the mutator and {record name: (kind, values)} and edits it in place.
def _an_array(m: Mutator, records: dict) -> tuple[dict, str, np.ndarray]:
    kind, arrays = records.get("arrays", ("", {}))
    if kind != "arrays" or not arrays:
        raise ValueError("no arrays left to edit")
    name = m.pick(sorted(arrays))
    return arrays, name, arrays[name].numpy()


def _edit_values(m: Mutator, records: dict) -> None:
    arrays, name, x = _an_array(m, records)
    x = np.array(x, copy=True)
    with np.errstate(all="ignore"):
        x.flat[m.rng.integers(x.size, size=int(m.rng.integers(1, 4)))] = m.pick(FLOATS[:3] + FLOATS[-3:])
    arrays[name] = Array(x)


def _edit_scale(m: Mutator, records: dict) -> None:
    arrays, name, x = _an_array(m, records)
    with np.errstate(all="ignore"):
        arrays[name] = Array((x * m.pick((-20.0, 1e3, 1e6, 1e30, 0.0))).astype(x.dtype))


def _edit_shape(m: Mutator, records: dict) -> None:
    arrays, name, x = _an_array(m, records)
    reshape = m.pick((np.transpose, np.ravel, lambda a: a[None], lambda a: a[:-1], lambda a: a[:0],
                      lambda a: np.asarray(a.flat[0]), lambda a: np.concatenate([a, a])))
    arrays[name] = Array(np.ascontiguousarray(reshape(x)))


def _edit_dtype(m: Mutator, records: dict) -> None:
    arrays, name, x = _an_array(m, records)
    with np.errstate(all="ignore"):
        arrays[name] = Array(x.astype(m.pick(("float64", "float16", "int32", "int8", "uint8", "bool", "complex64",
                                                ">f4", "<U3"))))


def _edit_npy(m: Mutator, records: dict) -> None:
    """The raw .npy bytes mutated, or a header declaring another dtype, order or (huge) shape over the data."""
    arrays, name, x = _an_array(m, records)
    a = arrays[name]
    if m.chance(0.5):
        arrays[name] = Array(dtype=a.dtype, shape=a.shape, stype=a.stype, data=m.blob(a.data))
        return
    header, buf = {"descr": m.pick(("<f4", "<f8", "|b1", "|O", "<U3", ">f4", "<c8")),
                   "fortran_order": m.chance(0.3), "shape": m.pick(((2**31,), (2**40,), (-1,), (2**31, 2**31),
                                                                    x.shape[::-1], (), (0,) + x.shape))}, io.BytesIO()
    m.log.append(f"npy-header:{header}")
    np.lib.format.write_array_header_1_0(buf, header)
    arrays[name] = Array(dtype=a.dtype, shape=a.shape, stype=a.stype, data=buf.getvalue() + x.tobytes()[:64])


def _edit_stype(m: Mutator, records: dict) -> None:
    arrays, name, _ = _an_array(m, records)
    a = arrays[name]
    arrays[name] = Array(dtype=m.pick(TEXT), shape=a.shape, stype=m.pick(TEXT + ("torch.Tensor",)), data=a.data)


def _edit_names(m: Mutator, records: dict) -> None:
    arrays, name, x = _an_array(m, records)
    op = m.pick(("drop", "rename", "add"))
    if op != "add":
        del arrays[name]
    if op != "drop":
        arrays[m.pick(TEXT[1:] + tuple(arrays))] = Array(x if op == "rename" else np.ones((2, 3), np.float32))


def _edit_records(m: Mutator, records: dict) -> None:
    op = m.pick(("drop-arrays", "drop-metrics", "arrays-as-config", "metrics-as-config", "extra"))
    if op.startswith("drop-"):
        records.pop(op[5:], None)
    elif op == "extra":
        records[m.pick(TEXT[1:])] = ("arrays", {"w": Array(np.zeros(3, np.float32))})
    else:
        records[op.split("-")[0]] = ("config", {"[/x]": m.pick(TEXT), "num-examples": "100"})


def _edit_metric(m: Mutator, records: dict) -> None:
    _, metrics = records.setdefault("metrics", ("metrics", {}))
    key = m.pick(("num-examples", "client_id", "train_loss", "compute_seconds", "train_seconds", "peak_rss_bytes",
                  "[/x]"))
    if m.chance(0.2):
        metrics.pop(key, None)
    else:
        metrics[key] = m.pick(INTS + FLOATS + ([1, 2], [math.nan], []))
    m.log.append(f"metric:{key}={metrics.get(key)!r}"[:80])


def _edit_profile(m: Mutator, records: dict) -> None:
    values = INTS[:4] + FLOATS[:6] + ("[/x]", True, b"x")
    profile = {k: m.pick(values) for k in ("memory_gib", "compute_tflops", "uplink_mbps", "downlink_mbps", "name")
               if m.chance(0.8)}
    profile.update({m.pick(TEXT[1:]): 1.0} if m.chance(0.3) else {})
    records["profile"] = ("config", profile)
    records.setdefault("metrics", ("metrics", {}))[1]["compute_seconds"] = 1.0


def _edit_message(m: Mutator, records: dict) -> None:
    records["<message>"] = ("message", {"error": m.pick(TEXT)} if m.chance(0.5) else {"duplicate": True})


_REPLY_EDITS = (_edit_values, _edit_scale, _edit_shape, _edit_dtype, _edit_npy, _edit_npy, _edit_stype, _edit_names,
                _edit_records, _edit_metric, _edit_metric, _edit_profile, _edit_message)
_RECORD_KINDS = {"arrays": ArrayRecord, "metrics": MetricRecord, "config": ConfigRecord}


def _build(records: dict) -> RecordDict:
    return RecordDict({name: _RECORD_KINDS[kind](values) for name, (kind, values) in records.items()
                       if kind != "message"})


def mutated_reply(m: Mutator, arrays: dict[str, np.ndarray], metrics: dict[str, Any], message: Message,
                  edits: int | None = None) -> list[Message]:
    """The reply(s) a client would send for ``arrays`` and ``metrics`` after ``edits`` (default 0-3) record
    edits; an edit Flower would refuse to build (so no client could send it) is skipped."""
    records: dict[str, tuple[str, dict]] = {"arrays": ("arrays", {k: Array(v) for k, v in arrays.items()}),
                                            "metrics": ("metrics", dict(metrics))}
    if edits is None:
        edits = 0 if m.chance(0.1) else int(m.rng.integers(1, 4))
    for _ in range(edits):
        edit = m.pick(_REPLY_EDITS)
        trial = {name: (kind, dict(values)) for name, (kind, values) in records.items()}
        m.log.append(f"reply:{edit.__name__[6:]}")
        try:
            edit(m, trial)
            _build(trial)
        except Exception:  # noqa: BLE001  (the attacker's side failed to build it: e.g. an edit of broken .npy bytes)
            m.log.append("skipped")
            continue
        records = trial
    action = records.get("<message>", ("", {}))[1]
    if "error" in action:
        return [Message(error=Error(code=1, reason=action["error"]), reply_to=message)]
    return [Message(_build(records), reply_to=message) for _ in range(2 if action else 1)]
