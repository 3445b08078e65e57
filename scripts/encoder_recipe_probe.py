"""Centralized probe behind the encoder classification recipe (docs/results/2026-11-30-learning-quality.md).

all-MiniLM-L6-v2 on BANKING77 (../shared/data), LoRA r8 on query/value, batch 16, AdamW, one client holding all
training rows; accuracy on 600 test examples every 100 steps. Variants differ in pooling (the checkpoint's stale
[CLS] pooler frozen or trained, or sentence-transformers mean pooling) and learning rates.

Run: ``python scripts/encoder_recipe_probe.py [VARIANT ...]`` (default: all variants).
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

import torch
from peft import LoraConfig, TaskType, get_peft_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from pollinate.common.models import resolve_model
from pollinate.common.pooling import use_mean_pooling

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "banking77"
ALL_LINEAR = ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense")
VARIANTS = {
    "A_cls_lr1e-3": {},
    "B_cls_pooler": {"train_pooler": True},
    "C_mean": {"pool": "mean"},
    "D_mean_head1e-2": {"pool": "mean", "head_lr": 1e-2},
    "E_mean_lr3e-3_head1e-2": {"pool": "mean", "lr": 3e-3, "head_lr": 1e-2},
    "F_cls_pooler_head1e-2": {"train_pooler": True, "head_lr": 1e-2},
    "G_mean_all_lr3e-3_head1e-2": {"pool": "mean", "lr": 3e-3, "head_lr": 1e-2, "targets": ALL_LINEAR},
}


def rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text().splitlines() if line.strip()]


def run(name: str, path: str, train: list[dict], test: list[dict], pool: str = "cls", train_pooler: bool = False,
        lr: float = 1e-3, head_lr: float | None = None, targets: tuple[str, ...] = ("query", "value"),
        steps: int = 300, batch_size: int = 16) -> None:
    tokenizer = AutoTokenizer.from_pretrained(path)

    def batch(items: list[dict]) -> dict:
        enc = tokenizer([r["text"] for r in items], padding=True, truncation=True, max_length=64, return_tensors="pt")
        return {**enc, "labels": torch.tensor([r["label"] for r in items])}

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=77)
    if pool == "mean":
        use_mean_pooling(model)
    heads = ["classifier", *(["pooler"] if train_pooler else [])]
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=list(targets),
                                             task_type=TaskType.SEQ_CLS, modules_to_save=heads))
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in trained if "modules_to_save" not in n], "lr": lr},
              {"params": [p for n, p in trained if "modules_to_save" in n], "lr": head_lr or lr}]
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    rng, start, curve = random.Random(1), time.time(), []
    for step in range(1, steps + 1):
        model.train()
        model(**batch(rng.sample(train, batch_size))).loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in trained], 1.0)
        optimizer.step()
        optimizer.zero_grad()
        if step % 100 == 0:
            curve.append(accuracy(model, [batch(test[i:i + 100]) for i in range(0, len(test), 100)]))
    print(name, curve, f"{time.time() - start:.0f}s", flush=True)


@torch.no_grad()
def accuracy(model: torch.nn.Module, batches: list[dict]) -> float:
    model.eval()
    hits = total = 0
    for b in batches:
        labels = b.pop("labels")
        hits += int((model(**b).logits.argmax(-1) == labels).sum())
        total += len(labels)
    return round(hits / total, 3)


def main() -> None:
    path = resolve_model("minilm").path
    train, test = rows("train.jsonl"), rows("test.jsonl")
    random.Random(0).shuffle(test)
    for name in sys.argv[1:] or VARIANTS:
        run(name, path, train, test[:600], **VARIANTS[name])


if __name__ == "__main__":
    main()
