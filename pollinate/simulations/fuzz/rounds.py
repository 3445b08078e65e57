"""One round of a real server half per case (``fedpipe-round``, ``dense-round``): Flower's hooks driven with fabricated
Messages, honest peers beside one attacker whose reply is fuzzed, the verdict seen through the strategy's checks."""

from __future__ import annotations

import contextlib
import io
import math
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from rich.console import Console

from pollinate.common.checks import UpdateRejected
from pollinate.common.config_io import build_config
from pollinate.common.report import RunRecorder
from pollinate.common.wire import arrays_to_record, bytes_to_record, record_to_arrays
from pollinate.methods.fedavg_lora.server import FedAvgLora
from pollinate.methods.fedpipe.codec import encode_bundle
from pollinate.methods.fedpipe.planner import ClientPlan
from pollinate.methods.fedpipe.server import FedPipe, lora_keys
from pollinate.server.identity import NodeIdentity
from pollinate.simulations.fuzz.bundles import mutated_bundle, tensor_problems
from pollinate.simulations.fuzz.mutations import Mutator
from pollinate.simulations.fuzz.replies import mutated_reply


@contextlib.contextmanager
def flower_task_identity() -> Iterator[None]:
    """Flower's per-process task identity, which building a reply Message reads (a SuperNode sets it)."""
    names = ("_run_id", "_node_id", "_task_id")
    saved = {name: getattr(TaskIdentity, name) for name in names}
    for name, value in zip(names, (1, 1, 0), strict=True):
        setattr(TaskIdentity, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(TaskIdentity, name, value)


class _Discard(io.StringIO):
    def write(self, text: str) -> int:
        return len(text)


def _recorder(run_dir: Path) -> RunRecorder:
    """A recorder whose console renders every rejection as a run would (markup errors would raise) and drops it."""
    return RunRecorder(run_dir, {"rounds_planned": 1}, console=Console(file=_Discard(), width=120), quiet=True)


class _Grid:
    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)


class _ReplySpy:
    """Sees the verdict on each reply by wrapping a strategy's per-reply check (instance attributes only)."""

    def __init__(self, strategy: Any) -> None:
        self.verdicts: dict[int, list[Any]] = {}
        self.errors: dict[int, str] = {}

        def spied_check(server_round: int, node_id: int, msg: Message, first: bool) -> Any:
            self.verdicts.setdefault(node_id, []).append(verdict := check(server_round, node_id, msg, first))
            return verdict

        def spied_read(server_round: int, node_id: int, msg: Message, record: dict) -> Any:
            try:
                return read(server_round, node_id, msg, record)
            except UpdateRejected as exc:
                self.errors[node_id] = f"UpdateRejected({exc.reason})"
                raise
            except Exception as exc:
                self.errors[node_id] = f"caught {type(exc).__name__}"  # the strategy's catch-all path
                raise

        def spied_aggregate(server_round: int, replies: list) -> ArrayRecord:
            try:
                return aggregate(server_round, replies)
            except Exception as exc:
                self.aggregate_error = f"{type(exc).__name__}: {str(exc)[:200]}"  # the round is skipped
                raise

        self.aggregate_error = ""
        check, read, aggregate = strategy._check, strategy._read, strategy.aggregate
        strategy._check, strategy._read, strategy.aggregate = spied_check, spied_read, spied_aggregate


class _RoundTarget:
    """One round of a real server half per case: every node replies honestly but ``attacker``, whose reply is
    fuzzed; the case is judged by the verdict on that reply and by the new global state."""

    strategy: Any
    nodes: list[int]
    attacker: int

    def setup(self) -> None:
        self.spy, self.notes = _ReplySpy(self.strategy), Counter()

    def play(self, m: Mutator, server_round: int, arrays: ArrayRecord) -> tuple[str, str]:
        strategy, spy = self.strategy, self.spy
        spy.verdicts.clear()
        spy.errors.clear()
        spy.aggregate_error = ""
        rejected_before = len(strategy.recorder.rejected)
        replies = []
        for message in strategy.configure_train(server_round, arrays, ConfigRecord(), _Grid(self.nodes)):
            message.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # what the grid does when it pushes one
            node = message.metadata.dst_node_id
            replies += self.attack(m, message) if node == self.attacker else [self.honest(message)]
        new, _ = strategy.aggregate_train(server_round, replies)
        for node in self.nodes:
            if node != self.attacker and None in spy.verdicts.get(node, [None]):
                self.notes[f"honest node {node} rejected: {spy.errors.get(node, '?')}"] += 1
        accepted = [v for v in spy.verdicts.get(self.attacker, []) if v is not None]
        problems = [p for reply in accepted for p in self.problems(reply)]
        problems += self.global_problems(new) if new is not None else []
        if spy.aggregate_error:  # every reply passed its checks, yet the round could not be aggregated
            problems.append(f"aggregation failed: {spy.aggregate_error}")
        if problems:
            return "bad-accept", "; ".join(problems)[:300]
        if accepted:
            return "accepted", "valid"
        if len(strategy.recorder.rejected) > rejected_before:
            return "rejected", spy.errors.get(self.attacker, "error reply or duplicate")
        return "crash", "the attacker's reply was neither accepted nor recorded as rejected"

    def identity_problems(self, reply: Any, honest_clients: set[int]) -> list[str]:
        problems = [f"client id {reply.client_id!r} is an honest node's"] if reply.client_id in honest_clients else []
        n, cap = reply.num_examples, self.strategy.cfg.federation.max_examples_per_client
        if type(n) is not int or not 1 <= n <= cap:
            problems.append(f"num_examples {n!r} outside [1, {cap}]")
        bound = self.strategy.cfg.federation.update_norm_bound
        if not math.isfinite(reply.norm) or (bound and reply.norm > bound):
            problems.append(f"norm {reply.norm!r} over federation.update_norm_bound {bound:g}")
        return problems

    def repro(self) -> dict[str, Any]:
        return {}


class FedPipeRound(_RoundTarget):
    """The real FedPipe server half (tiny-llama), three planned clients of three modules; node 13 attacks with a
    fuzzed bundle (and, in a quarter of cases, fuzzed records around it)."""

    NODES = {11: 0, 12: 1, 13: 2}
    PLAN = {"model.layers.0.self_attn.q_proj": 4, "model.layers.1.self_attn.k_proj": 2,
            "model.layers.2.mlp.down_proj": 8}

    def __init__(self, run_dir: Path) -> None:
        cfg = build_config(None, ['model.name="tiny-llama"', 'method="fedpipe"', "federation.clients=3"])
        self.strategy = strategy = FedPipe(cfg, _recorder(run_dir), run_dir)
        strategy.plans = {c: ClientPlan(str(c), dict(self.PLAN), 2, 32, 1.0, 1.0, 1.0, 1.0)
                          for c in self.NODES.values()}
        strategy.node_client, strategy.identity = dict(self.NODES), NodeIdentity(dict(self.NODES))
        self.nodes, self.attacker, self.round = list(self.NODES), 13, 0
        self.shapes: dict[str, tuple[int, ...]] = {}
        for module, rank in self.PLAN.items():
            out_features, in_features = strategy.shapes[module]
            key_a, key_b = lora_keys(module)
            self.shapes[key_a], self.shapes[key_b] = (rank, in_features), (out_features, rank)
        self.setup()

    def case(self, m: Mutator) -> tuple[str, str]:
        self.round += 1
        return self.play(m, self.round, ArrayRecord())  # ΔW = 0 each time: cases do not compound

    def _metrics(self, message: Message) -> dict[str, Any]:
        return {"client_id": self.NODES[message.metadata.dst_node_id], "num-examples": 10, "train_loss": 1.0}

    def honest(self, message: Message) -> Message:
        client = self.NODES[message.metadata.dst_node_id]
        rng = np.random.default_rng(client)
        deltas = {k: rng.normal(0.0, 0.01, s).astype(np.float32) for k, s in self.shapes.items()}
        payload = encode_bundle(deltas, "nf4", base_version=self.strategy.held_version[client])
        content = RecordDict({"arrays": bytes_to_record(payload), "metrics": MetricRecord(self._metrics(message))})
        return Message(content, reply_to=message)

    def attack(self, m: Mutator, message: Message) -> list[Message]:
        payload = mutated_bundle(m, self.shapes, self.strategy.held_version[self.NODES[self.attacker]])
        edits = 0 if m.chance(0.75) else None
        return mutated_reply(m, {"payload": np.frombuffer(payload, np.uint8)}, self._metrics(message), message, edits)

    def problems(self, reply: Any) -> list[str]:
        problems = self.identity_problems(reply, {0, 1}) + tensor_problems(reply.update, self.shapes)
        start, bound = self.strategy.round_starts[reply.client_id], self.strategy.cfg.fedpipe.norm_bound
        if not problems:
            norm = math.sqrt(sum(float(np.sum(np.square(reply.update[k] - start[k], dtype=np.float64)))
                                 for k in start))
            if not norm <= bound * (1 + 1e-6):
                problems.append(f"delta L2 norm {norm:.3g} over fedpipe.norm_bound {bound:g}")
        return problems

    def global_problems(self, new: ArrayRecord) -> list[str]:
        problems, rank = [], self.strategy.cfg.fedpipe.global_rank
        for module, f in self.strategy.global_factors(new).items():
            out_features, in_features = self.strategy.shapes[module]
            if f.a.shape[1] != in_features or f.b.shape != (out_features, f.a.shape[0]) or f.a.shape[0] > rank:
                problems.append(f"global '{module}' has factors {f.a.shape} and {f.b.shape}")
            elif not (np.isfinite(f.a).all() and np.isfinite(f.b).all()):
                problems.append(f"global '{module}' holds NaN or Inf")
        return problems


class DenseRound(_RoundTarget):
    """The real fedavg-lora server half (tiny-llama, five clients); fedavg-full and sfprompt check replies with the
    same ``StateFedAvg.decode_reply``. Identity as in simulation: bound on first contact (honest nodes first)."""

    def __init__(self, run_dir: Path) -> None:
        cfg = build_config(None, ['model.name="tiny-llama"', 'method="fedavg-lora"', "federation.clients=5"])
        torch.manual_seed(0)
        self.strategy = FedAvgLora(cfg, _recorder(run_dir), run_dir)
        self.nodes, self.attacker = [101, 102, 103, 104, 105], 105
        self.arrays = self.strategy.initial_arrays()
        self.base = record_to_arrays(self.arrays)
        self.setup()

    def case(self, m: Mutator) -> tuple[str, str]:
        self.strategy.identity = NodeIdentity()
        for client, node in enumerate(self.nodes[:-1]):
            self.strategy.identity.resolve(node, client)
        return self.play(m, 1, self.arrays)

    def _state(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        return {k: (v + rng.normal(0.0, 0.01, v.shape)).astype(np.float32) for k, v in self.base.items()}

    def honest(self, message: Message) -> Message:
        client = self.nodes.index(message.metadata.dst_node_id)
        metrics = MetricRecord({"client_id": client, "num-examples": 100, "train_loss": 1.0})
        return Message(RecordDict({"arrays": arrays_to_record(self._state(np.random.default_rng(client))),
                                   "metrics": metrics}), reply_to=message)

    def attack(self, m: Mutator, message: Message) -> list[Message]:
        return mutated_reply(m, self._state(m.rng), {"client_id": 4, "num-examples": 100, "train_loss": 1.0}, message)

    def problems(self, reply: Any) -> list[str]:
        problems = self.identity_problems(reply, {0, 1, 2, 3}) + tensor_problems(reply.update, self.strategy.shapes)
        if not problems:
            norm = math.sqrt(sum(float(np.sum(np.square(v.astype(np.float64) - self.base[k])))
                                 for k, v in reply.update.items()))
            if not abs(norm - reply.norm) <= 1e-6 * max(1.0, norm):
                problems.append(f"update norm {norm:.6g}, the strategy measured {reply.norm:.6g}")
        return problems

    def global_problems(self, new: ArrayRecord) -> list[str]:
        return tensor_problems(record_to_arrays(new), self.strategy.shapes)
