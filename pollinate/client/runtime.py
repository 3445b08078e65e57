"""Per-process state of an edge client: the base model, tokenizer and local data, loaded once and kept.

A Flower client process (a SuperNode's ClientApp process, or a Ray actor in simulation) serves many rounds
and, in simulation, several virtual clients. Rebuilding the base per round would dominate round time, so
everything expensive is cached here by what determines it.
"""

from __future__ import annotations

import math
import resource
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from pollinate.client.step import StepOptions, accumulated_step, finish_step, loss_scaler, use_gradient_checkpointing
from pollinate.common.config import RunConfig
from pollinate.common.data import ExampleStream, encoder_for, load_task, partition_indices, resolve_task_type
from pollinate.common.evaluation import EvalExamples, evaluate_model, held_out_indices, metric_name
from pollinate.common.models import load_model, load_tokenizer, model_device, resolve_model
from pollinate.common.pooling import resolve_pooling
from pollinate.common.seeds import derive_seed

_CACHE: dict[tuple, Any] = {}


def cached(key: tuple, build):
    """Build once per process; later calls with the same key reuse the object."""
    if key not in _CACHE:
        _CACHE[key] = build()
    return _CACHE[key]


def cached_or_none(key: tuple):
    return _CACHE.get(key)


def drop_cached(prefix: tuple, tag: str | None = None) -> None:
    """Forget cached objects whose key starts with ``prefix`` (and ends with ``tag`` when given)."""
    for key in [k for k in _CACHE if k[: len(prefix)] == prefix and (tag is None or k[-1] == tag)]:
        del _CACHE[key]


@dataclass
class LocalData:
    """One client's encoded training examples, and the examples it holds out (never trains on) to evaluate the
    global model with (``eval.client_fraction``; empty when off)."""

    client_id: int
    encoded: list[dict[str, Any]]
    num_labels: int
    task_type: str
    eval_rows: list[dict[str, Any]] = field(default_factory=list)
    eval_encoded: list[dict[str, Any]] = field(default_factory=list)

    @property
    def num_examples(self) -> int:
        return len(self.encoded)


def model_task(cfg: RunConfig) -> tuple[str, str]:
    """(model directory, task type) for this run."""
    info = resolve_model(cfg.model.name)
    return info.path, resolve_task_type(cfg.data, info.default_task)


def tokenizer_for(cfg: RunConfig):
    path, _ = model_task(cfg)
    return cached(("tokenizer", path), lambda: load_tokenizer(path))


def local_data(cfg: RunConfig, node_config: dict[str, Any]) -> LocalData:
    """This client's examples: its partition of the run's data source (simulation), or, when the node was
    started with ``data-path`` (deployment), all of that local file; less the rows it holds out for evaluation
    (drawn per client from the run seed, see ``held_out_indices``)."""
    path, task = model_task(cfg)
    data_cfg = cfg.data
    if node_config.get("data-path"):
        from dataclasses import replace

        data_cfg = replace(cfg.data, source=str(node_config["data-path"]), partition="iid")
    partition_id = int(node_config.get("partition-id", 0))
    num_partitions = int(node_config.get("num-partitions", cfg.federation.clients))

    # A simulation worker serves many clients: the task and its partitioning are built once per process.
    task_key = ("task", path, repr(data_cfg), task, cfg.federation.seed)

    def build() -> LocalData:
        task_data = cached(task_key, lambda: load_task(data_cfg, task, cfg.federation.seed))
        if node_config.get("data-path"):
            rows = task_data.train
        else:
            parts = cached((*task_key, "partitions", num_partitions), lambda: partition_indices(
                task_data.train, num_partitions, data_cfg, task_data.partition_by, cfg.federation.seed))
            rows = [task_data.train[i] for i in parts[partition_id]]
        held = held_out_indices(len(rows), cfg.eval.client_fraction, cfg.eval.client_max_examples,
                                derive_seed(cfg.federation.seed, "client-eval-rows", partition_id))
        held_set = set(held)
        tokenizer = tokenizer_for(cfg)
        encode = encoder_for(task_data.task_type, data_cfg.template)

        def encoded(picked: list[dict[str, Any]]) -> list[dict[str, Any]]:
            return [encode(r, tokenizer, cfg.model.max_seq_len) for r in picked]

        train_rows = [row for i, row in enumerate(rows) if i not in held_set]
        eval_rows = [rows[i] for i in held]
        return LocalData(partition_id, encoded(train_rows), len(task_data.labels), task_data.task_type,
                         eval_rows, encoded(eval_rows))

    key = ("data", path, repr(data_cfg), partition_id, num_partitions, cfg.federation.seed, cfg.model.max_seq_len,
           cfg.eval.client_fraction, cfg.eval.client_max_examples)
    return cached(key, build)


def base_model(cfg: RunConfig, num_labels: int, quantization_config=None, tag: str = "") -> torch.nn.Module:
    """The frozen pretrained base, loaded once per process per (model, task, quantization, tag)."""
    path, task = model_task(cfg)
    key = ("base", path, task, num_labels, repr(quantization_config), cfg.model.pooling, tag)
    return cached(key, lambda: load_model(path, task, num_labels, quantization_config, pooling=cfg.model.pooling))


def client_profile(cfg: RunConfig, node_config: dict[str, Any]):
    """This client's resource profile: the node's ``profile`` TOML in deployment, else the scenario's."""
    from pollinate.common.profiles import assign_profiles, load_profile

    if node_config.get("profile"):
        return cached(("profile", str(node_config["profile"])), lambda: load_profile(str(node_config["profile"])))
    partition_id = int(node_config.get("partition-id", 0))
    num_partitions = int(node_config.get("num-partitions", cfg.federation.clients))
    return assign_profiles(cfg.federation.scenario, num_partitions, cfg.federation.seed)[partition_id]


def host_tflops() -> float:
    """This machine's measured matmul throughput, once per process: simulated clients run here, so their
    compute time is scaled by host / profile throughput."""
    from pollinate.common.profiles import measure_compute

    return cached(("host-tflops",), measure_compute)


def profile_reply(cfg: RunConfig, node_config: dict[str, Any], train_seconds: float) -> dict[str, Any]:
    """What the server needs to enforce the profile: the profile itself, and this round's compute time as the
    profiled device would take it. Simulated clients all run on this host, so their measured time is scaled by
    host / profile throughput; a deployed client (its own ``profile`` file) reports its real time."""
    profile = client_profile(cfg, node_config)
    scale = 1.0 if node_config.get("profile") else host_tflops() / profile.compute_tflops
    return {"profile": ConfigRecord(profile.to_dict()), "compute_seconds": train_seconds * scale}


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def seed_everything(cfg: RunConfig, server_round: int, client_id: int) -> None:
    """Same seed + round + client -> the same dropout masks and batch order, whichever process runs it."""
    torch.manual_seed(derive_seed(cfg.federation.seed, "client-torch", server_round, client_id))


def optimizer_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, params: list[torch.nn.Parameter],
                   max_grad_norm: float) -> float:
    """One step of every client loop: backward, clip (when ``max_grad_norm`` > 0), step, clear; the loss out."""
    loss.backward()
    finish_step(optimizer, params, max_grad_norm)
    return float(loss.detach())


def optimizer_groups(named: list[tuple[str, torch.nn.Parameter]], lr: float, head_lr: float,
                     head_modules: list[str]) -> list[dict[str, Any]]:
    """AdamW parameter groups: the head's parameters (``is_head_parameter``) at ``head_lr``, the rest at ``lr``;
    one group in the model's order when ``head_lr`` is 0 (= ``lr``) or there is no head."""
    from pollinate.common.adapters import is_head_parameter  # imports peft: only runs that set a head lr pay

    head = [p for name, p in named if is_head_parameter(name, head_modules)] if head_lr > 0 else []
    if not head:
        return [{"params": [p for _, p in named], "lr": lr}]
    head_ids = {id(p) for p in head}
    return [{"params": [p for _, p in named if id(p) not in head_ids], "lr": lr}, {"params": head, "lr": head_lr}]


def proximal_term(params: list[torch.nn.Parameter], mu: float):
    """FedProx (Li et al. 2020): a function giving ``mu/2 · ||w - w_start||²`` over ``params``, ``w_start`` their
    values now (the round's start); None when ``mu`` is 0."""
    if mu <= 0:
        return None
    anchors = [p.detach().clone() for p in params]

    def term() -> torch.Tensor:
        return 0.5 * mu * sum(torch.sum((p - a) ** 2) for p, a in zip(params, anchors, strict=True))

    return term


def train_steps(model: torch.nn.Module, batches, steps: int, lr: float, weight_decay: float,
                max_grad_norm: float, *, head_lr: float = 0.0, head_modules: list[str] | None = None,
                prox_mu: float = 0.0, options: StepOptions | None = None) -> dict[str, float]:
    """The local loop: batches in, loss (+ the FedProx term when ``prox_mu`` > 0), backward, clip, step; mean
    task loss and seconds out. ``head_modules``' parameters train at ``head_lr`` (0 = ``lr``); ``options`` split
    each batch into micro-batches and set the autocast precision (default: one batch, fp32)."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    groups = optimizer_groups(named, lr, head_lr, head_modules or [])
    optimizer = torch.optim.AdamW(groups if len(groups) > 1 else params, lr=lr, weight_decay=weight_decay)
    proximal = proximal_term(params, prox_mu)
    model.train()
    losses = []
    device = model_device(model)
    options = options or StepOptions()
    scaler = loss_scaler(options.precision, device)
    start = time.perf_counter()
    for _ in range(steps):
        batch = {k: v.to(device) for k, v in batches.next_batch().items()}
        losses.append(accumulated_step(model, batch, optimizer, params, max_grad_norm, options, device,
                                       proximal, scaler))
    return {"train_loss": sum(losses) / len(losses), "train_seconds": time.perf_counter() - start}


def head_modules_for(cfg: RunConfig) -> list[str]:
    """The modules ``train.head_lr`` applies to in this run (the classifier head, and a CLS pooler)."""
    from pollinate.common.adapters import head_module_names  # imports peft: only runs that set a head lr pay

    path, task = model_task(cfg)
    return head_module_names(task, resolve_pooling(cfg.model.pooling, path))


def training_batches(cfg: RunConfig, data: LocalData, server_round: int,
                     batch_size: int | None = None) -> ExampleStream:
    """The batches of this client's round (default ``train.batch_size``), each padded to its longest example:
    seeded per (run seed, round, client), so a second stream draws the same batches as ``local_training``."""
    return ExampleStream(data.encoded, batch_size or cfg.train.batch_size, tokenizer_for(cfg).pad_token_id,
                         seed=derive_seed(cfg.federation.seed, "client-batches", server_round, data.client_id))


def local_training(cfg: RunConfig, data: LocalData, model: torch.nn.Module, server_round: int,
                   batch_size: int | None = None, steps: int | None = None) -> dict[str, float]:
    """This client's round of local steps (default ``train.local_steps``/``batch_size``): seeded, so the same
    seed + round + client gives the same batches and dropout. ``cfg.train.lr``/``head_lr`` are the round's (the
    client app applies the server's ``lr-scale``); ``grad_accumulation``, ``precision`` and
    ``gradient_checkpointing`` shape each step."""
    seed_everything(cfg, server_round, data.client_id)
    batches = training_batches(cfg, data, server_round, batch_size)
    train = cfg.train
    use_gradient_checkpointing(model, train.gradient_checkpointing)
    return train_steps(model, batches, steps or train.local_steps, train.lr, train.weight_decay, train.max_grad_norm,
                       head_lr=train.head_lr, head_modules=head_modules_for(cfg) if train.head_lr > 0 else None,
                       prox_mu=train.prox_mu, options=StepOptions(train.grad_accumulation, train.precision))


def training_reply(cfg: RunConfig, node_config: dict[str, Any], data: LocalData, stats: dict[str, float],
                   arrays: ArrayRecord, *, device_seconds: float | None = None, server_seconds: float = 0.0,
                   **metrics: float) -> RecordDict:
    """The one reply shape of every training method: its ``arrays``, the ``metrics`` the server reads (examples,
    client id, compute time, ``stats`` such as ``train_loss``/``train_seconds``, and the method's ``metrics``) and
    the client's ``profile``.

    ``device_seconds`` is what this device computed (default ``stats["train_seconds"]``), scaled to its profile;
    ``server_seconds`` is time spent waiting on server compute (split methods), counted as it is.
    """
    computed = stats["train_seconds"] if device_seconds is None else device_seconds
    timing = profile_reply(cfg, node_config, computed)
    record = MetricRecord({
        "num-examples": data.num_examples, "client_id": data.client_id, "peak_rss_bytes": peak_rss_bytes(),
        "compute_seconds": timing["compute_seconds"] + server_seconds, **stats, **metrics,
    })
    return RecordDict({"arrays": arrays, "metrics": record, "profile": timing["profile"]})


def evaluation_reply(cfg: RunConfig, data: LocalData, model: torch.nn.Module | None = None) -> RecordDict:
    """The one reply shape of client-side evaluation: ``metrics`` with ``num-examples`` (held-out examples
    evaluated; 0 when the client holds none or no ``model`` is given), ``client_id``, and ``model``'s
    ``eval_loss`` and task metric (``accuracy`` or ``exact_match``) on this client's held-out examples."""
    values: dict[str, Any] = {"num-examples": 0, "client_id": data.client_id}
    if model is not None and data.eval_encoded:
        examples = EvalExamples(data.task_type, data.eval_rows, data.eval_encoded, template=cfg.data.template)
        result = evaluate_model(model, examples, tokenizer_for(cfg), cfg.eval.batch_size, cfg.eval.max_new_tokens)
        name = metric_name(data.task_type)
        if math.isfinite(result["eval_loss"]):  # NaN: no held-out answer fits model.max_seq_len, nothing to report
            values.update({"num-examples": len(data.eval_encoded), "eval_loss": float(result["eval_loss"]),
                           name: float(result["eval_metrics"][name])})
    return RecordDict({"metrics": MetricRecord(values)})
