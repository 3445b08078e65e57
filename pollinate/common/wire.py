"""How Pollinate counts bytes on the wire: the serialized protobuf size of a Flower message's content.

Every method is measured the same way, both directions: ``RecordDict`` -> Flower's own protobuf
(``recorddict_to_proto``) -> ``ByteSize()``. That includes array payloads (numpy ``.npy`` bytes inside Flower's
``Array``), record keys, the per-round ``ConfigRecord`` and the ``MetricRecord`` a client returns. Flower's
HTTP framing and TLS are not counted (they are the same for every method).
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict
from flwr.common.serde import recorddict_to_proto


def wire_bytes(content: RecordDict) -> int:
    """Serialized size of a message's content, as Flower puts it on the wire."""
    return recorddict_to_proto(content).ByteSize()


def arrays_to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    """numpy arrays -> ArrayRecord, keys sorted so the wire order never depends on dict history."""
    return ArrayRecord({key: Array(np.ascontiguousarray(arrays[key])) for key in sorted(arrays)})


def record_to_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {key: record[key].numpy() for key in record}


def bytes_to_record(payload: bytes) -> ArrayRecord:
    """An opaque payload (e.g. an encoded UpdateBundle) carried as one uint8 Array."""
    return ArrayRecord({"payload": Array(np.frombuffer(payload, dtype=np.uint8).copy())})


def record_to_bytes(record: ArrayRecord) -> bytes:
    return record["payload"].numpy().tobytes()
