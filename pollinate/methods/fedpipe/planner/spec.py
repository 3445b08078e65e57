"""The shapes the planner reasons about: every adaptable linear layer of a model, without its weights.

A :class:`ModelSpec` is built from a Hugging Face config (object or ``config.json`` dict) for the Llama and
BERT families, or walked from a loaded model for anything else.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pollinate.common.models import FAMILY_ALL_LINEAR

__all__ = ["ModelSpec", "ModuleSpec", "head_parameter_count", "model_spec_from_config", "model_spec_from_model"]

_LLAMA_TYPES = ("llama", "mistral")
_BERT_TYPES = ("bert",)
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)\.")


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
    head_params : int, default 0
        Parameters trained in full next to the adapter and sent with it every round: a classifier's head (and
        its pooler with CLS pooling). Part of ``num_params`` too (the frozen original stays in the base).
    """

    num_params: int
    hidden: int
    num_layers: int
    vocab: int
    modules: list[ModuleSpec]
    logit_width: int | None = None
    head_params: int = 0

    def __post_init__(self) -> None:
        for name in ("num_params", "hidden", "num_layers", "vocab"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelSpec field {name!r} must be a positive int, got {value!r}")
        if not isinstance(self.head_params, int) or self.head_params < 0:
            raise ValueError(f"ModelSpec field 'head_params' must be an int >= 0, got {self.head_params!r}")
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


def _layer_modules(prefix: str, layers: int, shapes: Mapping[str, tuple[int, int]]) -> list[ModuleSpec]:
    return [
        ModuleSpec(f"{prefix}{layer}.{suffix}", fan_in, fan_out, layer)
        for layer in range(layers)
        for suffix, (fan_in, fan_out) in shapes.items()
    ]


def _llama_spec(cfg: Any, prefix: str) -> ModelSpec:
    h, inter = int(_cfg(cfg, "hidden_size")), int(_cfg(cfg, "intermediate_size"))
    layers, vocab = int(_cfg(cfg, "num_hidden_layers")), int(_cfg(cfg, "vocab_size"))
    heads = int(_cfg(cfg, "num_attention_heads"))
    kv_heads = int(_cfg(cfg, "num_key_value_heads", None) or heads)
    head_dim = int(_cfg(cfg, "head_dim", None) or h // heads)
    tied = bool(_cfg(cfg, "tie_word_embeddings", False))
    q, kv = heads * head_dim, kv_heads * head_dim
    shapes = {
        "self_attn.q_proj": (h, q),
        "self_attn.k_proj": (h, kv),
        "self_attn.v_proj": (h, kv),
        "self_attn.o_proj": (q, h),
        "mlp.gate_proj": (h, inter),
        "mlp.up_proj": (h, inter),
        "mlp.down_proj": (inter, h),
    }
    modules = _layer_modules(f"{prefix}layers.", layers, shapes)
    per_layer = sum(i * o for i, o in shapes.values()) + 2 * h  # weights + two RMSNorm scales
    if _cfg(cfg, "attention_bias", False):
        per_layer += q + 2 * kv + h
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
    # query, key, value, attention.output.dense are h x h; then the MLP's up and down projections.
    shapes = dict(zip(FAMILY_ALL_LINEAR["bert"], [(h, h)] * 4 + [(h, inter), (inter, h)], strict=True))
    modules = _layer_modules(f"{prefix}encoder.layer.", layers, shapes)
    embeddings = (vocab + max_pos + type_vocab) * h + 2 * h
    per_layer = sum(i * o + o for i, o in shapes.values()) + 2 * 2 * h  # + biases, two LayerNorms
    head = (h * h + h) + (h * num_labels + num_labels)  # pooler + classifier
    num_params = embeddings + layers * per_layer + head
    return ModelSpec(num_params, h, layers, vocab, modules, logit_width=num_labels)


def head_parameter_count(model: Any, head_modules: Sequence[str]) -> int:
    """Parameters of the modules named (as suffixes, like peft's ``modules_to_save``) by ``head_modules``."""
    return sum(p.numel() for name, module in model.named_modules()
               if any(name == h or name.endswith("." + h) for h in head_modules) for p in module.parameters())


def model_spec_from_model(model: Any, targets: Sequence[str] | None = None,
                          head_modules: Sequence[str] = ()) -> ModelSpec:
    """Walk a loaded (torch) model: every module with ``in_features``/``out_features`` whose name ends
    with one of ``targets`` (default: every family's attention and MLP projections) becomes a candidate;
    ``head_modules`` are trained in full (``ModelSpec.head_params``).
    Pass the base model, not a ``PeftModel``, so names match what peft's target matching sees."""
    if targets is None:
        targets = [t for family in FAMILY_ALL_LINEAR.values() for t in family]
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
        head_params=head_parameter_count(model, head_modules),
    )
