"""Per-process state of an edge client: the base model, tokenizer and local data, loaded once and kept.

A Flower client process (a SuperNode's ClientApp process, or a Ray actor in simulation) serves many rounds
and, in simulation, several virtual clients. Rebuilding the base per round would dominate round time, so
everything expensive is cached here by what determines it.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from pollinate.common.config import RunConfig
from pollinate.common.data import ExampleStream, encoder_for, load_task, partition_indices, resolve_task_type
from pollinate.common.lmloss import training_loss
from pollinate.common.models import load_model, load_tokenizer, model_device, resolve_model
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
    """One client's encoded training examples."""

    client_id: int
    encoded: list[dict[str, Any]]
    num_labels: int
    task_type: str

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
    started with ``data-path`` (deployment), all of that local file."""
    path, task = model_task(cfg)
    data_cfg = cfg.data
    if node_config.get("data-path"):
        from dataclasses import replace

        data_cfg = replace(cfg.data, source=str(node_config["data-path"]), partition="iid")
    partition_id = int(node_config.get("partition-id", 0))
    num_partitions = int(node_config.get("num-partitions", cfg.federation.clients))

    def build() -> LocalData:
        task_data = load_task(data_cfg, task, cfg.federation.seed)
        if node_config.get("data-path"):
            rows = task_data.train
        else:
            parts = partition_indices(task_data.train, num_partitions, data_cfg, task_data.partition_by,
                                      cfg.federation.seed)
            rows = [task_data.train[i] for i in parts[partition_id]]
        tokenizer = tokenizer_for(cfg)
        encode = encoder_for(task_data.task_type)
        encoded = [encode(r, tokenizer, cfg.model.max_seq_len) for r in rows]
        return LocalData(partition_id, encoded, len(task_data.labels), task_data.task_type)

    key = ("data", path, repr(data_cfg), partition_id, num_partitions, cfg.federation.seed, cfg.model.max_seq_len)
    return cached(key, build)


def base_model(cfg: RunConfig, num_labels: int, quantization_config=None, tag: str = "") -> torch.nn.Module:
    """The frozen pretrained base, loaded once per process per (model, task, quantization, tag)."""
    path, task = model_task(cfg)
    key = ("base", path, task, num_labels, repr(quantization_config), tag)
    return cached(key, lambda: load_model(path, task, num_labels, quantization_config))


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
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def train_steps(model: torch.nn.Module, batches, steps: int, lr: float, weight_decay: float,
                max_grad_norm: float) -> dict[str, float]:
    """The local loop: batches in, loss, backward, clip, step; mean loss and seconds out."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    model.train()
    losses = []
    device = model_device(model)
    start = time.perf_counter()
    for _ in range(steps):
        batch = {k: v.to(device) for k, v in batches.next_batch().items()}
        losses.append(optimizer_step(optimizer, training_loss(model, batch), params, max_grad_norm))
    return {"train_loss": sum(losses) / len(losses), "train_seconds": time.perf_counter() - start}


def local_training(cfg: RunConfig, data: LocalData, model: torch.nn.Module, server_round: int,
                   batch_size: int | None = None, steps: int | None = None) -> dict[str, float]:
    """This client's round of local steps (default ``train.local_steps``/``batch_size``): seeded, so the same
    seed + round + client gives the same batches and dropout."""
    seed_everything(cfg, server_round, data.client_id)
    batches = ExampleStream(data.encoded, batch_size or cfg.train.batch_size, tokenizer_for(cfg).pad_token_id,
                            seed=derive_seed(cfg.federation.seed, "client-batches", server_round, data.client_id))
    return train_steps(model, batches, steps or cfg.train.local_steps, cfg.train.lr, cfg.train.weight_decay,
                       cfg.train.max_grad_norm)


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
