"""BERT sequence classifiers (e.g. all-MiniLM-L6-v2) cut into head, body and tail: absolute positions,
segments, bidirectional padding mask."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from transformers.masking_utils import create_bidirectional_mask

from pollinate.common.pooling import MeanPooler
from pollinate.methods.sfprompt.split.base import (
    HeadOutput,
    SplitArchitecture,
    SplitParts,
    TailOutput,
    register_split_architecture,
)
from pollinate.methods.sfprompt.split.prompt import SoftPrompt


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
        """``answers_only`` changes nothing here: a classifier has one logit row per example. The [CLS] pooler
        reads the first position only, so the last block computes just that position's output; mean pooling
        reads every position."""
        if isinstance(self.pooler, MeanPooler):
            pooled = self.pooler(self.blocks(hidden, attention_mask), attention_mask)
        else:
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

