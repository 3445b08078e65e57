"""Round 0 on the client: what its own data and device make a training step cost, reported for the planner.

- ``tokens``: the token lengths of its training examples after truncation to ``model.max_seq_len``, as
  ``TOKEN_LEVELS`` quantiles (shortest first, longest last): a bounded summary whatever its example count.
- ``measured_step`` (``fedpipe.measure_step``): seconds per step of a small adapter (every candidate module at the
  smallest of ``fedpipe.ranks``, kept per process) at the smallest of ``fedpipe.batch_sizes``, at each of
  ``fedpipe.bits`` whose smallest plan fits the client's memory by the planner's own memory model (so a device
  that cannot hold an fp32 base never loads one), and again at the largest batch size that fits at all of them
  (``large_*``). Two batch sizes let the planner split a step into a part that grows with the tokens and a part
  that does not (on a CPU, streaming the frozen weights costs about as much for 2 examples as for 8): timed at
  the smallest batch alone, round-1 plans at batch 8 took 0.60-0.68x their estimates. Each is timed through the
  path training takes (``client.planned_model`` and the runtime's loop) after one warm-up step, and scaled to the
  client's profile as a round's compute is (``runtime.profile_reply``), with the padded tokens the timed steps
  computed.
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

__all__ = ["MEASURE_ADAPTER", "MEASURED_STEPS", "fitting_bits", "largest_fitting_batch", "measured_step",
           "token_summary"]

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
    fits, batch = _memory_check(cfg, node_config, spec, lengths), min(cfg.fedpipe.batch_sizes)
    return [bits for bits in sorted(cfg.fedpipe.bits, reverse=True) if fits(bits, batch)]


def largest_fitting_batch(cfg: RunConfig, node_config: dict[str, Any], spec: ModelSpec, lengths: list[int],
                          bits_list: list[int]) -> int | None:
    """The largest of ``fedpipe.batch_sizes`` above the smallest whose measured setup fits at every one of
    ``bits_list``; None when only the smallest does."""
    fits, smallest = _memory_check(cfg, node_config, spec, lengths), min(cfg.fedpipe.batch_sizes)
    return next((batch for batch in sorted(cfg.fedpipe.batch_sizes, reverse=True)
                 if batch > smallest and all(fits(bits, batch) for bits in bits_list)), None)


def _memory_check(cfg: RunConfig, node_config: dict[str, Any], spec: ModelSpec,
                  lengths: list[int]) -> Callable[[int, int], bool]:
    """Whether the measured setup at (bits, batch) fits this client's memory (one cost model for every query)."""
    profile = runtime.client_profile(cfg, node_config)
    costs = CostModel.build(spec, plan_options(cfg), [profile], [Workload(tuple(token_quantiles(lengths)))])
    n_params = sum(m.lora_params(min(cfg.fedpipe.ranks)) for m in spec.modules)
    return lambda bits, batch: costs.memory_bytes(0, costs.combo(bits, batch), n_params) <= profile.memory_bytes


def measured_step(cfg: RunConfig, node_config: dict[str, Any], data: runtime.LocalData, spec: ModelSpec,
                  build: ModelBuilder) -> MetricRecord | None:
    """The ``measured_step`` record: ``bits``, profile-scaled ``seconds`` per step at each, the ``batch_size``,
    ``rank`` and mean padded ``tokens`` per step it was measured with, and ``large_batch_size``,
    ``large_seconds`` and ``large_tokens`` at the largest batch that fits (absent when only the smallest does);
    None when no bits fits."""
    fp = cfg.fedpipe
    lengths = example_lengths(data)
    bits_list = fitting_bits(cfg, node_config, spec, lengths)
    if not bits_list:
        return None
    rank, small = min(fp.ranks), min(fp.batch_sizes)
    large = largest_fitting_batch(cfg, node_config, spec, lengths, bits_list)
    batches = [small] if large is None else [small, large]
    ranks = {m.name: rank for m in spec.modules}
    seconds = [_seconds_per_step(cfg, node_config, data, build, ranks, bits, batches) for bits in bits_list]
    record = {"bits": bits_list, "seconds": [s[0] for s in seconds], "batch_size": small, "rank": rank,
              "tokens": _mean_tokens(cfg, data, small)}
    if large is not None:
        record.update(large_batch_size=large, large_seconds=[s[1] for s in seconds],
                      large_tokens=_mean_tokens(cfg, data, large))
    return MetricRecord(record)


def _mean_tokens(cfg: RunConfig, data: runtime.LocalData, batch: int) -> float:
    """Mean padded tokens of the batches the timed steps drew (each call to the loop restarts the round's
    stream)."""
    stream = runtime.training_batches(cfg, data, 0, batch)
    return float(np.mean([stream.next_batch()["input_ids"].numel() for _ in range(MEASURED_STEPS)]))


def _seconds_per_step(cfg: RunConfig, node_config: dict[str, Any], data: runtime.LocalData, build: ModelBuilder,
                      ranks: dict[str, int], bits: int, batches: list[int]) -> list[float]:
    """Profile-scaled seconds per step at each of ``batches``: one warm-up step, then ``MEASURED_STEPS`` timed
    ones, on the measuring adapter (one per process and bits, inactive outside measurements; peft cannot delete a
    model's last adapter that has a trained head). A deployed client frees the base it loaded for them, since its
    memory holds only what its plan needs."""
    plan = {"ranks": ranks, "batch_size": batches[0], "bits": bits}
    model, _ = build(cfg, plan, data.num_labels, data.client_id, adapter_name=MEASURE_ADAPTER)
    seconds = []
    try:
        for batch in batches:
            runtime.local_training(cfg, data, model, 0, batch_size=batch, steps=1)
            stats = runtime.local_training(cfg, data, model, 0, batch_size=batch, steps=MEASURED_STEPS)
            per_step = stats["train_seconds"] / MEASURED_STEPS
            seconds.append(float(runtime.profile_reply(cfg, node_config, per_step)["compute_seconds"]))
    finally:
        if node_config.get("profile"):
            runtime.drop_cached(("fedpipe-peft", bits))
            runtime.drop_cached(("fedpipe-base", bits))
    return seconds
