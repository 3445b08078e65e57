"""One training reply on its way from the wire to aggregation: the checks every method's replies pass.

Everything in a reply is peer-supplied. Numbers are read as numbers in a stated range or refused; text is
never read (report fields are numbers); the client's identity comes from the node that sent it
(``NodeIdentity``), its weight is an integer example count in ``[1, federation.max_examples_per_client]``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Message, MetricRecord, RecordDict

from pollinate.common.checks import UpdateRejected
from pollinate.common.wire import record_to_arrays

# Per-client report fields a reply may carry as numbers (anything else in its metrics stays out of the report).
REPORTED_METRICS = ("train_seconds", "peak_rss_bytes", "train_loss")


@dataclass
class Reply:
    """A training reply that passed its checks.

    Parameters
    ----------
    client_id : int
        The client, from the node that sent the reply (never from its content).
    node_id : int
        Flower's id of that node.
    num_examples : int
        Its FedAvg weight, an integer in ``[1, federation.max_examples_per_client]``.
    content : RecordDict
        The reply as received.
    update : Any
        What the method's ``decode_reply`` made of it (e.g. the checked state).
    norm : float or None
        L2 norm of the update in the method's update space (``update_norm``), finite; None under secure
        aggregation, where the server never sees one client's update (norm bounds are refused there).
    record : dict
        Its per-client report fields.
    """

    client_id: int
    node_id: int
    num_examples: int
    content: RecordDict
    update: Any
    norm: float | None
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def train_loss(self) -> float | None:
        return finite_number(self.content["metrics"].get("train_loss"))


def integer_in(value: Any, low: int, high: int, what: str, *, reason: str = "invalid") -> int:
    """``value`` as an int in ``[low, high]`` (an integral float counts), else ``UpdateRejected`` naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise UpdateRejected(f"{what} = {value!r} is not an integer in [{low}, {high}]", reason=reason)
    if isinstance(value, float) and not value.is_integer():
        raise UpdateRejected(f"{what} = {value!r} is not an integer in [{low}, {high}]", reason=reason)
    return int(value)


def finite_number(value: Any) -> float | int | None:
    """``value`` if it is a finite int or float (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return value if math.isfinite(value) else None


def reply_metrics(content: RecordDict) -> MetricRecord:
    if "metrics" not in content.metric_records:
        raise UpdateRejected("reply has no 'metrics' MetricRecord")
    return content["metrics"]


def reply_arrays(content: RecordDict, expected: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """A reply's ``arrays`` ArrayRecord as numpy, its names and declared shapes checked against ``expected`` before
    any array is loaded; unreadable arrays are ``UpdateRejected`` (reason ``garbled``)."""
    if "arrays" not in content.array_records:
        raise UpdateRejected("reply has no 'arrays' ArrayRecord", reason="garbled")
    return record_to_arrays(content.array_records["arrays"], expected)


def reported_numbers(metrics: MetricRecord, keys: tuple[str, ...] = REPORTED_METRICS) -> dict[str, Any]:
    """The finite numbers among ``keys`` of a reply's metrics (absent or malformed ones are left out)."""
    picked = {key: finite_number(metrics.get(key)) for key in keys}
    return {key: value for key, value in picked.items() if value is not None}


def mean_train_loss(replies: list[Reply]) -> float | None:
    """Example-weighted mean of the replies' training losses; replies without a finite one do not count."""
    pairs = [(reply.train_loss, float(reply.num_examples)) for reply in replies if reply.train_loss is not None]
    if not pairs:
        return None
    return float(np.average([loss for loss, _ in pairs], weights=[weight for _, weight in pairs]))


def relative_norm_outliers(replies: list[Reply], factor: float) -> dict[int, str]:
    """``{index: reason}`` of replies whose norm exceeds ``factor`` × the median norm of the round (from three
    replies on; with fewer, a median says nothing about who is the outlier)."""
    if factor <= 0 or len(replies) < 3:
        return {}
    median = float(np.median([reply.norm for reply in replies]))
    if median <= 0:  # most updates are zero: no scale to compare against
        return {}
    return {i: f"update L2 norm {reply.norm:.3g} exceeds {factor:g} x the round's median client norm "
               f"{median:.3g} (federation.relative_norm_bound)"
            for i, reply in enumerate(replies) if reply.norm > factor * median}


def by_destination(sent: Iterable[Message], replies: Iterable[Message]) -> Iterator[tuple[int, Message, bool]]:
    """Each reply with the node its message was sent to, and whether it is that node's first reply this round.
    Errors the SuperLink makes itself (e.g. "node unavailable") come from its own id: the destination names them."""
    sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in sent}
    replied: set[int] = set()
    for msg in replies:
        node_id = sent_to.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)
        yield node_id, msg, node_id not in replied
        replied.add(node_id)
