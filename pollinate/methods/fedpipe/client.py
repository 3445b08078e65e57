"""fedpipe, client half (Fang et al. 2024, "Automated Federated Pipeline for PEFT of LLMs").

prepare (round 0): report this client's resource profile and importance scores of every candidate weight
matrix — mean |W ⊙ ∂L/∂W| over a few local batches (gradient sensitivity, as in AdaLoRA/FedPipe) — and what a
step costs on it: its examples' token lengths and, with ``fedpipe.measure_step``, a measured step (``step_probe``).
train (each round): build the planned model once (base quantized to the planned bits, kept per process; a
LoRA adapter with the planned modules and per-module ranks), apply the server's compressed delta to the
factors this client holds, train, and send back the compressed delta of the trained factors with error
feedback (with local DP the change is clipped and noised first: ``privatize_delta``).
evaluate (after a round it trained in): the global model, rebuilt on an fp32 base, on the held-out examples.
Per-client state that must survive rounds (factors held, residuals) lives in ``context.state``,
because in simulation a process may serve a different virtual client each round.
A classifier also trains its head in full (peft ``modules_to_save``, left unquantized): it is part of the
adapter state, so it arrives, trains and travels back with the factors.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from pollinate.client import runtime
from pollinate.common.adapters import adapter_state, head_module_names, load_adapter_state, peft_lora_config
from pollinate.common.config import RunConfig
from pollinate.common.data import ExampleStream
from pollinate.common.models import FAMILY_ALL_LINEAR, model_device, resolve_model
from pollinate.common.pooling import resolve_pooling
from pollinate.common.privacy import DP_CLIPPED_METRIC, add_noise, clip_update, read_local_dp
from pollinate.common.seeds import derive_seed
from pollinate.common.wire import bytes_to_record, record_to_arrays, record_to_bytes
from pollinate.methods.fedpipe.codec import ErrorFeedback, decode_bundle
from pollinate.methods.fedpipe.global_model import load_global
from pollinate.methods.fedpipe.planner.spec import model_spec_from_model
from pollinate.methods.fedpipe.step_probe import measured_step, token_summary

HELD_KEY, RESIDUAL_KEY, VERSION_KEY = "fedpipe.held", "fedpipe.residual", "fedpipe.version"


def candidate_names(model: torch.nn.Module, suffixes: list[str]) -> list[str]:
    """Full names of the linear layers whose name ends with one of ``suffixes`` (peft's matching rule)."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and any(name == s or name.endswith("." + s) for s in suffixes):
            names.append(name)
    return names


def importance_scores(model: torch.nn.Module, batches: ExampleStream, names: list[str],
                      num_batches: int) -> dict[str, float]:
    """Mean |W ⊙ ∇W| per candidate matrix over ``num_batches`` batches (weights restored to frozen after)."""
    modules = dict(model.named_modules())
    weights = {name: modules[name].weight for name in names}
    flags = {name: w.requires_grad for name, w in weights.items()}
    for w in weights.values():
        w.requires_grad_(True)
    scores = dict.fromkeys(names, 0.0)
    model.train()
    try:
        for _ in range(num_batches):
            model.zero_grad(set_to_none=True)
            batch = {k: v.to(model_device(model)) for k, v in batches.next_batch().items()}
            model(**batch).loss.backward()
            for name, w in weights.items():
                scores[name] += float((w.detach() * w.grad).abs().mean()) / num_batches
    finally:
        for name, w in weights.items():
            w.grad = None
            w.requires_grad_(flags[name])
    return scores


def prepare(msg: Message, cfg: RunConfig, context: Context) -> RecordDict:
    node_config = dict(context.node_config)
    data = runtime.local_data(cfg, node_config)
    info = resolve_model(cfg.model.name)
    if data.task_type != "generation":  # score through the server's initial head (seeded the same way)
        torch.manual_seed(cfg.federation.seed)
    base = runtime.base_model(cfg, data.num_labels, tag="fedpipe-score")
    targets = cfg.fedpipe.candidate_modules or FAMILY_ALL_LINEAR[info.family]
    names = candidate_names(base, targets)
    runtime.seed_everything(cfg, 0, data.client_id)
    batches = ExampleStream(data.encoded, cfg.train.batch_size, runtime.tokenizer_for(cfg).pad_token_id,
                            seed=derive_seed(cfg.federation.seed, "client-scoring-batches", data.client_id))
    scores = importance_scores(base, batches, names, cfg.fedpipe.score_batches)
    spec = model_spec_from_model(base, targets, runtime.head_modules_for(cfg))
    del base  # scoring is one-off: free the fp32 copy before the measured step loads its own
    runtime.drop_cached(("base",), tag="fedpipe-score")
    content = RecordDict({
        "scores": MetricRecord(scores),
        "profile": ConfigRecord(runtime.client_profile(cfg, node_config).to_dict()),
        "metrics": MetricRecord({"num-examples": data.num_examples, "client_id": data.client_id}),
        "tokens": token_summary(data),
    })
    step = measured_step(cfg, node_config, data, spec, planned_model) if cfg.fedpipe.measure_step else None
    if step is not None:
        content["measured_step"] = step
    return content


def _plan(msg: Message) -> dict[str, Any]:
    plan = json.loads(str(msg.content["config"]["plan"]))
    for key in ("ranks", "bits", "batch_size"):
        if key not in plan:
            raise ValueError(f"FedPipe plan from the server has no '{key}'")
    return plan


def planned_model(cfg: RunConfig, plan: dict[str, Any], num_labels: int, client_id: int,
                  adapter_name: str | None = None):
    """The base at the planned bits (one per process and bits) with this client's adapter (default name: per client
    and ranks; ``adapter_name`` names another) active on it (and a classifier's head, trained in full)."""
    from peft import PeftModel, get_peft_model

    info = resolve_model(cfg.model.name)
    _, task = runtime.model_task(cfg)
    heads = head_module_names(task, resolve_pooling(cfg.model.pooling, info.path))
    bits = int(plan["bits"])

    def build_base():
        if bits >= 32:
            return runtime.base_model(cfg, num_labels, tag="fedpipe-32")
        from pollinate.common.quantize import load_quantized_base

        path, task = runtime.model_task(cfg)
        # transformers matches a skipped name from the start of a module's name or as its suffix: a head's nested
        # linears (bert.pooler.dense under "pooler") need the name anywhere at a module boundary to stay fp32
        skip = [rf"(?:.*\.)?{re.escape(name)}" for name in heads]
        return load_quantized_base(path, task, num_labels, bits, skip, pooling=cfg.model.pooling)

    base = runtime.cached(("fedpipe-base", bits, num_labels), build_base)
    ranks = {name: int(r) for name, r in plan["ranks"].items()}
    config = peft_lora_config(
        cfg.lora, info.family, task, target_modules=sorted(ranks),
        rank_pattern={re.escape(n): r for n, r in ranks.items()},
        alpha_pattern={re.escape(n): 2.0 * r for n, r in ranks.items()}, head_modules=heads,
    )
    adapter = adapter_name or (f"client{client_id}-"
                               + hashlib.sha1(json.dumps(ranks, sort_keys=True).encode()).hexdigest()[:10])
    key = ("fedpipe-peft", bits, num_labels)
    model = runtime.cached_or_none(key)
    if model is None:
        model = runtime.cached(key, lambda: get_peft_model(base, config, adapter_name=adapter))
    elif adapter not in model.peft_config:
        model.add_adapter(adapter, config)
    assert isinstance(model, PeftModel)
    model.set_adapter(adapter)
    return model, adapter


def _load_state_arrays(context: Context, key: str) -> dict[str, np.ndarray]:
    return record_to_arrays(context.state[key]) if key in context.state.array_records else {}


def _store_state_arrays(context: Context, key: str, arrays: dict[str, np.ndarray]) -> None:
    from pollinate.common.wire import arrays_to_record

    context.state[key] = arrays_to_record(arrays)


def _held_version(context: Context) -> int:
    if VERSION_KEY in context.state.config_records:
        return int(context.state[VERSION_KEY]["version"])
    return 0


def apply_downlink(context: Context, payload: bytes, shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """The server sends new factors as a delta against the version this client holds (0 = full)."""
    bundle = decode_bundle(payload, expected_shapes=shapes, require_all=True)
    held = _load_state_arrays(context, HELD_KEY)
    if bundle.base_version != 0 and bundle.base_version != _held_version(context):
        raise ValueError(f"server delta is against version {bundle.base_version}, this client holds "
                         f"{_held_version(context)}")
    if bundle.base_version == 0:
        start = {k: v.astype(np.float32) for k, v in bundle.tensors.items()}
    else:
        start = {k: (held[k] + bundle.tensors[k]).astype(np.float32) for k in bundle.tensors}
    _store_state_arrays(context, HELD_KEY, start)
    context.state[VERSION_KEY] = ConfigRecord({"version": bundle.version})
    return start


def train(msg: Message, cfg: RunConfig, context: Context) -> RecordDict:
    server_round = int(msg.content["config"]["server-round"])
    node_config = dict(context.node_config)
    data = runtime.local_data(cfg, node_config)
    plan = _plan(msg)
    model, adapter = planned_model(cfg, plan, data.num_labels, data.client_id)
    shapes = {k: v.shape for k, v in adapter_state(model, adapter).items()}
    start = apply_downlink(context, record_to_bytes(msg.content["arrays"]), shapes)
    load_adapter_state(model, start, adapter)

    stats = runtime.local_training(cfg, data, model, server_round, batch_size=int(plan["batch_size"]),
                                   steps=int(plan.get("local_steps") or cfg.train.local_steps))
    trained = adapter_state(model, adapter)
    delta = {k: trained[k] - start[k] for k in trained}
    delta, dp_metrics = privatize_delta(delta, plan, cfg.federation.seed, server_round, data.client_id)

    feedback = ErrorFeedback(_load_state_arrays(context, RESIDUAL_KEY) if cfg.fedpipe.error_feedback else {})
    payload = feedback.encode(delta, cfg.fedpipe.uplink_encoding, base_version=_held_version(context),
                              round=server_round, topk_fraction=cfg.fedpipe.topk_fraction,
                              block_size=cfg.fedpipe.block_size)
    if cfg.fedpipe.error_feedback:
        _store_state_arrays(context, RESIDUAL_KEY, feedback.residuals)
    return runtime.training_reply(cfg, node_config, data, stats, bytes_to_record(payload),
                                  residual_norm=feedback.residual_norm(), **dp_metrics)


def privatize_delta(delta: dict[str, np.ndarray], plan: dict[str, Any], run_seed: int, server_round: int,
                    client_id: int) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Local DP, when the plan carries a clip norm and σ (``privacy.dp = "local"``): this round's change of the
    factors and the head (the vector this client sends) clipped to L2 norm C and noised with N(0, (σC)²) per entry,
    seeded per (run seed, round, client), before error feedback and compression: both are then post-processing,
    and the residual error feedback keeps is computed from the noised change. It is the factor change, not ΔW, that
    is clipped and noised: a noised ΔW is a dense (out, in) matrix that rank-r factors cannot carry. Returns the
    change (as given without local DP) and the reply's ``dp_clipped`` metric (none without local DP)."""
    asked = read_local_dp(plan)
    if asked is None:
        return delta, {}
    clip_norm, noise_multiplier = asked
    clipped, was_clipped = clip_update(delta, {k: np.zeros_like(v) for k, v in delta.items()}, clip_norm)
    rng = np.random.default_rng(derive_seed(run_seed, "client-dp-noise", server_round, client_id))
    return add_noise(clipped, noise_multiplier * clip_norm, rng), {DP_CLIPPED_METRIC: int(was_clipped)}


EVAL_TAG = "fedpipe-eval"


def evaluate(msg: Message, cfg: RunConfig, context: Context) -> RecordDict:
    """The global model on this client's held-out examples: W₀ + the global ΔW of every module the run adapts and a
    classifier's global head (the message's bundle, ``global_model``), rebuilt on an fp32 copy of the base (the
    model the server evaluates, not this client's quantized training base), loaded for the evaluation and freed
    after it, since the plan sized this client's memory for its training model alone."""
    data = runtime.local_data(cfg, dict(context.node_config))
    if not data.eval_encoded:
        return runtime.evaluation_reply(cfg, data)
    model = runtime.base_model(cfg, data.num_labels, tag=EVAL_TAG)
    try:
        load_global(model, record_to_bytes(msg.content["arrays"]), runtime.head_modules_for(cfg),
                    cfg.fedpipe.global_rank)
        return runtime.evaluation_reply(cfg, data, model)
    finally:
        runtime.drop_cached(("base",), tag=EVAL_TAG)
