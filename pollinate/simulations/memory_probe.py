"""Peak memory of one client's LoRA training at a given base precision, in a fresh process.

``python -m pollinate.simulations.memory_probe --model smollm2-135m --bits 4`` prints one JSON line:
``peak_mib`` is the highest RSS while training (sampled every 2 ms) minus the RSS after imports: what the base,
adapter, optimizer state and activations cost on top of the runtime. Quantizing from the fp32 checkpoint
transiently needs the fp32 weights (``load_peak_mib``); a deployed NF4 client would load a pre-quantized base,
so the freed load-time memory is returned to the OS (``malloc_trim``) before training is measured.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import resource
import threading
import time

import torch


def _rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--bits", type=int, default=32, choices=(32, 8, 4))
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--answer-tokens", type=int, default=16,
                        help="labelled tokens at the end of each sequence, as in instruction data (0 = all)")
    args = parser.parse_args()

    from pollinate.common.adapters import peft_lora_config, wrap_with_lora
    from pollinate.common.config import LoraConfig
    from pollinate.common.lmloss import IGNORE_INDEX, training_loss
    from pollinate.common.models import FAMILY_ALL_LINEAR, load_model, resolve_model

    info = resolve_model(args.model)
    import peft  # noqa: F401  (import cost belongs to the runtime, not the model)

    baseline = _rss_mib()
    start = time.perf_counter()
    qcfg = None
    if args.bits < 32:
        from pollinate.common.quantize import prepare_quantized_model, quantization_config

        qcfg = quantization_config(args.bits)
    model = load_model(info.path, "generation", quantization_config=qcfg)
    if args.bits < 32:
        model = prepare_quantized_model(model)
    lora = LoraConfig(r=args.rank, alpha=2.0 * args.rank, dropout=0.0, target_modules=FAMILY_ALL_LINEAR[info.family])
    model = wrap_with_lora(model, peft_lora_config(lora, info.family, "generation"))
    load_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cuda_after_load = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (args.batch_size, args.seq_len)).to(
        next(p for p in model.parameters() if p.requires_grad).device)
    samples: list[float] = [_rss_mib()]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append(_rss_mib())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    labels = ids.clone()
    if args.answer_tokens:  # instruction data: only the answer is labelled (the loss projects only those)
        labels[:, : max(args.seq_len - args.answer_tokens, 0)] = IGNORE_INDEX
    for _ in range(args.steps):
        loss = training_loss(model, {"input_ids": ids, "labels": labels})
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    done.set()
    sampler.join()
    peak = max(samples)
    result = {"bits": args.bits, "batch_size": args.batch_size, "answer_tokens": args.answer_tokens,
              "baseline_mib": round(baseline, 1), "train_peak_rss_mib": round(peak, 1),
              "peak_mib": round(peak - baseline, 1), "load_peak_mib": round(load_peak - baseline, 1),
              "seconds": round(time.perf_counter() - start, 2)}
    if torch.cuda.is_available():  # on a GPU the model lives in device memory: that is the peak that matters
        result.update(cuda_weights_mib=round(cuda_after_load / 2**20, 1),
                      cuda_train_peak_mib=round(torch.cuda.max_memory_allocated() / 2**20, 1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
