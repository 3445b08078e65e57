"""Llama-family decoders (e.g. SmolLM2) cut into head, body and tail: rotary embeddings, causal mask, GQA."""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.masking_utils import create_causal_mask
from transformers.models.llama.modeling_llama import rotate_half

from pollinate.common.lmloss import IGNORE_INDEX, answers_loss
from pollinate.methods.sfprompt.split.base import (
    HeadOutput,
    SplitArchitecture,
    SplitParts,
    TailOutput,
    register_split_architecture,
)
from pollinate.methods.sfprompt.split.prompt import SoftPrompt

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

