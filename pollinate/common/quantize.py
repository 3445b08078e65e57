"""Frozen base weights in NF4 or int8, via bitsandbytes through ``transformers.BitsAndBytesConfig``: FedPipe's
per-client bits and fedavg-lora's ``lora.base_bits``.

bitsandbytes on CPU and CUDA; peft has dedicated LoRA layers for bitsandbytes modules, and the adapter's
keys and shapes do not depend on the base's bits, so clients with different bits aggregate together.
:func:`load_quantized_base` builds the base: on CUDA through ``transformers.from_pretrained``, on the CPU one
checkpoint tensor at a time (:mod:`pollinate.common.quantized_base`), so the fp32 checkpoint never stays resident.

Bits: 32 = fp32 base, 16 = bf16 base (no bitsandbytes), 8 = LLM.int8, 4 = NF4 with double
quantization and bf16 compute (on a CPU without AVX512-BF16, fp32 compute: :func:`cpu_compute_dtype`).
Never merge an adapter into a quantized base on a client; merge on the server into an fp32/bf16 base.
"""

from __future__ import annotations

import logging

import torch
from transformers import BitsAndBytesConfig

__all__ = [
    "ALLOWED_BITS",
    "cpu_compute_dtype",
    "is_quantized",
    "load_quantized_base",
    "prepare_quantized_model",
    "quantization_config",
    "silence_bitsandbytes",
]

ALLOWED_BITS = (32, 16, 8, 4)


def silence_bitsandbytes() -> None:
    """Quiet bitsandbytes' per-call logs: the offline "Failed to load CPU gemm_4bit_forward from
    kernels-community" fallback notice and int8's "inputs will be cast" warning on every matmul.

    The ``gemv_4bit`` autograd UserWarning is deliberately left alone: it is the only visible sign of
    the AVX512-BF16 repacking bug that :func:`prepare_quantized_model` prevents.
    """
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


silence_bitsandbytes()


def quantization_config(bits: int, skip_modules: list[str] | None = None) -> BitsAndBytesConfig | None:
    """The ``BitsAndBytesConfig`` for ``bits`` (None for 32/16: no quantization).

    ``skip_modules`` stay in full precision: a classifier's head (and CLS pooler), which is trained in full and
    which bitsandbytes would otherwise quantize like every other linear layer of an encoder. None keeps
    transformers' own choice (a causal LM's output head).
    """
    if isinstance(bits, bool) or bits not in ALLOWED_BITS:
        raise ValueError(f"bits must be one of {ALLOWED_BITS}, got {bits!r}")
    if bits in (32, 16):
        return None
    skip = {"llm_int8_skip_modules": list(skip_modules)} if skip_modules else {}
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, **skip)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
        **skip,
    )


def is_quantized(model: torch.nn.Module) -> bool:
    """Whether the model holds bitsandbytes 4-bit or 8-bit linear layers."""
    import bitsandbytes as bnb

    return any(isinstance(m, bnb.nn.Linear4bit | bnb.nn.Linear8bitLt) for m in model.modules())


def prepare_quantized_model(model: torch.nn.Module) -> torch.nn.Module:
    """Make a bitsandbytes-quantized model safe to LoRA-train; a no-op for unquantized models.

    - Sets ``support_avx512bf16_for_cpu = False`` on every ``Linear4bit``. On CPUs with AVX512-BF16,
      bitsandbytes 0.50.x repacks 4-bit weights in place during any eval-mode no-grad forward, and
      from then on no gradient flows back through those layers (LoRA B tensors below them stay at
      zero). A federated client evaluates between rounds, so it would hit this every round.
    - Runs peft's ``prepare_model_for_kbit_training`` without gradient checkpointing (it freezes the
      base and upcasts non-quantized bf16/fp16 parameters to fp32).
    """
    if not is_quantized(model):
        return model
    import bitsandbytes as bnb
    from peft import prepare_model_for_kbit_training

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def cpu_compute_dtype() -> torch.dtype:
    """The dtype NF4 layers compute in on this CPU: bf16 where it has AVX512-BF16 (bf16 matmuls are faster than
    fp32 there), else fp32 (elsewhere bf16 matmuls are emulated, and an NF4 step becomes many times slower)."""
    from bitsandbytes.functional import has_avx512bf16

    return torch.bfloat16 if has_avx512bf16() else torch.float32


def load_quantized_base(path: str, task: str, num_labels: int, bits: int, skip_modules: list[str] | None = None,
                        pooling: str = "auto") -> torch.nn.Module:
    """The frozen base at ``bits`` for ``task``, ready for LoRA (:func:`prepare_quantized_model`).

    ``skip_modules`` as in :func:`quantization_config`. On CUDA, ``transformers`` loads and quantizes it; on the
    CPU it is built one checkpoint tensor at a time. Bits 32 and 16 give the plain fp32 model.
    """
    from pollinate.common.models import load_model, pick_device

    config = quantization_config(bits, skip_modules)
    if config is None:
        return load_model(path, task, num_labels, pooling=pooling)
    if pick_device().type == "cuda":
        return prepare_quantized_model(load_model(path, task, num_labels, config, pooling=pooling))
    from pollinate.common.quantized_base import load_quantized_cpu

    if config.load_in_4bit:
        config.bnb_4bit_compute_dtype = cpu_compute_dtype()
    return prepare_quantized_model(load_quantized_cpu(path, task, num_labels, config, pooling=pooling))
