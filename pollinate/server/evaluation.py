"""Server-side evaluation of the global model on the held-out split: eval loss and the task metric.

Generation tasks: greedy decoding, exact match of the first answer line (overall and per skill/category).
Classification: accuracy. The eval split is held out before partitioning, so no client ever trains on it.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

from pollinate.common.config import RunConfig
from pollinate.common.data import TaskData, collate, encoder_for, format_prompt, load_task, resolve_task_type
from pollinate.common.models import load_tokenizer, model_device, resolve_model


class ServerEvaluator:
    """Evaluates any model with the HF forward signature (``input_ids, attention_mask, labels -> loss``)."""

    def __init__(self, cfg: RunConfig):
        info = resolve_model(cfg.model.name)
        task = resolve_task_type(cfg.data, info.default_task)
        self.cfg = cfg
        self.model_path = info.path
        self.family = info.family
        self.tokenizer = load_tokenizer(info.path)
        self.task: TaskData = load_task(cfg.data, task, cfg.federation.seed)
        encode = encoder_for(self.task.task_type)
        self.encoded = [encode(r, self.tokenizer, cfg.model.max_seq_len) for r in self.task.eval]

    @property
    def num_labels(self) -> int:
        return len(self.task.labels)

    @staticmethod
    def _on(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        device = model_device(model)
        return {k: v.to(device) for k, v in batch.items()}

    def _batches(self, items: list, size: int):
        for start in range(0, len(items), size):
            yield items[start: start + size]

    @torch.no_grad()
    def eval_loss(self, model: torch.nn.Module) -> float:
        """Mean loss per target token (generation) or per example (classification) over the eval split."""
        model.eval()
        total, weight = 0.0, 0
        for chunk in self._batches(self.encoded, self.cfg.eval.batch_size):
            batch = self._on(model, collate(chunk, self.tokenizer.pad_token_id))
            loss = float(model(**batch).loss)
            n = int((batch["labels"][:, 1:] != -100).sum()) if batch["labels"].dim() == 2 else len(chunk)
            total, weight = total + loss * n, weight + n
        return total / max(weight, 1)

    @torch.no_grad()
    def generate_answers(self, model: torch.nn.Module) -> list[str]:
        """Greedy answers to every eval prompt (left padding so generation continues each prompt)."""
        model.eval()
        answers: list[str] = []
        for chunk in self._batches(self.task.eval, self.cfg.eval.batch_size):
            ids = [self.tokenizer(format_prompt(r["prompt"]), add_special_tokens=False)["input_ids"] for r in chunk]
            prompts = [{"input_ids": x, "labels": [-100] * len(x)} for x in ids]
            batch = self._on(model, collate(prompts, self.tokenizer.pad_token_id, pad_left=True))
            out = model.generate(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], do_sample=False,
                max_new_tokens=self.cfg.eval.max_new_tokens, pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=self.tokenizer.eos_token_id,
            )
            new_tokens = out[:, batch["input_ids"].shape[1]:]
            for text in self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True):
                answers.append(text.strip().split("\n")[0].strip())
        return answers

    @torch.no_grad()
    def accuracy(self, model: torch.nn.Module) -> dict[str, float]:
        model.eval()
        correct: dict[str, list[int]] = defaultdict(list)
        for chunk in self._batches(self.encoded, self.cfg.eval.batch_size):
            batch = self._on(model, collate(chunk, self.tokenizer.pad_token_id))
            predicted = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.argmax(-1)
            for label, guess in zip(batch["labels"].tolist(), predicted.tolist(), strict=True):
                correct["all"].append(int(label == guess))
        return {"accuracy": sum(correct["all"]) / len(correct["all"])}

    def exact_match(self, model: torch.nn.Module) -> dict[str, float]:
        answers = self.generate_answers(model)
        by_group: dict[str, list[int]] = defaultdict(list)
        group_key = self.task.partition_by
        for row, answer in zip(self.task.eval, answers, strict=True):
            hit = int(answer == row["response"].strip())
            by_group["all"].append(hit)
            if group_key and group_key in row:
                by_group[str(row[group_key])].append(hit)
        metrics = {"exact_match": sum(by_group.pop("all")) / len(self.task.eval)}
        metrics.update({f"exact_match/{g}": sum(v) / len(v) for g, v in sorted(by_group.items())})
        return metrics

    def evaluate(self, model: torch.nn.Module) -> dict[str, Any]:
        """``{"eval_loss": float, "eval_metrics": {...}}`` for the report."""
        metrics = self.exact_match(model) if self.task.task_type == "generation" else self.accuracy(model)
        return {"eval_loss": self.eval_loss(model), "eval_metrics": metrics}
