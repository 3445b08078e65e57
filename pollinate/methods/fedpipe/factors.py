"""The factors a FedPipe client is sent for a planned module: peft's names, a seeded fresh init, and the best
rank-r factorisation of the global ΔW at the client's alpha."""

from __future__ import annotations

import math
import zlib

import numpy as np
import torch

from pollinate.methods.fedpipe.lowrank import LoraFactors, reproject_lora

LORA_ALPHA_PER_RANK = 2.0  # alpha = 2r on every client: the same scaling (2) whatever the planned rank


def lora_keys(module: str) -> tuple[str, str]:
    """peft state-dict keys of a module's factors (``get_peft_model_state_dict`` naming)."""
    return f"base_model.model.{module}.lora_A.weight", f"base_model.model.{module}.lora_B.weight"


def fresh_factors(module: str, rank: int, in_features: int, out_features: int, seed: int) -> LoraFactors:
    """peft's default LoRA init (A: Kaiming-uniform with a=√5, B: 0), seeded by module so it is reproducible."""
    gen = torch.Generator().manual_seed(seed ^ (hash_name(module) & 0x7FFFFFFF))
    a = torch.empty(rank, in_features)
    torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=gen)
    return LoraFactors(a=a.numpy(), b=np.zeros((out_features, rank), np.float32), alpha=LORA_ALPHA_PER_RANK * rank)


def hash_name(name: str) -> int:
    return zlib.crc32(name.encode())  # stable across processes, unlike hash()


def factors_for_client(global_factors: LoraFactors | None, module: str, rank: int, shape: tuple[int, int],
                       seed: int) -> LoraFactors:
    """Best rank-``rank`` factors of the global ΔW at this client's alpha; rows beyond the ΔW's rank (and a
    zero ΔW) get a fresh A with B = 0, so every planned component can learn and ΔW is unchanged."""
    out_features, in_features = shape
    fresh = fresh_factors(module, rank, in_features, out_features, seed)
    if global_factors is None:
        return fresh
    factors, _ = reproject_lora(global_factors, rank, alpha=LORA_ALPHA_PER_RANK * rank)
    a, b = factors.a.astype(np.float32), factors.b.astype(np.float32)
    dead = np.linalg.norm(b, axis=0) == 0
    a[dead] = fresh.a[dead]
    return LoraFactors(a=a, b=b, alpha=LORA_ALPHA_PER_RANK * rank)
