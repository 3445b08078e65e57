"""Memory and step time of one client's LoRA training at a given base precision, in a fresh process.

``python -m pollinate.simulations.memory_probe --model smollm2-360m-shape --bits 4 --batch-size 1`` prints one
JSON line. ``resident_bytes`` is the RSS once the model is built and the memory freed while loading is returned to
the OS (``gc`` + ``malloc_trim``). ``peak_bytes`` is the training high-water mark: the kernel's ``VmHWM`` after
it was reset to the current RSS (``/proc/self/clear_refs``) at that point, so load-time memory does not count.
``step_seconds`` is the mean of the timed steps after the warm-up steps. ``peak_mib`` is ``peak_bytes`` less the
RSS after imports (``baseline_mib``); ``load_peak_mib`` is the load's own high-water mark above that baseline.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import time
from typing import Any

import torch

MIB = 2**20


def _status_bytes(field: str) -> int:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``, ``RssAnon``...) in bytes."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field} line: the memory probe needs Linux")


def reset_high_water_mark() -> None:
    """Reset ``VmHWM`` to the current RSS (Linux ``clear_refs`` code 5)."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def release_freed_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS, so the RSS shows what is still in use."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from pollinate.common.models import FAMILY_ALL_LINEAR

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="preset, model directory or cached Hub id")
    parser.add_argument("--bits", type=int, default=32, choices=(32, 8, 4))
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--targets", default=",".join(FAMILY_ALL_LINEAR["llama"]),
                        help="comma-separated LoRA target modules (default: every attention and MLP projection)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (they count for the peak)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    parser.add_argument("--answer-tokens", type=int, default=16,
                        help="labelled tokens at the end of each sequence, as in instruction data (0 = all)")
    args = parser.parse_args(argv)
    if min(args.rank, args.batch_size, args.seq_len, args.steps) < 1 or min(args.warmup, args.threads) < 0:
        parser.error("--rank, --batch-size, --seq-len and --steps must be >= 1; --warmup and --threads >= 0")
    return args


def build_model(model_name: str, bits: int, rank: int, targets: list[str]) -> torch.nn.Module:
    """The base at ``bits`` as a client builds it, with a LoRA adapter of ``rank`` on ``targets``."""
    from pollinate.common.adapters import peft_lora_config, wrap_with_lora
    from pollinate.common.config import LoraConfig
    from pollinate.common.models import load_model, resolve_model
    from pollinate.common.quantize import load_quantized_base

    info = resolve_model(model_name)
    if bits < 32:
        model = load_quantized_base(info.path, "generation", 0, bits)
    else:
        model = load_model(info.path, "generation")
    lora = LoraConfig(r=rank, alpha=2.0 * rank, dropout=0.0, target_modules=targets)
    return wrap_with_lora(model, peft_lora_config(lora, info.family, "generation"))


def train_steps(model: torch.nn.Module, args: argparse.Namespace) -> list[float]:
    """Warm-up then timed AdamW steps on random tokens; the timed steps' seconds."""
    from pollinate.common.lmloss import IGNORE_INDEX, training_loss

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (args.batch_size, args.seq_len), generator=generator)
    ids = ids.to(trainable[0].device)
    labels = ids.clone()
    if args.answer_tokens:  # instruction data: only the answer is labelled (the loss projects only those)
        labels[:, : max(args.seq_len - args.answer_tokens, 0)] = IGNORE_INDEX
    seconds = []
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        training_loss(model, {"input_ids": ids, "labels": labels}).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ids.is_cuda:
            torch.cuda.synchronize()
        if step >= args.warmup:
            seconds.append(time.perf_counter() - start)
    return seconds


def probe(args: argparse.Namespace) -> dict[str, Any]:
    """Build, measure the resident set, reset the high-water mark, train, measure: the JSON line's fields."""
    if args.threads:
        torch.set_num_threads(args.threads)
    import peft  # noqa: F401  (import cost belongs to the runtime, not the model)

    targets = [t for t in args.targets.split(",") if t]
    baseline = _status_bytes("VmRSS")
    start = time.perf_counter()
    model = build_model(args.model, args.bits, args.rank, targets)
    load_peak = _status_bytes("VmHWM")
    release_freed_memory()
    resident, resident_anon = _status_bytes("VmRSS"), _status_bytes("RssAnon")
    on_cuda = any(p.is_cuda for p in model.parameters())
    cuda_weights = torch.cuda.memory_allocated() if on_cuda else 0
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
    reset_high_water_mark()
    seconds = train_steps(model, args)
    peak = _status_bytes("VmHWM")
    result = {"model": args.model, "bits": args.bits, "batch_size": args.batch_size, "seq_len": args.seq_len,
              "rank": args.rank, "targets": targets, "answer_tokens": args.answer_tokens,
              "threads": torch.get_num_threads(), "peak_bytes": peak, "resident_bytes": resident,
              "resident_anon_bytes": resident_anon, "step_seconds": round(sum(seconds) / len(seconds), 4),
              "baseline_mib": round(baseline / MIB, 1), "train_peak_rss_mib": round(peak / MIB, 1),
              "peak_mib": round((peak - baseline) / MIB, 1), "load_peak_mib": round((load_peak - baseline) / MIB, 1),
              "seconds": round(time.perf_counter() - start, 2)}
    if on_cuda:  # on a GPU the model lives in device memory: that is the peak that matters
        result.update(cuda_weights_mib=round(cuda_weights / MIB, 1),
                      cuda_train_peak_mib=round(torch.cuda.max_memory_allocated() / MIB, 1))
    return result


def main(argv: list[str] | None = None) -> None:
    print(json.dumps(probe(parse_args(argv))))


if __name__ == "__main__":
    main()
