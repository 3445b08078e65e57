"""One typed run configuration: dataclasses with help text, loaded from TOML, overridden from the CLI.

Precedence: field defaults < ``--config run.toml`` < ``--set section.key=value`` / dedicated flags.
Every section validates itself in ``__post_init__`` with an error that names the field, the value and what
was expected; unknown keys are rejected with the list of allowed ones.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from typing import Any

from pollinate.common.suggest import did_you_mean


class ConfigError(ValueError):
    """A configuration value or key the user must fix; the message names it."""


def config_field(text: str, *, server_only: bool = False, **kwargs: Any) -> Any:
    """A config field with its help text; ``server_only`` fields never travel to clients (their halves don't
    read them, and a message carries only what its receiver reads)."""
    return field(metadata={"help": text, "server_only": server_only}, **kwargs)


def require(cond: bool, name: str, value: Any, expected: str) -> None:
    if not cond:
        raise ConfigError(f"config field '{name}' = {value!r} is invalid: expected {expected}")


def one_of(name: str, value: Any, allowed: typing.Iterable[Any]) -> None:
    allowed = list(allowed)
    hint = did_you_mean(value, allowed) if isinstance(value, str) else ""
    require(value in allowed, name, value, f"one of {allowed}{hint}")


PRECISIONS = ("fp32", "bf16", "fp16")
PROMPT_TEMPLATES = ("plain", "alpaca", "chat")
LORA_BASE_BITS = (32, 8, 4)


@dataclass
class ModelConfig:
    """Which pretrained model to fine-tune."""

    name: str = config_field(
        "Preset (smollm2-135m, minilm, tiny-llama, tiny-bert; smollm2-shape, smollm2-360m-shape, smollm2-1.7b-shape: "
        "those architectures with random weights, for probes), a local Hugging Face model directory, or a Hub id "
        "already in the local Hugging Face cache (e.g. HuggingFaceTB/SmolLM2-135M-Instruct; runs are offline)",
        default="smollm2-135m",
    )
    max_seq_len: int = config_field("Truncate tokenized examples to this many tokens", default=64)
    pooling: str = config_field(
        "Classification: how an encoder's tokens become one vector: auto (the model's sentence-transformers "
        "pooling when it ships one, e.g. mean for all-MiniLM; else cls) | mean | cls (the [CLS] pooler, trained)",
        default="auto")

    def __post_init__(self) -> None:
        require(bool(self.name), "model.name", self.name, "a preset, a model directory or a Hub id")
        require(8 <= self.max_seq_len <= 8192, "model.max_seq_len", self.max_seq_len, "an int in [8, 8192]")
        one_of("model.pooling", self.pooling, ("auto", "mean", "cls"))


@dataclass
class DataConfig:
    """Where examples come from and how they are split over clients."""

    source: str = config_field(
        "Built-in task name (skills), a .jsonl/.csv file, a directory of them (read in name order), or a Hugging "
        "Face dataset saved with save_to_disk",
        default="skills",
    )
    task_type: str = config_field("generation | classification | auto (from the model/data)", default="auto")
    prompt_field: str = config_field("Field holding the prompt (generation)", default="prompt")
    response_field: str = config_field("Field holding the expected response (generation)", default="response")
    text_field: str = config_field("Field holding the input text (classification)", default="text")
    label_field: str = config_field("Field holding the class label (classification)", default="label")
    partition_by: str = config_field(
        "Field used by dirichlet/pathological partitioning; empty = 'skill' for generation, the label field "
        "for classification",
        default="",
    )
    partition: str = config_field("iid | dirichlet | pathological", default="dirichlet")
    dirichlet_alpha: float = config_field("Concentration for dirichlet partitioning (smaller = more skewed)",
                                          default=0.5)
    classes_per_client: int = config_field("Classes/skills per client for pathological partitioning", default=1)
    builtin_examples: int = config_field("Built-in task: training examples to generate", default=800)
    max_train_examples: int = config_field(
        "Use at most this many training examples of the source (after the eval split; 0 = all)", default=0)
    eval_examples: int = config_field("Held-out examples evaluated on the server each round", default=60)
    eval_fraction: float = config_field("Files without a split: fraction held out for evaluation", default=0.1)
    template: str = config_field(
        "Generation: how a prompt becomes model input: plain (Question: {prompt}\\nAnswer:) | alpaca | chat (the "
        "tokenizer's chat template; rows with a 'messages' list of {role, content} use it, the last assistant "
        "message is the response) | a format string containing {prompt}", default="plain")

    def __post_init__(self) -> None:
        require(self.template in PROMPT_TEMPLATES or "{prompt}" in self.template, "data.template", self.template,
                f"one of {list(PROMPT_TEMPLATES)} or a format string containing {{prompt}}")
        one_of("data.task_type", self.task_type, ("auto", "generation", "classification"))
        one_of("data.partition", self.partition, ("iid", "dirichlet", "pathological"))
        require(self.dirichlet_alpha > 0, "data.dirichlet_alpha", self.dirichlet_alpha, "a float > 0")
        require(self.classes_per_client >= 1, "data.classes_per_client", self.classes_per_client, "an int >= 1")
        require(self.builtin_examples >= 1, "data.builtin_examples", self.builtin_examples, "an int >= 1")
        require(self.max_train_examples >= 0, "data.max_train_examples", self.max_train_examples, "an int >= 0")
        require(self.eval_examples >= 1, "data.eval_examples", self.eval_examples, "an int >= 1")
        require(0 < self.eval_fraction < 1, "data.eval_fraction", self.eval_fraction, "a float in (0, 1)")


AGGREGATORS = ("fedavg", "median", "trimmed-mean", "krum", "multi-krum")
SERVER_OPTIMIZERS = ("fedavg", "fedavgm", "fedadam", "fedyogi")


@dataclass
class FederationConfig:
    """How many clients and rounds, and the run's seed."""

    clients: int = config_field("Number of clients: simulated, or joined clients the coordinator waits for",
                                default=4)
    rounds: int = config_field("Federated rounds", server_only=True, default=3)
    fraction_train: float = config_field("Fraction of clients sampled per round", server_only=True, default=1.0)
    min_clients: int = config_field("Minimum replies for a round to count (0 = all sampled)", server_only=True,
                                    default=0)
    seed: int = config_field("Seed for data generation, partitioning, initialisation and sampling", default=0)
    round_timeout_s: float = config_field("Seconds to wait for client replies in a round", server_only=True,
                                          default=3600.0)
    client_cpus: float = config_field("Simulation: CPU cores reserved per client (Ray)", server_only=True, default=1.0)
    client_gpus: float = config_field(
        "Simulation: GPUs reserved per client (Ray; a fraction shares one, e.g. 0.25 = four clients per GPU; "
        "0 = clients get no GPU)", server_only=True, default=0.0)
    ray_address: str = config_field(
        "Simulation: address of an existing Ray cluster to run the clients on (e.g. auto, 10.0.0.5:6379, "
        "ray://head:10001; Pollinate must be installed on its nodes); empty = start a local Ray", server_only=True,
        default="")
    scenario: str = config_field(
        "Simulation: resource profiles assigned to clients (uniform | tiers | mixed); enforced: a client's "
        "round time is its compute (scaled to its profile) + bytes / its bandwidth", default="uniform")
    deadline_s: float = config_field("Round deadline a client must meet (compute + communication), seconds",
                                     server_only=True, default=120.0)
    max_examples_per_client: int = config_field(
        "Largest example count (FedAvg weight) a reply may state; a count that is not an integer in "
        "[1, this] rejects the reply", server_only=True, default=1_000_000)
    update_norm_bound: float = config_field("Reject a client update whose L2 norm exceeds this (0 = no bound)",
                                            server_only=True, default=1e4)
    relative_norm_bound: float = config_field(
        "Reject a client update whose L2 norm exceeds this many times the round's median client norm "
        "(0 = off; applies from 3 replies)", server_only=True, default=10.0)
    max_skipped_rounds: int = config_field(
        "Stop the run (its last checkpoint kept for --resume) after this many rounds in a row with no accepted "
        "update, naming the last rejections (0 = never stop)", server_only=True, default=3)
    aggregator: str = config_field("How accepted updates combine: fedavg | median | trimmed-mean | krum | multi-krum",
                                   server_only=True, default="fedavg")
    byzantine_clients: int = config_field(
        "Malicious clients per round the robust aggregators tolerate (trimmed each side; Krum's f)", server_only=True,
        default=1)
    server_optimizer: str = config_field(
        "How the aggregated update moves the global model: fedavg (global += update) | fedavgm (server "
        "momentum) | fedadam | fedyogi (adaptive, Reddi et al. 2021)", server_only=True, default="fedavg")
    server_lr: float = config_field("Server learning rate (fedavgm/fedadam/fedyogi; fedavg is 1)", server_only=True,
                                    default=1.0)
    server_momentum: float = config_field("fedavgm momentum; beta1 of fedadam/fedyogi", server_only=True,
                                          default=0.9)
    server_beta2: float = config_field("beta2 of fedadam/fedyogi", server_only=True, default=0.99)
    server_tau: float = config_field("Adaptivity tau of fedadam/fedyogi (added to the root of the second moment)",
                                     server_only=True, default=1e-3)

    def __post_init__(self) -> None:
        require(self.clients >= 1, "federation.clients", self.clients, "an int >= 1")
        require(self.rounds >= 1, "federation.rounds", self.rounds, "an int >= 1")
        require(0 < self.fraction_train <= 1, "federation.fraction_train", self.fraction_train, "(0, 1]")
        require(0 <= self.min_clients <= self.clients, "federation.min_clients", self.min_clients,
                 f"an int in [0, clients={self.clients}]")
        require(self.round_timeout_s > 0, "federation.round_timeout_s", self.round_timeout_s, "a float > 0")
        require(self.client_cpus > 0, "federation.client_cpus", self.client_cpus, "a float > 0")
        require(self.client_gpus >= 0, "federation.client_gpus", self.client_gpus, "a float >= 0")
        one_of("federation.scenario", self.scenario, ("uniform", "tiers", "mixed"))
        require(self.deadline_s > 0, "federation.deadline_s", self.deadline_s, "a float > 0")
        require(self.max_examples_per_client >= 1, "federation.max_examples_per_client",
                self.max_examples_per_client, "an int >= 1")
        require(self.update_norm_bound >= 0, "federation.update_norm_bound", self.update_norm_bound, "a float >= 0")
        require(self.max_skipped_rounds >= 0, "federation.max_skipped_rounds", self.max_skipped_rounds,
                "an integer >= 0")
        require(self.relative_norm_bound == 0 or self.relative_norm_bound >= 1, "federation.relative_norm_bound",
                self.relative_norm_bound, "0 (off) or a float >= 1")
        one_of("federation.aggregator", self.aggregator, AGGREGATORS)
        require(self.byzantine_clients >= 0, "federation.byzantine_clients", self.byzantine_clients, "an int >= 0")
        one_of("federation.server_optimizer", self.server_optimizer, SERVER_OPTIMIZERS)
        require(self.server_lr > 0, "federation.server_lr", self.server_lr, "a float > 0")
        require(0 <= self.server_momentum < 1, "federation.server_momentum", self.server_momentum, "a float in [0, 1)")
        require(0 <= self.server_beta2 < 1, "federation.server_beta2", self.server_beta2, "a float in [0, 1)")
        require(self.server_tau > 0, "federation.server_tau", self.server_tau, "a float > 0")


@dataclass
class TrainConfig:
    """The local training loop on each client."""

    local_steps: int = config_field("Optimizer steps per client per round", default=5)
    batch_size: int = config_field("Examples per step", default=8)
    lr: float = config_field("AdamW learning rate", default=1e-3)
    weight_decay: float = config_field("AdamW weight decay", default=0.0)
    max_grad_norm: float = config_field("Clip gradients to this norm (0 = no clipping)", default=1.0)
    head_lr: float = config_field(
        "Classification: learning rate of the trained head (classifier, and the pooler with CLS pooling); "
        "0 = train.lr", default=1e-2)
    prox_mu: float = config_field("FedProx: weight of the proximal term mu/2 * ||w - w_global||^2 (0 = off)",
                                  default=0.0)
    lr_schedule: str = config_field(
        "Learning rate across rounds: constant | cosine | linear (decay from train.lr to train.min_lr_ratio x lr "
        "over federation.rounds, after train.warmup_rounds of linear warmup)", server_only=True,
        default="constant")
    warmup_rounds: int = config_field("Rounds of linear learning-rate warmup before the schedule", server_only=True,
                                      default=0)
    min_lr_ratio: float = config_field("The schedule's final learning rate as a fraction of train.lr",
                                       server_only=True, default=0.1)
    grad_accumulation: int = config_field(
        "Micro-batches per optimizer step: each step's train.batch_size examples are split into this many "
        "micro-batches whose gradients add up to the whole batch's (less activation memory, the same step)",
        default=1)
    gradient_checkpointing: bool = config_field(
        "Recompute activations in the backward pass instead of keeping them (less memory, more compute)",
        default=False)
    precision: str = config_field(
        "Autocast of the forward pass: fp32 (off) | bf16 (CPU or a bf16-capable GPU) | fp16 (CUDA only, with "
        "loss scaling); the trained weights stay fp32", default="fp32")

    def __post_init__(self) -> None:
        require(self.local_steps >= 1, "train.local_steps", self.local_steps, "an int >= 1")
        require(self.batch_size >= 1, "train.batch_size", self.batch_size, "an int >= 1")
        require(self.lr > 0, "train.lr", self.lr, "a float > 0")
        require(self.weight_decay >= 0, "train.weight_decay", self.weight_decay, "a float >= 0")
        require(self.max_grad_norm >= 0, "train.max_grad_norm", self.max_grad_norm, "a float >= 0")
        require(self.head_lr >= 0, "train.head_lr", self.head_lr, "a float >= 0 (0 = train.lr)")
        require(self.prox_mu >= 0, "train.prox_mu", self.prox_mu, "a float >= 0")
        one_of("train.lr_schedule", self.lr_schedule, ("constant", "cosine", "linear"))
        require(self.warmup_rounds >= 0, "train.warmup_rounds", self.warmup_rounds, "an int >= 0")
        require(0 <= self.min_lr_ratio <= 1, "train.min_lr_ratio", self.min_lr_ratio, "a float in [0, 1]")
        require(1 <= self.grad_accumulation <= self.batch_size, "train.grad_accumulation", self.grad_accumulation,
                f"an int in [1, train.batch_size={self.batch_size}]")
        require(isinstance(self.gradient_checkpointing, bool), "train.gradient_checkpointing",
                self.gradient_checkpointing, "true or false")
        one_of("train.precision", self.precision, PRECISIONS)


@dataclass
class LoraConfig:
    """The LoRA adapter (peft) trained by the LoRA-based methods."""

    r: int = config_field("LoRA rank", default=8)
    alpha: float = config_field("LoRA alpha (the update is scaled by alpha / r)", default=16.0)
    dropout: float = config_field("LoRA dropout", default=0.05)
    target_modules: list[str] = config_field(
        "Module name suffixes to adapt; empty = the family default (q_proj,v_proj / query,value)",
        default_factory=list,
    )
    base_bits: int = config_field(
        "fedavg-lora: the frozen base under the adapter: 32 (fp32) | 8 (LLM.int8) | 4 (NF4, as QLoRA); "
        "bitsandbytes quantizes it on load", default=32)

    def __post_init__(self) -> None:
        require(self.r >= 1, "lora.r", self.r, "an int >= 1")
        one_of("lora.base_bits", self.base_bits, LORA_BASE_BITS)
        require(self.alpha > 0, "lora.alpha", self.alpha, "a float > 0")
        require(0 <= self.dropout < 1, "lora.dropout", self.dropout, "a float in [0, 1)")
        require(all(isinstance(m, str) and m for m in self.target_modules), "lora.target_modules",
                 self.target_modules, "a list of non-empty module names")


@dataclass
class EvalConfig:
    """Evaluation of the global model: on the server (every ``every`` rounds) and on the clients' held-out
    examples."""

    batch_size: int = config_field("Examples per evaluation batch", default=20)
    max_new_tokens: int = config_field("Generation: tokens generated for exact-match scoring", default=8)
    client_fraction: float = config_field(
        "Federated evaluation: fraction of each client's examples it holds out (never trains on) and evaluates "
        "the global model on every round (0 = off)", default=0.1)
    client_max_examples: int = config_field("Federated evaluation: at most this many held-out examples per client",
                                            default=50)
    every: int = config_field("Evaluate the global model on the server every this many rounds (and always after "
                              "the last); other rounds record eval_loss null", server_only=True, default=1)
    overlap: bool = config_field(
        "Evaluate each round's global model on the server in a background thread while the next round trains (the "
        "last round is evaluated at once); a round's record is written once its evaluation is in, and each round's "
        "timing.eval_wait_seconds is how long it waited for the previous round's", server_only=True, default=False)

    def __post_init__(self) -> None:
        require(self.batch_size >= 1, "eval.batch_size", self.batch_size, "an int >= 1")
        require(self.max_new_tokens >= 1, "eval.max_new_tokens", self.max_new_tokens, "an int >= 1")
        require(0 <= self.client_fraction < 1, "eval.client_fraction", self.client_fraction, "a float in [0, 1)")
        require(self.client_max_examples >= 1, "eval.client_max_examples", self.client_max_examples, "an int >= 1")
        require(self.every >= 1, "eval.every", self.every, "an int >= 1")


@dataclass
class OutputConfig:
    """Where the run writes its report, metrics, checkpoints and adapter."""

    dir: str = config_field("Run directory; empty = runs/<timestamp>", default="")
    plots: bool = config_field("Write PNG plots and report.md", default=True)
    loggers: list[str] = config_field(
        "Experiment trackers that also receive every round's metrics: any of tensorboard, mlflow, trackio, wandb "
        "(each needs its extra: pip install 'pollinate[tensorboard]')", default_factory=list)

    def __post_init__(self) -> None:
        for name in self.loggers:
            one_of("output.loggers[]", name, LOGGERS)
        require(len(set(self.loggers)) == len(self.loggers), "output.loggers", self.loggers, "no repeated logger")


LOGGERS = ("tensorboard", "mlflow", "trackio", "wandb")


DP_MODES = ("none", "central", "local")


@dataclass
class PrivacyConfig:
    """Differential privacy of the clients' updates (docs/privacy.md): the dense methods (fedavg-lora, fedavg-full,
    SFPrompt's prompts and tail) and FedPipe (in its update space)."""

    dp: str = config_field(
        "none | central (the server clips each client's update and adds Gaussian noise to their mean; trusts the "
        "server) | local (each client clips and noises its own update before sending it)", server_only=True,
        default="none")
    clip_norm: float = config_field("L2 bound of one client's update (the initial bound with adaptive clipping)",
                                    server_only=True, default=1.0)
    adaptive_clipping: bool = config_field(
        "central: adapt the clip norm each round towards the median update norm from a noisy count of clipped "
        "updates (Andrew et al. 2021, as Flower's DifferentialPrivacyServerSideAdaptiveClipping)",
        server_only=True, default=False)
    noise_multiplier: float = config_field(
        "Noise standard deviation in units of the clip norm (ignored when target_epsilon is set)", server_only=True,
        default=1.0)
    target_epsilon: float = config_field(
        "When > 0: derive the noise multiplier so that the whole run spends at most this epsilon (RDP accountant, "
        "this run's client sampling rate and rounds); 0 = use noise_multiplier", server_only=True, default=0.0)
    delta: float = config_field("The delta of the reported (epsilon, delta)", server_only=True, default=1e-5)
    secure_aggregation: bool = config_field(
        "SecAgg+ (fedavg-lora, fedavg-full): the server learns only the sum of the clients' updates, masked, "
        "clipped and quantized on the clients; needs federation.aggregator = fedavg and both norm bounds 0",
        server_only=True, default=False)
    secagg_num_shares: int = config_field(
        "SecAgg+: each client shares its secrets with this many neighbours, itself included (the round's clients "
        "when fewer; odd below that)", server_only=True, default=3)
    secagg_reconstruction_threshold: int = config_field(
        "SecAgg+: shares that rebuild a secret: each client needs this many of its neighbours to stay until the "
        "unmask stage; more than half of secagg_num_shares", server_only=True, default=2)
    secagg_clipping_range: float = config_field(
        "SecAgg+: every coordinate of a client's update is clipped to [-this, this] before quantization "
        "(with dp = central the clip norm is used instead)", server_only=True, default=8.0)
    secagg_quantization_range: int = config_field(
        "SecAgg+: quantization levels over [-clipping range, clipping range]; clients per round x this must stay "
        "below 2^32", server_only=True, default=2**22)

    def __post_init__(self) -> None:
        one_of("privacy.dp", self.dp, DP_MODES)
        require(self.clip_norm > 0, "privacy.clip_norm", self.clip_norm, "a float > 0")
        require(isinstance(self.adaptive_clipping, bool), "privacy.adaptive_clipping", self.adaptive_clipping,
                "true or false")
        require(not (self.adaptive_clipping and self.dp == "local"), "privacy.adaptive_clipping",
                self.adaptive_clipping, "false with privacy.dp = 'local' (adaptive clipping is server-side)")
        require(self.noise_multiplier >= 0, "privacy.noise_multiplier", self.noise_multiplier, "a float >= 0")
        require(self.target_epsilon >= 0, "privacy.target_epsilon", self.target_epsilon, "a float >= 0 (0 = off)")
        require(0 < self.delta < 1, "privacy.delta", self.delta, "a float in (0, 1)")
        require(isinstance(self.secure_aggregation, bool), "privacy.secure_aggregation", self.secure_aggregation,
                "true or false")
        require(self.secagg_num_shares >= 3, "privacy.secagg_num_shares", self.secagg_num_shares, "an int >= 3")
        require(self.secagg_num_shares / 2 < self.secagg_reconstruction_threshold < self.secagg_num_shares,
                "privacy.secagg_reconstruction_threshold", self.secagg_reconstruction_threshold,
                f"an int above half of secagg_num_shares = {self.secagg_num_shares} and below it")
        require(self.secagg_clipping_range > 0, "privacy.secagg_clipping_range", self.secagg_clipping_range,
                "a float > 0")
        require(2 <= self.secagg_quantization_range < 2**32, "privacy.secagg_quantization_range",
                self.secagg_quantization_range, "an int in [2, 2^32)")


# Method sections and method names, filled by ``pollinate.methods.register_method`` (this module knows no method).
METHOD_SECTIONS: dict[str, type] = {}
METHOD_NAMES: list[str] = []
CORE_CLIENT_SECTIONS = ("model", "data", "federation", "train", "eval")
# Keys that no longer exist -> what replaced them (the error names the fix).
RENAMED_KEYS = {
    "data.train_examples": "data.builtin_examples (the built-in task's size) or data.max_train_examples (a cap on "
                           "a file's rows; files are used in full by default)",
}


def register_method_config(method: str, section: str | None, section_cls: type | None) -> None:
    """Called by the method registry: ``method`` becomes a valid ``method`` value and ``[section]`` a section."""
    if section is not None:
        if section in {f.name for f in dataclasses.fields(RunConfig)} or section in METHOD_SECTIONS:
            raise ValueError(f"config section {section!r} of method {method!r} is already taken")
        METHOD_SECTIONS[section] = section_cls
    METHOD_NAMES.append(method)


def _client_fields(section: Any) -> dict[str, Any]:
    return {f.name: dataclasses.asdict(section)[f.name] for f in dataclasses.fields(section)
            if not f.metadata.get("server_only")}


def _default_method_sections() -> dict[str, Any]:
    return {name: cls() for name, cls in METHOD_SECTIONS.items()}


@dataclass
class RunConfig:
    """Everything a run needs; ``pollinate config show`` prints the effective one.

    The core sections are fields; each registered method's own section is in ``methods`` and reads as an
    attribute (``cfg.fedpipe``) and, in TOML, as a top-level table (``[fedpipe]``).
    """

    method: str = config_field("Fine-tuning method (see `pollinate simulate --help` for the registered ones)",
                               default="fedavg-lora")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    methods: dict[str, Any] = field(default_factory=_default_method_sections, repr=False)

    def __post_init__(self) -> None:
        one_of("method", self.method, METHOD_NAMES)

    def __getattr__(self, name: str) -> Any:
        sections = self.__dict__.get("methods") or {}
        if name in sections:
            return sections[name]
        raise AttributeError(f"RunConfig has no section or field {name!r}")

    def with_section(self, name: str, value: Any) -> RunConfig:
        """A copy with one section replaced (core or method section)."""
        if name in self.methods:
            return dataclasses.replace(self, methods={**self.methods, name: value})
        return dataclasses.replace(self, **{name: value})

    def to_dict(self) -> dict[str, Any]:
        """Plain values, method sections as top-level tables (the TOML layout)."""
        out = {f.name: dataclasses.asdict(getattr(self, f.name)) if dataclasses.is_dataclass(getattr(self, f.name))
               else getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "methods"}
        out.update({name: dataclasses.asdict(section) for name, section in self.methods.items()})
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def sections_for(self, names: typing.Iterable[str]) -> dict[str, Any]:
        """``method`` plus the named sections without their server-only fields (what a client half reads)."""
        sections = {**{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, **self.methods}
        return {"method": self.method, **{name: _client_fields(sections[name]) for name in names if name in sections}}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunConfig:
        from pollinate.common.config_io import config_from_dict

        return config_from_dict(raw)

    @classmethod
    def from_json(cls, text: str) -> RunConfig:
        return cls.from_dict(json.loads(text))
