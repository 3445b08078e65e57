"""Learnable soft prompts (prompt tuning) for the client's head."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from pollinate.common.lmloss import IGNORE_INDEX

PromptInit = Literal["vocab-sample", "random"]


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

