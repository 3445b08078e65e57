"""Run directories for the export/generate/eval tests, written directly (no simulation): a config.toml, per-round
checkpoints holding a seeded random global state of the method's shape, their history and a report.json."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pollinate.common.adapters import (
    adapter_state,
    head_module_names,
    parameter_state,
    peft_lora_config,
    wrap_with_lora,
)
from pollinate.common.config_io import build_config, to_toml
from pollinate.common.data import resolve_task_type
from pollinate.common.models import load_model, resolve_model
from pollinate.common.pooling import resolve_pooling
from pollinate.server.checkpoint import round_state, save_round

LABELS = ["neg", "neu", "pos"]


def classification_file(root: Path, labels: list[str] = LABELS, rows: int = 30, name: str = "cls.jsonl") -> Path:
    path = root / name
    path.write_text("".join(json.dumps({"text": f"example number {i} about {labels[i % len(labels)]}",
                                        "label": labels[i % len(labels)]}) + "\n" for i in range(rows)))
    return path


def _randomized(state: dict[str, np.ndarray], seed: int, scale: float = 0.05) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (v + scale * rng.standard_normal(v.shape)).astype(np.float32) for k, v in state.items()}


def _global_state(cfg, info, task: str, num_labels: int, seed: int) -> dict[str, np.ndarray]:
    torch.manual_seed(0)
    base = load_model(info.path, task, num_labels, pooling=cfg.model.pooling)
    if cfg.method == "fedavg-full":
        return _randomized(parameter_state(dict(base.named_parameters())), seed, 0.01)
    pooling = resolve_pooling(cfg.model.pooling, info.path) if task == "classification" else ""
    heads = head_module_names(task, pooling)
    if cfg.method == "fedpipe":  # ΔW factors of two modules at different ranks (alpha = rank), and the head
        rng = np.random.default_rng(seed)
        modules = dict(base.named_modules())
        names = [n for n in modules if n.endswith(("q_proj", "query"))][:2]
        state = {}
        for rank, name in zip((2, 4), names, strict=True):
            out_f, in_f = modules[name].weight.shape
            state[f"{name}.a"] = (0.1 * rng.standard_normal((rank, in_f))).astype(np.float32)
            state[f"{name}.b"] = (0.1 * rng.standard_normal((out_f, rank))).astype(np.float32)
        from pollinate.methods.fedpipe.head import head_arrays, head_parameters, prefixed

        state.update(prefixed(_randomized(head_arrays(head_parameters(base, heads)), seed)))
        return state
    model = wrap_with_lora(base, peft_lora_config(cfg.lora, info.family, task, head_modules=heads))
    return _randomized(adapter_state(model), seed)


def _record(server_round: int, task: str) -> dict:
    metrics = ({"exact_match": 0.1 * server_round, "exact_match/add": 0.2 * server_round} if task == "generation"
               else {"accuracy": 0.3 * server_round})
    return {"round": server_round, "train_loss": 2.0 / server_round, "eval_loss": 3.0 / server_round,
            "eval_metrics": metrics, "bytes_up": 1000 * server_round, "bytes_down": 2000 * server_round,
            "seconds": 1.5, "clients": [{"client_id": 0, "bytes_up": 500, "bytes_down": 1000, "num_examples": 10}]}


def make_run(root: Path, method: str = "fedavg-lora", model: str = "tiny-llama", rounds: int = 2,
             overrides: tuple[str, ...] = ()) -> Path:
    """A finished run directory of ``method`` on ``model`` with ``rounds`` checkpointed rounds."""
    run_dir = root / f"{method}-{model}"
    cfg = build_config(None, [f'method="{method}"', f'model.name="{model}"', "federation.clients=2",
                              f"federation.rounds={rounds}", f'output.dir="{run_dir}"', *overrides])
    run_dir.mkdir(parents=True)
    (run_dir / "config.toml").write_text(to_toml(cfg))
    info = resolve_model(model)
    task = resolve_task_type(cfg.data, info.default_task)
    num_labels = len(LABELS) if task == "classification" else 0
    history = {"initial_eval": {"eval_loss": 4.0, "eval_metrics": {}}, "rounds": [], "rejected": [], "elapsed_s": 1.0}
    for server_round in range(1, rounds + 1):
        history["rounds"].append(_record(server_round, task))
        state = round_state(server_round, cfg, copy.deepcopy(history))
        save_round(run_dir, server_round, _global_state(cfg, info, task, num_labels, server_round), state)
    report = {"method": method, "model": model, "task": cfg.data.source, "num_clients": 2,
              "rounds": history["rounds"], "totals": {"bytes_up": 3000, "bytes_down": 6000}, "config": cfg.to_dict()}
    (run_dir / "report.json").write_text(json.dumps(report))
    return run_dir


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> Path:
    """fedavg-lora on tiny-llama, the built-in task, 2 rounds."""
    return make_run(tmp_path_factory.mktemp("runs"))
