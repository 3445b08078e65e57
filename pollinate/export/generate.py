"""``pollinate generate``: the run's model answers prompts written in the run's template (greedy decoding), or,
for a classifier, names the class of each text."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from pollinate.common.data import collate, format_prompt
from pollinate.common.models import model_device
from pollinate.export.run import ExportError, FinishedRun
from pollinate.export.weights import TrainedModel


def read_prompts(path: Path, field: str) -> list[str]:
    """Prompts of a .jsonl file: each line an object with ``field`` (the run's prompt or text field, else
    ``prompt``/``text``) or a JSON string."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ExportError(f"prompt file '{path}' does not exist")
    prompts = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ExportError(f"'{path}' line {lineno} is not valid JSON: {exc}") from exc
        prompts.append(_prompt_of(item, field, f"'{path}' line {lineno}"))
    if not prompts:
        raise ExportError(f"prompt file '{path}' holds no prompt")
    return prompts


def _prompt_of(item: Any, field: str, where: str) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, dict):
        for key in (field, "prompt", "text"):
            if key in item:
                return str(item[key])
        raise ExportError(f"{where} has no field '{field}'; its fields are {sorted(item)}")
    raise ExportError(f"{where} is neither an object nor a string")


def _batches(items: list[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield items[start: start + size]


@torch.no_grad()
def complete(trained: TrainedModel, prompts: list[str], max_new_tokens: int, batch_size: int,
             template: str = "plain") -> list[str]:
    """Greedy completions of ``prompts`` put in the run's ``template`` (left padding, so each continues its
    prompt); a completion stops at the end-of-sequence token."""
    tokenizer, model = trained.tokenizer, trained.model
    answers: list[str] = []
    for chunk in _batches(prompts, batch_size):
        ids = [tokenizer(format_prompt(p, template, tokenizer), add_special_tokens=False)["input_ids"] for p in chunk]
        batch = collate([{"input_ids": x, "labels": [-100] * len(x)} for x in ids], tokenizer.pad_token_id,
                        pad_left=True)
        device = model_device(model)
        out = model.generate(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                             do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
        new_tokens = out[:, batch["input_ids"].shape[1]:]
        answers += [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    return answers


@torch.no_grad()
def classify(trained: TrainedModel, texts: list[str], labels: list[str], batch_size: int, max_len: int) -> list[str]:
    """The predicted class name of each text (the run's class names, in index order)."""
    tokenizer, model = trained.tokenizer, trained.model
    predicted: list[str] = []
    for chunk in _batches(texts, batch_size):
        encoded = [{"input_ids": tokenizer(t, truncation=True, max_length=max_len)["input_ids"], "labels": 0}
                   for t in chunk]
        batch = collate(encoded, tokenizer.pad_token_id)
        device = model_device(model)
        logits = model(input_ids=batch["input_ids"].to(device),
                       attention_mask=batch["attention_mask"].to(device)).logits
        predicted += [labels[i] for i in logits.argmax(-1).tolist()]
    return predicted


def respond(run: FinishedRun, trained: TrainedModel, prompts: list[str], max_new_tokens: int) -> list[str]:
    """What the run's model says to each prompt: its completion (generation) or its class (classification)."""
    batch_size = run.cfg.eval.batch_size
    if run.task_type == "generation":
        return complete(trained, prompts, max_new_tokens, batch_size, run.cfg.data.template)
    return classify(trained, prompts, run.labels(), batch_size, run.cfg.model.max_seq_len)
