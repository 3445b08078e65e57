"""The parts of a U-shaped split and the table of architectures that know how to cut a model.

The client keeps the head (embeddings, the first blocks and learnable soft prompts) and the tail (the last
blocks, final norm/pooler and output head, so labels never leave it); the server runs the frozen body. Only
hidden states and a 2-D attention mask cross the cut: each side recomputes positions, rotary embeddings and
the 4-D attention mask from those, exactly as the unsplit model does.

Architectures are small classes in sibling modules, chosen from a table keyed on the model class name
(filled by ``register_split_architecture``). Nothing here knows a federated method.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from pollinate.methods.sfprompt.split.prompt import PromptInit, SoftPrompt


@dataclass
class HeadOutput:
    """What the head hands on: exactly what travels to the server.

    ``hidden`` is (B, P+T, H); ``attention_mask`` is (B, P+T) with 1 for tokens to attend (prompts included).
    """

    hidden: torch.Tensor
    attention_mask: torch.Tensor


@dataclass
class TailOutput:
    """Loss (None without labels) and logits of the tail.

    With ``answers_only`` (causal LM) the logits are only those of the (example, position) pairs that predict
    a labelled token, flattened to (N, V); ``targets`` (N,) holds the token each predicts and ``rows`` (N,)
    the example it belongs to.
    """

    loss: torch.Tensor | None
    logits: torch.Tensor
    targets: torch.Tensor | None = None
    rows: torch.Tensor | None = None


@dataclass
class SplitParts:
    """Head, body and tail modules sharing the original model's parameters (no copies)."""

    head: nn.Module
    body: nn.Module
    tail: nn.Module
    architecture: SplitArchitecture

    @property
    def prompt(self) -> SoftPrompt | None:
        return getattr(self.head, "prompt", None)

    def trainable_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Named parameters the client trains: the prompt and tail parameters with ``requires_grad``."""
        for prefix, module in (("head", self.head), ("tail", self.tail)):
            for name, param in module.named_parameters():
                if param.requires_grad:
                    yield f"{prefix}.{name}", param


def set_split_trainable(parts: SplitParts, *, tail: Literal["full", "none"] = "full") -> None:
    """Freeze head and body; make the prompt and (with ``tail="full"``) the tail trainable.

    A tail parameter that is also a head parameter (tied input/output embeddings, as in SmolLM2) stays
    frozen: training it would silently change the frozen head. For LoRA on the tail, call this with
    ``tail="none"`` and then ``peft.inject_adapter_in_model(lora_config, parts.tail)``: peft wraps the tail's
    linears in place (they are the model's own modules) and only its adapters become trainable.
    """
    if tail not in ("full", "none"):
        raise ValueError(f"set_split_trainable tail={tail!r}: expected 'full' or 'none'")
    parts.head.requires_grad_(False)
    parts.body.requires_grad_(False)
    head_ids = {id(p) for p in parts.head.parameters()}
    for param in parts.tail.parameters():
        param.requires_grad_(tail == "full" and id(param) not in head_ids)
    if parts.prompt is not None:
        parts.prompt.requires_grad_(True)


# --------------------------------------------------------------------------------------------- registry
class SplitArchitecture(ABC):
    """How one model family is cut into head, body and tail. Subclasses register with the decorator."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.config = model.config

    @property
    @abstractmethod
    def layers(self) -> nn.ModuleList:
        """The model's transformer blocks, in order."""

    @property
    @abstractmethod
    def input_embedding(self) -> nn.Embedding:
        """The token embedding (read for vocab-sampled prompt initialisation)."""

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @abstractmethod
    def build(self, head_layers: int, tail_layers: int, prompt: SoftPrompt | None) -> SplitParts:
        """Build the three parts around the given cut points (already validated)."""

    @abstractmethod
    def unsplit_forward(
        self, prompt: SoftPrompt | None, batch: Mapping[str, torch.Tensor]
    ) -> TailOutput:
        """The same prompts and math as head → body → tail, through the model's own forward."""


_REGISTRY: dict[str, type[SplitArchitecture]] = {}


def register_split_architecture(*model_class_names: str) -> Callable[[type[SplitArchitecture]], type]:
    """Class decorator: use the decorated architecture for models of these class names (or subclasses)."""

    def decorate(cls: type[SplitArchitecture]) -> type[SplitArchitecture]:
        for name in model_class_names:
            _REGISTRY[name] = cls
        return cls

    return decorate


def split_architecture_for(model: nn.Module) -> SplitArchitecture:
    """The registered split architecture for ``model`` (looked up along its class hierarchy)."""
    for klass in type(model).__mro__:
        if klass.__name__ in _REGISTRY:
            return _REGISTRY[klass.__name__](model)
    raise ValueError(
        f"no split architecture for model class {type(model).__name__!r}; "
        f"supported: {sorted(_REGISTRY)} (add one with @register_split_architecture)"
    )


def split_model(
    model: nn.Module,
    head_layers: int = 1,
    tail_layers: int = 1,
    num_prompt_tokens: int = 0,
    *,
    prompt_init: PromptInit = "vocab-sample",
    generator: torch.Generator | None = None,
    train_tail: Literal["full", "none"] = "full",
) -> SplitParts:
    """Cut ``model`` into head (embeddings + ``head_layers`` blocks + prompt), body, tail (``tail_layers``).

    The parts share the model's parameters. Head and body are frozen, prompt and tail trainable (see
    ``set_split_trainable``). ``num_prompt_tokens=0`` builds no prompt.
    """
    arch = split_architecture_for(model)
    num_layers = len(arch.layers)
    if head_layers < 1:
        raise ValueError(f"head_layers={head_layers}: the head needs at least 1 block")
    if tail_layers < 1:
        raise ValueError(f"tail_layers={tail_layers}: the tail needs at least 1 block")
    if head_layers + tail_layers >= num_layers:
        raise ValueError(
            f"head_layers={head_layers} + tail_layers={tail_layers} must be < num_layers={num_layers} "
            f"so that the server's body keeps at least 1 block"
        )
    if num_prompt_tokens < 0:
        raise ValueError(f"num_prompt_tokens={num_prompt_tokens}: expected >= 0")
    prompt = None
    if num_prompt_tokens:
        prompt = SoftPrompt(num_prompt_tokens, arch.hidden_size, prompt_init, embedding=arch.input_embedding,
                            std=float(getattr(model.config, "initializer_range", 0.02)), generator=generator)
        prompt.to(device=arch.input_embedding.weight.device)
    parts = arch.build(head_layers, tail_layers, prompt)
    set_split_trainable(parts, tail=train_tail)
    return parts


def unsplit_forward(
    model: nn.Module, prompt: SoftPrompt | None, batch: Mapping[str, torch.Tensor]
) -> TailOutput:
    """Reference: the model's own forward with the same prompts, no split (for exactness checks).

    ``batch`` holds ``input_ids``, ``attention_mask`` and optionally ``labels`` (and ``token_type_ids``).
    """
    return split_architecture_for(model).unsplit_forward(prompt, batch)

