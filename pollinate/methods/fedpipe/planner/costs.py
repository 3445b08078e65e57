"""The planner's cost model: memory, compute and communication of a plan, for many clients at once.

Every cost is affine in the adapter's parameter count P, so :class:`CostModel` holds, per (client budget and
workload, bits, batch size), a fixed part and a per-parameter part; the search turns them into one capacity per choice
and the plans report the same formulas. The constants live in :class:`PlanOptions`; they were calibrated on
SmolLM2-135M (B x T = 4 x 32, LoRA r8 on all seven projections), and ``test_planner.py`` pins the measured
peaks and step time they reproduce.

- Memory = frozen base + adapter state + activations.
  Base: bits 32 / 16 store every parameter in 4 / 2 bytes. Bits 8 / 4 quantize only the spec's linear
  modules (bitsandbytes LLM.int8: 1 byte/weight + a 4-byte scale per output row; NF4 with double
  quantization: 0.5 + 1/64 + 4/16384 bytes/weight); embeddings, tied/untied output head, norms and
  biases stay fp32, as ``transformers`` loads them.
  NF4 also needs its dequantization workspace: bitsandbytes dequantizes a layer's weight to bf16 for each
  matmul (forward and backward), one layer at a time, so 2 bytes per weight of the largest quantized module
  (twice that on a CPU without AVX512-BF16, which computes in fp32; LLM.int8 multiplies in int8, none).
  Adapter: ``adapter_state_bytes_per_param`` per LoRA parameter (fp32 weight, gradient and two Adam moments),
  and as much per parameter of the head a classifier trains in full (``ModelSpec.head_params``: peft keeps a
  trainable copy next to the frozen original, and bitsandbytes leaves the head unquantized).
  Activations: ``tokens x (act_bytes_per_token_hidden_layer x hidden x layers + act_bytes_per_token_logit x
  logit_width)`` times a per-bits factor (bitsandbytes keeps extra per-token buffers). The per-logit bytes are
  three fp32 copies (logits, log-softmax, its gradient); the per-hidden bytes are what remains of the measured
  fp32 peak after base and adapter state. Activations are counted as if every module were adapted
  (conservative: a frozen, unadapted linear does not need its input saved).
  Checked against ``memory_probe`` on SmolLM2-360M / 1.7B-shaped models (batch 1 x 64, LoRA r8 on all seven
  projections): ``test_planner_costs_quantized.py`` pins those measurements and the model's distance from them.
  On a CPU the quantized peaks run above the model (glibc keeps freed dequantization buffers), which profiles
  must leave room for.
- Compute per step, frozen base: forward 2N + input-gradient backward 2N FLOPs per token (no weight
  gradients for the base, so 4N, not the 6N of full training), 6 FLOPs per token per LoRA parameter,
  and attention 12 x layers x width x hidden per token; the head's weight gradients 2 FLOPs per head
  parameter per sequence (it reads one pooled vector; its forward and input gradient are in the 4N).
  A client that measured steps at two batch sizes adds, per step, the FLOPs-equivalent of what did not grow with
  the tokens (``Workload.step_overhead``: on a CPU, mostly streaming the frozen weights).
  Seconds = FLOPs / (compute_tflops x utilization) x a per-bits factor (NF4 computes in bf16) x the client's
  measured correction at those bits (``Workload.time_scale``, 1 where it measured nothing).
- Tokens: a batch is padded to its longest example. A client's :class:`Workload` gives its examples' token
  lengths (``workload``): compute takes the expected padded width of a batch, memory its longest example;
  without them every example is ``seq_len`` tokens long.
- Communication: the adapter at the client's ranks, and the head, go down and come back each round,
  ``update_bytes_per_param`` bytes per parameter each way (times the client's ``comm_scale``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from pollinate.common.profiles import GIB, ResourceProfile, comm_seconds
from pollinate.methods.fedpipe.planner.options import SUPPORTED_BITS, PlanOptions
from pollinate.methods.fedpipe.planner.spec import ModelSpec
from pollinate.methods.fedpipe.planner.workload import Workload, sequence_widths

__all__ = ["CostModel", "activation_bytes", "adapter_param_count", "base_weight_bytes", "dequant_workspace_bytes",
           "modelled_speed", "step_flops"]

_NF4_BYTES_PER_WEIGHT = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4 bits + int8 absmax per 64 + fp32 per 256 absmax


def base_weight_bytes(spec: ModelSpec, bits: int) -> float:
    """Bytes of the frozen base at ``bits`` (see the module docstring for what stays fp32)."""
    if bits == 32:
        return 4.0 * spec.num_params
    if bits == 16:
        return 2.0 * spec.num_params
    rest = 4.0 * (spec.num_params - spec.linear_params)
    if bits == 8:
        return rest + sum(m.in_features * m.out_features + 4.0 * m.out_features for m in spec.modules)
    if bits == 4:
        return rest + _NF4_BYTES_PER_WEIGHT * spec.linear_params
    raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")


def dequant_workspace_bytes(spec: ModelSpec, bits: int) -> float:
    """Bytes of the one NF4 weight dequantized to bf16 at a time (the largest module's); 0 for other bits."""
    if bits != 4:
        return 0.0
    return 2.0 * max(m.in_features * m.out_features for m in spec.modules)


def activation_bytes(spec: ModelSpec, bits: int, batch_size: int, options: PlanOptions,
                     width: float | np.ndarray | None = None) -> float | np.ndarray:
    """Peak activation bytes of one training step whose batch is ``width`` tokens wide (default ``seq_len``; an
    array: one value per width)."""
    tokens = batch_size * (options.seq_len if width is None else width)
    per_token = (options.act_bytes_per_token_hidden_layer * spec.hidden * spec.num_layers
                 + options.act_bytes_per_token_logit * spec.logit_width)
    return tokens * per_token * options.activation_factor[bits]


def adapter_param_count(spec: ModelSpec, ranks: Mapping[str, int]) -> int:
    """LoRA parameters of a rank assignment (modules absent or at rank 0 are not adapted)."""
    by_name = {m.name: m for m in spec.modules}
    unknown = [n for n in ranks if n not in by_name]
    if unknown:
        raise ValueError(f"ranks name module(s) {unknown[:3]} not in the model spec "
                         f"(expected names like {spec.modules[0].name!r})")
    return sum(by_name[n].lora_params(r) for n, r in ranks.items())


def step_flops(spec: ModelSpec, batch_size: int, mean_width: float | np.ndarray,
               attention_width: float | np.ndarray) -> tuple[float | np.ndarray, float | np.ndarray]:
    """(FLOPs of one step independent of the adapter, FLOPs per adapter parameter) at a mean padded width of
    ``mean_width`` tokens; ``attention_width`` is ``E[W^2] / E[W]`` (attention costs width x tokens). Arrays of
    widths give arrays of FLOPs."""
    tokens = batch_size * mean_width
    fixed = tokens * (4.0 * spec.num_params + 12.0 * spec.num_layers * attention_width * spec.hidden)
    return fixed + 2.0 * batch_size * spec.head_params, 6.0 * tokens


def modelled_speed(profile: ResourceProfile, bits: int, options: PlanOptions) -> float:
    """FLOP/s the cost model expects of ``profile`` at ``bits`` before any measured correction."""
    return profile.compute_tflops * 1e12 * options.utilization / options.time_factor[bits]


@dataclass(frozen=True)
class CostModel:
    """Costs of every (client, bits, batch) choice as affine functions of the adapter's parameters P.

    Choice ``j`` is ``combos[j]`` (bits high to low, then batch large to small); client ``u`` is
    ``profiles[u]`` with ``workloads[u]``. Memory of choice ``j`` is ``fixed_memory[u, j] +
    adapter_state_bytes_per_param x P``; the round (all local steps, adapter down and up) takes
    ``fixed_seconds[u, j] + seconds_per_param[u, j] x P``.

    Parameters
    ----------
    options : PlanOptions
        Constants and the round's shape.
    head_params : int
        Parameters trained in full and sent every round whatever the ranks (``ModelSpec.head_params``).
    profiles : tuple of ResourceProfile
        The clients' budgets (clients with identical budgets and workloads may be passed once).
    workloads : tuple of Workload
        The clients' token lengths and measured corrections, one per profile.
    combos : tuple of (int, int)
        The (bits, batch size) choices.
    fixed_memory : np.ndarray
        (profiles, choices) bytes of base and activations.
    round_flops : np.ndarray
        (profiles, choices, 2) FLOPs of ``local_steps`` steps: independent of P, and per adapter parameter.
    speed : np.ndarray
        (profiles, choices) FLOP/s a step achieves.
    fixed_seconds, seconds_per_param : np.ndarray
        (profiles, choices) round seconds independent of P, and per adapter parameter.
    """

    options: PlanOptions
    head_params: int
    profiles: tuple[ResourceProfile, ...]
    workloads: tuple[Workload, ...]
    combos: tuple[tuple[int, int], ...]
    fixed_memory: np.ndarray
    round_flops: np.ndarray
    speed: np.ndarray
    fixed_seconds: np.ndarray
    seconds_per_param: np.ndarray

    @classmethod
    def build(cls, spec: ModelSpec, options: PlanOptions, profiles: Sequence[ResourceProfile],
              workloads: Sequence[Workload] | None = None) -> CostModel:
        """The cost model of ``spec`` for each profile (with its workload; default: none measured, every example
        ``seq_len`` tokens) and every (bits, batch) in ``options``."""
        workloads = tuple(workloads) if workloads is not None else (Workload(),) * len(profiles)
        if len(workloads) != len(profiles):
            raise ValueError(f"got {len(workloads)} workloads for {len(profiles)} profiles")
        up, down = (np.array([getattr(p, name) for p in profiles], dtype=float)
                    for name in ("uplink_mbps", "downlink_mbps"))
        combos = tuple((b, s) for b in options.bits for s in sorted(options.batch_sizes, reverse=True))
        fixed_memory, flops = _workload_costs(spec, options, combos, workloads)
        speed = np.array([[modelled_speed(p, b, options) / scale.get(b, 1.0) for b, _ in combos]
                          for p, scale in zip(profiles, (dict(w.time_scale) for w in workloads), strict=True)])
        comm_scale = np.array([w.comm_scale for w in workloads])
        comm_per_param = options.update_bytes_per_param * 8e-6 * (1.0 / up + 1.0 / down) * comm_scale
        return cls(options, spec.head_params, tuple(profiles), workloads, combos, fixed_memory, flops, speed,
                   fixed_seconds=flops[:, :, 0] / speed + spec.head_params * comm_per_param[:, None],
                   seconds_per_param=flops[:, :, 1] / speed + comm_per_param[:, None])

    def combo(self, bits: int, batch_size: int) -> int:
        """Index of the (bits, batch size) choice."""
        try:
            return self.combos.index((bits, batch_size))
        except ValueError:
            raise ValueError(f"(bits, batch_size) = ({bits}, {batch_size}) is not among {list(self.combos)}") \
                from None

    def max_params(self) -> np.ndarray:
        """(profiles, choices) most adapter parameters that fit memory, deadline and ``max_adapter_params``."""
        options = self.options
        memory = np.array([p.memory_gib for p in self.profiles], dtype=float)
        cap_memory = (memory[:, None] * GIB - self.fixed_memory) / options.adapter_state_bytes_per_param
        cap_time = (options.deadline_s - self.fixed_seconds) / self.seconds_per_param
        return np.minimum(np.minimum(cap_memory, cap_time), options.max_adapter_params)

    def memory_bytes(self, u: int, j: int, n_params: int) -> float:
        """Peak training memory of choice ``j`` on profile ``u`` with ``n_params`` adapter parameters."""
        return float(self.fixed_memory[u, j] + self.options.adapter_state_bytes_per_param * n_params)

    def step_seconds(self, u: int, j: int, n_params: int) -> float:
        """Seconds of one local step of choice ``j`` on profile ``u``."""
        flops = self.round_flops[u, j, 0] + self.round_flops[u, j, 1] * n_params
        return float(flops / self.speed[u, j]) / self.options.local_steps

    def comm_seconds(self, u: int, n_params: int) -> float:
        """Seconds to download and upload ``n_params`` adapter parameters and the head on profile ``u``."""
        nbytes = self.options.update_bytes_per_param * (n_params + self.head_params)
        return comm_seconds(nbytes, nbytes, self.profiles[u]) * self.workloads[u].comm_scale


def _workload_costs(spec: ModelSpec, options: PlanOptions, combos: tuple[tuple[int, int], ...],
                    workloads: tuple[Workload, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(profiles, choices) bytes of base and activations, and (profiles, choices, 2) FLOPs of a round, from each
    workload's padded widths (vectorised over the workloads)."""
    batches = sorted(options.batch_sizes, reverse=True)
    widths = sequence_widths([w.token_quantiles for w in workloads], batches, options.seq_len)
    head = options.adapter_state_bytes_per_param * spec.head_params
    memory = np.empty((len(workloads), len(combos)))
    flops = np.empty((len(workloads), len(combos), 2))
    overheads = {bits: np.array([w.overhead_flops(bits) for w in workloads]) for bits, _ in combos}
    for j, (bits, size) in enumerate(combos):
        c = batches.index(size)
        weights = base_weight_bytes(spec, bits) + dequant_workspace_bytes(spec, bits)
        memory[:, j] = weights + activation_bytes(spec, bits, size, options, widths.longest) + head
        fixed, per_param = step_flops(spec, size, widths.mean[:, c], widths.mean_square[:, c] / widths.mean[:, c])
        flops[:, j, 0], flops[:, j, 1] = fixed + overheads[bits], per_param
    return memory, flops * options.local_steps
