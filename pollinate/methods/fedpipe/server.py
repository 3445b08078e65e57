"""fedpipe, server half: plan per client, send compressed factor deltas, aggregate heterogeneous ranks exactly.

Round 0 (``prepare``): every client reports its resource profile, importance scores, its examples' token lengths
and a measured training step (``round_zero``); the server combines the scores (weighted by examples) and the
planner picks, per client, the modules, LoRA ranks, batch size and base bits that fit its memory and the round
deadline, with its speed corrected by its measured step (``calibration``). A client nothing fits for is left out,
with the planner's message (its budget and the minimum it needs) in the report. After each round a client whose
round ran over the deadline or whose compute missed the estimate is re-planned (``plan_book``); its report
record carries ``estimated_compute_seconds`` next to the measured ``compute_seconds``.

Each round: the global ΔW of every module is kept in factored form (``b @ a``, rank ≤ ``global_rank``). Client k
gets, per planned module, the best rank-r_k factorisation of the global ΔW (SVD of the small core) — zero modules
get a fresh peft-style init — encoded as a delta against the factors it holds (first time: in full). Its reply is
the compressed delta of its trained factors. Aggregation is FedAvg in update space, exact for any mix of ranks:
``ΔW ← ΔW + Σ_k q_k s_k (B'_k A'_k − B⁰_k A⁰_k)`` with ``q_k`` the example weights of the clients that adapted
the module (stacked factors, then re-projected; the truncation error is logged per round). Norm bounds and the
robust aggregators work on the same ΔW_k (``update_space``).

A classifier (encoder) also trains its head in full (``head``): every planned client gets the global head with
its factors, in the same bundle, and returns its change; the head is aggregated by ``federation.aggregator``
(example-weighted FedAvg) and evaluated with the server's model, its pooling included.

After each round the clients that trained evaluate the new global model on their held-out examples: the whole
global state in one bundle (``global_model``). ``privacy.dp``: central DP clips, averages and noises the updates in
the same update space (``central_dp``); local DP clips and noises each client's factor change on the client.

A client is the node that sent its replies (``NodeIdentity``), from round 0 on: a second node naming a planned
client's id is refused, in round 0 and after.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from pollinate.common.adapters import head_module_names
from pollinate.common.config import ConfigError, RunConfig
from pollinate.common.models import FAMILY_ALL_LINEAR, load_model
from pollinate.common.pooling import resolve_pooling
from pollinate.common.report import RunRecorder
from pollinate.common.seeds import derive_seed
from pollinate.common.wire import arrays_to_record, bytes_to_record, record_to_arrays, record_to_bytes
from pollinate.methods.fedpipe import central_dp, global_model, head, update_space
from pollinate.methods.fedpipe.codec import decode_bundle, encode_bundle
from pollinate.methods.fedpipe.factors import LORA_ALPHA_PER_RANK, factors_for_client, lora_keys
from pollinate.methods.fedpipe.lowrank import LoraFactors, apply_weighted_updates
from pollinate.methods.fedpipe.peft_adapter import save_adapter
from pollinate.methods.fedpipe.plan_book import PlanBook
from pollinate.methods.fedpipe.plan_table import plan_summary
from pollinate.methods.fedpipe.planner import ClientPlan, combine_importance, model_spec_from_model
from pollinate.methods.fedpipe.round_zero import PrepareReply, read_prepare_reply
from pollinate.server import robust
from pollinate.server.deployment import Deployment
from pollinate.server.evaluation import ServerEvaluator
from pollinate.server.privacy import ServerPrivacy
from pollinate.server.strategy import PollinateStrategy, Reply, UpdateRejected, rejection_reason


class FedPipe(PollinateStrategy):
    """FedPipe server half; parameters in ``[fedpipe]``, ``[federation]`` (scenario, deadline) and ``[train]``."""

    def __init__(self, cfg: RunConfig, recorder: RunRecorder, run_dir: Path, deployment: Deployment | None = None):
        super().__init__(cfg, recorder, run_dir, deployment)
        if cfg.federation.server_optimizer != "fedavg":  # ΔW is kept factored; no optimizer steps it yet
            raise ConfigError(f"federation.server_optimizer = {cfg.federation.server_optimizer!r}: method "
                              "'fedpipe' supports only 'fedavg' (the aggregate is the new global ΔW)")
        self.privacy = ServerPrivacy.for_run(cfg, self.min_train_nodes)  # None without DP
        self.evaluator = ServerEvaluator(cfg)
        self.task, path = self.evaluator.task.task_type, self.evaluator.model_path
        self.head_modules = head_module_names(self.task, resolve_pooling(cfg.model.pooling, path))
        if self.head_modules:  # the initial head is a function of the seed (clients score with the same one)
            torch.manual_seed(cfg.federation.seed)
        self.model = load_model(path, self.task, self.evaluator.num_labels, pooling=cfg.model.pooling)
        self.head_weights = head.head_parameters(self.model, self.head_modules)
        self.initial_head = head.head_arrays(self.head_weights)
        self.spec = model_spec_from_model(self.model, cfg.fedpipe.candidate_modules
                                          or FAMILY_ALL_LINEAR[self.evaluator.family], self.head_modules)
        self.shapes = {m.name: (m.out_features, m.in_features) for m in self.spec.modules}
        modules = dict(self.model.named_modules())
        self.base_weights = {name: modules[name].weight.detach().clone() for name in self.shapes}
        self.book = PlanBook(cfg, self.spec, recorder)
        self.node_client: dict[int, int] = {}
        self.held: dict[int, dict[str, np.ndarray]] = {}  # what each client holds (server's exact view)
        self.held_version: dict[int, int] = {}
        self.round_starts: dict[int, dict[str, np.ndarray]] = {}
        self.importance: dict[str, float] = {}
        self.truncation: float = 0.0
        self._eval_payload: tuple[int, bytes] | None = None  # (round, the global state as clients evaluate it)

    @property
    def plans(self) -> dict[int, ClientPlan]:
        """Each planned client's current plan (``PlanBook``)."""
        return self.book.plans

    @plans.setter
    def plans(self, plans: dict[int, ClientPlan]) -> None:
        self.book.plans = plans

    # --- round 0: profiles, importance, plans ---------------------------------------------------------
    def prepare(self, grid: Grid) -> None:
        sample_nodes(grid, self.min_available_nodes, self.min_available_nodes)  # waits until enough joined
        self._prepare_nodes(grid, list(grid.get_node_ids()), server_round=0)
        if not self.plans:
            raise RuntimeError("no client could be planned in FedPipe's round 0 (see 'rejected' in metrics.jsonl)")

    def begin_round(self, grid: Grid, server_round: int) -> None:
        """Clients whose last round missed its plan are re-planned (``PlanBook.review``); nodes seen for the first
        time (joined late, or rejoined with a new node id) are profiled, scored and planned against the run's
        importance map before they get a training message."""
        self.round_starts = {}  # filled per client as this round's messages are built
        for client in self.book.review(self.importance, server_round):
            self._forget_held(client)
        new_nodes = [n for n in grid.get_node_ids() if n not in self.node_client]
        if new_nodes and self.importance:
            self._prepare_nodes(grid, new_nodes, server_round)

    def _prepare_nodes(self, grid: Grid, node_ids: list[int], server_round: int) -> None:
        """Ask ``node_ids`` for profile, importance scores, token lengths and a measured step; the first call fixes
        the run's importance map."""
        config = ConfigRecord({"server-round": server_round, "run-config": self.client_config})
        messages = [Message(content=RecordDict({"config": config}), dst_node_id=n, message_type="train.prepare")
                    for n in node_ids]
        replies: list[PrepareReply] = []
        for reply in grid.send_and_receive(messages, timeout=self.cfg.federation.round_timeout_s):
            node_id = reply.metadata.src_node_id
            if reply.has_error():
                self.recorder.reject(server_round, f"node-{node_id}", f"prepare failed: {reply.error.reason}")
                continue
            try:  # a malformed reply is that node's rejection, never the run's end
                read = read_prepare_reply(reply.content, node_id, self.identity, set(self.shapes), self.cfg)
            except Exception as exc:  # noqa: BLE001
                self.recorder.reject(server_round, f"node-{node_id}", f"prepare reply: {rejection_reason(exc)}")
                continue
            self.node_client[node_id] = read.client_id
            replies.append(read)
        if not replies:
            return
        if not self.importance:
            self.importance = combine_importance([r.scores for r in replies], [float(r.examples) for r in replies])
        self.book.plan_new(replies, self.importance, server_round)
        for reply in replies:  # a re-planned client starts from a full download
            self._forget_held(reply.client_id)

    def _forget_held(self, client: int) -> None:
        """The client's next download is in full (its plan's factor shapes may have changed)."""
        self.held.pop(client, None)
        self.held_version.pop(client, None)

    # --- per-round exchange -----------------------------------------------------------------------------
    def initial_arrays(self) -> ArrayRecord:
        if self.initial_head:  # a classifier starts from its (seeded) fresh head
            return arrays_to_record(head.prefixed(self.initial_head))
        return ArrayRecord()  # ΔW = 0 everywhere before round 1

    @staticmethod
    def global_factors(arrays: ArrayRecord) -> dict[str, LoraFactors]:
        return global_model.global_factors(record_to_arrays(arrays))

    @staticmethod
    def global_head(arrays: ArrayRecord) -> dict[str, np.ndarray]:
        """The global head under its peft keys (empty for a generation model)."""
        return head.split_global(record_to_arrays(arrays))[1]

    def train_content(self, node_id: int, server_round: int, arrays: ArrayRecord,
                      config: ConfigRecord) -> RecordDict | None:
        client = self.node_client.get(node_id)
        plan = self.plans.get(client) if client is not None else None
        if plan is None:
            return None  # not planned (joined late or fits nothing): left out of training
        current = self.global_factors(arrays)
        seed = derive_seed(self.cfg.federation.seed, "server-round", server_round)
        target: dict[str, np.ndarray] = {}
        for module, rank in plan.ranks.items():
            factors = factors_for_client(current.get(module), module, rank, self.shapes[module], seed)
            key_a, key_b = lora_keys(module)
            target[key_a], target[key_b] = factors.a.astype(np.float32), factors.b.astype(np.float32)
        target.update(self.global_head(arrays))
        payload = self._encode_downlink(client, target)
        dp = self.privacy.train_config_entries() if self.privacy is not None else {}  # local DP: C and σ
        plan_json = json.dumps({"ranks": plan.ranks, "bits": plan.bits, "batch_size": plan.batch_size,
                                "local_steps": plan.local_steps, **dp})
        config = ConfigRecord({**dict(config), "plan": plan_json})
        return RecordDict({"arrays": bytes_to_record(payload), "config": config})

    def _encode_downlink(self, client: int, target: dict[str, np.ndarray]) -> bytes:
        """Delta against what the client holds (in full the first time); the server decodes its own payload so
        its view of the client's factors is exactly what the client will compute."""
        fp = self.cfg.fedpipe
        held, version = self.held.get(client), self.held_version.get(client, 0)
        as_delta = held is not None and version > 0 and held.keys() == target.keys()
        tensors = {k: target[k] - held[k] for k in target} if as_delta else target
        payload = encode_bundle(tensors, fp.downlink_encoding, base_version=version if as_delta else 0,
                                version=version + 1, topk_fraction=fp.topk_fraction, block_size=fp.block_size)
        decoded = decode_bundle(payload).tensors
        start = {k: (held[k] + decoded[k] if as_delta else decoded[k]).astype(np.float32) for k in target}
        self.held[client], self.held_version[client] = start, version + 1
        self.round_starts[client] = start
        return payload

    def decode_reply(self, server_round: int, client_id: int, content: RecordDict) -> dict[str, np.ndarray]:
        """The client's trained factors: what it was sent this round plus its decoded, checked delta."""
        start = self.round_starts.get(client_id)
        if start is None:
            raise UpdateRejected(f"client {client_id} sent an update but was not sent a plan this round")
        fp = self.cfg.fedpipe
        bundle = decode_bundle(record_to_bytes(content["arrays"]),
                               expected_shapes={k: v.shape for k, v in start.items()}, require_all=True,
                               max_bytes=fp.max_update_bytes, norm_bound=fp.norm_bound)
        if bundle.base_version != self.held_version.get(client_id):
            raise UpdateRejected(f"update is against version {bundle.base_version}, the server sent "
                                 f"{self.held_version.get(client_id)}")
        return {k: start[k] + bundle.tensors[k] for k in start}

    def module_changes(self, client_id: int, trained: dict[str, np.ndarray]) -> dict[str, tuple[LoraFactors,
                                                                                                LoraFactors]]:
        """``{module: (start, trained)}`` factors of one client's planned modules this round."""
        start, changes = self.round_starts[client_id], {}
        for module, rank in self.plans[client_id].ranks.items():
            key_a, key_b = lora_keys(module)
            alpha = LORA_ALPHA_PER_RANK * rank
            changes[module] = (LoraFactors(a=start[key_a], b=start[key_b], alpha=alpha),
                               LoraFactors(a=trained[key_a], b=trained[key_b], alpha=alpha))
        return changes

    def head_change(self, client_id: int, trained: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One client's change of the head this round (empty for a generation model)."""
        return head.head_change(self.round_starts[client_id], trained, list(self.initial_head))

    def change_pairs(self, client_id: int, update: dict[str, np.ndarray]) -> dict[str, update_space.FactorPair]:
        """The client's whole change as factor pairs: ΔW_k per module, and each head tensor's change."""
        pairs = {m: update_space.factor_pair(*p) for m, p in self.module_changes(client_id, update).items()}
        for key, change in self.head_change(client_id, update).items():
            pairs[head.HEAD_PREFIX + key] = update_space.dense_pair(change)
        return pairs

    def update_norm(self, client_id: int, update: dict[str, np.ndarray]) -> float:
        """``‖ΔW_k‖_F`` over the client's modules (and its head's change), from its factors."""
        return update_space.update_norm(self.change_pairs(client_id, update))

    def aggregate(self, server_round: int, replies: list[Reply]) -> ArrayRecord:
        """FedAvg (exact, per module over its adapters); Krum/Multi-Krum: the same over the clients they select,
        equally weighted; median/trimmed mean: per module on the dense ΔW_k (see ``update_space``). A classifier's
        head: the global head plus the clients' changes combined the same way. Central DP: ``central_dp``; local
        DP: as without, the clients' clipping noted."""
        if self.privacy is not None and self.privacy.mode == "central":
            return self._private_aggregate(server_round, replies)
        if self.privacy is not None:
            self.privacy.note_local(server_round, [reply.content["metrics"] for reply in replies])
        aggregator, byzantine = self.cfg.federation.aggregator, self.cfg.federation.byzantine_clients
        weights = [float(reply.num_examples) for reply in replies]
        if aggregator in ("krum", "multi-krum"):
            pairs = [self.change_pairs(r.client_id, r.update) for r in replies]
            keep = 1 if aggregator == "krum" else len(replies) - byzantine
            chosen = robust.krum_select(update_space.distance_embedding(pairs), byzantine, keep)
            replies, weights = [replies[i] for i in chosen], [1.0] * len(chosen)
        per_module: dict[str, list[tuple[float, LoraFactors, LoraFactors]]] = {}
        for reply, weight in zip(replies, weights, strict=True):
            for module, (start, trained) in self.module_changes(reply.client_id, reply.update).items():
                per_module.setdefault(module, []).append((weight, start, trained))
        current = self.global_factors(self.global_arrays)
        state: dict[str, np.ndarray] = {}
        dropped_sq = 0.0
        for module in sorted(set(current) | set(per_module)):
            if module in per_module:
                new, dropped = self._combine_module(current.get(module), per_module[module])
                dropped_sq += float(np.sum(dropped ** 2))
            else:
                new = current[module]
            state[f"{module}.a"], state[f"{module}.b"] = new.a.astype(np.float32), new.b.astype(np.float32)
        if self.initial_head:
            state.update(head.prefixed(self._aggregate_head(replies, weights)))
        self.truncation = math.sqrt(dropped_sq)
        self.recorder.event("aggregate", round=server_round, truncation_error=self.truncation,
                            modules=len(per_module))
        return arrays_to_record(state)

    def _private_aggregate(self, server_round: int, replies: list[Reply]) -> ArrayRecord:
        """Central DP over every module of the run's plans and the head (``central_dp``)."""
        modules = sorted({module for plan in self.plans.values() for module in plan.ranks})
        shapes = {**{m: self.shapes[m] for m in modules},
                  **{head.HEAD_PREFIX + key: value.shape for key, value in self.initial_head.items()}}
        state, self.truncation = central_dp.private_aggregate(
            self.privacy, server_round, [self.change_pairs(r.client_id, r.update) for r in replies], shapes,
            self.global_factors(self.global_arrays), self.global_head(self.global_arrays), self.cfg.fedpipe.global_rank)
        self.recorder.event("aggregate", round=server_round, truncation_error=self.truncation, modules=len(modules))
        return arrays_to_record(state)

    def _combine_module(self, current: LoraFactors | None,
                        updates: list[tuple[float, LoraFactors, LoraFactors]]) -> tuple[LoraFactors, np.ndarray]:
        if self.cfg.federation.aggregator in ("median", "trimmed-mean"):
            changes = [update_space.factor_pair(start, trained) for _, start, trained in updates]
            return update_space.combine_module(current, changes, [w for w, _, _ in updates], self.combine,
                                               self.cfg.fedpipe.global_rank)
        return apply_weighted_updates(current, updates, self.cfg.fedpipe.global_rank)

    def _aggregate_head(self, replies: list[Reply], weights: list[float]) -> dict[str, np.ndarray]:
        """Global head + the clients' changes by ``federation.aggregator`` (the clients Krum chose: their mean)."""
        changes = [self.head_change(reply.client_id, reply.update) for reply in replies]
        if self.cfg.federation.aggregator in ("krum", "multi-krum"):
            combined = robust.aggregate("fedavg", changes, weights)
        else:
            combined = self.combine(changes, weights)
        current = self.global_head(self.global_arrays)
        return {k: (current[k].astype(np.float64) + combined[k]).astype(np.float32) for k in current}

    def evaluate_content(self, node_id: int, server_round: int, arrays: ArrayRecord) -> RecordDict | None:
        """The new global state for a client to evaluate on its held-out examples (``client.evaluate``): every
        module's global factors and the head in one bundle (``global_model.encode_global``: the downlink's
        encoding, fp16 where that one drops entries), encoded once per round."""
        if self._eval_payload is None or self._eval_payload[0] != server_round:
            self._eval_payload = (server_round, global_model.encode_global(record_to_arrays(arrays), self.cfg.fedpipe))
        config = ConfigRecord({"server-round": server_round, "run-config": self.client_config})
        return RecordDict({"arrays": bytes_to_record(self._eval_payload[1]), "config": config})

    def round_fields(self) -> dict[str, Any]:
        """``privacy`` (ε, δ, σ, clip norm, clipped fraction) of a run with DP; nothing otherwise."""
        return {} if self.privacy is None else {"privacy": self.privacy.take_round_record()}

    def client_record(self, client_id: int, content: RecordDict, bytes_up: int, bytes_down: int) -> dict[str, Any]:
        """The plan's estimates (``estimated_compute_seconds`` beside the measured ``compute_seconds``); the measured
        timing is kept for the next round's check of the plan."""
        record = super().client_record(client_id, content, bytes_up, bytes_down)
        record.update(self.book.estimate_fields(record["client_id"]))
        self.book.observe(record["client_id"], self.profile_timing(content, bytes_up, bytes_down))
        return record

    # --- evaluation and the final adapter --------------------------------------------------------------
    @torch.no_grad()
    def _merge_into_base(self, arrays: ArrayRecord) -> None:
        """Evaluate by writing W₀ + ΔW into the server's fp32 copy (no adapter layers needed), as clients do."""
        modules = dict(self.model.named_modules())
        for name, weight in self.base_weights.items():
            modules[name].weight.copy_(weight)
        global_model.add_global_delta(self.model, self.global_factors(arrays))

    def evaluate_global(self, arrays: ArrayRecord) -> dict[str, Any]:
        self._merge_into_base(arrays)
        if self.head_weights:
            head.load_head(self.head_weights, self.global_head(arrays))
        return self.evaluator.evaluate(self.model)

    def save_final(self, arrays: ArrayRecord) -> dict[str, Any]:
        """The global ΔW as a PEFT LoRA adapter (``peft_adapter``: per-module rank, alpha = rank so scaling is 1),
        with a classifier's head as its ``modules_to_save``."""
        extra = {"plans": {str(c): plan_summary(p) for c, p in self.plans.items()},
                 "importance": self.importance, "truncation_error": self.truncation}
        base = functools.partial(load_model, self.evaluator.model_path, self.task, self.evaluator.num_labels,
                                 pooling=self.cfg.model.pooling)
        adapter_dir = save_adapter(record_to_arrays(arrays), self.head_modules, self.task, base,
                                   self.run_dir / "adapter")
        return {"adapter_dir": adapter_dir, "fedpipe": extra}


def make_strategy(cfg: RunConfig, recorder: RunRecorder, run_dir: Path,
                  deployment: Deployment | None = None) -> FedPipe:
    return FedPipe(cfg, recorder, run_dir, deployment)
