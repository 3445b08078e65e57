"""A plain Flower + peft FedAvg-LoRA app: the baseline Pollinate's round overhead is measured against.

Nothing from Pollinate is imported here: it is what a user would write from Flower's and peft's quickstarts
(Flower 1.42 Message API, ``flwr.serverapp.strategy.FedAvg``, a peft LoRA on a causal LM), so the overhead probe
(``simulations/overhead_probe.py``) can run the same work both ways and compare round wall time with the
clients' training time. Client ``i`` trains on the ``i``-th ``*.jsonl`` file of a directory (Dolly's one file
per category), prompt field + newline + response field, loss on every token.

Run: ``python -m pollinate.simulations.plain_flower_app CONFIG.json`` with the keys of ``PlainConfig``; it
writes one JSON line per round to ``out`` (round wall seconds, the clients' training seconds).
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from transformers import AutoModelForCausalLM, AutoTokenizer

CONFIG_ENV = "PLAIN_FLOWER_CONFIG"  # JSON; Ray's workers inherit the driver's environment


@dataclass(frozen=True)
class PlainConfig:
    """The work of one run: the same knobs the probe sets on Pollinate's side."""

    model_path: str
    data_dir: str
    out: str
    clients: int = 8
    rounds: int = 3
    local_steps: int = 5
    batch_size: int = 8
    max_seq_len: int = 64
    lr: float = 1e-3
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    prompt_field: str = "instruction"
    response_field: str = "response"
    seed: int = 0


def _config() -> PlainConfig:
    raw = json.loads(os.environ[CONFIG_ENV])
    return PlainConfig(**{**raw, "target_modules": tuple(raw.get("target_modules", ("q_proj", "v_proj")))})


def _peft_model(cfg: PlainConfig) -> torch.nn.Module:
    torch.manual_seed(cfg.seed)
    base = AutoModelForCausalLM.from_pretrained(cfg.model_path, torch_dtype=torch.float32)
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.target_modules), task_type="CAUSAL_LM")
    return get_peft_model(base, lora)


def _client_batches(cfg: PlainConfig, partition: int, tokenizer) -> list[dict[str, torch.Tensor]]:
    """``local_steps`` batches drawn from this client's file (its category)."""
    files = sorted(Path(cfg.data_dir).glob("*.jsonl"))
    rows = [json.loads(line) for line in files[partition % len(files)].read_text().splitlines() if line.strip()]
    rng = random.Random(cfg.seed + partition)
    batches = []
    for _ in range(cfg.local_steps):
        texts = [f"{r[cfg.prompt_field]}\n{r[cfg.response_field]}" for r in rng.sample(rows, cfg.batch_size)]
        enc = tokenizer(texts, truncation=True, max_length=cfg.max_seq_len, padding=True, return_tensors="pt")
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        batches.append({**enc, "labels": labels})
    return batches


client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = _config()
    tokenizer = AutoTokenizer.from_pretrained(cfg.model_path)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = _peft_model(cfg)
    set_peft_model_state_dict(model, msg.content["arrays"].to_torch_state_dict())
    batches = _client_batches(cfg, int(context.node_config["partition-id"]), tokenizer)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    model.train()
    started = time.perf_counter()
    for batch in batches:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    seconds = time.perf_counter() - started
    arrays = ArrayRecord(get_peft_model_state_dict(model))
    metrics = MetricRecord({"num-examples": cfg.local_steps * cfg.batch_size, "train_seconds": seconds,
                            "train_loss": float(loss)})
    return Message(content=RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


class TimedFedAvg(FedAvg):
    """Flower's FedAvg, writing each round's wall time (configure_train to the end of aggregate_train) and the
    clients' training seconds."""

    def __init__(self, out: Path, **kwargs) -> None:
        super().__init__(**kwargs)
        self.out, self.started = out, 0.0

    def configure_train(self, server_round, arrays, config, grid):
        self.started = time.perf_counter()
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        result = super().aggregate_train(server_round, replies)
        train = [float(m.content["metrics"]["train_seconds"]) for m in replies if m.has_content()]
        with self.out.open("a") as fh:
            fh.write(json.dumps({"round": server_round, "seconds": time.perf_counter() - self.started,
                                 "client_train_seconds": train}) + "\n")
        return result


server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = _config()
    initial = ArrayRecord(get_peft_model_state_dict(_peft_model(cfg)))
    strategy = TimedFedAvg(Path(cfg.out), fraction_train=1.0, fraction_evaluate=0.0,
                           min_available_nodes=cfg.clients, min_train_nodes=cfg.clients)
    strategy.start(grid=grid, initial_arrays=initial, num_rounds=cfg.rounds)


def run(cfg: PlainConfig, cpus: int) -> None:
    """Run the app in Flower's simulation engine with one CPU per client, as Pollinate's default does."""
    from flwr.simulation import run_simulation

    os.environ[CONFIG_ENV] = json.dumps(asdict(cfg))
    Path(cfg.out).unlink(missing_ok=True)
    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
               "init_args": {"num_cpus": cpus, "include_dashboard": False, "logging_level": "error",
                             "log_to_driver": False}}
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=cfg.clients, backend_config=backend)


if __name__ == "__main__":
    config = json.loads(Path(sys.argv[1]).read_text())
    run(PlainConfig(**{**config, "target_modules": tuple(config.get("target_modules", ("q_proj", "v_proj")))}),
        os.cpu_count() or 1)
