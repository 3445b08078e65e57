"""Prove Pollinate's CUDA path on a GPU machine (not part of CI: CI has no GPU).

Checks, one JSON line each: LoRA training steps + server evaluation on CUDA; NF4 and int8 frozen bases through
bitsandbytes on CUDA (a LoRA step, and every LoRA B still gets a gradient after an eval forward); the SFPrompt
split equals the unsplit model on CUDA (Llama and BERT). Run: ``python scripts/cuda_check.py``.
Needs torch with CUDA, transformers, peft, bitsandbytes, tokenizers; not flwr.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("POLLINATE_CACHE", "/tmp/pollinate-cache")

import torch  # noqa: E402

from pollinate.common.adapters import peft_lora_config, wrap_with_lora  # noqa: E402
from pollinate.common.config import LoraConfig, RunConfig  # noqa: E402
from pollinate.common.config_io import build_config  # noqa: E402
from pollinate.common.data import ExampleStream, encode_generation, generate_skills  # noqa: E402
from pollinate.common.models import FAMILY_ALL_LINEAR, load_model, load_tokenizer, pick_device, resolve_model  # noqa: E402


def report(name: str, **fields) -> None:
    print(json.dumps({"check": name, **fields}), flush=True)


def stream(tokenizer, n: int = 64, batch: int = 8) -> ExampleStream:
    encoded = [encode_generation(r, tokenizer, 64) for r in generate_skills(n, seed=0)]
    return ExampleStream(encoded, batch, tokenizer.pad_token_id, seed=0)


def check_lora_training_and_eval(path: str) -> None:
    from pollinate.client.runtime import train_steps
    from pollinate.server.evaluation import ServerEvaluator

    tokenizer = load_tokenizer(path)
    torch.manual_seed(0)
    model = wrap_with_lora(load_model(path, "generation"), peft_lora_config(LoraConfig(), "llama", "generation"))
    device = next(model.parameters()).device
    first = train_steps(model, stream(tokenizer), 1, 1e-3, 0.0, 1.0)["train_loss"]
    stats = train_steps(model, stream(tokenizer), 30, 1e-3, 0.0, 1.0)
    cfg: RunConfig = build_config(None, ['model.name="tiny-llama"', "data.eval_examples=20"])
    evaluation = ServerEvaluator(cfg).evaluate(model)
    report("lora-train-eval", device=str(device), first_loss=first, mean_loss_30_steps=stats["train_loss"],
           seconds=round(stats["train_seconds"], 3), eval_loss=evaluation["eval_loss"],
           ok=device.type == "cuda" and stats["train_loss"] < first)


def check_quantized_base(path: str, bits: int) -> None:
    from pollinate.common.quantize import prepare_quantized_model, quantization_config

    tokenizer = load_tokenizer(path)
    torch.manual_seed(0)
    base = prepare_quantized_model(load_model(path, "generation", quantization_config=quantization_config(bits)))
    lora = LoraConfig(r=8, alpha=16, dropout=0.0, target_modules=FAMILY_ALL_LINEAR["llama"])
    model = wrap_with_lora(base, peft_lora_config(lora, "llama", "generation"))
    batches = stream(tokenizer)
    device = next(p for p in model.parameters() if p.requires_grad).device
    model.eval()
    with torch.no_grad():  # the forward a client runs between rounds (the CPU repacking bug's trigger)
        model(**{k: v.to(device) for k, v in batches.next_batch().items()})
    model.train()
    batch = {k: v.to(device) for k, v in batches.next_batch().items()}
    model(**batch).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    nonzero = sum(int(g is not None and bool(g.abs().sum() > 0)) for g in grads)
    linear_types = sorted({type(m).__name__ for m in base.modules() if "Linear" in type(m).__name__})
    report(f"quantized-base-{bits}bit", device=str(device), lora_b_with_grad=nonzero, lora_b_total=len(grads),
           layer_types=linear_types, ok=nonzero == len(grads) and device.type == "cuda")


def check_split_exactness(kind: str) -> None:
    from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

    from pollinate.methods.sfprompt.split import split_model, unsplit_forward

    torch.manual_seed(0)
    device = pick_device()
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2))
        labels = torch.randint(0, 128, (3, 10))
    else:
        model = BertForSequenceClassification(BertConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                                         num_hidden_layers=4, num_attention_heads=4, num_labels=3))
        labels = torch.tensor([0, 2, 1])
    model = model.to(device).eval()
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, 7:] = 0
    batch = {"input_ids": torch.randint(1, 128, (3, 10)).to(device), "attention_mask": mask.to(device),
             "labels": labels.to(device)}
    parts = split_model(model, head_layers=1, tail_layers=1, num_prompt_tokens=4)
    parts.prompt.to(device)
    head = parts.head(batch["input_ids"], batch["attention_mask"])
    out = parts.tail(parts.body(head.hidden, head.attention_mask), head.attention_mask, labels=batch["labels"])
    ref = unsplit_forward(model, parts.prompt, batch)
    diff = float((out.logits - ref.logits).abs().max())
    report(f"split-exact-{kind}", device=str(device), max_logit_diff=diff,
           loss_diff=float((out.loss - ref.loss).abs()), ok=diff < 1e-4)


def main() -> int:
    report("env", torch=torch.__version__, cuda=torch.cuda.is_available(),
           gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    path = resolve_model("tiny-llama").path
    failures = 0
    checks = [lambda: check_lora_training_and_eval(path), lambda: check_quantized_base(path, 4),
              lambda: check_quantized_base(path, 8), lambda: check_split_exactness("llama"),
              lambda: check_split_exactness("bert")]
    for check in checks:
        start = time.perf_counter()
        try:
            check()
        except Exception as exc:  # report every check, even after one fails
            failures += 1
            report("error", error=repr(exc), trace=traceback.format_exc()[-1500:])
        report("timing", seconds=round(time.perf_counter() - start, 2))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
