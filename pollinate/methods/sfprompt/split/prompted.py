"""The split model as evaluation expects a Hugging Face model: head -> body -> tail with HF-style calls."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from pollinate.methods.sfprompt.split.base import SplitParts, TailOutput

BodyFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class PromptedSplitModel(nn.Module):
    """The global model as ``evaluate_model`` expects it: head -> body -> tail with HF-style calls.

    ``forward(input_ids, attention_mask, labels)`` returns ``TailOutput(loss, logits)``; ``generate`` is
    greedy decoding for causal LMs (what exact match needs), without a KV cache.

    Parameters
    ----------
    parts : SplitParts
        Head, body and tail of the split model.
    body : callable, optional
        ``body(hidden, attention_mask) -> hidden`` in place of ``parts.body``: on a client, the split service's
        body (``SplitChannel.body``).
    max_positions : int, optional
        Positions one sequence may have, prompt included (the split service's ``max_seq_len``): ``generate``
        keeps the last tokens of a longer prompt so that it and ``max_new_tokens`` fit. None: no bound.
    """

    def __init__(self, parts: SplitParts, body: BodyFn | None = None, *, max_positions: int | None = None) -> None:
        super().__init__()
        self.head, self.tail = parts.head, parts.tail
        self.body = parts.body if body is None else body
        self.num_prompt_tokens = parts.prompt.num_tokens if parts.prompt is not None else 0
        self.max_positions = max_positions

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> TailOutput:
        out = self.head(input_ids, attention_mask)
        return self.tail(self.body(out.hidden, out.attention_mask), out.attention_mask, labels)

    def _prompt_room(self, max_new_tokens: int) -> int | None:
        """Tokens a prompt may keep so that it, the soft prompt and ``max_new_tokens`` fit (None: any)."""
        if self.max_positions is None:
            return None
        room = self.max_positions - self.num_prompt_tokens - max_new_tokens + 1  # the last new token is not fed
        if room < 1:
            raise ValueError(f"max_positions={self.max_positions} leaves no room for a prompt with "
                             f"{self.num_prompt_tokens} soft-prompt tokens and max_new_tokens={max_new_tokens}")
        return room

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                 pad_token_id: int, eos_token_id: int | None = None, **_: Any) -> torch.Tensor:
        """Greedy continuation of left-padded prompts; returns ``[input_ids | new tokens]`` like HF.

        The split model numbers positions 0..P+T-1 whatever the mask says, so each prompt is decoded
        right-padded (causal attention never looks at the padding after a row's last token).
        """
        room = self._prompt_room(max_new_tokens)
        rows = [ids[mask.bool()][-room:] if room else ids[mask.bool()]
                for ids, mask in zip(input_ids, attention_mask, strict=True)]
        lengths = torch.tensor([len(r) for r in rows])
        batch = len(rows)
        buf = torch.full((batch, int(lengths.max()) + max_new_tokens), pad_token_id, dtype=input_ids.dtype)
        mask = torch.zeros_like(buf)
        for i, row in enumerate(rows):
            buf[i, : len(row)], mask[i, : len(row)] = row, 1
        done = torch.zeros(batch, dtype=torch.bool)
        new_tokens = []
        arange = torch.arange(batch)
        for _ in range(max_new_tokens):
            width = int(lengths.max())
            logits = self(buf[:, :width], mask[:, :width]).logits
            token = logits[arange, self.num_prompt_tokens + lengths - 1].argmax(-1)
            token = torch.where(done, torch.full_like(token, pad_token_id), token)
            buf[arange, lengths], mask[arange, lengths] = token, 1
            lengths = lengths + 1
            new_tokens.append(token)
            if eos_token_id is not None:
                done |= token == eos_token_id
            if bool(done.all()):
                break
        return torch.cat([input_ids, torch.stack(new_tokens, dim=1)], dim=1)
