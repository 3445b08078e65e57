"""U-shaped split of Hugging Face models: head (client) | body (server) | tail (client).

The client keeps the head (embeddings, the first blocks and learnable soft prompts) and the tail (the last
blocks, final norm/pooler and output head, so labels never leave it); the server runs the frozen body. Only
hidden states and a 2-D attention mask cross the cut: each side recomputes positions, rotary embeddings and
the 4-D attention mask from those, exactly as the unsplit model does.

Architectures are small classes beside each other, chosen by a registry keyed on the model class name
(``register_split_architecture``). This module knows no federated method. It also holds the wire format of
the tensors that cross the cut (``encode_tensor``/``decode_tensor``), shared by the split service and its
client so that neither imports the other.
"""

from __future__ import annotations

import inspect
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers.masking_utils import create_bidirectional_mask, create_causal_mask
from transformers.models.llama.modeling_llama import rotate_half

from pollinate.common.lmloss import IGNORE_INDEX, answers_loss
from pollinate.protos import split_pb2

PromptInit = Literal["vocab-sample", "random"]


# --------------------------------------------------------------------------------------------- soft prompts
class SoftPrompt(nn.Module):
    """``num_tokens`` learnable vectors prepended after the token embeddings (prompt tuning).

    Parameters
    ----------
    num_tokens : int
        Number of virtual tokens (> 0).
    hidden : int
        Embedding width of the model.
    init : {"vocab-sample", "random"}, default "vocab-sample"
        "vocab-sample" copies the embeddings of uniformly sampled vocabulary tokens (Lester et al. 2021, which
        keeps the prompt on the scale the first layer expects; needs ``embedding``); "random" draws from
        N(0, ``std``²).
    embedding : nn.Embedding, optional
        The model's input embedding, read once for "vocab-sample" (not kept, not shared).
    std : float, default 0.02
        Standard deviation for "random".
    generator : torch.Generator, optional
        Source of randomness, for reproducible initialisation.
    """

    def __init__(
        self,
        num_tokens: int,
        hidden: int,
        init: PromptInit = "vocab-sample",
        *,
        embedding: nn.Embedding | None = None,
        std: float = 0.02,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if num_tokens <= 0:
            raise ValueError(f"SoftPrompt num_tokens={num_tokens}: expected a positive number of tokens")
        if hidden <= 0:
            raise ValueError(f"SoftPrompt hidden={hidden}: expected a positive embedding width")
        if init == "vocab-sample":
            if embedding is None:
                raise ValueError("SoftPrompt init='vocab-sample' needs the model's input embedding")
            if embedding.embedding_dim != hidden:
                raise ValueError(
                    f"SoftPrompt hidden={hidden} but the embedding has width {embedding.embedding_dim}"
                )
            ids = torch.randint(0, embedding.num_embeddings, (num_tokens,), generator=generator)
            weight = embedding.weight.detach()[ids].clone().float()
        elif init == "random":
            weight = torch.randn(num_tokens, hidden, generator=generator) * std
        else:
            raise ValueError(f"SoftPrompt init={init!r}: expected 'vocab-sample' or 'random'")
        self.weight = nn.Parameter(weight)

    @property
    def num_tokens(self) -> int:
        return self.weight.shape[0]

    def prepend(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(prompt ++ embeds, ones ++ mask)``, shapes (B, P+T, H) and (B, P+T)."""
        batch, seq = inputs_embeds.shape[:2]
        if attention_mask is None:
            attention_mask = torch.ones(batch, seq, dtype=torch.long, device=inputs_embeds.device)
        prompt = self.weight.to(inputs_embeds.dtype).unsqueeze(0).expand(batch, -1, -1)
        ones = torch.ones(batch, self.num_tokens, dtype=attention_mask.dtype, device=attention_mask.device)
        return torch.cat([prompt, inputs_embeds], dim=1), torch.cat([ones, attention_mask], dim=1)

    def extend_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Prepend ``IGNORE_INDEX`` for the prompt positions of token-level labels (B, T) -> (B, P+T)."""
        pad = torch.full((labels.shape[0], self.num_tokens), IGNORE_INDEX, dtype=labels.dtype,
                         device=labels.device)
        return torch.cat([pad, labels], dim=1)

    def extend_token_type_ids(self, token_type_ids: torch.Tensor) -> torch.Tensor:
        """Prompt positions get segment 0, like the [CLS] segment they sit before."""
        zeros = torch.zeros(token_type_ids.shape[0], self.num_tokens, dtype=token_type_ids.dtype,
                            device=token_type_ids.device)
        return torch.cat([zeros, token_type_ids], dim=1)


# --------------------------------------------------------------------------------------------- split parts
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


# --------------------------------------------------------------------------------------------- Llama family
_MASK_PARAMS = inspect.signature(create_causal_mask).parameters


def _causal_mask(config, hidden: torch.Tensor, attention_mask: torch.Tensor | None,
                 position_ids: torch.Tensor) -> Any:
    """``create_causal_mask`` across transformers 5.x (its keyword names changed between minor releases:
    ``cache`` vs ``past_key_values``, ``inputs_embeds`` vs ``input_embeds``, ``cache_position``)."""
    kwargs: dict[str, Any] = {"config": config, "attention_mask": attention_mask, "position_ids": position_ids}
    kwargs["inputs_embeds" if "inputs_embeds" in _MASK_PARAMS else "input_embeds"] = hidden
    for name in ("cache", "past_key_values"):
        if name in _MASK_PARAMS:
            kwargs[name] = None
    if "cache_position" in _MASK_PARAMS:
        kwargs["cache_position"] = torch.arange(hidden.shape[1], device=hidden.device)
    return create_causal_mask(**kwargs)


class _LlamaBlocks(nn.Module):
    """A run of decoder layers that rebuilds rotary embeddings and the causal mask from shape + 2-D mask.

    Positions are ``arange(P+T)`` as in ``LlamaModel.forward`` (which does not derive them from the mask).
    """

    def __init__(self, config, layers: list[nn.Module], rotary_emb: nn.Module) -> None:
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(layers)
        self.rotary_emb = rotary_emb

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        return self.run(hidden, attention_mask, self.layers)

    def run(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None, layers: Iterable[nn.Module]
            ) -> torch.Tensor:
        position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        mask = _causal_mask(self.config, hidden, attention_mask, position_ids)
        position_embeddings = self.rotary_emb(hidden, position_ids=position_ids)
        for layer in layers:
            hidden = layer(hidden, attention_mask=mask, position_embeddings=position_embeddings,
                           position_ids=position_ids)
        return hidden

    def last_layer_at(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None, rows: torch.Tensor,
                      positions: torch.Tensor) -> torch.Tensor:
        """Output of the last layer at the (row, position) pairs only, (N, H): keys and values for every
        position, queries, attention output and MLP only where asked — nothing after this block reads the other
        positions. The same arithmetic as ``LlamaDecoderLayer`` (pre-norm, rotary, GQA, causal + padding mask)."""
        layer = self.layers[-1]
        attn = layer.self_attn
        batch, seq, _ = hidden.shape
        heads, kv_heads, dim = self.config.num_attention_heads, self.config.num_key_value_heads, attn.head_dim
        normed = layer.input_layernorm(hidden)
        keys = attn.k_proj(normed).view(batch, seq, kv_heads, dim).transpose(1, 2)
        values = attn.v_proj(normed).view(batch, seq, kv_heads, dim).transpose(1, 2)
        position_ids = torch.arange(seq, device=hidden.device).unsqueeze(0)
        cos, sin = self.rotary_emb(hidden, position_ids=position_ids)
        keys = keys * cos.unsqueeze(1) + rotate_half(keys) * sin.unsqueeze(1)
        queries = attn.q_proj(normed[rows, positions]).view(-1, heads, 1, dim)
        cos_q, sin_q = cos[0, positions][:, None, None], sin[0, positions][:, None, None]
        queries = queries * cos_q + rotate_half(queries) * sin_q
        repeat = heads // kv_heads  # GQA: each key/value head serves `repeat` query heads, as HF's repeat_kv
        keys = keys[rows].repeat_interleave(repeat, dim=1)
        values = values[rows].repeat_interleave(repeat, dim=1)
        allowed = torch.arange(seq, device=hidden.device) <= positions[:, None]
        if attention_mask is not None:
            allowed = allowed & attention_mask[rows].bool()
        dropout = attn.attention_dropout if self.training else 0.0
        context = F.scaled_dot_product_attention(queries, keys, values, attn_mask=allowed[:, None, None, :],
                                                 dropout_p=dropout, scale=attn.scaling)
        out = hidden[rows, positions] + attn.o_proj(context.reshape(-1, heads * dim))
        return out + layer.mlp(layer.post_attention_layernorm(out))


class LlamaSplitHead(nn.Module):
    """Token embedding, soft prompt and the first decoder blocks of a Llama-family model."""

    def __init__(self, embed_tokens: nn.Embedding, blocks: _LlamaBlocks, prompt: SoftPrompt | None) -> None:
        super().__init__()
        self.embed_tokens = embed_tokens
        self.blocks = blocks
        self.prompt = prompt

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> HeadOutput:
        embeds = self.embed_tokens(input_ids)
        if attention_mask is None:
            attention_mask = torch.ones(input_ids.shape, dtype=torch.long, device=input_ids.device)
        if self.prompt is not None:
            embeds, attention_mask = self.prompt.prepend(embeds, attention_mask)
        return HeadOutput(self.blocks(embeds, attention_mask), attention_mask)


class LlamaSplitTail(nn.Module):
    """Last decoder blocks, final norm and LM head; the causal-LM loss ignores prompt positions."""

    def __init__(self, model: nn.Module, blocks: _LlamaBlocks, num_prompt_tokens: int) -> None:
        super().__init__()
        self.blocks = blocks
        self.norm = model.model.norm
        self.lm_head = model.lm_head
        self.num_prompt_tokens = num_prompt_tokens
        # Bound method of the model: the loss HF uses for this class (shifted cross-entropy).
        self._loss_function = model.loss_function
        self._vocab_size = model.config.vocab_size

    def forward(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor | None = None,
        answers_only: bool = False,
    ) -> TailOutput:
        """``answers_only`` (needs ``labels``): compute only what the loss reads — the last block's output and
        the LM head at the (example, position) pairs that predict a labelled token (keys and values still see
        every position). The same loss and gradients at a fraction of the compute and memory; see
        ``pollinate.common.lmloss`` for the projection."""
        if labels is None:
            if answers_only:
                raise ValueError("answers_only needs labels: they say which positions are answers")
            return TailOutput(None, self.lm_head(self.norm(self.blocks(hidden, attention_mask))))
        labels = self._with_prompt_positions(labels, hidden)
        if answers_only:
            return self._answers_only(hidden, attention_mask, labels)
        hidden = self.norm(self.blocks(hidden, attention_mask))
        logits = self.lm_head(hidden)
        return TailOutput(self._loss_function(logits=logits, labels=labels, vocab_size=self._vocab_size), logits)

    def _answers_only(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor
                      ) -> TailOutput:
        rows, positions = (labels[:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)  # position p predicts p + 1
        hidden = self.blocks.run(hidden, attention_mask, self.blocks.layers[:-1])
        final = self.norm(self.blocks.last_layer_at(hidden, attention_mask, rows, positions))
        logits, targets = self.lm_head(final), labels[rows, positions + 1]
        return TailOutput(answers_loss(logits, targets), logits, targets, rows)

    def _with_prompt_positions(self, labels: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """Labels padded with ``IGNORE_INDEX`` over the prompt positions, after checking their shape."""
        expected = hidden.shape[1] - self.num_prompt_tokens
        if labels.shape != (hidden.shape[0], expected):
            raise ValueError(
                f"labels have shape {tuple(labels.shape)}, expected {(hidden.shape[0], expected)} "
                f"(one per input token; the {self.num_prompt_tokens} prompt positions are added here)"
            )
        pad = torch.full((labels.shape[0], self.num_prompt_tokens), IGNORE_INDEX, dtype=labels.dtype,
                         device=labels.device)
        return torch.cat([pad, labels], dim=1)


@register_split_architecture("LlamaForCausalLM")
class LlamaSplit(SplitArchitecture):
    """LlamaForCausalLM (e.g. SmolLM2): rotary embeddings at model level, causal mask, GQA."""

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.model.layers

    @property
    def input_embedding(self) -> nn.Embedding:
        return self.model.model.embed_tokens

    def build(self, head_layers: int, tail_layers: int, prompt: SoftPrompt | None) -> SplitParts:
        inner, layers = self.model.model, list(self.layers)
        cut = len(layers) - tail_layers
        head = LlamaSplitHead(inner.embed_tokens, _LlamaBlocks(self.config, layers[:head_layers],
                                                              inner.rotary_emb), prompt)
        body = _LlamaBlocks(self.config, layers[head_layers:cut], inner.rotary_emb)
        tail = LlamaSplitTail(self.model, _LlamaBlocks(self.config, layers[cut:], inner.rotary_emb),
                              prompt.num_tokens if prompt is not None else 0)
        return SplitParts(head, body, tail, self)

    def unsplit_forward(self, prompt: SoftPrompt | None, batch: Mapping[str, torch.Tensor]) -> TailOutput:
        input_ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        labels = batch.get("labels")
        embeds = self.input_embedding(input_ids)
        if prompt is not None:
            embeds, mask = prompt.prepend(embeds, mask)
            labels = prompt.extend_labels(labels) if labels is not None else None
        out = self.model(inputs_embeds=embeds, attention_mask=mask, labels=labels, use_cache=False)
        return TailOutput(out.loss, out.logits)


# --------------------------------------------------------------------------------------------- BERT family
class _BertBlocks(nn.Module):
    """A run of encoder layers that rebuilds the bidirectional padding mask from the 2-D mask."""

    def __init__(self, config, layers: list[nn.Module]) -> None:
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(layers)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        return self.run(hidden, attention_mask, self.layers)

    def run(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None, layers: Iterable[nn.Module]
            ) -> torch.Tensor:
        mask = create_bidirectional_mask(config=self.config, inputs_embeds=hidden,
                                         attention_mask=attention_mask)
        for layer in layers:
            hidden = layer(hidden, mask)
        return hidden

    def last_layer_at_first_position(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None
                                     ) -> torch.Tensor:
        """Output of the last layer at position 0 only, (B, 1, H) — all the pooler reads: keys and values for
        every position, the query, attention output and feed-forward for the first. The arithmetic of
        ``BertLayer`` (self-attention, residual + LayerNorm, feed-forward)."""
        layer = self.layers[-1]
        attn = layer.attention.self
        batch, seq, _ = hidden.shape

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, x.shape[1], -1, attn.attention_head_size).transpose(1, 2)

        first = hidden[:, :1]
        allowed = attention_mask.bool()[:, None, None, :] if attention_mask is not None else None
        context = F.scaled_dot_product_attention(
            heads(attn.query(first)), heads(attn.key(hidden)), heads(attn.value(hidden)), attn_mask=allowed,
            dropout_p=attn.dropout.p if attn.training else 0.0, scale=attn.scaling)
        attended = layer.attention.output(context.transpose(1, 2).reshape(batch, 1, -1), first)
        return layer.output(layer.intermediate(attended), attended)


class BertSplitHead(nn.Module):
    """Word/position/segment embeddings, soft prompt and the first encoder layers of a BERT model.

    The prompt is prepended to the word embeddings before positions and segments are added (as peft's
    prompt tuning does), so every token's absolute position shifts by the prompt length.
    """

    def __init__(self, embeddings: nn.Module, blocks: _BertBlocks, prompt: SoftPrompt | None) -> None:
        super().__init__()
        self.embeddings = embeddings
        self.blocks = blocks
        self.prompt = prompt

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> HeadOutput:
        words = self.embeddings.word_embeddings(input_ids)
        if attention_mask is None:
            attention_mask = torch.ones(input_ids.shape, dtype=torch.long, device=input_ids.device)
        if self.prompt is not None:
            words, attention_mask = self.prompt.prepend(words, attention_mask)
            if token_type_ids is not None:
                token_type_ids = self.prompt.extend_token_type_ids(token_type_ids)
        _check_bert_length(self.blocks.config, words.shape[1])
        embedded = self.embeddings(inputs_embeds=words, token_type_ids=token_type_ids)
        return HeadOutput(self.blocks(embedded, attention_mask), attention_mask)


class BertSplitTail(nn.Module):
    """Last encoder layers, pooler (first position), dropout and classifier, with HF's classification loss."""

    def __init__(self, model: nn.Module, blocks: _BertBlocks) -> None:
        super().__init__()
        self.blocks = blocks
        self.pooler = model.bert.pooler
        self.dropout = model.dropout
        self.classifier = model.classifier
        self._loss_function = model.loss_function
        self._config = model.config

    def forward(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor | None = None,
        answers_only: bool = False,
    ) -> TailOutput:
        """``answers_only`` changes nothing here: a classifier has one logit row per example. The pooler reads
        the first position only, so the last block computes just that position's output."""
        hidden = self.blocks.run(hidden, attention_mask, self.blocks.layers[:-1])
        pooled = self.pooler(self.blocks.last_layer_at_first_position(hidden, attention_mask))
        logits = self.classifier(self.dropout(pooled))
        loss = None
        if labels is not None:
            loss = self._loss_function(labels=labels, pooled_logits=logits, config=self._config)
        return TailOutput(loss, logits)


def _check_bert_length(config, length: int) -> None:
    if length > config.max_position_embeddings:
        raise ValueError(
            f"sequence of {length} positions (prompt included) exceeds max_position_embeddings="
            f"{config.max_position_embeddings}; shorten the inputs or the prompt"
        )


@register_split_architecture("BertForSequenceClassification")
class BertSplit(SplitArchitecture):
    """BertForSequenceClassification (e.g. all-MiniLM-L6-v2): absolute positions, segments, padding mask."""

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.bert.encoder.layer

    @property
    def input_embedding(self) -> nn.Embedding:
        return self.model.bert.embeddings.word_embeddings

    def build(self, head_layers: int, tail_layers: int, prompt: SoftPrompt | None) -> SplitParts:
        if self.model.bert.pooler is None:
            raise ValueError("BertForSequenceClassification without a pooler cannot be split (tail needs it)")
        if self.config.is_decoder:  # the tail's first-position shortcut assumes bidirectional attention
            raise ValueError("a BERT configured as a decoder (is_decoder=True) cannot be split; expected an encoder")
        layers = list(self.layers)
        cut = len(layers) - tail_layers
        head = BertSplitHead(self.model.bert.embeddings, _BertBlocks(self.config, layers[:head_layers]),
                             prompt)
        body = _BertBlocks(self.config, layers[head_layers:cut])
        tail = BertSplitTail(self.model, _BertBlocks(self.config, layers[cut:]))
        return SplitParts(head, body, tail, self)

    def unsplit_forward(self, prompt: SoftPrompt | None, batch: Mapping[str, torch.Tensor]) -> TailOutput:
        input_ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        token_type_ids = batch.get("token_type_ids")
        embeds = self.input_embedding(input_ids)
        if prompt is not None:
            embeds, mask = prompt.prepend(embeds, mask)
            if token_type_ids is not None:
                token_type_ids = prompt.extend_token_type_ids(token_type_ids)
        _check_bert_length(self.config, embeds.shape[1])
        out = self.model(inputs_embeds=embeds, attention_mask=mask, token_type_ids=token_type_ids,
                         labels=batch.get("labels"))
        return TailOutput(out.loss, out.logits)


# --------------------------------------------------------------------------------------------- wire format
WireDType = Literal["fp32", "fp16", "bf16"]

WIRE_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_TORCH_TO_PROTO = {
    torch.float32: split_pb2.FLOAT32,
    torch.float16: split_pb2.FLOAT16,
    torch.bfloat16: split_pb2.BFLOAT16,
    torch.int64: split_pb2.INT64,
    torch.bool: split_pb2.BOOL,
}
_PROTO_TO_TORCH = {v: k for k, v in _TORCH_TO_PROTO.items()}


class TensorDecodeError(ValueError):
    """A tensor message whose dtype, shape or byte size is inconsistent."""


def encode_tensor(tensor: torch.Tensor, dtype: torch.dtype | None = None) -> split_pb2.Tensor:
    """Tensor -> ``split_pb2.Tensor`` (dtype, shape, raw little-endian bytes), cast to ``dtype`` first."""
    tensor = tensor.detach()
    if dtype is not None and tensor.dtype != dtype:
        tensor = tensor.to(dtype)
    if tensor.dtype not in _TORCH_TO_PROTO:
        supported = sorted(map(str, _TORCH_TO_PROTO))
        raise ValueError(f"tensor dtype {tensor.dtype} cannot travel; supported: {supported}")
    # Viewing as uint8 covers bf16, which numpy has no dtype for.
    data = tensor.cpu().contiguous().view(torch.uint8).numpy().tobytes()
    return split_pb2.Tensor(dtype=_TORCH_TO_PROTO[tensor.dtype], shape=list(tensor.shape), data=data)


def decode_tensor(message: split_pb2.Tensor, *, name: str = "tensor") -> torch.Tensor:
    """``split_pb2.Tensor`` -> torch tensor; raises ``TensorDecodeError`` naming ``name`` on inconsistency."""
    if message.dtype not in _PROTO_TO_TORCH:
        raise TensorDecodeError(f"{name}: unknown dtype code {message.dtype}")
    dtype = _PROTO_TO_TORCH[message.dtype]
    shape = tuple(int(d) for d in message.shape)
    if any(d < 0 for d in shape):
        raise TensorDecodeError(f"{name}: negative dimension in shape {shape}")
    itemsize = torch.empty((), dtype=dtype).element_size()
    expected = math.prod(shape) * itemsize
    if len(message.data) != expected:
        raise TensorDecodeError(
            f"{name}: {len(message.data)} bytes of data, expected {expected} for shape {shape} of {dtype}"
        )
    if expected == 0:
        return torch.empty(shape, dtype=dtype)
    # bytearray: torch.frombuffer needs a writable buffer to avoid a warning and aliasing the message.
    return torch.frombuffer(bytearray(message.data), dtype=dtype).reshape(shape)
