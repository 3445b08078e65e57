"""FedPipe planner: per client, which weight matrices to adapt, at which LoRA rank, with which batch size
and base-weight bits, so that training fits the client's memory and its round fits the deadline.

The planner is torch-free: it works on a :class:`ModelSpec` (shapes only) built from a Hugging Face
config (object or ``config.json`` dict) or walked from a loaded model.

Cost model (all constants in :class:`PlanOptions`, calibrated on SmolLM2-135M with this CPU, see
``ENVIRONMENT.md``, "Quantized frozen base", B x T = 4 x 32, LoRA r8 on all 7 linears):

- Memory = frozen base + adapter state + activations.
  Base: bits 32 / 16 store every parameter in 4 / 2 bytes. Bits 8 / 4 quantize only the spec's linear
  modules (bitsandbytes LLM.int8: 1 byte/weight + a 4-byte scale per output row; NF4 with double
  quantization: 0.5 + 1/64 + 4/16384 bytes/weight); embeddings, tied/untied output head, norms and
  biases stay fp32, as ``transformers`` loads them. This reproduces the measured 513 / 210 / 161 MiB.
  Adapter: 16 bytes per LoRA parameter (fp32 weight, gradient and two Adam moments).
  Activations: ``tokens x (103 B x hidden x layers + 12 B x logit_width)`` times a per-bits factor
  (int8 1.19, NF4 1.11: bitsandbytes keeps extra per-token buffers). The 12 B per logit are three fp32
  copies (logits, log-softmax, its gradient); 103 B is what remains of the measured fp32 peak
  (840 MiB - 513 MiB base - 37 MiB adapter state), and the factors make the int8 (591 MiB) and NF4
  (518 MiB) peaks come out exactly. Activations are counted as if every module were adapted
  (conservative: a frozen, unadapted linear does not need its input saved).
- Compute per step, frozen base: forward 2N + input-gradient backward 2N FLOPs per token (no weight
  gradients for the base, so 4N, not the 6N of full training), 6 FLOPs per token per LoRA parameter,
  and attention 12 x layers x seq_len x hidden per token. Seconds = FLOPs / (compute_tflops x
  utilization) x a per-bits factor (NF4 with bf16 compute: 0.91 of fp32's time; int8 = fp32).
  ``utilization`` 0.7 matches 0.81 s/step measured for SmolLM2 at 0.12 TFLOP/s matmul throughput.
- Communication: the adapter at the client's ranks goes down and comes back each round,
  ``update_bytes_per_param`` bytes per parameter each way (4: fp32 before any codec).

Objective (monotone in every choice): ``sum_m w_m log2(1 + r_m) / log2(1 + r_max)`` with the client
importance ``w`` normalised to sum 1 (so it lies in [0, 1]; log2 is concave: the tenth rank buys less
than the first), plus ``bits_bonus[bits]`` (less quantization error) plus ``batch_bonus x log2(batch)``.

Search: memory and round time are both affine in the adapter's parameter count P, so for each
(bits, batch) the budget is one capacity ``P <= P_max``. Choosing ranks is then a multiple-choice
knapsack over modules whose weights are multiples of ``g = gcd(r x (in + out))``; one dynamic
programme over capacities in units of ``g`` gives the exact optimum for every capacity at once, so
all clients and all (bits, batch) pairs share it and each client costs a table lookup.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from pollinate.common.profiles import GIB, ResourceProfile, assign_profiles, comm_seconds

__all__ = [
    "BERT_TARGETS",
    "LLAMA_TARGETS",
    "SMOLLM2_135M_CONFIG",
    "ClientPlan",
    "ModelSpec",
    "ModuleSpec",
    "PlanInfeasible",
    "PlanOptions",
    "activation_bytes",
    "adapter_param_count",
    "base_weight_bytes",
    "benchmark_planner",
    "combine_importance",
    "estimate_comm_seconds",
    "estimate_compute_seconds",
    "estimate_memory_bytes",
    "model_spec_from_config",
    "model_spec_from_model",
    "plan_client",
    "plan_clients",
    "plan_objective",
]

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BERT_TARGETS = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
)
_LLAMA_TYPES = ("llama", "mistral")
_BERT_TYPES = ("bert",)

# The embedded default model's architecture (HuggingFaceTB/SmolLM2-135M), for benchmarks and tests.
SMOLLM2_135M_CONFIG: dict[str, Any] = {
    "model_type": "llama",
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
}

_NF4_BYTES_PER_WEIGHT = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4 bits + int8 absmax per 64 + fp32 per 256 absmax
_SUPPORTED_BITS = (32, 16, 8, 4)
_MAX_TABLE_ENTRIES = 50_000_000  # DP choice table (int8) above this is coarsened; see _capacity_unit


class PlanInfeasible(ValueError):
    """No plan in the search space fits a client's memory and deadline."""


# --------------------------------------------------------------------------------------------------
# Model description


@dataclass(frozen=True)
class ModuleSpec:
    """One adaptable linear layer: its name as peft's target matching sees it, shape and layer index."""

    name: str
    in_features: int
    out_features: int
    layer: int

    def lora_params(self, rank: int) -> int:
        """Parameters of a rank-``rank`` LoRA pair (A: r x in, B: out x r) on this module."""
        return rank * (self.in_features + self.out_features)


@dataclass
class ModelSpec:
    """Shapes the planner needs, independent of torch.

    Parameters
    ----------
    num_params : int
        All parameters of the model (tied ones once).
    hidden : int
        Hidden size.
    num_layers : int
        Transformer blocks.
    vocab : int
        Vocabulary size.
    modules : list of ModuleSpec
        Candidate modules for LoRA (they are also the ones bitsandbytes quantizes).
    logit_width : int, optional
        Width of the output logits (vocab for a causal LM, num_labels for a classifier); default vocab.
    """

    num_params: int
    hidden: int
    num_layers: int
    vocab: int
    modules: list[ModuleSpec]
    logit_width: int | None = None

    def __post_init__(self) -> None:
        for name in ("num_params", "hidden", "num_layers", "vocab"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelSpec field {name!r} must be a positive int, got {value!r}")
        if self.logit_width is None:
            self.logit_width = self.vocab
        if not self.modules:
            raise ValueError("ModelSpec field 'modules' must list at least one module")
        names = [m.name for m in self.modules]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"ModelSpec has duplicate module names {dup[:3]}")
        linear = self.linear_params
        if linear > self.num_params:
            raise ValueError(
                f"ModelSpec num_params={self.num_params} is smaller than its modules' weights ({linear})"
            )

    @property
    def linear_params(self) -> int:
        """Weights of the candidate modules (biases excluded)."""
        return sum(m.in_features * m.out_features for m in self.modules)

    def module_names(self) -> list[str]:
        """Module names in spec order."""
        return [m.name for m in self.modules]


def _cfg(config: Any, key: str, default: Any = ...) -> Any:
    value = config.get(key, default) if isinstance(config, Mapping) else getattr(config, key, default)
    if value is ...:
        raise ValueError(f"model config has no {key!r}, which the planner needs")
    return value


def model_spec_from_config(hf_config: Any, prefix: str | None = None) -> ModelSpec:
    """Build a :class:`ModelSpec` from a Hugging Face config object or a ``config.json`` dict.

    Llama family (``llama``, ``mistral``): q/k/v/o/gate/up/down per layer, names as inside
    ``*ForCausalLM`` (prefix ``"model."``, e.g. ``"model.layers.3.self_attn.q_proj"``).
    BERT: query/key/value/attention.output.dense/intermediate.dense/output.dense per layer, names and
    parameter count as inside ``BertForSequenceClassification`` (prefix ``"bert."``).
    For other architectures load the model and use :func:`model_spec_from_model`.
    """
    model_type = _cfg(hf_config, "model_type", "")
    if model_type in _LLAMA_TYPES:
        return _llama_spec(hf_config, "model." if prefix is None else prefix)
    if model_type in _BERT_TYPES:
        return _bert_spec(hf_config, "bert." if prefix is None else prefix)
    raise ValueError(
        f"model_type {model_type!r} is not described by model_spec_from_config (supported: "
        f"{list(_LLAMA_TYPES + _BERT_TYPES)}); build the spec from the loaded model with "
        "model_spec_from_model"
    )


def _llama_spec(cfg: Any, prefix: str) -> ModelSpec:
    h, inter = int(_cfg(cfg, "hidden_size")), int(_cfg(cfg, "intermediate_size"))
    layers, vocab = int(_cfg(cfg, "num_hidden_layers")), int(_cfg(cfg, "vocab_size"))
    heads = int(_cfg(cfg, "num_attention_heads"))
    kv_heads = int(_cfg(cfg, "num_key_value_heads", None) or heads)
    head_dim = int(_cfg(cfg, "head_dim", None) or h // heads)
    tied = bool(_cfg(cfg, "tie_word_embeddings", False))
    shapes = {
        "self_attn.q_proj": (h, heads * head_dim),
        "self_attn.k_proj": (h, kv_heads * head_dim),
        "self_attn.v_proj": (h, kv_heads * head_dim),
        "self_attn.o_proj": (heads * head_dim, h),
        "mlp.gate_proj": (h, inter),
        "mlp.up_proj": (h, inter),
        "mlp.down_proj": (inter, h),
    }
    modules = [
        ModuleSpec(f"{prefix}layers.{layer}.{suffix}", fan_in, fan_out, layer)
        for layer in range(layers)
        for suffix, (fan_in, fan_out) in shapes.items()
    ]
    per_layer = sum(i * o for i, o in shapes.values()) + 2 * h  # weights + two RMSNorm scales
    if _cfg(cfg, "attention_bias", False):
        per_layer += heads * head_dim + 2 * kv_heads * head_dim + h
    if _cfg(cfg, "mlp_bias", False):
        per_layer += 2 * inter + h
    num_params = vocab * h + layers * per_layer + h + (0 if tied else vocab * h)
    return ModelSpec(num_params, h, layers, vocab, modules, logit_width=vocab)


def _bert_spec(cfg: Any, prefix: str) -> ModelSpec:
    h, inter = int(_cfg(cfg, "hidden_size")), int(_cfg(cfg, "intermediate_size"))
    layers, vocab = int(_cfg(cfg, "num_hidden_layers")), int(_cfg(cfg, "vocab_size"))
    max_pos, type_vocab = int(_cfg(cfg, "max_position_embeddings")), int(_cfg(cfg, "type_vocab_size", 2))
    id2label = _cfg(cfg, "id2label", None)
    num_labels = int(_cfg(cfg, "num_labels", None) or (len(id2label) if id2label else 2))
    shapes = dict(zip(BERT_TARGETS, [(h, h)] * 4 + [(h, inter), (inter, h)], strict=True))
    modules = [
        ModuleSpec(f"{prefix}encoder.layer.{layer}.{suffix}", fan_in, fan_out, layer)
        for layer in range(layers)
        for suffix, (fan_in, fan_out) in shapes.items()
    ]
    embeddings = (vocab + max_pos + type_vocab) * h + 2 * h
    per_layer = sum(i * o + o for i, o in shapes.values()) + 2 * 2 * h  # + biases, two LayerNorms
    head = (h * h + h) + (h * num_labels + num_labels)  # pooler + classifier
    num_params = embeddings + layers * per_layer + head
    return ModelSpec(num_params, h, layers, vocab, modules, logit_width=num_labels)


_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)\.")


def model_spec_from_model(model: Any, targets: Sequence[str] = LLAMA_TARGETS + BERT_TARGETS) -> ModelSpec:
    """Walk a loaded (torch) model: every module with ``in_features``/``out_features`` whose name ends
    with one of ``targets`` becomes a candidate. Pass the base model, not a ``PeftModel``, so names
    match what peft's target matching sees."""
    modules = []
    packed_correction = 0
    for name, module in model.named_modules():
        fan_in, fan_out = getattr(module, "in_features", None), getattr(module, "out_features", None)
        if not (isinstance(fan_in, int) and isinstance(fan_out, int)):
            continue
        if not any(name == t or name.endswith("." + t) for t in targets):
            continue
        match = _LAYER_INDEX.search(name)
        modules.append(ModuleSpec(name, fan_in, fan_out, int(match.group(1)) if match else -1))
        # bitsandbytes stores 4-bit weights two per byte: count the logical weights, not the storage.
        packed_correction += fan_in * fan_out - module.weight.numel()
    if not modules:
        raise ValueError(f"model has no linear module whose name ends with one of {list(targets)}")
    config = model.config
    # parameters() yields tied weights once.
    num_params = sum(p.numel() for p in model.parameters()) + packed_correction
    get_head = getattr(model, "get_output_embeddings", None)
    has_lm_head = get_head is not None and get_head() is not None
    vocab = int(config.vocab_size)
    return ModelSpec(
        num_params=int(num_params),
        hidden=int(config.hidden_size),
        num_layers=int(config.num_hidden_layers),
        vocab=vocab,
        modules=modules,
        logit_width=vocab if has_lm_head else int(getattr(config, "num_labels", vocab)),
    )


# --------------------------------------------------------------------------------------------------
# Options, plans


def _default_activation_factor() -> dict[int, float]:
    return {32: 1.0, 16: 1.0, 8: 1.19, 4: 1.11}


def _default_time_factor() -> dict[int, float]:
    return {32: 1.0, 16: 1.0, 8: 1.0, 4: 0.91}


def _default_bits_bonus() -> dict[int, float]:
    return {32: 0.1, 16: 0.1, 8: 0.08, 4: 0.05}


@dataclass
class PlanOptions:
    """Search space, round shape and cost-model constants of the planner.

    Parameters
    ----------
    ranks : tuple of int, default (0, 2, 4, 8, 16)
        LoRA ranks per module; 0 means the module is not adapted.
    bits : tuple of int, default (32, 8, 4)
        Base-weight bits to consider (32/16 = fp32/bf16, 8 = LLM.int8, 4 = NF4).
    batch_sizes : tuple of int, default (1, 2, 4, 8)
        Local batch sizes to consider.
    seq_len : int, default 128
        Tokens per sequence.
    local_steps : int, default 10
        Optimizer steps per round: every plan must fit the deadline with this many.
    max_local_steps : int, default 0
        When above ``local_steps``, a client whose plan leaves deadline to spare trains more steps, up to this
        many, filling ``deadline_fill`` of the deadline: the update it sends costs the same bytes whatever
        the steps, so spare compute is free progress per byte (0 = always ``local_steps``).
    deadline_fill : float, default 0.8
        Share of the deadline the extra steps may fill (headroom for estimate error).
    deadline_s : float, default 120.0
        Round deadline: local compute plus adapter download and upload.
    utilization : float, default 0.7
        Fraction of the profile's matmul TFLOP/s a training step achieves (calibrated here).
    update_bytes_per_param : float, default 4.0
        Bytes per adapter parameter on the wire, each direction (4 = fp32, before any codec).
    adapter_state_bytes_per_param : float, default 16.0
        Training state per adapter parameter: fp32 weight, gradient and two Adam moments.
    act_bytes_per_token_hidden_layer : float, default 103.0
        Activation bytes per token, per hidden unit, per layer (calibrated, see module docstring).
    act_bytes_per_token_logit : float, default 12.0
        Activation bytes per token per logit (three fp32 copies).
    activation_factor : dict, default {32: 1.0, 16: 1.0, 8: 1.19, 4: 1.11}
        Per-bits multiplier on activations (bitsandbytes' extra buffers; 16 not measured).
    time_factor : dict, default {32: 1.0, 16: 1.0, 8: 1.0, 4: 0.91}
        Per-bits multiplier on compute time (measured; NF4 computes in bf16).
    bits_bonus : dict, default {32: 0.1, 16: 0.1, 8: 0.08, 4: 0.05}
        Objective bonus per bits (less quantization error is better); keep it non-decreasing in bits.
    batch_bonus : float, default 0.02
        Objective bonus per doubling of the batch size.
    max_adapter_params : float, default inf
        Cap on trainable adapter parameters per client, on top of memory and deadline: the per-round
        communication budget of a deployment (each parameter travels both ways every round).
    """

    ranks: tuple[int, ...] = (0, 2, 4, 8, 16)
    bits: tuple[int, ...] = (32, 8, 4)
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8)
    seq_len: int = 128
    local_steps: int = 10
    max_local_steps: int = 0
    deadline_fill: float = 0.8
    deadline_s: float = 120.0
    utilization: float = 0.7
    update_bytes_per_param: float = 4.0
    adapter_state_bytes_per_param: float = 16.0
    act_bytes_per_token_hidden_layer: float = 103.0
    act_bytes_per_token_logit: float = 12.0
    activation_factor: dict[int, float] = field(default_factory=_default_activation_factor)
    time_factor: dict[int, float] = field(default_factory=_default_time_factor)
    bits_bonus: dict[int, float] = field(default_factory=_default_bits_bonus)
    batch_bonus: float = 0.02
    max_adapter_params: float = math.inf

    def __post_init__(self) -> None:
        self.ranks = tuple(sorted(set(self.ranks)))
        self.bits = tuple(sorted(set(self.bits), reverse=True))
        self.batch_sizes = tuple(sorted(set(self.batch_sizes)))
        if not self.ranks or any(not isinstance(r, int) or r < 0 for r in self.ranks) or self.ranks == (0,):
            raise ValueError(f"PlanOptions.ranks must be ints >= 0 with at least one > 0, got {self.ranks}")
        if not self.bits or any(b not in _SUPPORTED_BITS for b in self.bits):
            raise ValueError(
                f"PlanOptions.bits must be a non-empty subset of {_SUPPORTED_BITS}, got {self.bits}"
            )
        if not self.batch_sizes or any(not isinstance(b, int) or b < 1 for b in self.batch_sizes):
            raise ValueError(f"PlanOptions.batch_sizes must be ints >= 1, got {self.batch_sizes}")
        for name in ("seq_len", "local_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"PlanOptions.{name} must be an int >= 1, got {value!r}")
        for name in ("deadline_s", "update_bytes_per_param", "adapter_state_bytes_per_param",
                     "act_bytes_per_token_hidden_layer", "act_bytes_per_token_logit"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"PlanOptions.{name} must be > 0, got {value!r}")
        if not isinstance(self.max_local_steps, int) or self.max_local_steps < 0:
            raise ValueError(f"PlanOptions.max_local_steps must be an int >= 0, got {self.max_local_steps!r}")
        if not 0 < self.deadline_fill <= 1:
            raise ValueError(f"PlanOptions.deadline_fill must be in (0, 1], got {self.deadline_fill!r}")
        if not 0 < self.utilization <= 1:
            raise ValueError(f"PlanOptions.utilization must be in (0, 1], got {self.utilization!r}")
        if not self.max_adapter_params > 0:
            raise ValueError(f"PlanOptions.max_adapter_params must be > 0, got {self.max_adapter_params!r}")
        if not math.isfinite(self.batch_bonus) or self.batch_bonus < 0:
            raise ValueError(f"PlanOptions.batch_bonus must be >= 0, got {self.batch_bonus!r}")
        for name in ("activation_factor", "time_factor", "bits_bonus"):
            table = getattr(self, name)
            missing = [b for b in self.bits if b not in table]
            if missing:
                raise ValueError(
                    f"PlanOptions.{name} has no entry for bits {missing}; it has {sorted(table)}"
                )


@dataclass
class ClientPlan:
    """What one client trains this run, and what the planner expects it to cost.

    Parameters
    ----------
    client_id : str
        The client (Flower node id or simulation index, as a string).
    ranks : dict of str to int
        LoRA rank per adapted module (modules not listed are not adapted).
    batch_size : int
        Local batch size.
    bits : int
        Base-weight bits (32, 16, 8 or 4).
    est_memory_bytes, est_compute_s, est_comm_s : float
        Cost-model estimates: peak training memory, local compute per round, adapter down + up per round.
    objective : float
        The planner's objective value for this plan.
    local_steps : int
        Optimizer steps per round (0 in plans from before the planner chose them: the run's default).
    """

    client_id: str
    ranks: dict[str, int]
    batch_size: int
    bits: int
    est_memory_bytes: float
    est_compute_s: float
    est_comm_s: float
    objective: float
    local_steps: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ClientPlan:
        """Inverse of :meth:`to_dict`; raises ``ValueError`` naming a missing or unknown key."""
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in data and n != "local_steps"]
        unknown = sorted(set(data) - set(names))
        if missing or unknown:
            raise ValueError(f"ClientPlan dict: missing keys {missing}, unknown keys {unknown}")
        ranks = {str(k): int(v) for k, v in data["ranks"].items()}
        bad = {k: v for k, v in ranks.items() if v < 1}
        if bad:
            raise ValueError(f"ClientPlan ranks must be >= 1 for adapted modules, got {bad}")
        return cls(
            client_id=str(data["client_id"]),
            ranks=ranks,
            batch_size=int(data["batch_size"]),
            bits=int(data["bits"]),
            est_memory_bytes=float(data["est_memory_bytes"]),
            est_compute_s=float(data["est_compute_s"]),
            est_comm_s=float(data["est_comm_s"]),
            objective=float(data["objective"]),
            local_steps=int(data.get("local_steps", 0)),
        )

    def lora_config_kwargs(self) -> dict[str, Any]:
        """``target_modules``, ``rank_pattern`` and ``r`` for ``peft.LoraConfig`` that realise the ranks.

        Names are regex-escaped in ``rank_pattern`` because peft matches its keys as regexes.
        """
        names = sorted(self.ranks)
        return {
            "target_modules": names,
            "rank_pattern": {re.escape(n): self.ranks[n] for n in names},
            "r": max(self.ranks.values()),
        }


# --------------------------------------------------------------------------------------------------
# Cost model (public so tests and reports use the exact formulas the planner optimises)


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
    raise ValueError(f"bits must be one of {_SUPPORTED_BITS}, got {bits!r}")


def activation_bytes(spec: ModelSpec, bits: int, batch_size: int, options: PlanOptions) -> float:
    """Peak activation bytes of one training step."""
    tokens = batch_size * options.seq_len
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


def _step_flops(spec: ModelSpec, batch_size: int, options: PlanOptions) -> tuple[float, float]:
    """(FLOPs per step independent of the adapter, FLOPs per step per adapter parameter)."""
    tokens = batch_size * options.seq_len
    fixed = tokens * (4.0 * spec.num_params + 12.0 * spec.num_layers * options.seq_len * spec.hidden)
    return fixed, 6.0 * tokens


def estimate_memory_bytes(spec: ModelSpec, ranks: Mapping[str, int], bits: int, batch_size: int,
                          options: PlanOptions) -> float:
    """Peak training memory of a plan: base + adapter state + activations."""
    return (base_weight_bytes(spec, bits) + activation_bytes(spec, bits, batch_size, options)
            + options.adapter_state_bytes_per_param * adapter_param_count(spec, ranks))


def estimate_compute_seconds(spec: ModelSpec, ranks: Mapping[str, int], bits: int, batch_size: int,
                             profile: ResourceProfile, options: PlanOptions) -> float:
    """Local compute seconds per round."""
    fixed, per_param = _step_flops(spec, batch_size, options)
    flops = options.local_steps * (fixed + per_param * adapter_param_count(spec, ranks))
    return flops / (profile.compute_tflops * 1e12 * options.utilization) * options.time_factor[bits]


def estimate_comm_seconds(spec: ModelSpec, ranks: Mapping[str, int], profile: ResourceProfile,
                          options: PlanOptions) -> float:
    """Seconds to download and upload the adapter at the plan's ranks."""
    nbytes = options.update_bytes_per_param * adapter_param_count(spec, ranks)
    return comm_seconds(nbytes, nbytes, profile)


def _normalised_importance(importance: Mapping[str, float], spec: ModelSpec) -> np.ndarray:
    names = {m.name for m in spec.modules}
    unknown = [k for k in importance if k not in names]
    if unknown:
        raise ValueError(f"importance names module(s) {unknown[:3]} not in the model spec "
                         f"(expected names like {spec.modules[0].name!r})")
    values = [float(importance.get(m.name, 0.0)) for m in spec.modules]
    bad = [(m.name, v) for m, v in zip(spec.modules, values, strict=True) if not math.isfinite(v) or v < 0]
    if bad:
        raise ValueError(f"importance must be finite and >= 0, got {bad[0][1]!r} for {bad[0][0]!r}")
    w = np.array(values)
    total = w.sum()
    # No signal at all (e.g. a fresh model): every module counts the same.
    return w / total if total > 0 else np.full(len(w), 1.0 / len(w))


def _rank_gain(rank: int | np.ndarray, options: PlanOptions) -> Any:
    return np.log2(1.0 + np.asarray(rank, dtype=float)) / math.log2(1.0 + options.ranks[-1])


def plan_objective(importance: Mapping[str, float], ranks: Mapping[str, int], bits: int, batch_size: int,
                   spec: ModelSpec, options: PlanOptions) -> float:
    """The planner's objective for a plan (importance is normalised to sum 1 first)."""
    w = _normalised_importance(importance, spec)
    index = {m.name: i for i, m in enumerate(spec.modules)}
    adapter_param_count(spec, ranks)  # validates names
    capacity = sum(w[index[n]] * _rank_gain(r, options) for n, r in ranks.items())
    return float(capacity + options.bits_bonus[bits] + options.batch_bonus * math.log2(batch_size))


# --------------------------------------------------------------------------------------------------
# Search


@dataclass
class _Knapsack:
    """Exact multiple-choice knapsack over modules, solved once for every capacity up to ``cap``."""

    unit: int  # parameters per capacity unit
    weights: np.ndarray  # (modules, ranks) in units
    params: np.ndarray  # (modules, ranks) in parameters
    values: np.ndarray  # (modules, ranks)
    best: np.ndarray  # (cap + 1,) best value at capacity <= c units (-inf: nothing feasible)
    choice: np.ndarray  # (modules, cap + 1) rank index chosen for module m at capacity c
    min_units: int  # smallest capacity that adapts at least one module
    min_params: int

    @classmethod
    def solve(cls, spec: ModelSpec, w: np.ndarray, options: PlanOptions, max_params: float) -> _Knapsack:
        ranks = np.array(options.ranks)
        fan = np.array([m.in_features + m.out_features for m in spec.modules])
        params = fan[:, None] * ranks[None, :]
        values = w[:, None] * _rank_gain(ranks, options)[None, :]
        unit = _capacity_unit(params, len(spec.modules), max_params)
        # Rounding weights up keeps plans within budget if the table had to be coarsened.
        weights = -(-params // unit)
        if options.ranks[0] == 0:
            min_units = int(weights[:, 1].min())
            min_params = int(params[:, 1].min())
        else:  # every module must be adapted
            min_units, min_params = int(weights[:, 0].sum()), int(params[:, 0].sum())
        cap = int(min(weights[:, -1].sum(), max(max_params // unit, 0)))
        best = np.zeros(cap + 1)
        choice = np.zeros((len(spec.modules), cap + 1), dtype=np.int8)
        for m in range(len(spec.modules)):
            new = np.full(cap + 1, -np.inf)
            pick = choice[m]
            for k in range(len(ranks)):  # ascending ranks + strict ">" -> ties keep the smaller rank
                wk = int(weights[m, k])
                if wk > cap:
                    break
                cand = best[: cap + 1 - wk] + values[m, k]
                better = cand > new[wk:]
                new[wk:][better] = cand[better]
                pick[wk:][better] = k
            best = new
        return cls(unit, weights, params, values, best, choice, min_units, min_params)

    def backtrack(self, caps: np.ndarray) -> np.ndarray:
        """Rank indices (clients, modules) of the optimum at each capacity in ``caps`` (units)."""
        c = np.minimum(caps, len(self.best) - 1).astype(np.int64)
        picks = np.empty((len(c), self.weights.shape[0]), dtype=np.int64)
        for m in range(self.weights.shape[0] - 1, -1, -1):
            k = self.choice[m, c].astype(np.int64)
            picks[:, m] = k
            c = c - self.weights[m, k]
        return picks


def _capacity_unit(params: np.ndarray, num_modules: int, max_params: float) -> int:
    unit = int(np.gcd.reduce(params[params > 0]))
    cap = min(params[:, -1].sum(), max(max_params, 0)) / unit
    if num_modules * (cap + 1) > _MAX_TABLE_ENTRIES:
        # Huge models with coprime shapes: coarsen so the table fits; weights round up (still feasible,
        # optimal up to one unit per module).
        unit *= math.ceil(num_modules * (cap + 1) / _MAX_TABLE_ENTRIES)
    return unit


def plan_clients(profiles: Sequence[ResourceProfile], importance: Mapping[str, float], spec: ModelSpec,
                 options: PlanOptions | None = None,
                 client_ids: Sequence[str | int] | None = None) -> list[ClientPlan]:
    """Plan every client against one (combined) importance map.

    Identical profiles are planned once; the rank search is one knapsack table shared by all clients.

    Raises
    ------
    PlanInfeasible
        For the first client with no feasible plan (exclude it and plan the others).
    """
    options = options or PlanOptions()
    if client_ids is None:
        client_ids = [str(i) for i in range(len(profiles))]
    if len(client_ids) != len(profiles):
        raise ValueError(f"got {len(client_ids)} client_ids for {len(profiles)} profiles")
    if not profiles:
        return []
    w = _normalised_importance(importance, spec)

    keys = [(p.memory_gib, p.compute_tflops, p.uplink_mbps, p.downlink_mbps) for p in profiles]
    unique: dict[tuple[float, ...], int] = {}
    owner = np.array([unique.setdefault(k, len(unique)) for k in keys])
    first = {}
    for i, u in enumerate(owner):
        first.setdefault(int(u), i)
    mem, tflops, up, down = (np.array(col, dtype=float) for col in zip(*unique, strict=True))

    # Affine costs per (unique profile, bits, batch): cost = fixed + per_param * P.
    combos = [(b, s) for b in options.bits for s in sorted(options.batch_sizes, reverse=True)]
    fixed_mem = np.array(
        [base_weight_bytes(spec, b) + activation_bytes(spec, b, s, options) for b, s in combos]
    )
    flops = np.array([_step_flops(spec, s, options) for _, s in combos]) * options.local_steps
    time_factor = np.array([options.time_factor[b] for b, _ in combos])
    speed = tflops[:, None] * 1e12 * options.utilization / time_factor
    fixed_t = flops[None, :, 0] / speed
    comm_pp = options.update_bytes_per_param * 8e-6 * (1.0 / up + 1.0 / down)
    per_param_t = flops[None, :, 1] / speed + comm_pp[:, None]
    cap_mem = (mem[:, None] * GIB - fixed_mem[None, :]) / options.adapter_state_bytes_per_param
    cap_time = (options.deadline_s - fixed_t) / per_param_t
    cap_params = np.minimum(np.minimum(cap_mem, cap_time), options.max_adapter_params)

    knap = _Knapsack.solve(spec, w, options, float(cap_params.max()))
    cap_units = np.floor(cap_params / knap.unit).astype(np.int64)
    feasible = cap_units >= knap.min_units
    bonus = np.array([options.bits_bonus[b] + options.batch_bonus * math.log2(s) for b, s in combos])
    score = np.where(feasible, knap.best[np.clip(cap_units, 0, len(knap.best) - 1)] + bonus[None, :], -np.inf)
    chosen = np.argmax(score, axis=1)  # first max wins: combos are ordered high bits, large batch first

    for u in np.flatnonzero(~feasible.any(axis=1)):
        i = first[int(u)]
        need_mem = fixed_mem + options.adapter_state_bytes_per_param * knap.min_params
        need_t = fixed_t[u] + per_param_t[u] * knap.min_params
        jm, jt = int(np.argmin(need_mem)), int(np.argmin(need_t))
        raise PlanInfeasible(
            f"no plan fits client {str(client_ids[i])!r} ({profiles[i].name or 'unnamed profile'}): budget "
            f"{profiles[i].memory_gib:.2f} GiB memory and {options.deadline_s:g} s round deadline; the "
            f"smallest plan needs {need_mem[jm] / GIB:.2f} GiB (bits {combos[jm][0]}, batch {combos[jm][1]}) "
            f"and {need_t[jt]:.1f} s (bits {combos[jt][0]}, batch {combos[jt][1]})"
        )

    picks = knap.backtrack(cap_units[np.arange(len(unique)), chosen])
    rank_values = np.array(options.ranks)
    cheapest = int(np.argmin(knap.params[:, 1])) if options.ranks[0] == 0 else 0
    # Only zero-importance modules fit: adapt the cheapest one so the client trains something.
    picks[(rank_values[picks] == 0).all(axis=1), cheapest] = 1
    rows = np.arange(len(spec.modules))
    n_params = knap.params[rows[None, :], picks].sum(axis=1).tolist()
    objective = (knap.values[rows[None, :], picks].sum(axis=1) + bonus[chosen]).tolist()
    ranks_table = rank_values[picks].tolist()  # python ints: building dicts from numpy scalars is 10x slower
    names = spec.module_names()
    unique_plans = []
    for u in range(len(unique)):
        j = int(chosen[u])
        bits, batch = combos[j]
        nbytes = options.update_bytes_per_param * n_params[u]
        comm_s = comm_seconds(nbytes, nbytes, profiles[first[u]])
        step_s = float((flops[j, 0] + flops[j, 1] * n_params[u]) / speed[u, j]) / options.local_steps
        steps = local_steps_to_fill(step_s, comm_s, options)
        unique_plans.append(ClientPlan(
            client_id="",
            ranks={name: r for name, r in zip(names, ranks_table[u], strict=True) if r},
            batch_size=batch,
            bits=bits,
            est_memory_bytes=float(fixed_mem[j] + options.adapter_state_bytes_per_param * n_params[u]),
            est_compute_s=steps * step_s,
            est_comm_s=comm_s,
            objective=objective[u],
            local_steps=steps,
        ))
    return [
        ClientPlan(**{**_shallow_fields(unique_plans[u]), "client_id": str(cid),
                      "ranks": dict(unique_plans[u].ranks)})
        for cid, u in zip(client_ids, owner, strict=True)
    ]


def local_steps_to_fill(step_seconds: float, comm_seconds_: float, options: PlanOptions) -> int:
    """Steps a feasible plan trains: ``local_steps``, raised towards ``max_local_steps`` while the estimated
    round stays within ``deadline_fill`` of the deadline."""
    if options.max_local_steps <= options.local_steps:
        return options.local_steps
    room = options.deadline_fill * options.deadline_s - comm_seconds_
    fits = int(room // step_seconds) if step_seconds > 0 else options.max_local_steps
    return max(options.local_steps, min(options.max_local_steps, fits))


def _shallow_fields(plan: ClientPlan) -> dict[str, Any]:
    """Field dict without deep-copying (``dataclasses.asdict`` deep-copies the ranks dict)."""
    return {f.name: getattr(plan, f.name) for f in fields(plan)}


def plan_client(profile: ResourceProfile, importance: Mapping[str, float], spec: ModelSpec,
                options: PlanOptions | None = None, client_id: str | int | None = None) -> ClientPlan:
    """Best plan for one client: exact optimum of the objective over ranks x bits x batch sizes.

    ``client_id`` defaults to the profile's name. Raises :class:`PlanInfeasible` if nothing fits.
    """
    cid = profile.name if client_id is None else client_id
    return plan_clients([profile], importance, spec, options, client_ids=[cid])[0]


def combine_importance(per_client: Sequence[Mapping[str, float]],
                       weights: Sequence[float] | None = None) -> dict[str, float]:
    """Weighted mean of the clients' importance maps, each first normalised to sum 1.

    A module a client did not score counts as 0 for it; a client whose scores are all 0 carries no
    information and is left out. ``weights`` (e.g. sample counts) default to equal.
    """
    if weights is None:
        weights = [1.0] * len(per_client)
    if len(weights) != len(per_client):
        raise ValueError(f"got {len(weights)} weights for {len(per_client)} importance maps")
    if not per_client:
        raise ValueError("combine_importance needs at least one client's importance")
    combined: dict[str, float] = {}
    total_weight = 0.0
    for index, (scores, weight) in enumerate(zip(per_client, weights, strict=True)):
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"weight of client {index} must be finite and >= 0, got {weight!r}")
        for name, value in scores.items():
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"importance of {name!r} from client {index} must be finite and >= 0, "
                                 f"got {value!r}")
        total = sum(scores.values())
        if total <= 0 or weight == 0:
            continue
        total_weight += weight
        for name, value in scores.items():
            combined[name] = combined.get(name, 0.0) + weight * value / total
    names = {name for scores in per_client for name in scores}
    if total_weight == 0:
        return {name: 1.0 / len(names) for name in sorted(names)} if names else {}
    return {name: combined.get(name, 0.0) / total_weight for name in sorted(names)}


def benchmark_planner(num_clients: int = 1000, scenario: str = "mixed", seed: int = 0,
                      repeats: int = 3) -> float:
    """Best-of-``repeats`` wall seconds of :func:`plan_clients` for SmolLM2-135M with ``num_clients``
    clients drawn from ``scenario`` (``"mixed"``: every profile distinct, so no caching helps)."""
    spec = model_spec_from_config(SMOLLM2_135M_CONFIG)
    rng = np.random.default_rng(seed)
    importance = dict(zip(spec.module_names(), rng.gamma(0.5, size=len(spec.modules)).tolist(), strict=True))
    profiles = assign_profiles(scenario, num_clients, seed)
    options = PlanOptions()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        plan_clients(profiles, importance, spec, options)
        best = min(best, time.perf_counter() - start)
    return best


if __name__ == "__main__":
    for name in ("tiers", "mixed"):
        seconds = benchmark_planner(1000, name)
        print(f"plan_clients, 1000 clients, scenario {name!r}, SmolLM2-135M: {seconds:.3f} s")
