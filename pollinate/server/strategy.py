"""What every Pollinate server half shares, as a Flower strategy: the round loop stays Flower's ``start``.

- each round samples nodes as Flower's FedAvg does and builds one message per sampled node (``train_content``)
  carrying the sections its client half reads; bytes are counted as serialized, per client, both directions;
- every reply is checked before it counts: the node that sent it names the client (``NodeIdentity``), its
  example count is an integer in ``[1, federation.max_examples_per_client]``, the method decodes and checks its
  update (``decode_reply``, no side effects), its norm in the method's update space (``update_norm``) is finite
  and within ``federation.update_norm_bound`` and ``relative_norm_bound`` × the round's median. Any error
  while checking one reply is that reply's rejection (metrics.jsonl + report) and the round goes on; a round
  with fewer accepted replies than ``min_clients`` keeps the previous global;
- after each round's training the nodes that trained evaluate the new global on their held-out examples
  (``evaluate_content``, ``server.client_eval``); then (Flower calls ``evaluate_fn``) the server evaluates it
  (every ``eval.every`` rounds and the last; other rounds: ``eval_loss`` None), the round is checkpointed (report
  history and RNG states: a run resumes) and recorded with both and its ``timing`` (``server.round_timing``);
  with ``eval.overlap`` that evaluation runs while the next round trains (``server.eval_overlap``);
- a node that does not reply within the round timeout is dropped from that round and named in the report.
A resumed run sets ``round_offset``: Flower counts its rounds from 1, and the Flower-facing hooks translate that
once (``in_run_rounds``), so every method hook sees the run's true round number.
A method subclasses this and says only what differs: its initial state, what it sends, how it decodes, measures
and aggregates replies, and how its global state becomes a model to evaluate and save.
"""

from __future__ import annotations

import functools
import json
import random
from abc import abstractmethod
from collections.abc import Callable, Iterable
from logging import INFO
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import psutil
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.serverapp.strategy.strategy_utils import sample_nodes
from rich.text import Text

from pollinate.common.checks import UpdateRejected, check_arrays
from pollinate.common.config import ConfigError, RunConfig
from pollinate.common.data import resolve_task_type
from pollinate.common.evaluation import metric_name
from pollinate.common.lr_schedule import lr_scale_entry
from pollinate.common.models import resolve_model
from pollinate.common.profiles import ResourceProfile, comm_seconds
from pollinate.common.report import RunRecorder, peer_text
from pollinate.common.wire import record_to_arrays, wire_bytes
from pollinate.methods import get_method
from pollinate.server import robust
from pollinate.server.checkpoint import round_state, save_round
from pollinate.server.client_eval import ClientEvaluation
from pollinate.server.deployment import Deployment
from pollinate.server.eval_overlap import OverlappedEvaluation
from pollinate.server.identity import NodeIdentity
from pollinate.server.replies import (
    Reply,
    by_destination,
    finite_number,
    integer_in,
    mean_train_loss,
    relative_norm_outliers,
    reply_metrics,
    reported_numbers,
)
from pollinate.server.round_timing import RoundTiming
from pollinate.server.server_optimizer import server_optimizer_for

__all__ = ["PollinateStrategy", "Reply", "RunStalled", "UpdateRejected", "check_arrays", "rejection_reason"]


class RunStalled(RuntimeError):
    """``federation.max_skipped_rounds`` rounds in a row accepted no update: the run stops, resumable."""


def in_run_rounds(hook: Callable[..., Any]) -> Callable[..., Any]:
    """A Flower hook called with Flower's round number runs with the run's: ``+ round_offset`` (resume)."""

    @functools.wraps(hook)
    def translated(self: PollinateStrategy, server_round: int, *args: Any) -> Any:
        return hook(self, server_round + self.round_offset, *args)

    return translated


class PollinateStrategy(Strategy):
    """Shared mechanics for every method; see the module docstring.

    Parameters
    ----------
    cfg : RunConfig
        The run's config (``[federation]`` sets sampling, bounds and the aggregator).
    recorder : RunRecorder
        Where rounds, client events and rejections are recorded.
    run_dir : Path
        The run directory (checkpoints, final artefacts).
    deployment : Deployment or None, default None
        The coordinator's network facts; None in simulation.
    """

    # Whether this method's replies can be securely aggregated (server.secagg); others refuse the setting.
    supports_secure_aggregation: ClassVar[bool] = False

    def __init__(self, cfg: RunConfig, recorder: RunRecorder, run_dir: Path, deployment: Deployment | None = None):
        if cfg.privacy.secure_aggregation and not self.supports_secure_aggregation:
            raise ConfigError(f"privacy.secure_aggregation = true is not supported by method {cfg.method!r}: only "
                              "methods whose clients return one dense state of fixed shapes (fedavg-lora, fedavg-full)")
        n = cfg.federation.clients
        self.fraction_train = cfg.federation.fraction_train
        self.min_train_nodes = max(1, round(n * cfg.federation.fraction_train))
        self.min_available_nodes = n
        self.cfg = cfg
        self.deployment = deployment  # None in simulation
        self.recorder = recorder
        self.run_dir = Path(run_dir)
        self.min_replies = cfg.federation.min_clients or 1
        registered = deployment.identities if deployment is not None else None
        self.identity = NodeIdentity(dict(registered.clients) if registered is not None else None)
        try:
            robust.check_aggregator(cfg.federation.aggregator, self.min_train_nodes,
                                    **robust_parameters(cfg, self.min_train_nodes))
        except robust.AggregatorError as exc:
            raise ConfigError(f"federation.aggregator = {cfg.federation.aggregator!r} with "
                              f"{self.min_train_nodes} clients per round: {exc}") from exc
        self.global_arrays = ArrayRecord()
        self.server_optimizer = server_optimizer_for(cfg.federation)  # None (fedavg): the aggregate is the global
        self.round_offset = 0  # rounds completed before this process started (resume)
        self.timing = RoundTiming()
        self.overlap = OverlappedEvaluation(cfg.eval.overlap, cfg.federation.rounds)
        self._down: dict[int, int] = {}
        self._clients: list[dict[str, Any]] = []
        self._train_loss: float | None = None
        self._sent: list[Message] = []
        self._skipped_in_a_row = 0
        task_type = resolve_task_type(cfg.data, resolve_model(cfg.model.name).default_task)
        self.client_eval = ClientEvaluation(cfg, recorder, metric_name(task_type))
        # What a client half reads of the config: the core sections it uses and its method's own, no others.
        self.client_config = json.dumps(cfg.sections_for(get_method(cfg.method).client_sections), sort_keys=True)

    # --- what a method says -------------------------------------------------------------------------
    @abstractmethod
    def initial_arrays(self) -> ArrayRecord:
        """The global state before round 1."""

    @abstractmethod
    def decode_reply(self, server_round: int, client_id: int, content: RecordDict) -> Any:
        """The update in a reply of ``client_id``, checked (shapes, dtypes, finite, size); raise
        ``UpdateRejected`` when it must not count. No side effects: what it returns reaches ``aggregate``."""

    @abstractmethod
    def update_norm(self, client_id: int, update: Any) -> float | None:
        """L2 norm of a decoded update as a change of the global model (what the norm bounds apply to); None when
        the server cannot see it (a masked update: secure aggregation refuses the norm bounds)."""

    @abstractmethod
    def aggregate(self, server_round: int, replies: list[Reply]) -> ArrayRecord:
        """New global state from the accepted replies (sorted by client id), combined by
        ``federation.aggregator``."""

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

    def begin_round(self, grid: Grid, server_round: int) -> None:
        """Before a round samples its nodes (e.g. FedPipe plans nodes that joined late); default nothing."""

    def replies_in(self, server_round: int) -> None:
        """The round's replies are in, before they are checked (e.g. SFPrompt revokes the round's split-service
        tokens); default nothing."""

    def train_content(self, node_id: int, server_round: int, arrays: ArrayRecord,
                      config: ConfigRecord) -> RecordDict | None:
        """What one client receives (``None``: skip this node this round); methods that send per-client
        payloads override this."""
        return RecordDict({"arrays": arrays, "config": config})

    def before_train(self, grid: Grid, server_round: int, messages: list[Message]) -> list[Message]:
        """The round's train messages just before they go out: a method may exchange other messages first and
        send fewer or amended ones (secure aggregation's key exchange); default: as they are."""
        return messages

    def evaluate_content(self, node_id: int, server_round: int, arrays: ArrayRecord) -> RecordDict | None:
        """What one client evaluates the global state with on its held-out examples (``None``: this method has
        no client-side evaluation; nothing is sent)."""
        config = ConfigRecord({"server-round": server_round, "run-config": self.client_config})
        return RecordDict({"arrays": arrays, "config": config})

    def client_record(self, client_id: int, content: RecordDict, bytes_up: int, bytes_down: int) -> dict[str, Any]:
        """Per-client report fields from its reply and its Flower bytes (methods may add their own, e.g. bytes
        of another data plane); numbers only, read from the reply's metrics."""
        metrics = content["metrics"]
        return {"bytes_down": bytes_down, "bytes_up": bytes_up, "client_id": client_id, **reported_numbers(metrics),
                "num_examples": int(metrics["num-examples"])}

    def round_fields(self) -> dict[str, Any]:
        """Extra per-round report fields of a method (e.g. totals of its own per-client fields)."""
        return {}

    def profile_timing(self, content: RecordDict, bytes_up: int, bytes_down: int) -> dict[str, Any]:
        """Enforce the client's profile: round time = compute (as its device) + bytes / its bandwidth."""
        compute = finite_number(content["metrics"].get("compute_seconds"))
        if "profile" not in content.config_records or compute is None or compute < 0:
            return {}
        profile = ResourceProfile(**dict(content["profile"]))
        compute_s = float(compute)
        comm_s = comm_seconds(bytes_up, bytes_down, profile)
        round_s = compute_s + comm_s
        return {
            "profile": peer_text(profile.name), "memory_budget_bytes": int(profile.memory_bytes),
            "compute_seconds": round(compute_s, 3), "comm_seconds": round(comm_s, 3),
            "round_seconds": round(round_s, 3), "met_deadline": round_s <= self.cfg.federation.deadline_s,
        }

    # --- Flower hooks ---------------------------------------------------------------------------------
    def summary(self) -> None:
        fed = self.cfg.federation
        log(INFO, "\t├── Pollinate %s: %d clients, fraction_train %g, aggregator %s", self.cfg.method,
            fed.clients, fed.fraction_train, fed.aggregator)

    @in_run_rounds
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.timing.start()
        self.identity.connected(grid.get_node_ids())  # a client whose node left may come back on a new one
        self.begin_round(grid, server_round)
        self._down, self._clients = {}, []
        self.global_arrays = arrays  # the global state this round starts from (aggregate may need it)
        config = ConfigRecord({**dict(config), "server-round": server_round, "run-config": self.client_config,
                               **lr_scale_entry(self.cfg.train, server_round, self.cfg.federation.rounds)})
        messages = []
        for node_id in self.sample(grid):
            content = self.train_content(node_id, server_round, arrays, config)
            if content is not None:
                messages.append(Message(content=content, dst_node_id=node_id, message_type=MessageType.TRAIN))
        messages = self.before_train(grid, server_round, messages)
        self._down = {message.metadata.dst_node_id: wire_bytes(message.content) for message in messages}
        self._sent = messages  # the grid gives each its message id when it pushes it
        self.timing.open("train")  # Flower sends them now and waits for the replies
        return messages

    def sample(self, grid: Grid) -> list[int]:
        """Flower FedAvg's sampling, draw for draw: ``fraction_train`` of the connected nodes (at least
        ``min_train_nodes``), once ``min_available_nodes`` are connected."""
        num_nodes = int(len(list(grid.get_node_ids())) * self.fraction_train)
        size = max(num_nodes, self.min_train_nodes)
        _, connected = sample_nodes(grid, max(self.min_available_nodes, size), 0)  # waits; draws nothing
        self.identity.connected(connected)
        # Node ids are random per SuperLink and per (re)join: draw from the nodes ordered by client identity, so
        # a seed (and a resumed run's restored RNG state) picks the same clients whatever their node ids.
        return random.sample(sorted(connected, key=self._identity_order), size)

    def _identity_order(self, node_id: int) -> tuple[int, int]:
        """Bound nodes by client id first, then unbound ones by node id."""
        client = self.identity.client_of(node_id)
        return (0, client) if client is not None else (1, node_id)

    @in_run_rounds
    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        self.timing.close("train")
        self.timing.open("aggregate")
        replies = list(replies)
        self.replies_in(server_round)
        checked: list[Reply] = []
        replied: set[int] = set()
        for node_id, msg, first in by_destination(self._sent, replies):
            reply = self._check(server_round, node_id, msg, first=first)
            replied.add(node_id)
            if reply is not None:
                checked.append(reply)
        accepted = self._within_relative_bound(server_round, checked)
        for reply in accepted:
            self._clients.append(reply.record)
            self.recorder.client_event(server_round, **reply.record)
        for node_id in sorted(set(self._down) - replied):
            self.recorder.reject(server_round, self._name(node_id),
                                 f"dropped: node {node_id} sent no reply within federation.round_timeout_s = "
                                 f"{self.cfg.federation.round_timeout_s:g} s")
        result = self._aggregate(server_round, accepted)
        self.timing.close("aggregate")
        return result

    @in_run_rounds
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """Client-side evaluation of the new global state (``eval.client_fraction`` > 0) by the nodes that
        answered this round's training; Flower calls it after ``aggregate_train`` and before ``end_round``."""
        trained = {record["client_id"] for record in self._clients} if self.cfg.eval.client_fraction else set()
        nodes = [node_id for node_id in sorted(self._down) if self._name(node_id) in trained]
        messages = self.client_eval.messages(nodes, lambda node: self.evaluate_content(node, server_round, arrays))
        self.timing.open("client_eval")  # Flower sends them (if any) now and waits for the replies
        return messages

    @in_run_rounds
    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        self.timing.close("client_eval")
        return self.client_eval.collect(server_round, replies, self.identity)

    @in_run_rounds
    def end_round(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Flower's ``evaluate_fn``: evaluate (every ``eval.every`` rounds and after the last), checkpoint (the
        round as it stands before, checkpoint_seconds None) and record the round. Flower's round 0 (before its
        first round) is the run's initial evaluation, or nothing when resumed (it is in the restored history; a
        round checkpointed with its evaluation pending, ``eval.overlap``, is evaluated and recorded then)."""
        if server_round == self.round_offset:
            if self.round_offset:
                self.overlap.finish_restored(self.recorder, self.evaluate_global, arrays, self.timing.clock)
                return None
            evaluation = self.evaluate_global(arrays)
            self.recorder.initial(evaluation)
            return MetricRecord({"eval_loss": evaluation["eval_loss"]})
        self.overlap.record_previous(self.recorder, self.timing)  # eval.overlap: the previous round first
        evaluation: dict[str, Any] = {"eval_loss": None, "eval_metrics": {}}  # a round eval.every skips (or pending)
        if server_round % self.cfg.eval.every == 0 or server_round >= self.cfg.federation.rounds:
            if self.overlap.overlaps(server_round):
                self.overlap.start(server_round, self.evaluate_global, arrays, self.timing.clock)
            else:
                with self.timing.measure("eval"):
                    evaluation = self.evaluate_global(arrays)
        timed = [c for c in self._clients if "met_deadline" in c]
        record = {
            "round": server_round, "train_loss": self._train_loss, **evaluation,
            "under_training_rate": (sum(not c["met_deadline"] for c in timed) / len(timed)) if timed else None,
            "bytes_up": sum(c["bytes_up"] for c in self._clients),
            "bytes_down": sum(c["bytes_down"] for c in self._clients),
            **self.timing.round_fields(checkpointed=False),  # completed once the checkpoint is written
            **self.round_fields(),
            **self.client_eval.round_fields(),
            "server_rss_bytes": psutil.Process().memory_info().rss,  # the driver's memory stays flat at scale
            "clients": sorted(self._clients, key=_client_order),
        }
        with self.timing.measure("checkpoint"):
            history = self.recorder.history(pending=self.overlap.checkpointed(record))
            state = round_state(server_round, self.cfg, history)
            save_round(self.run_dir, server_round, record_to_arrays(arrays), state,
                       None if self.server_optimizer is None else self.server_optimizer.state())
        record.update(self.timing.round_fields())
        if self.overlap.hold(record):  # recorded once its evaluation is in
            return None
        self.recorder.round_done(record)
        return None if evaluation["eval_loss"] is None else MetricRecord({"eval_loss": evaluation["eval_loss"]})

    # --- one reply ------------------------------------------------------------------------------------
    def _check(self, server_round: int, node_id: int, msg: Message, first: bool) -> Reply | None:
        """The reply if it counts; otherwise its rejection is recorded and None returned. Nothing in a reply
        can raise out of here: whatever goes wrong is that reply's rejection."""
        if msg.has_error():
            self.recorder.reject(server_round, self._name(node_id),
                                 f"client failed (node {node_id}): {msg.error.reason}")
            return None
        record: dict[str, Any] = {"client_id": self._name(node_id), "bytes_down": self._down.get(node_id, 0),
                                  "bytes_up": 0}
        try:
            record["bytes_up"] = wire_bytes(msg.content)
            if not first:
                raise UpdateRejected(f"node {node_id} sent more than one reply this round", reason="identity")
            return self._read(server_round, node_id, msg, record)
        except Exception as exc:  # noqa: BLE001  (a peer's reply must never end the round)
            self.recorder.reject(server_round, record["client_id"], rejection_reason(exc))
            self._clients.append({**record, "rejected": True})
            return None

    def _read(self, server_round: int, node_id: int, msg: Message, record: dict[str, Any]) -> Reply:
        if msg.metadata.src_node_id != node_id:
            raise UpdateRejected(f"a reply from node {msg.metadata.src_node_id} answers a message sent to node "
                                 f"{node_id}", reason="identity")
        metrics = reply_metrics(msg.content)
        client_id = self.identity.resolve(node_id, metrics.get("client_id"))
        record["client_id"] = client_id
        fed = self.cfg.federation
        num_examples = integer_in(metrics.get("num-examples"), 1, fed.max_examples_per_client, "num-examples",
                                  reason="weight")
        record.update(self.client_record(client_id, msg.content, record["bytes_up"], record["bytes_down"]))
        record.update(self.profile_timing(msg.content, record["bytes_up"], record["bytes_down"]))
        update = self.decode_reply(server_round, client_id, msg.content)
        norm = self.update_norm(client_id, update)
        if norm is not None:
            norm = float(norm)
            if not np.isfinite(norm):
                raise UpdateRejected(f"update L2 norm is {norm}", reason="non-finite")
            if fed.update_norm_bound and norm > fed.update_norm_bound:
                raise UpdateRejected(f"update L2 norm {norm:.3g} exceeds federation.update_norm_bound = "
                                     f"{fed.update_norm_bound:g}", reason="norm")
            record["update_norm"] = norm
        return Reply(client_id, node_id, num_examples, msg.content, update, norm, record)

    def _within_relative_bound(self, server_round: int, replies: list[Reply]) -> list[Reply]:
        outliers = relative_norm_outliers(replies, self.cfg.federation.relative_norm_bound)
        for index, reason in outliers.items():
            self.recorder.reject(server_round, replies[index].client_id, reason)
            self._clients.append({**replies[index].record, "rejected": True})
        return [reply for i, reply in enumerate(replies) if i not in outliers]

    def _aggregate(self, server_round: int,
                   accepted: list[Reply]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        self._train_loss = None
        if len(accepted) < self.min_replies:
            self.recorder.event("round_skipped", round=server_round, accepted=len(accepted), needed=self.min_replies)
            self._skipped(server_round)
            return None, None
        accepted.sort(key=lambda reply: reply.client_id)
        try:
            arrays = self.aggregate(server_round, accepted)
        except Exception as exc:  # noqa: BLE001  (every reply passed its checks: keep the global, go on)
            reason = rejection_reason(exc)
            self.recorder.event("round_skipped", round=server_round, accepted=len(accepted), reason=reason)
            self.recorder.console.print(Text(f"round {server_round}: aggregation failed, the global model is "
                                             f"unchanged: {reason}", style="yellow"))
            self._skipped(server_round)
            return None, None
        self._skipped_in_a_row = 0
        self._train_loss = mean_train_loss(accepted)
        return arrays, MetricRecord({} if self._train_loss is None else {"train_loss": self._train_loss})

    def _skipped(self, server_round: int) -> None:
        """Count a round that changed nothing; ``federation.max_skipped_rounds`` of them in a row end the run
        (``RunStalled``) rather than evaluating the same model round after round (clients out of memory, a bound
        every update breaks)."""
        self._skipped_in_a_row += 1
        limit = self.cfg.federation.max_skipped_rounds
        if limit and self._skipped_in_a_row >= limit:
            reasons = sorted({r["reason"] for r in self.recorder.rejected if r["round"] == server_round})
            last = "; ".join(peer_text(reason, 160) for reason in reasons[:3]) or "too few replies"
            raise RunStalled(f"stopped: rounds {server_round - limit + 1}-{server_round} had no accepted update "
                             f"(federation.max_skipped_rounds = {limit}); round {server_round}: {last}")

    def combine(self, states: list[dict[str, np.ndarray]], weights: list[float]) -> dict[str, np.ndarray]:
        """Client states (or updates) combined by ``federation.aggregator`` (``fedavg``: example-weighted)."""
        name = self.cfg.federation.aggregator
        return robust.aggregate(name, states, weights, **robust_parameters(self.cfg, len(states)))

    def _name(self, node_id: int) -> int | str:
        """How the report names a node: its client id once bound, else ``node-<id>``."""
        client = self.identity.client_of(node_id)
        return f"node-{node_id}" if client is None else client


def robust_parameters(cfg: RunConfig, clients: int) -> dict[str, Any]:
    """``robust.aggregate``'s parameters for a round of ``clients``: Krum tolerates ``federation.byzantine_clients``
    and the trimmed mean drops that many clients at each end of every coordinate."""
    byzantine = cfg.federation.byzantine_clients
    # scipy trims floor(fraction · n) per end: the half keeps the floor at f whatever the float rounding.
    return {"byzantine": byzantine, "trim_fraction": min((byzantine + 0.5) / max(clients, 1), 0.4999)}


def rejection_reason(exc: BaseException) -> str:
    """A rejection reason from an exception (peer text inside is cut and escaped by the recorder)."""
    return str(exc) if isinstance(exc, UpdateRejected) else f"{type(exc).__name__}: {exc}"


def _client_order(record: dict[str, Any]) -> tuple[int, int, str]:
    client = record["client_id"]
    return (0, client, "") if isinstance(client, int) else (1, 0, str(client))
