"""Round 0 on the client: what its own data and device make a training step cost, reported for the planner.

- ``tokens``: the token lengths of its training examples after truncation to ``model.max_seq_len``, as
  ``TOKEN_LEVELS`` quantiles (shortest first, longest last): a bounded summary whatever its example count.
- ``measured_step`` (``fedpipe.measure_step``): seconds per step of a small adapter (every candidate module at the
  smallest of ``fedpipe.ranks``, kept per process) at the smallest of ``fedpipe.batch_sizes``, at each of
  ``fedpipe.bits`` whose smallest plan fits the client's memory by the planner's own memory model (so a device
  that cannot hold an fp32 base never loads one). It is timed through the path training takes
  (``client.planned_model`` and the runtime's loop) after one warm-up step, and scaled to the client's profile as
  a round's compute is (``runtime.profile_reply``), with the padded tokens the timed steps computed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from flwr.app import MetricRecord

from pollinate.client import runtime
from pollinate.common.config import RunConfig
from pollinate.methods.fedpipe.plan_options import plan_options
from pollinate.methods.fedpipe.planner.costs import CostModel
from pollinate.methods.fedpipe.planner.spec import ModelSpec
from pollinate.methods.fedpipe.planner.workload import Workload, token_quantiles

__all__ = ["MEASURE_ADAPTER", "MEASURED_STEPS", "measured_step", "token_summary"]

MEASURED_STEPS = 2  # timed steps per bits, after one warm-up step
MEASURE_ADAPTER = "fedpipe-measure"

# (cfg, plan, num_labels, client_id, adapter_name) -> (the planned peft model, its adapter's name)
ModelBuilder = Callable[..., tuple[torch.nn.Module, str]]


def example_lengths(data: runtime.LocalData) -> list[int]:
    """Tokens of each training example (already truncated to ``model.max_seq_len`` by the encoder)."""
    return [len(example["input_ids"]) for example in data.encoded]


def token_summary(data: runtime.LocalData) -> MetricRecord:
    """The ``tokens`` record of the round-0 reply: its examples' token-length quantiles."""
    return MetricRecord({"quantiles": token_quantiles(example_lengths(data))})


def fitting_bits(cfg: RunConfig, node_config: dict[str, Any], spec: ModelSpec, lengths: list[int]) -> list[int]:
    """Bits of ``fedpipe.bits`` at which the measured setup (smallest batch, every module at the smallest rank)
    fits this client's memory, by the planner's memory model and this client's longest example."""
    fp = cfg.fedpipe
    profile = runtime.client_profile(cfg, node_config)
    options = plan_options(cfg)
    costs = CostModel.build(spec, options, [profile], [Workload(tuple(token_quantiles(lengths)))])
    n_params = sum(m.lora_params(min(fp.ranks)) for m in spec.modules)
    batch = min(fp.batch_sizes)
    return [bits for bits in sorted(fp.bits, reverse=True)
            if costs.memory_bytes(0, costs.combo(bits, batch), n_params) <= profile.memory_bytes]


def measured_step(cfg: RunConfig, node_config: dict[str, Any], data: runtime.LocalData, spec: ModelSpec,
                  build: ModelBuilder) -> MetricRecord | None:
    """The ``measured_step`` record: ``bits``, profile-scaled ``seconds`` per step at each, the ``batch_size``,
    ``rank`` and mean padded ``tokens`` per step it was measured with; None when no bits fits."""
    fp = cfg.fedpipe
    bits_list = fitting_bits(cfg, node_config, spec, example_lengths(data))
    if not bits_list:
        return None
    rank, batch = min(fp.ranks), min(fp.batch_sizes)
    plan = {"ranks": {m.name: rank for m in spec.modules}, "batch_size": batch}
    seconds = [_seconds_per_step(cfg, node_config, data, build, {**plan, "bits": bits}) for bits in bits_list]
    stream = runtime.training_batches(cfg, data, 0, batch)  # the batches the timed steps drew
    tokens = float(np.mean([stream.next_batch()["input_ids"].numel() for _ in range(MEASURED_STEPS)]))
    return MetricRecord({"bits": bits_list, "seconds": seconds, "batch_size": batch, "rank": rank,
                         "tokens": tokens})


def _seconds_per_step(cfg: RunConfig, node_config: dict[str, Any], data: runtime.LocalData, build: ModelBuilder,
                      plan: dict[str, Any]) -> float:
    """One warm-up step, then ``MEASURED_STEPS`` timed ones on the measuring adapter (one per process and bits,
    inactive outside measurements; peft cannot delete a model's last adapter that has a trained head). A deployed
    client frees the base it loaded for them, since its memory holds only what its plan needs."""
    bits = int(plan["bits"])
    model, _ = build(cfg, plan, data.num_labels, data.client_id, adapter_name=MEASURE_ADAPTER)
    try:
        runtime.local_training(cfg, data, model, 0, batch_size=int(plan["batch_size"]), steps=1)
        stats = runtime.local_training(cfg, data, model, 0, batch_size=int(plan["batch_size"]),
                                       steps=MEASURED_STEPS)
    finally:
        if node_config.get("profile"):
            runtime.drop_cached(("fedpipe-peft", bits))
            runtime.drop_cached(("fedpipe-base", bits))
    return float(runtime.profile_reply(cfg, node_config, stats["train_seconds"] / MEASURED_STEPS)["compute_seconds"])
