"""Client-side federated evaluation, server side: who evaluates the global model each round, and their replies.

After a round's training (Flower calls ``configure_evaluate``/``aggregate_evaluate`` before its ``evaluate_fn``),
each node that answered the round's training gets the new global state in an evaluate message and evaluates it on
the examples its client holds out (``eval.client_fraction``). Every reply is peer-supplied and checked like a
training reply, and nothing in one can raise: its node names the client (``NodeIdentity``), ``num-examples`` is
an integer in ``[0, eval.client_max_examples]`` (0: the client holds nothing out; skipped), ``eval_loss`` is a
finite number >= 0 and the task metric a number in ``[0, 1]``. A reply that fails is rejected (recorder) alone.
The round record gets the per-client results, their example-weighted mean, the worst client (lowest metric,
then highest loss) and the evaluate messages' bytes (``bytes_eval_down``/``bytes_eval_up``, apart from the
training totals), plus the bytes a method's own data plane carried for the evaluation (``plane_bytes``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import Message, MessageType, MetricRecord, RecordDict

from pollinate.common.checks import UpdateRejected
from pollinate.common.config import RunConfig
from pollinate.common.report import RunRecorder
from pollinate.common.wire import wire_bytes
from pollinate.server.identity import NodeIdentity
from pollinate.server.replies import by_destination, finite_number, integer_in, reply_metrics


class ClientEvaluation:
    """One round at a time: the evaluate messages sent, the checked results and the round's summary.

    Parameters
    ----------
    cfg : RunConfig
        The run's config (``[eval]`` bounds the replies).
    recorder : RunRecorder
        Where rejected replies are recorded.
    metric : str
        The task metric every reply must carry (``accuracy`` or ``exact_match``).
    """

    def __init__(self, cfg: RunConfig, recorder: RunRecorder, metric: str) -> None:
        self.cfg, self.recorder, self.metric = cfg, recorder, metric
        self.identity = NodeIdentity()
        self.reset()

    def reset(self) -> None:
        self._sent: list[Message] = []
        self._down: dict[int, int] = {}
        self._up = 0
        self._plane_down = 0
        self._results: list[dict[str, Any]] = []

    def messages(self, nodes: Iterable[int], content_for: Callable[[int], RecordDict | None]) -> list[Message]:
        """One evaluate message per node whose ``content_for(node)`` is not None; starts a new round."""
        self.reset()
        for node_id in nodes:
            content = content_for(node_id)
            if content is None:
                continue
            self._down[node_id] = wire_bytes(content)
            self._sent.append(Message(content=content, dst_node_id=node_id, message_type=MessageType.EVALUATE))
        return list(self._sent)

    def collect(self, server_round: int, replies: Iterable[Message], identity: NodeIdentity) -> MetricRecord | None:
        """Check every reply (rejections recorded, never raised), its client named by ``identity`` (the run's node
        <-> client bindings, shared with training); the example-weighted means, or None."""
        self.identity = identity
        for node_id, msg, first in by_destination(self._sent, replies):
            result = self._check(server_round, node_id, msg, first=first)
            if result is not None:
                self._results.append(result)
        mean = self._mean()
        return None if mean is None else MetricRecord({k: v for k, v in mean.items() if k != "num_examples"})

    def round_fields(self) -> dict[str, Any]:
        """The round record's client-evaluation fields (none when nothing was sent), then a fresh round."""
        if not self._sent:
            return {}
        fields: dict[str, Any] = {"bytes_eval_down": sum(self._down.values()) + self._plane_down,
                                  "bytes_eval_up": self._up}
        if self._results:
            clients = sorted(self._results, key=lambda r: r["client_id"])
            worst = min(clients, key=lambda r: (r[self.metric], -r["eval_loss"]))
            fields["client_eval"] = {"clients": clients, "mean": self._mean(), "worst": dict(worst)}
        self.reset()
        return fields

    def plane_bytes(self, content: RecordDict) -> tuple[int, int]:
        """``(up, down)`` bytes a reply reports its evaluation sent over a method's own data plane (SFPrompt's
        split plane), counted in the eval bytes; none here. May raise: the reply is then rejected."""
        return 0, 0

    def _mean(self) -> dict[str, Any] | None:
        total = sum(r["num_examples"] for r in self._results)
        if not total:
            return None
        mean = {key: math.fsum(r[key] * r["num_examples"] for r in self._results) / total
                for key in ("eval_loss", self.metric)}
        return {**mean, "num_examples": total}

    def _check(self, server_round: int, node_id: int, msg: Message, first: bool) -> dict[str, Any] | None:
        name = self._name(node_id)
        if msg.has_error():
            self.recorder.reject(server_round, name, f"evaluation failed (node {node_id}): {msg.error.reason}")
            return None
        try:
            self._up += wire_bytes(msg.content)
            if not first:
                raise UpdateRejected(f"node {node_id} sent more than one evaluation reply this round",
                                     reason="identity")
            plane_up, plane_down = self.plane_bytes(msg.content)
            self._up, self._plane_down = self._up + plane_up, self._plane_down + plane_down
            return self._read(node_id, msg)
        except Exception as exc:  # noqa: BLE001  (a peer's reply must never end the round)
            reason = str(exc) if isinstance(exc, UpdateRejected) else f"{type(exc).__name__}: {exc}"
            self.recorder.reject(server_round, self._name(node_id), f"evaluation: {reason}")
            return None

    def _read(self, node_id: int, msg: Message) -> dict[str, Any] | None:
        if msg.metadata.src_node_id != node_id:
            raise UpdateRejected(f"a reply from node {msg.metadata.src_node_id} answers a message sent to node "
                                 f"{node_id}", reason="identity")
        metrics = reply_metrics(msg.content)
        limit = self.cfg.eval.client_max_examples
        num_examples = integer_in(metrics.get("num-examples"), 0, limit, "num-examples", reason="weight")
        if num_examples == 0:
            return None  # the client holds no examples out (or its method does not evaluate on clients)
        client_id = self.identity.resolve(node_id, metrics.get("client_id"))
        loss = finite_number(metrics.get("eval_loss"))
        if loss is None or loss < 0:
            raise UpdateRejected(f"eval_loss = {metrics.get('eval_loss')!r} is not a finite number >= 0")
        value = finite_number(metrics.get(self.metric))
        if value is None or not 0 <= value <= 1:
            raise UpdateRejected(f"{self.metric} = {metrics.get(self.metric)!r} is not a number in [0, 1]")
        return {"client_id": client_id, "num_examples": num_examples, "eval_loss": float(loss),
                self.metric: float(value)}

    def _name(self, node_id: int) -> int | str:
        client = self.identity.client_of(node_id)
        return f"node-{node_id}" if client is None else client
