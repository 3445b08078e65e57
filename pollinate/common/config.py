"""One typed run configuration: dataclasses with help text, loaded from TOML, overridden from the CLI.

Precedence: field defaults < ``--config run.toml`` < ``--set section.key=value`` / dedicated flags.
Every section validates itself in ``__post_init__`` with an error that names the field, the value and what
was expected; unknown keys are rejected with the list of allowed ones.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pollinate.methods import METHODS


class ConfigError(ValueError):
    """A configuration value or key the user must fix; the message names it."""


def _help(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


def _require(cond: bool, name: str, value: Any, expected: str) -> None:
    if not cond:
        raise ConfigError(f"config field '{name}' = {value!r} is invalid: expected {expected}")


def _one_of(name: str, value: Any, allowed: typing.Iterable[Any]) -> None:
    allowed = list(allowed)
    _require(value in allowed, name, value, f"one of {allowed}")


@dataclass
class ModelConfig:
    """Which pretrained model to fine-tune."""

    name: str = _help(
        "Preset (smollm2-135m, minilm, tiny-llama, tiny-bert) or a local Hugging Face model directory",
        default="smollm2-135m",
    )
    max_seq_len: int = _help("Truncate tokenized examples to this many tokens", default=64)

    def __post_init__(self) -> None:
        _require(bool(self.name), "model.name", self.name, "a preset name or a model directory")
        _require(8 <= self.max_seq_len <= 8192, "model.max_seq_len", self.max_seq_len, "an int in [8, 8192]")


@dataclass
class DataConfig:
    """Where examples come from and how they are split over clients."""

    source: str = _help(
        "Built-in task name (skills), a .jsonl/.csv file, or a Hugging Face dataset saved with save_to_disk",
        default="skills",
    )
    task_type: str = _help("generation | classification | auto (from the model/data)", default="auto")
    prompt_field: str = _help("Field holding the prompt (generation)", default="prompt")
    response_field: str = _help("Field holding the expected response (generation)", default="response")
    text_field: str = _help("Field holding the input text (classification)", default="text")
    label_field: str = _help("Field holding the class label (classification)", default="label")
    partition_by: str = _help(
        "Field used by dirichlet/pathological partitioning (default: 'skill' for generation, the label field "
        "for classification)",
        default="",
    )
    partition: str = _help("iid | dirichlet | pathological", default="dirichlet")
    dirichlet_alpha: float = _help("Concentration for dirichlet partitioning (smaller = more skewed)", default=0.5)
    classes_per_client: int = _help("Classes/skills per client for pathological partitioning", default=1)
    train_examples: int = _help("Built-in task: training examples to generate (0 = all of a file)", default=800)
    eval_examples: int = _help("Held-out examples evaluated on the server each round", default=60)
    eval_fraction: float = _help("Files without a split: fraction held out for evaluation", default=0.1)

    def __post_init__(self) -> None:
        _one_of("data.task_type", self.task_type, ("auto", "generation", "classification"))
        _one_of("data.partition", self.partition, ("iid", "dirichlet", "pathological"))
        _require(self.dirichlet_alpha > 0, "data.dirichlet_alpha", self.dirichlet_alpha, "a float > 0")
        _require(self.classes_per_client >= 1, "data.classes_per_client", self.classes_per_client, "an int >= 1")
        _require(self.train_examples >= 0, "data.train_examples", self.train_examples, "an int >= 0")
        _require(self.eval_examples >= 1, "data.eval_examples", self.eval_examples, "an int >= 1")
        _require(0 < self.eval_fraction < 1, "data.eval_fraction", self.eval_fraction, "a float in (0, 1)")


@dataclass
class FederationConfig:
    """How many clients and rounds, and the run's seed."""

    clients: int = _help("Number of simulated clients (SuperNodes)", default=4)
    rounds: int = _help("Federated rounds", default=3)
    fraction_train: float = _help("Fraction of clients sampled per round", default=1.0)
    min_clients: int = _help("Minimum replies for a round to count (0 = all sampled)", default=0)
    seed: int = _help("Seed for data generation, partitioning, initialisation and sampling", default=0)
    round_timeout_s: float = _help("Seconds to wait for client replies in a round", default=3600.0)
    client_cpus: float = _help("Simulation: CPU cores reserved per client (Ray)", default=1.0)
    scenario: str = _help(
        "Simulation: resource profiles assigned to clients (uniform | tiers | mixed); enforced: a client's "
        "round time is its compute (scaled to its profile) + bytes / its bandwidth", default="uniform")
    deadline_s: float = _help("Round deadline a client must meet (compute + communication), seconds", default=120.0)

    def __post_init__(self) -> None:
        _require(self.clients >= 1, "federation.clients", self.clients, "an int >= 1")
        _require(self.rounds >= 1, "federation.rounds", self.rounds, "an int >= 1")
        _require(0 < self.fraction_train <= 1, "federation.fraction_train", self.fraction_train, "(0, 1]")
        _require(0 <= self.min_clients <= self.clients, "federation.min_clients", self.min_clients,
                 f"an int in [0, clients={self.clients}]")
        _require(self.round_timeout_s > 0, "federation.round_timeout_s", self.round_timeout_s, "a float > 0")
        _require(self.client_cpus > 0, "federation.client_cpus", self.client_cpus, "a float > 0")
        _one_of("federation.scenario", self.scenario, ("uniform", "tiers", "mixed"))
        _require(self.deadline_s > 0, "federation.deadline_s", self.deadline_s, "a float > 0")


@dataclass
class TrainConfig:
    """The local training loop on each client."""

    local_steps: int = _help("Optimizer steps per client per round", default=5)
    batch_size: int = _help("Examples per step", default=8)
    lr: float = _help("AdamW learning rate", default=1e-3)
    weight_decay: float = _help("AdamW weight decay", default=0.0)
    max_grad_norm: float = _help("Clip gradients to this norm (0 = no clipping)", default=1.0)

    def __post_init__(self) -> None:
        _require(self.local_steps >= 1, "train.local_steps", self.local_steps, "an int >= 1")
        _require(self.batch_size >= 1, "train.batch_size", self.batch_size, "an int >= 1")
        _require(self.lr > 0, "train.lr", self.lr, "a float > 0")
        _require(self.weight_decay >= 0, "train.weight_decay", self.weight_decay, "a float >= 0")
        _require(self.max_grad_norm >= 0, "train.max_grad_norm", self.max_grad_norm, "a float >= 0")


@dataclass
class LoraConfig:
    """The LoRA adapter (peft) trained by the LoRA-based methods."""

    r: int = _help("LoRA rank", default=8)
    alpha: float = _help("LoRA alpha (the update is scaled by alpha / r)", default=16.0)
    dropout: float = _help("LoRA dropout", default=0.05)
    target_modules: list[str] = _help(
        "Module name suffixes to adapt; empty = the family default (q_proj,v_proj / query,value)",
        default_factory=list,
    )

    def __post_init__(self) -> None:
        _require(self.r >= 1, "lora.r", self.r, "an int >= 1")
        _require(self.alpha > 0, "lora.alpha", self.alpha, "a float > 0")
        _require(0 <= self.dropout < 1, "lora.dropout", self.dropout, "a float in [0, 1)")
        _require(all(isinstance(m, str) and m for m in self.target_modules), "lora.target_modules",
                 self.target_modules, "a list of non-empty module names")


ENCODING_CHOICES = ("dense-fp32", "dense-fp16", "int8", "nf4", "topk", "lowrank")


@dataclass
class FedPipeConfig:
    """FedPipe: importance scoring, the per-client plan, compressed exchange and heterogeneous aggregation."""

    candidate_modules: list[str] = _help(
        "Module name suffixes the planner may adapt; empty = every attention and MLP projection",
        default_factory=list,
    )
    ranks: list[int] = _help("LoRA ranks the planner may give a module", default_factory=lambda: [2, 4, 8, 16])
    bits: list[int] = _help("Base-weight bits the planner may choose (32 = fp32, 8 = int8, 4 = NF4)",
                            default_factory=lambda: [32, 8, 4])
    batch_sizes: list[int] = _help("Batch sizes the planner may choose", default_factory=lambda: [2, 4, 8])
    score_batches: int = _help("Local batches used for importance scoring (|W * grad W|)", default=2)
    param_budget: int = _help(
        "Most adapter parameters a client trains (and sends) per round, on top of its memory and deadline "
        "(0 = no cap); the planner spends it on the most important modules", default=250_000)
    max_local_steps: int = _help(
        "Most local steps a client trains when its plan leaves round deadline to spare (train.local_steps is "
        "the minimum every plan must fit); its update costs the same bytes however many steps it took",
        default=20)
    global_rank: int = _help("Rank the server keeps the global ΔW at per module (higher = exact longer)",
                             default=32)
    uplink_encoding: str = _help(f"Client->server delta encoding: {' | '.join(ENCODING_CHOICES)}", default="nf4")
    downlink_encoding: str = _help("Server->client delta encoding (same choices)", default="nf4")
    error_feedback: bool = _help("Keep the compression residual on the client and add it next round",
                                 default=True)
    topk_fraction: float = _help("Share of entries kept by the topk encoding", default=0.1)
    block_size: int = _help("Block size of the int8/nf4 encodings", default=64)
    norm_bound: float = _help("Reject client updates whose L2 norm exceeds this", default=1e4)
    max_update_bytes: int = _help("Reject client payloads larger than this many bytes", default=64_000_000)

    def __post_init__(self) -> None:
        _require(bool(self.ranks) and all(r >= 1 for r in self.ranks), "fedpipe.ranks", self.ranks,
                 "a non-empty list of ints >= 1")
        _require(bool(self.bits) and set(self.bits) <= {32, 8, 4}, "fedpipe.bits", self.bits,
                 "a non-empty subset of [32, 8, 4]")
        _require(bool(self.batch_sizes) and all(b >= 1 for b in self.batch_sizes), "fedpipe.batch_sizes",
                 self.batch_sizes, "a non-empty list of ints >= 1")
        _require(self.score_batches >= 1, "fedpipe.score_batches", self.score_batches, "an int >= 1")
        _require(self.param_budget >= 0, "fedpipe.param_budget", self.param_budget, "an int >= 0")
        _require(self.max_local_steps >= 0, "fedpipe.max_local_steps", self.max_local_steps, "an int >= 0")
        _require(self.global_rank >= 1, "fedpipe.global_rank", self.global_rank, "an int >= 1")
        _one_of("fedpipe.uplink_encoding", self.uplink_encoding, ENCODING_CHOICES)
        _one_of("fedpipe.downlink_encoding", self.downlink_encoding, ENCODING_CHOICES)
        _require(0 < self.topk_fraction <= 1, "fedpipe.topk_fraction", self.topk_fraction, "a float in (0, 1]")
        _require(self.block_size >= 8, "fedpipe.block_size", self.block_size, "an int >= 8")
        _require(self.norm_bound > 0, "fedpipe.norm_bound", self.norm_bound, "a float > 0")
        _require(self.max_update_bytes > 0, "fedpipe.max_update_bytes", self.max_update_bytes, "an int > 0")


SPLIT_WIRE_DTYPES = ("fp32", "fp16", "bf16")
EL2N_PATHS = ("split", "local")


@dataclass
class SFPromptConfig:
    """SFPrompt: split model (client head + tail, server body), soft prompts, EL2N pruning, local-loss epochs."""

    head_layers: int = _help("Transformer blocks in the client's head (after the embeddings)", default=1)
    tail_layers: int = _help("Transformer blocks in the client's tail (before the output head)", default=1)
    num_prompt_tokens: int = _help("Learnable soft-prompt tokens prepended after the embeddings", default=8)
    prompt_init: str = _help("Prompt initialisation: vocab-sample | random", default="vocab-sample")
    prompt_lr: float = _help("AdamW learning rate of the prompts (the tail uses train.lr)", default=1e-2)
    keep_fraction: float = _help("γ: share of local examples with the highest EL2N score kept for split steps",
                                 default=0.5)
    keep_per_class: bool = _help(
        "Classification: keep the top γ of each class rather than of all examples, so EL2N under a fresh "
        "classifier (which mostly measures the class prior) cannot drop a whole class", default=True)
    el2n_path: str = _help(
        "Model EL2N scores with: local = the client's head output straight into its tail (no server, no bytes, "
        "as SFPrompt scores; γ = 0.5 then halves the split plane) | split = head -> server body -> tail, the "
        "model the split steps train (a forward-only pass over the split plane: every example's activations "
        "up and body output down, each round it scores)", default="local")
    rescore_every: int = _help(
        "Re-score EL2N and re-select the kept data every this many rounds (1 = every round, as SFPrompt does; "
        "0 = once, at the client's first round, which saves a forward pass over all local data per round)",
        default=1)
    local_epochs: float = _help(
        "Local-loss passes over all local data per round (head output straight into the tail, no server). "
        "Off by default: on SmolLM2 the tail, trained on first-block features it never sees behind the body, "
        "lost more than the split steps regained (round-1 eval loss 1.284 with 1 epoch vs 0.842 without)",
        default=0.0)
    local_steps: int = _help("Cap on local-loss steps per round (0 = no cap)", default=0)
    split_epochs: float = _help("Split-training passes over the kept data per round (head -> server body -> tail)",
                                default=3.0)
    split_steps: int = _help("Cap on split steps per round (0 = no cap)", default=0)
    wire_dtype: str = _help(f"Activations and gradients on the split plane: {' | '.join(SPLIT_WIRE_DTYPES)}",
                            default="fp32")
    host: str = _help("Interface the server's split service binds", default="127.0.0.1")
    port: int = _help("Port of the split service (0 = an ephemeral port)", default=0)
    public_address: str = _help("host:port clients dial (default: host and the bound port)", default="")
    token_ttl_s: float = _help("Lifetime of a per-round split token (also revoked when its round ends)",
                               default=1800.0)
    session_ttl_s: float = _help("An idle split session is dropped with its graph after this many seconds",
                                 default=300.0)
    max_sessions: int = _help("Split sessions the service holds at once", default=64)
    max_message_bytes: int = _help("Largest split-plane message, both directions", default=64 * 1024 * 1024)
    max_graph_bytes: int = _help("Bound on the activations the service keeps for pending backward passes",
                                 default=4 * 1024**3)
    call_timeout_s: float = _help("Deadline of each split-service call from a client", default=60.0)
    tls_certs: str = _help(
        "Directory from `pollinate keys init` (server.crt, server.key, ca.crt): serve the split plane over TLS; "
        "`pollinate coordinator --certs` sets it; empty = plaintext (simulation on loopback)", default="")

    def __post_init__(self) -> None:
        _require(self.head_layers >= 1, "sfprompt.head_layers", self.head_layers, "an int >= 1")
        _require(self.tail_layers >= 1, "sfprompt.tail_layers", self.tail_layers, "an int >= 1")
        _require(self.num_prompt_tokens >= 0, "sfprompt.num_prompt_tokens", self.num_prompt_tokens, "an int >= 0")
        _one_of("sfprompt.prompt_init", self.prompt_init, ("vocab-sample", "random"))
        _require(self.prompt_lr > 0, "sfprompt.prompt_lr", self.prompt_lr, "a float > 0")
        _require(0 < self.keep_fraction <= 1, "sfprompt.keep_fraction", self.keep_fraction, "a float in (0, 1]")
        _one_of("sfprompt.el2n_path", self.el2n_path, EL2N_PATHS)
        _require(self.rescore_every >= 0, "sfprompt.rescore_every", self.rescore_every, "an int >= 0")
        _require(self.local_epochs >= 0, "sfprompt.local_epochs", self.local_epochs, "a float >= 0")
        _require(self.local_steps >= 0, "sfprompt.local_steps", self.local_steps, "an int >= 0")
        _require(self.split_epochs >= 0, "sfprompt.split_epochs", self.split_epochs, "a float >= 0")
        _require(self.split_steps >= 0, "sfprompt.split_steps", self.split_steps, "an int >= 0")
        _require(self.local_epochs > 0 or self.split_epochs > 0, "sfprompt.local_epochs", self.local_epochs,
                 "> 0 when sfprompt.split_epochs is 0 (otherwise nothing trains)")
        _one_of("sfprompt.wire_dtype", self.wire_dtype, SPLIT_WIRE_DTYPES)
        _require(bool(self.host), "sfprompt.host", self.host, "an interface address such as 127.0.0.1")
        _require(0 <= self.port <= 65535, "sfprompt.port", self.port, "an int in [0, 65535]")
        _require(not self.public_address or ":" in self.public_address, "sfprompt.public_address",
                 self.public_address, "empty or host:port")
        _require(self.token_ttl_s > 0, "sfprompt.token_ttl_s", self.token_ttl_s, "a float > 0")
        _require(self.session_ttl_s > 0, "sfprompt.session_ttl_s", self.session_ttl_s, "a float > 0")
        _require(self.max_sessions >= 1, "sfprompt.max_sessions", self.max_sessions, "an int >= 1")
        _require(self.max_message_bytes > 0, "sfprompt.max_message_bytes", self.max_message_bytes, "an int > 0")
        _require(self.max_graph_bytes > 0, "sfprompt.max_graph_bytes", self.max_graph_bytes, "an int > 0")
        _require(self.call_timeout_s > 0, "sfprompt.call_timeout_s", self.call_timeout_s, "a float > 0")


@dataclass
class EvalConfig:
    """Server-side evaluation of the global model after every round."""

    batch_size: int = _help("Examples per evaluation batch", default=20)
    max_new_tokens: int = _help("Generation: tokens generated for exact-match scoring", default=8)

    def __post_init__(self) -> None:
        _require(self.batch_size >= 1, "eval.batch_size", self.batch_size, "an int >= 1")
        _require(self.max_new_tokens >= 1, "eval.max_new_tokens", self.max_new_tokens, "an int >= 1")


@dataclass
class OutputConfig:
    """Where the run writes its report, metrics, checkpoints and adapter."""

    dir: str = _help("Run directory (default: runs/<timestamp>)", default="")
    plots: bool = _help("Write PNG plots and report.md", default=True)




@dataclass
class RunConfig:
    """Everything a run needs; ``pollinate config show`` prints the effective one."""

    method: str = _help(f"Fine-tuning method: {' | '.join(METHODS)}", default="fedavg-lora")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    fedpipe: FedPipeConfig = field(default_factory=FedPipeConfig)
    sfprompt: SFPromptConfig = field(default_factory=SFPromptConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def __post_init__(self) -> None:
        _one_of("method", self.method, METHODS)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunConfig:
        return _build(cls, raw, prefix="")

    @classmethod
    def from_json(cls, text: str) -> RunConfig:
        return cls.from_dict(json.loads(text))


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """Check/convert a TOML or CLI value to the field's declared type."""
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        if isinstance(value, str):  # "--set lora.target_modules=q_proj,v_proj"
            value = [v.strip() for v in value.split(",") if v.strip()]
        _require(isinstance(value, list), name, value, "a list")
        (item_tp,) = typing.get_args(tp)[:1]
        return [_coerce(f"{name}[]", v, item_tp) for v in value]
    if origin in (typing.Union, types.UnionType):
        return value
    if tp is bool:
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        _require(isinstance(value, bool), name, value, "true or false")
        return value
    if tp is int:
        _require(isinstance(value, int) and not isinstance(value, bool), name, value, "an integer")
        return value
    if tp is float:
        _require(isinstance(value, (int, float)) and not isinstance(value, bool), name, value, "a number")
        return float(value)
    if tp is str:
        _require(isinstance(value, str), name, value, "a string")
        return value
    return value


def _build(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a table, got {raw!r}")
    types_ = _field_types(cls)
    unknown = sorted(set(raw) - set(types_))
    if unknown:
        where = f"section [{prefix.rstrip('.')}]" if prefix else "the top level"
        raise ConfigError(f"unknown config key '{prefix}{unknown[0]}' in {where}; allowed: {sorted(types_)}")
    kwargs = {}
    for key, value in raw.items():
        tp = types_[key]
        kwargs[key] = _build(tp, value, f"{prefix}{key}.") if _is_section(tp) else _coerce(f"{prefix}{key}", value, tp)
    return cls(**kwargs)


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parse ``section.key=value``; the value is read as TOML when it parses, else as a plain string."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    key, text = item.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    return path, value


def _set_path(raw: dict[str, Any], path: list[str], value: Any) -> None:
    node = raw
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config key '{'.'.join(path)}': '{part}' is a value, not a section")
    node[path[-1]] = value


def load_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file '{path}' is not valid TOML: {exc}") from exc


def build_config(toml_path: str | Path | None = None, overrides: typing.Iterable[str] = ()) -> RunConfig:
    """Defaults, then the TOML file, then ``section.key=value`` overrides; validated as a whole."""
    raw: dict[str, Any] = load_toml(toml_path) if toml_path else {}
    for item in overrides:
        path, value = parse_override(item)
        _set_path(raw, path, value)
    return RunConfig.from_dict(raw)


def describe_fields(cls: type = RunConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, help) for every config field, for ``--help`` and the README."""
    rows = []
    defaults = cls()
    for f in dataclasses.fields(cls):
        tp = _field_types(cls)[f.name]
        if _is_section(tp):
            rows += describe_fields(tp, f"{prefix}{f.name}.")
        else:
            rows.append((f"{prefix}{f.name}", json.dumps(getattr(defaults, f.name)), f.metadata.get("help", "")))
    return rows


def to_toml(cfg: RunConfig) -> str:
    """The effective config as TOML (what ``pollinate config show`` prints and runs save)."""
    lines: list[str] = []
    sections = []
    for key, value in cfg.to_dict().items():
        if isinstance(value, dict):
            sections.append((key, value))
        else:
            lines.append(f"{key} = {json.dumps(value)}")
    for name, values in sections:
        lines.append(f"\n[{name}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"
