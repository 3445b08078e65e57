"""Build a frozen base directly in its bitsandbytes NF4 / int8 form on the CPU, one checkpoint tensor at a time.

``transformers.from_pretrained`` with a ``BitsAndBytesConfig`` quantizes tensor by tensor too, but it memory-maps
the checkpoint: every page it reads stays in the process's resident set while the mapping lives, and the
unquantized tensors (embeddings, norms) stay views of it, so a quantized base kept the fp32 checkpoint resident.
Here the model is built as a skeleton without parameter storage (``accelerate.init_empty_weights``), its linear
layers are swapped for bitsandbytes layers (``replace_with_bnb_linear``, as ``transformers`` does), and each
tensor is read into its own buffer with plain file reads, quantized if it is a target layer's weight, and placed.
Peak memory while loading is the quantized model plus one fp32 tensor.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import struct
from collections.abc import Iterator
from pathlib import Path

import torch

__all__ = ["checkpoint_files", "load_quantized_cpu", "read_checkpoint"]

# safetensors dtype codes -> torch dtypes (the format's specification).
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def checkpoint_files(path: str | Path) -> list[Path]:
    """The model directory's safetensors files: the shards its index names (in order), else the single file."""
    directory = Path(path)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [directory / name for name in dict.fromkeys(weight_map.values())]
    single = directory / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"model directory '{directory}' has no model.safetensors nor an index of shards: "
                                "a quantized CPU base loads safetensors checkpoints only")
    return [single]


def read_checkpoint(path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the checkpoint as (name, tensor), each read into memory of its own.

    Plain reads, not a memory map: a mapped checkpoint keeps every page read so far in the resident set.
    """
    for file in checkpoint_files(path):
        with open(file, "rb") as fh:
            (header_len,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(header_len))
            header.pop("__metadata__", None)
            start = 8 + header_len
            for name, entry in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                begin, end = entry["data_offsets"]
                if entry["dtype"] not in _DTYPES:
                    raise ValueError(f"checkpoint tensor {name!r} in {file} has dtype {entry['dtype']!r}; "
                                     f"supported: {sorted(_DTYPES)}")
                raw = torch.empty(end - begin, dtype=torch.uint8)
                fh.seek(start + begin)
                if fh.readinto(raw.numpy()) != end - begin:
                    raise ValueError(f"checkpoint file {file} is truncated at tensor {name!r}")
                yield name, raw.view(_DTYPES[entry["dtype"]]).reshape(entry["shape"])


def release_freed_heap() -> None:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``; a no-op elsewhere): the fp32 buffer of each
    weight is freed once quantized, and glibc would otherwise keep the pages, so the load's peak would grow."""
    libc = ctypes.util.find_library("c")
    trim = getattr(ctypes.CDLL(libc), "malloc_trim", None) if libc else None
    if trim is not None:
        trim(0)


def _skeleton(path: str, task: str, num_labels: int, bnb_config) -> torch.nn.Module:
    """The model with parameters on the meta device (buffers real), its target linears bitsandbytes layers."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear
    from transformers.quantizers.base import get_keys_to_not_convert

    if task == "generation":
        config, auto = AutoConfig.from_pretrained(path), AutoModelForCausalLM
    else:
        config, auto = AutoConfig.from_pretrained(path, num_labels=num_labels), AutoModelForSequenceClassification
    with init_empty_weights(include_buffers=False):
        model = auto.from_config(config, dtype=torch.float32)
    skip = bnb_config.llm_int8_skip_modules
    keep = get_keys_to_not_convert(model) if skip is None else list(skip)  # transformers' own default
    return replace_with_bnb_linear(model, modules_to_not_convert=keep, quantization_config=bnb_config)


def _quantized(old: torch.nn.Parameter, value: torch.Tensor) -> torch.nn.Parameter:
    """``value`` as the bitsandbytes parameter ``old`` (a meta placeholder) stands for, quantized on the CPU."""
    import bitsandbytes as bnb

    value = value.to(torch.float32)
    if isinstance(old, bnb.nn.Params4bit):
        return bnb.nn.Params4bit(value, requires_grad=False, **old.__dict__).to("cpu")
    kwargs = {k: v for k, v in old.__dict__.items() if k != "SCB"}
    return bnb.nn.Int8Params(value, requires_grad=False, **kwargs).to("cpu")


def _checkpoint_name(name: str, names: set[str], prefix: str) -> str | None:
    """The model's name for a checkpoint key: as is, with or without the base model's prefix, legacy norms."""
    name = name.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
    for candidate in (name, f"{prefix}.{name}", name.removeprefix(prefix + ".")):
        if candidate in names:
            return candidate
    return None


def _place(model: torch.nn.Module, name: str, value: torch.Tensor) -> bool:
    """Put one checkpoint tensor into the model (quantizing a target weight); False when its shape differs (a
    classifier head sized for other labels, left to be initialized fresh)."""
    import bitsandbytes as bnb

    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    old = getattr(module, leaf)
    if tuple(old.shape) != tuple(value.shape):
        return False
    if isinstance(old, bnb.nn.Params4bit | bnb.nn.Int8Params):
        module._parameters[leaf] = _quantized(old, value)
        release_freed_heap()
    elif leaf in module._parameters:
        cast = value.to(torch.float32) if value.is_floating_point() else value
        module._parameters[leaf] = torch.nn.Parameter(cast, requires_grad=old.requires_grad)
    else:
        module._buffers[leaf] = value.to(old.dtype)
    return True


def _materialize_missing(model: torch.nn.Module) -> list[str]:
    """Initialize, as ``from_pretrained`` does for missing keys, every parameter still without storage (a fresh
    classifier head); returns their names."""
    missing = [name for name, p in model.named_parameters() if p.is_meta]
    owners = {name.rpartition(".")[0] for name in missing}
    with torch.no_grad():
        for owner in owners:
            module = model.get_submodule(owner)
            module.to_empty(device="cpu", recurse=False)
            model._init_weights(module)
    return missing


def load_quantized_cpu(path: str, task: str, num_labels: int, bnb_config, pooling: str = "auto") -> torch.nn.Module:
    """The model at ``path`` for ``task`` (eval mode, on the CPU) with its linear layers quantized as ``bnb_config``
    asks (skip modules and the output head stay fp32), loaded one tensor at a time; classification heads get
    ``num_labels`` outputs over the ``pooling`` the model calls for, as :func:`pollinate.common.models.load_model`."""
    from pollinate.common.pooling import resolve_pooling, use_mean_pooling

    model = _skeleton(path, task, num_labels, bnb_config)
    state_names = set(model.state_dict())  # tied parameters appear under every name
    prefix = model.base_model_prefix
    for key, value in read_checkpoint(path):
        name = _checkpoint_name(key, state_names, prefix)
        if name is not None:
            _place(model, name, value)
    model.tie_weights()
    _materialize_missing(model)
    if task != "generation" and resolve_pooling(pooling, path) == "mean":
        use_mean_pooling(model)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id
    return model.eval()
