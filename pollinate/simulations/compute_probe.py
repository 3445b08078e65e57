"""Client compute of one SFPrompt round vs federated full fine-tuning on the same data, in FLOPs.

``python -m pollinate.simulations.compute_probe [--config run.toml] [--set section.key=value ...]`` runs one
client's SFPrompt round in process — EL2N over its data (through the body, or straight into the tail, as
``sfprompt.el2n_path`` says), the local-loss steps, the split steps through an in-process body (``LocalBody``:
the service's own handlers, no network) — and then the same optimizer steps on the same batches with the whole
model trainable (what a ``fedavg-full`` client computes). Every phase is
counted with the formulas of torch's ``FlopCounterMode`` (matmul/attention FLOPs, forward and backward); the
body's share is counted separately and is the server's. Prints one JSON line.

Counting every op cost 9–55% wall time here (SmolLM2 and tiny training steps, on a shared CPU), time that
would be billed to a client's deadline, so simulations do not count FLOPs; this probe does, once, for the
configuration given.
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from pollinate.client import runtime
from pollinate.common.config import RunConfig
from pollinate.common.config_io import build_config
from pollinate.common.data import ExampleStream
from pollinate.common.lmloss import training_loss
from pollinate.common.models import load_model
from pollinate.methods.sfprompt.pruning import el2n_scores, select_kept
from pollinate.methods.sfprompt.service import LocalBody
from pollinate.methods.sfprompt.split import split_model
from pollinate.methods.sfprompt.training import phase_steps, train_prompts_and_tail


class FlopCounter(TorchDispatchMode):
    """Adds up FLOPs with the formulas of torch's ``FlopCounterMode`` (``flop_registry``: matmuls, convolutions,
    attention, forward and backward). ``FlopCounterMode`` itself also tracks modules with autograd hooks, which
    break the split service's ``torch.autograd.grad`` on the body; this counter has no hooks."""

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.flops += formula(*args, **kwargs, out_val=out)
        return out


class CountingLocalBody(LocalBody):
    """``LocalBody`` whose service calls (the server's forward and backward of the body) are FLOP-counted."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.flops = 0

    def _invoke(self, method: str, request: Any) -> Any:
        with FlopCounter() as counter:
            reply = super()._invoke(method, request)
        self.flops += counter.flops
        return reply


def counted(fn) -> tuple[Any, int]:
    """``fn()`` and the FLOPs it ran (including any nested, separately counted calls)."""
    with FlopCounter() as counter:
        result = fn()
    return result, counter.flops


def full_finetune_flops(cfg: RunConfig, num_labels: int, streams: list[tuple[ExampleStream, int]]) -> int:
    """FLOPs of ``steps`` AdamW steps per stream with every weight of the unsplit model trainable."""
    path, task = runtime.model_task(cfg)
    model = load_model(path, task, num_labels, pooling=cfg.model.pooling)
    model.train()
    for param in model.parameters():
        param.requires_grad_(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)

    def run() -> None:
        for stream, steps in streams:
            for _ in range(steps):
                training_loss(model, stream.next_batch()).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

    return counted(run)[1]


def probe(cfg: RunConfig, client: int) -> dict[str, Any]:
    sf = cfg.sfprompt
    data = runtime.local_data(cfg, {"partition-id": client, "num-partitions": cfg.federation.clients})
    path, task = runtime.model_task(cfg)
    pad_id = runtime.tokenizer_for(cfg).pad_token_id
    batch_size = cfg.train.batch_size
    runtime.seed_everything(cfg, 1, data.client_id)
    parts = split_model(load_model(path, task, data.num_labels, pooling=cfg.model.pooling), sf.head_layers,
                        sf.tail_layers, sf.num_prompt_tokens, prompt_init=sf.prompt_init)

    body = CountingLocalBody(parts.body)
    scoring_body = body.body if sf.el2n_path == "split" else None
    scores, el2n_total = counted(lambda: el2n_scores(parts, data.encoded, batch_size, pad_id, scoring_body))
    el2n_server = body.flops
    kept = select_kept(scores, data.encoded, sf)
    local_steps = phase_steps(sf.local_epochs, data.num_examples, batch_size, sf.local_steps)
    split_steps = phase_steps(sf.split_epochs, len(kept), batch_size, sf.split_steps)

    def streams() -> list[tuple[ExampleStream, int]]:  # fresh, identically seeded: the same batches twice
        return [(ExampleStream(data.encoded, batch_size, pad_id, seed=11), local_steps),
                (ExampleStream([data.encoded[i] for i in kept], batch_size, pad_id, seed=12), split_steps)]

    (local, n_local), (kept_stream, n_split) = streams()
    _, local_flops = counted(lambda: train_prompts_and_tail(parts, local, n_local, kept_stream, 0, body.body, cfg))
    _, split_flops = counted(lambda: train_prompts_and_tail(parts, local, 0, kept_stream, n_split, body.body, cfg))
    split_server = body.flops - el2n_server
    split_client = split_flops - split_server
    el2n_flops = el2n_total - el2n_server
    client_total = el2n_flops + local_flops + split_client
    fft = full_finetune_flops(cfg, data.num_labels, streams())
    return {
        "model": cfg.model.name, "client": client, "examples": data.num_examples, "kept": len(kept),
        "local_steps": local_steps, "split_steps": split_steps, "batch_size": batch_size,
        "head_layers": sf.head_layers, "tail_layers": sf.tail_layers, "keep_fraction": sf.keep_fraction,
        "el2n_gflops": el2n_flops / 1e9, "local_gflops": local_flops / 1e9,
        "el2n_path": sf.el2n_path, "el2n_server_gflops": el2n_server / 1e9,
        "split_client_gflops": split_client / 1e9, "split_server_gflops": split_server / 1e9,
        "client_gflops": client_total / 1e9, "full_finetune_gflops": fft / 1e9,
        # The paper's measure: the client's compute relative to federated full fine-tuning of the same steps.
        "client_share_vs_full_finetune": client_total / fft if fft else math.nan,
        # Rounds that reuse the kept set (sfprompt.rescore_every = 0, or γ = 1) skip the EL2N pass.
        "client_share_without_el2n": (local_flops + split_client) / fft if fft else math.nan,
        # Within SFPrompt's split steps: how much of head + body + tail the device runs.
        "split_step_client_share": split_client / split_flops if split_flops else math.nan,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="run TOML (default: built-in defaults)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--client", type=int, default=0, help="partition id of the probed client")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v
                      for k, v in probe(build_config(args.config, args.set), args.client).items()}))


if __name__ == "__main__":
    main()
