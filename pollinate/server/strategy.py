"""What every Pollinate server half shares, as a Flower strategy: the round loop stays Flower's ``start``.

- messages carry the run config; bytes are counted as serialized, per client, both directions;
- replies are validated by the method; a rejected reply is logged (metrics.jsonl + report) and the round
  aggregates the others; a round with fewer valid replies than ``min_clients`` keeps the previous global;
- after each round (Flower calls ``evaluate_fn``) the global model is evaluated, the round is recorded and
  checkpointed (with the report history, RNG states and the method's ``extra_state()``, so a run resumes);
- a node that does not reply within the round timeout is dropped from that round and named in the report.
A resumed run sets ``round_offset``: Flower counts its rounds from 1, the base hooks add the offset, so the
method hooks below always see the run's true round number.
A method subclasses this and says only what differs: its initial state, what it sends, how it checks and
aggregates replies, and how its global state becomes a model to evaluate and save.
"""

from __future__ import annotations

import json
import time
from abc import abstractmethod
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from pollinate.common.checks import UpdateRejected, check_arrays  # noqa: F401  (re-exported for methods)
from pollinate.common.config import RunConfig
from pollinate.common.profiles import ResourceProfile, comm_seconds
from pollinate.common.report import RunRecorder
from pollinate.common.wire import arrays_to_record, record_to_arrays, wire_bytes
from pollinate.methods import get_method
from pollinate.server.checkpoint import round_state, save_round
from pollinate.server.deployment import Deployment


def weighted_average(states: list[dict[str, np.ndarray]], weights: list[float]) -> dict[str, np.ndarray]:
    """FedAvg: Σ_k (n_k / Σn) · state_k per tensor, accumulated in float64 in a fixed order."""
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"FedAvg weights must sum to > 0, got {weights}")
    out = {}
    for key in states[0]:
        acc = np.zeros(states[0][key].shape, dtype=np.float64)
        for state, weight in zip(states, weights, strict=True):
            acc += (weight / total) * state[key].astype(np.float64)
        out[key] = acc.astype(np.float32)
    return out


class PollinateStrategy(FedAvg):
    """Shared mechanics for every method; see the module docstring."""

    def __init__(self, cfg: RunConfig, recorder: RunRecorder, run_dir: Path, deployment: Deployment | None = None):
        n = cfg.federation.clients
        super().__init__(
            fraction_train=cfg.federation.fraction_train, fraction_evaluate=0.0,
            min_train_nodes=max(1, round(n * cfg.federation.fraction_train)), min_available_nodes=n,
        )
        self.cfg = cfg
        self.deployment = deployment  # None in simulation
        self.recorder = recorder
        self.run_dir = Path(run_dir)
        self.min_replies = cfg.federation.min_clients or 1
        self._round_start = time.perf_counter()
        self.global_arrays = ArrayRecord()
        self._down: dict[int, int] = {}
        self._clients: list[dict[str, Any]] = []
        self._train_loss: float | None = None
        self.round_offset = 0  # rounds completed before this process started (resume)
        self._client_of_node: dict[int, int] = {}  # names dropped nodes in the report
        self._sent: list[Message] = []
        # What a client half reads of the config: the core sections it uses and its method's own, no others.
        self.client_config = json.dumps(cfg.sections_for(get_method(cfg.method).client_sections), sort_keys=True)

    # --- what a method says -------------------------------------------------------------------------
    @abstractmethod
    def initial_arrays(self) -> ArrayRecord:
        """The global state before round 1."""

    @abstractmethod
    def check_reply(self, server_round: int, content: RecordDict) -> None:
        """Raise UpdateRejected when a reply must not be aggregated."""

    @abstractmethod
    def aggregate(self, server_round: int, contents: list[RecordDict]) -> ArrayRecord:
        """New global state from the accepted replies (sorted by client id)."""

    @abstractmethod
    def evaluate_global(self, arrays: ArrayRecord) -> dict[str, Any]:
        """``{"eval_loss": .., "eval_metrics": {..}}`` of the global state."""

    @abstractmethod
    def save_final(self, arrays: ArrayRecord) -> dict[str, Any]:
        """Write the final model artefacts; returns report fields (e.g. ``adapter_dir``)."""

    def prepare(self, grid: Grid) -> None:
        """Before round 1 (e.g. FedPipe: collect profiles and importance scores, plan); default nothing."""

    def close(self) -> None:
        """After the run, also on errors (e.g. stop a service the method started); default nothing."""

    def extra_state(self) -> dict[str, Any]:
        """Method state beyond the global arrays that a resumed run needs (e.g. per-client plans); JSON values
        and numpy arrays, nested in dicts/lists. Saved with every round's checkpoint; default none."""
        return {}

    def restore_state(self, state: dict[str, Any]) -> None:
        """Take back what ``extra_state`` returned, on resume (called before ``prepare``); default nothing."""

    def train_content(self, node_id: int, server_round: int, arrays: ArrayRecord,
                      config: ConfigRecord) -> RecordDict | None:
        """What one client receives (``None``: skip this node this round); methods that send per-client
        payloads override this."""
        return RecordDict({"arrays": arrays, "config": config})

    def client_record(self, content: RecordDict, bytes_up: int, bytes_down: int) -> dict[str, Any]:
        """Per-client report fields from its reply and its Flower bytes (methods may add their own, e.g. bytes
        of another data plane)."""
        metrics = content["metrics"]
        keep = ("client_id", "train_seconds", "num-examples", "peak_rss_bytes", "train_loss")
        record: dict[str, Any] = {"bytes_down": bytes_down, "bytes_up": bytes_up}
        record.update({key: metrics[key] for key in keep if key in metrics})
        record["num_examples"] = int(record.pop("num-examples", 0))
        record["client_id"] = int(record.get("client_id", -1))
        return record

    def round_fields(self) -> dict[str, Any]:
        """Extra per-round report fields of a method (e.g. totals of its own per-client fields)."""
        return {}

    def profile_timing(self, content: RecordDict, bytes_up: int, bytes_down: int) -> dict[str, Any]:
        """Enforce the client's profile: round time = compute (as its device) + bytes / its bandwidth."""
        if "profile" not in content.config_records or "compute_seconds" not in content["metrics"]:
            return {}
        profile = ResourceProfile(**dict(content["profile"]))
        compute_s = float(content["metrics"]["compute_seconds"])
        comm_s = comm_seconds(bytes_up, bytes_down, profile)
        round_s = compute_s + comm_s
        return {
            "profile": profile.name, "memory_budget_bytes": int(profile.memory_bytes),
            "compute_seconds": round(compute_s, 3), "comm_seconds": round(comm_s, 3),
            "round_seconds": round(round_s, 3), "met_deadline": round_s <= self.cfg.federation.deadline_s,
        }

    # --- Flower hooks ---------------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        server_round += self.round_offset
        self._round_start = time.perf_counter()
        self._down, self._clients = {}, []
        self.global_arrays = arrays  # the global state this round starts from (aggregate may need it)
        sampled = super().configure_train(server_round, arrays, config, grid)
        config = ConfigRecord({**dict(config), "server-round": server_round, "run-config": self.client_config})
        messages = []
        for msg in sampled:
            node_id = msg.metadata.dst_node_id
            content = self.train_content(node_id, server_round, arrays, config)
            if content is None:
                continue
            self._down[node_id] = wire_bytes(content)
            messages.append(Message(content=content, dst_node_id=node_id, message_type=msg.metadata.message_type))
        self._sent = messages  # the grid gives each its message id when it pushes it
        return messages

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        accepted: list[tuple[int, RecordDict]] = []
        replied: set[int] = set()
        # Errors the SuperLink makes itself (e.g. "node unavailable") come from its own id: name the destination.
        sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in self._sent}
        for msg in replies:
            node_id = sent_to.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)
            replied.add(node_id)
            if msg.has_error():
                self.recorder.reject(server_round, self._client_of_node.get(node_id, f"node-{node_id}"),
                                     f"client failed (node {node_id}): {msg.error.reason}")
                continue
            record = {"bytes_down": self._down.get(node_id, 0), "bytes_up": wire_bytes(msg.content)}
            try:
                if "metrics" not in msg.content.metric_records:
                    raise UpdateRejected("reply has no 'metrics' MetricRecord")
                record = self.client_record(msg.content, record["bytes_up"], record["bytes_down"])
                record.update(self.profile_timing(msg.content, record["bytes_up"], record["bytes_down"]))
                self.check_reply(server_round, msg.content)
            except (UpdateRejected, KeyError, ValueError, TypeError) as exc:
                self.recorder.reject(server_round, record.get("client_id", f"node-{node_id}"), str(exc))
                self._clients.append({**record, "rejected": True})
                continue
            self._clients.append(record)
            self._client_of_node[node_id] = record["client_id"]
            self.recorder.client_event(server_round, **record)
            accepted.append((record["client_id"], msg.content))
        for node_id in sorted(set(self._down) - replied):
            self.recorder.reject(server_round, self._client_of_node.get(node_id, f"node-{node_id}"),
                                 f"dropped: node {node_id} sent no reply within federation.round_timeout_s = "
                                 f"{self.cfg.federation.round_timeout_s:g} s")
        self._train_loss = None
        if len(accepted) < self.min_replies:
            self.recorder.event("round_skipped", round=server_round, accepted=len(accepted), needed=self.min_replies)
            return None, None
        accepted.sort(key=lambda item: item[0])
        contents = [content for _, content in accepted]
        weights = [float(c["metrics"]["num-examples"]) for c in contents]
        self._train_loss = float(np.average([float(c["metrics"]["train_loss"]) for c in contents], weights=weights))
        return self.aggregate(server_round, contents), MetricRecord({"train_loss": self._train_loss})

    def end_round(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Flower's ``evaluate_fn``: evaluate, record and checkpoint the round (round 0 = before training)."""
        if server_round == 0 and self.round_offset:
            return None  # resumed: the initial evaluation is in the restored history
        server_round += self.round_offset
        evaluation = self.evaluate_global(arrays)
        if server_round == 0:
            self.recorder.initial(evaluation)
            return MetricRecord({"eval_loss": evaluation["eval_loss"]})
        timed = [c for c in self._clients if "met_deadline" in c]
        record = {
            "round": server_round, "train_loss": self._train_loss, **evaluation,
            "under_training_rate": (sum(not c["met_deadline"] for c in timed) / len(timed)) if timed else None,
            "bytes_up": sum(c["bytes_up"] for c in self._clients),
            "bytes_down": sum(c["bytes_down"] for c in self._clients),
            "seconds": round(time.perf_counter() - self._round_start, 3),
            **self.round_fields(),
            "clients": sorted(self._clients, key=lambda c: c["client_id"]),
        }
        self.recorder.round_done(record)
        state, extra_arrays = round_state(server_round, self.cfg, self.recorder.history(), self.extra_state())
        save_round(self.run_dir, server_round, record_to_arrays(arrays), state, extra_arrays)
        return MetricRecord({"eval_loss": evaluation["eval_loss"]})


class StateFedAvg(PollinateStrategy):
    """A method whose global state is a fixed set of named fp32 tensors that every client receives and returns in
    full: replies are checked against ``self.shapes`` and averaged weighted by examples (FedAvg)."""

    shapes: dict[str, tuple[int, ...]]

    def check_reply(self, server_round: int, content: RecordDict) -> None:
        check_arrays(record_to_arrays(content["arrays"]), self.shapes)

    def aggregate(self, server_round: int, contents: list[RecordDict]) -> ArrayRecord:
        states = [record_to_arrays(c["arrays"]) for c in contents]
        weights = [float(c["metrics"]["num-examples"]) for c in contents]
        return arrays_to_record(weighted_average(states, weights))
