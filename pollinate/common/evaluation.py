"""Evaluating a model on held-out examples: eval loss and the task metric, the same on the server and on clients.

Classification: the loss and the accuracy come from one forward pass per batch. Generation: the loss pass, then
greedy decoding for exact match of the first answer line (overall and, with a group key, per group).
The server evaluates the run's held-out split; each client evaluates its own held-out slice
(``held_out_indices``: which of its rows it never trains on).
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from pollinate.common.data import collate, format_prompt
from pollinate.common.models import model_device


@dataclass
class EvalExamples:
    """Held-out examples as evaluation reads them.

    Parameters
    ----------
    task_type : str
        ``generation`` or ``classification``.
    rows : list of dict
        The raw rows (generation reads ``prompt``/``response`` and the group key).
    encoded : list of dict
        The same rows encoded for the model (``input_ids``, ``labels``).
    group_key : str, default ""
        Generation: also report exact match per value of this field (``""``: overall only).
    template : str, default "plain"
        Generation: the run's ``data.template``, which puts each prompt in the form the model was trained on.
    """

    task_type: str
    rows: list[dict[str, Any]]
    encoded: list[dict[str, Any]]
    group_key: str = ""
    template: str = "plain"


def metric_name(task_type: str) -> str:
    """The task metric's name: ``exact_match`` (generation) or ``accuracy`` (classification)."""
    return "exact_match" if task_type == "generation" else "accuracy"


def held_out_indices(num_rows: int, fraction: float, max_examples: int, seed: int) -> list[int]:
    """Sorted indices of the rows a client holds out for evaluation: ``min(max(1, round(fraction · n)),
    max_examples)`` of them drawn with ``seed``, never all (at least one row trains); none when ``fraction`` is 0
    or there are fewer than two rows."""
    if fraction <= 0 or num_rows < 2:
        return []
    count = min(max(1, round(fraction * num_rows)), max_examples, num_rows - 1)
    return sorted(random.Random(seed).sample(range(num_rows), count))


def _batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start: start + size]


def _on(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    device = model_device(model)
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def loss_and_accuracy(model: torch.nn.Module, encoded: list[dict[str, Any]], pad_id: int,
                      batch_size: int) -> tuple[float, float]:
    """Classification: mean loss per example and accuracy, from one forward pass per batch."""
    model.eval()
    total, weight, correct = 0.0, 0, 0
    for chunk in _batches(encoded, batch_size):
        batch = _on(model, collate(list(chunk), pad_id))
        out = model(**batch)
        total, weight = total + float(out.loss) * len(chunk), weight + len(chunk)
        correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
    return total / max(weight, 1), correct / max(len(encoded), 1)


@torch.no_grad()
def generation_loss(model: torch.nn.Module, encoded: list[dict[str, Any]], pad_id: int, batch_size: int) -> float:
    """Generation: mean loss per target token; NaN when no example has a target token left (answers cut by
    ``model.max_seq_len``). A batch without target tokens is skipped: its loss is 0/0 (NaN) and counts for 0."""
    model.eval()
    total, weight = 0.0, 0
    for chunk in _batches(encoded, batch_size):
        batch = _on(model, collate(list(chunk), pad_id))
        n = int((batch["labels"][:, 1:] != -100).sum())
        if n:
            total, weight = total + float(model(**batch).loss) * n, weight + n
    return total / weight if weight else math.nan


@torch.no_grad()
def generate_answers(model: torch.nn.Module, tokenizer: Any, rows: list[dict[str, Any]], batch_size: int,
                     max_new_tokens: int, template: str = "plain") -> list[str]:
    """Greedy answers to every row's prompt put in ``template``, first line only (left padding so generation
    continues each prompt)."""
    model.eval()
    answers: list[str] = []
    for chunk in _batches(rows, batch_size):
        ids = [tokenizer(format_prompt(r["prompt"], template, tokenizer), add_special_tokens=False)["input_ids"]
               for r in chunk]
        prompts = [{"input_ids": x, "labels": [-100] * len(x)} for x in ids]
        batch = _on(model, collate(prompts, tokenizer.pad_token_id, pad_left=True))
        out = model.generate(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], do_sample=False,
            max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        )
        new_tokens = out[:, batch["input_ids"].shape[1]:]
        for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True):
            answers.append(text.strip().split("\n")[0].strip())
    return answers


def exact_match(rows: list[dict[str, Any]], answers: list[str], group_key: str = "") -> dict[str, float]:
    """``exact_match`` over all rows and, with ``group_key``, ``exact_match/<group>`` per value of that field."""
    by_group: dict[str, list[int]] = defaultdict(list)
    for row, answer in zip(rows, answers, strict=True):
        hit = int(answer == row["response"].strip())
        by_group["all"].append(hit)
        if group_key and group_key in row:
            by_group[str(row[group_key])].append(hit)
    metrics = {"exact_match": sum(by_group.pop("all", [])) / max(len(rows), 1)}
    metrics.update({f"exact_match/{g}": sum(v) / len(v) for g, v in sorted(by_group.items())})
    return metrics


def evaluate_model(model: torch.nn.Module, examples: EvalExamples, tokenizer: Any, batch_size: int,
                   max_new_tokens: int) -> dict[str, Any]:
    """``{"eval_loss": float, "eval_metrics": {...}}`` of ``model`` on ``examples``; the model is any with the HF
    forward signature (``input_ids, attention_mask, labels -> loss, logits``), and ``generate`` for generation."""
    pad_id = tokenizer.pad_token_id
    if examples.task_type == "generation":
        answers = generate_answers(model, tokenizer, examples.rows, batch_size, max_new_tokens, examples.template)
        metrics = exact_match(examples.rows, answers, examples.group_key)
        return {"eval_loss": generation_loss(model, examples.encoded, pad_id, batch_size), "eval_metrics": metrics}
    loss, accuracy = loss_and_accuracy(model, examples.encoded, pad_id, batch_size)
    return {"eval_loss": loss, "eval_metrics": {"accuracy": accuracy}}
