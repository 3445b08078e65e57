"""How Pollinate counts bytes on the wire, and how arrays come off it.

Every method is measured the same way, both directions: ``RecordDict`` -> Flower's own protobuf
(``recorddict_to_proto``) -> ``ByteSize()``. That includes array payloads (numpy ``.npy`` bytes inside Flower's
``Array``), record keys, the per-round ``ConfigRecord`` and the ``MetricRecord`` a client returns. Flower's
HTTP framing and TLS are not counted (they are the same for every method).

An ``Array`` a peer sent is read only once its ``.npy`` header accounts for exactly the bytes sent and agrees with
the Array's ``dtype``/``shape`` metadata (and with the expected shape, where the reader knows it): numpy never
reserves memory for a size the peer did not send. Anything unreadable is ``UpdateRejected`` (reason ``garbled``).
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict
from flwr.common.constant import SType
from flwr.common.serde import recorddict_to_proto

from pollinate.common.checks import UpdateRejected

# How much of an error raised while reading peer bytes goes into the rejection reason.
MAX_ERROR_CHARS = 200
_NPY_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def wire_bytes(content: RecordDict) -> int:
    """Serialized size of a message's content, as Flower puts it on the wire."""
    return recorddict_to_proto(content).ByteSize()


def arrays_to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    """numpy arrays -> ArrayRecord, keys sorted so the wire order never depends on dict history."""
    return ArrayRecord({key: Array(np.ascontiguousarray(arrays[key])) for key in sorted(arrays)})


def record_to_arrays(record: ArrayRecord, expected: Mapping[str, tuple[int, ...]] | None = None
                     ) -> dict[str, np.ndarray]:
    """Every Array of ``record`` read with ``read_array``. With ``expected`` (name -> shape), the names must be
    exactly its keys and each declared shape its value, all checked before any array is loaded."""
    if not isinstance(record, ArrayRecord):
        raise UpdateRejected(f"'arrays' is a {type(record).__name__}, expected an ArrayRecord", reason="garbled")
    if expected is None:
        return {key: read_array(key, record[key]) for key in record}
    unknown = sorted(set(record) - set(expected))
    if unknown:
        raise UpdateRejected(f"unknown tensor name '{unknown[0]}'", reason="unknown-tensor", tensor=unknown[0])
    missing = sorted(set(expected) - set(record))
    if missing:
        raise UpdateRejected(f"missing tensor '{missing[0]}'", reason="unknown-tensor", tensor=missing[0])
    return {key: read_array(key, record[key], expected[key]) for key in record}


def read_array(name: str, array: Array, expected_shape: tuple[int, ...] | None = None) -> np.ndarray:
    """One Array a peer sent, as numpy, or ``UpdateRejected``: reason ``shape`` when its declared shape is not
    ``expected_shape``; ``garbled`` unless it is an ``.npy`` whose header matches its metadata and its byte count."""
    if array.stype != SType.NUMPY:
        raise _garbled(name, f"has stype {array.stype!r}, expected {SType.NUMPY!r}")
    try:
        declared = tuple(int(size) for size in array.shape), np.dtype(array.dtype)
    except Exception as exc:  # noqa: BLE001  (peer text: numpy raises several types on a bogus dtype)
        raise _garbled(name, f"has unreadable metadata: {_error_text(exc)}") from None
    if expected_shape is not None and declared[0] != tuple(expected_shape):
        raise UpdateRejected(f"tensor '{name}' has shape {declared[0]}, expected {tuple(expected_shape)}",
                             reason="shape", tensor=name)
    shape, dtype, data_bytes = _npy_layout(name, array.data)
    if (shape, dtype) != declared:
        raise _garbled(name, f"declares {dtype}{shape} in its .npy header but {declared[1]}{declared[0]} in its "
                             "metadata")
    if data_bytes != math.prod(shape) * dtype.itemsize:
        raise _garbled(name, f"holds {data_bytes} bytes of data, its header declares {dtype}{shape}")
    try:
        return array.numpy()
    except Exception as exc:  # noqa: BLE001  (numpy raises several types on bytes it cannot load)
        raise _garbled(name, f"is not a loadable .npy: {_error_text(exc)}") from None


def _npy_layout(name: str, data: bytes) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, bytes after the header) an ``.npy`` buffer declares, read from its header alone."""
    buffer = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(buffer)
        read_header = _NPY_HEADER_READERS.get(version)
        if read_header is not None:
            shape, _, dtype = read_header(buffer)
    except Exception as exc:  # noqa: BLE001  (numpy raises several types on a bad header)
        raise _garbled(name, f"has no readable .npy header: {_error_text(exc)}") from None
    if read_header is None:
        raise _garbled(name, f"is .npy format version {version}, expected 1.0 or 2.0")
    return tuple(shape), dtype, len(data) - buffer.tell()


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:MAX_ERROR_CHARS]}"


def _garbled(name: str, what: str) -> UpdateRejected:
    # ``what`` may quote the peer (its stype, a dtype from its header): both parts are cut.
    return UpdateRejected(f"array '{name[:120]}' {what[:MAX_ERROR_CHARS + 100]}", reason="garbled", tensor=name)


def bytes_to_record(payload: bytes) -> ArrayRecord:
    """An opaque payload (e.g. an encoded UpdateBundle) carried as one uint8 Array."""
    return ArrayRecord({"payload": Array(np.frombuffer(payload, dtype=np.uint8).copy())})


def record_to_bytes(record: ArrayRecord) -> bytes:
    """The payload of ``bytes_to_record``; anything but one readable uint8 vector is ``UpdateRejected``
    (``garbled``)."""
    if not isinstance(record, ArrayRecord) or "payload" not in record:
        raise UpdateRejected("expected an ArrayRecord holding a 'payload' Array", reason="garbled")
    payload = read_array("payload", record["payload"])
    if payload.dtype != np.uint8 or payload.ndim != 1:
        raise _garbled("payload", f"is {payload.dtype}{payload.shape}, expected a uint8 vector")
    return payload.tobytes()
