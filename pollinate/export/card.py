"""The README.md model card of an exported adapter or merged model: how it was trained (method, data, clients,
rounds, bytes), its server-side evaluation per round, and how to load it."""

from __future__ import annotations

from typing import Any

from huggingface_hub import ModelCardData

from pollinate.common.data import format_prompt
from pollinate.common.report import headline_metric, human_bytes
from pollinate.export.run import FinishedRun


def model_card(run: FinishedRun, server_round: int, base: str, kind: str, location: str, pooling: str = "",
               num_labels: int = 0, base_note: str = "") -> str:
    """The card's Markdown (YAML metadata first); ``kind`` is ``adapter`` or ``merged``, ``base`` the base
    model's Hub id or path, ``location`` where the export is (shown in the code), ``pooling`` and ``num_labels`` a
    classifier's resolved pooling and class count, ``base_note`` what to know about the base weights."""
    cfg, history = run.cfg, run.history(server_round)
    generation = run.task_type == "generation"
    metadata = ModelCardData(
        base_model=base if "/" in base and not base.startswith(("/", ".")) else None,
        library_name="peft" if kind == "adapter" else "transformers",
        pipeline_tag="text-generation" if generation else "text-classification",
        tags=["pollinate", "flower", "federated-learning", cfg.method, *(["lora"] if kind == "adapter" else [])],
    )
    planned = cfg.federation.rounds
    lines = [
        "---", metadata.to_yaml(), "---", "",
        f"# {cfg.method} on {cfg.data.source} ({cfg.model.name})", "",
        f"Fine-tuned with Pollinate (federated learning on Flower): {cfg.federation.clients} clients, "
        f"method `{cfg.method}`, the global model after round {server_round} of {planned}"
        f"{'' if kind == 'adapter' else ', its adapter merged into the base weights'}.", "",
        "## Training", "",
        *_training_table(run, history, base),
        "", "## Evaluation (server side, held-out examples no client trained on)", "",
        *_results_table(history),
        "", "## Use", "",
        *_usage(run, base, kind, location, pooling, num_labels),
        *(["", base_note] if base_note else []),
    ]
    return "\n".join(lines) + "\n"


def _training_table(run: FinishedRun, history: list[dict[str, Any]], base: str) -> list[str]:
    cfg = run.cfg
    fields = (f"`{cfg.data.prompt_field}` → `{cfg.data.response_field}`" if run.task_type == "generation"
              else f"`{cfg.data.text_field}` → `{cfg.data.label_field}`")
    up, down = sum(r["bytes_up"] for r in history), sum(r["bytes_down"] for r in history)
    rows = [
        ("method", f"`{cfg.method}`"), ("base model", f"`{base}`"),
        ("data", f"`{cfg.data.source}` ({run.task_type}, {fields}; partition `{cfg.data.partition}`)"),
        ("clients", str(cfg.federation.clients)), ("rounds", f"{len(history)} (of {cfg.federation.rounds} planned)"),
        ("local training", f"{cfg.train.local_steps} steps x {cfg.train.batch_size} examples per round, "
                           f"lr {cfg.train.lr:g}"),
        ("bytes", f"{human_bytes(up)} up, {human_bytes(down)} down (all clients, rounds 1-{len(history)})"),
        ("seed", str(cfg.federation.seed)),
    ]
    if cfg.method in ("fedavg-lora",):
        targets = ", ".join(cfg.lora.target_modules) or "family default"
        rows.insert(2, ("LoRA", f"r {cfg.lora.r}, alpha {cfg.lora.alpha:g}, targets {targets}"))
    return ["| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows]]


def _results_table(history: list[dict[str, Any]]) -> list[str]:
    if not history:
        return ["(no round recorded)"]
    name = headline_metric(history[-1]["eval_metrics"])[0] or "metric"
    lines = [f"| round | train loss | eval loss | {name} | bytes up | bytes down |", "|---:|---:|---:|---:|---:|---:|"]
    for r in history:
        train = "-" if r.get("train_loss") is None else f"{r['train_loss']:.4f}"
        value = r["eval_metrics"].get(name)
        loss = "-" if r["eval_loss"] is None else f"{r['eval_loss']:.4f}"  # a round eval.every skips
        lines.append(f"| {r['round']} | {train} | {loss} | {'-' if value is None else f'{value:.3f}'} "
                     f"| {r['bytes_up']} | {r['bytes_down']} |")
    groups = {k.split("/", 1)[1]: v for k, v in history[-1]["eval_metrics"].items() if "/" in k}
    if groups:
        shown = ", ".join(f"{k} {v:.2f}" for k, v in groups.items())
        lines += ["", f"{name} per group after round {history[-1]['round']}: {shown}."]
    return lines


def _usage(run: FinishedRun, base: str, kind: str, location: str, pooling: str, num_labels: int) -> list[str]:
    generation = run.task_type == "generation"
    auto = "AutoModelForCausalLM" if generation else "AutoModelForSequenceClassification"
    if kind == "merged":
        code = [f"from transformers import AutoTokenizer, {auto}", "",
                f'model = {auto}.from_pretrained("{location}")',
                f'tokenizer = AutoTokenizer.from_pretrained("{location}")']
    else:
        labels = "" if generation else f", num_labels={num_labels}, ignore_mismatched_sizes=True"
        code = ["from peft import PeftModel", f"from transformers import AutoTokenizer, {auto}", "",
                f'base = {auto}.from_pretrained("{base}"{labels})']
        if pooling == "mean":
            code += ["from pollinate.common.pooling import use_mean_pooling",
                     "use_mean_pooling(base)  # the run pooled token states by their mean, as the base model does"]
        code += [f'model = PeftModel.from_pretrained(base, "{location}")',
                 f'tokenizer = AutoTokenizer.from_pretrained("{base}")']
    lines = ["```python", *code, "```", ""]
    if generation:
        if run.cfg.data.template == "chat":
            lines.append("Prompts go through the tokenizer's chat template (`apply_chat_template`, greedy decoding).")
        else:
            template = format_prompt("{prompt}", run.cfg.data.template).replace("\n", "\\n")
            lines.append(f"Prompts use the run's template `{template}` (greedy decoding; the answer is the first "
                         "line).")
    else:
        lines.append(f"Class names in index order: {_labels_text(run)}.")
    lines += ["", "With Pollinate: `pollinate generate RUN_DIR --prompt ...`, `pollinate eval RUN_DIR --data FILE`."]
    return lines


def _labels_text(run: FinishedRun) -> str:
    try:
        labels = run.labels()
    except ValueError:
        return "see the run's data source"
    shown = ", ".join(f"`{label}`" for label in labels[:20])
    return f"{len(labels)} classes: {shown}{', ...' if len(labels) > 20 else ''}"
