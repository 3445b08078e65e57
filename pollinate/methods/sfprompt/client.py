"""sfprompt, client half (Cao et al. 2024): split federated prompt tuning with data pruning.

The client keeps the head (embeddings, first blocks, soft prompts) and the tail (last blocks and output
head); the frozen body runs on the server's split service. Per round:

1. load the global prompts + tail the server sent;
2. EL2N-score every local example with the local head -> tail model (or, with ``sfprompt.el2n_path = "split"``,
   head -> server body -> tail, forward only) and keep the top fraction γ;
3. local-loss steps on all local data, the head output straight into the tail, no server (off by default:
   ``sfprompt.local_epochs``);
4. split steps on the kept data: head activations up, body output down, gradient up, gradient down;
5. return the trained prompts + tail state with the split-plane bytes and timings.
Only prompts and tail train; head and body stay frozen.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from pollinate.client import runtime
from pollinate.common.adapters import load_parameter_state, parameter_state
from pollinate.common.config import RunConfig
from pollinate.common.data import ExampleStream, collate
from pollinate.common.wire import arrays_to_record, record_to_arrays
from pollinate.methods.sfprompt.channel import SplitChannel
from pollinate.methods.sfprompt.config import SFPromptConfig
from pollinate.methods.sfprompt.splitmodel import SplitParts, TailOutput, split_model

BodyFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------------------------- model state
def split_parts(cfg: RunConfig, num_labels: int) -> SplitParts:
    """Head + tail of the base, built once per process; each round only overwrites prompts and tail."""
    sf = cfg.sfprompt
    path, task = runtime.model_task(cfg)

    def build() -> SplitParts:
        base = runtime.base_model(cfg, num_labels, tag="sfprompt")
        parts = split_model(base, sf.head_layers, sf.tail_layers, sf.num_prompt_tokens,
                            prompt_init=sf.prompt_init)
        # The client never runs the body (the server does): free its weights, as an edge device would not
        # hold them.
        for param in parts.body.parameters():
            param.data = torch.empty(0)
        return parts

    key = ("sfprompt", path, task, num_labels, sf.head_layers, sf.tail_layers, sf.num_prompt_tokens)
    return runtime.cached(key, build)


def trainable_state(parts: SplitParts) -> dict[str, np.ndarray]:
    """Prompts + trainable tail parameters as fp32 numpy, under ``head.*`` / ``tail.*`` names."""
    return parameter_state(dict(parts.trainable_parameters()))


def load_trainable_state(parts: SplitParts, state: dict[str, np.ndarray]) -> None:
    """Overwrite prompts + tail in place; the key sets must match exactly (no silent partial loads)."""
    try:
        load_parameter_state(dict(parts.trainable_parameters()), state)
    except ValueError as exc:
        raise ValueError(f"sfprompt {exc}; check sfprompt.head_layers/tail_layers/num_prompt_tokens") from exc


# --------------------------------------------------------------------------------------------- EL2N pruning
def el2n(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """EL2N per row: ‖softmax(f(x)) − onehot(y)‖₂ (Paul et al. 2021), for ``logits`` (N, C), ``labels`` (N,)."""
    probs = logits.float().softmax(-1)
    target = probs.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    # ‖p − e_y‖² = Σp² − 2p_y + 1: no one-hot needed, which matters for a 49k vocabulary.
    return (probs.square().sum(-1) - 2 * target + 1).clamp_min(0).sqrt()


def el2n_per_example(tail: TailOutput, labels: torch.Tensor) -> torch.Tensor:
    """EL2N of each example: of its logits (classification), or the mean over its answer tokens (causal LM,
    from a tail run with ``answers_only``; 0 for an example without any)."""
    if tail.rows is None:
        return el2n(tail.logits, labels)
    per_token = el2n(tail.logits, tail.targets)
    batch = labels.shape[0]
    totals = per_token.new_zeros(batch).index_add_(0, tail.rows, per_token)
    counts = per_token.new_zeros(batch).index_add_(0, tail.rows, torch.ones_like(per_token))
    return totals / counts.clamp_min(1)


@torch.no_grad()
def el2n_scores(parts: SplitParts, encoded: list[dict[str, Any]], batch_size: int, pad_id: int,
                body: BodyFn | None = None) -> np.ndarray:
    """EL2N of every example in eval mode: head -> ``body`` -> tail, the split model being trained (no grad, so
    the service keeps no graph), or with ``body`` None the head output straight into the tail."""
    parts.head.eval()
    parts.tail.eval()
    scores = []
    for start in range(0, len(encoded), batch_size):
        batch = collate(encoded[start: start + batch_size], pad_id)
        out = parts.head(batch["input_ids"], batch["attention_mask"])
        hidden = out.hidden if body is None else body(out.hidden, out.attention_mask)
        tail = parts.tail(hidden, out.attention_mask, batch["labels"], answers_only=True)
        scores.append(el2n_per_example(tail, batch["labels"]))
    return torch.cat(scores).cpu().numpy()


def keep_top(scores: np.ndarray, fraction: float) -> list[int]:
    """Indices (ascending) of the ``ceil(fraction · n)`` highest scores (at least one); ties keep the
    earlier example."""
    if not 0 < fraction <= 1:
        raise ValueError(f"keep fraction {fraction}: expected a float in (0, 1]")
    n = len(scores)
    k = min(n, max(1, math.ceil(fraction * n - 1e-9)))  # the epsilon keeps 0.5 * 10 at 5, not 6
    order = np.argsort(-np.asarray(scores), kind="stable")
    return sorted(int(i) for i in order[:k])


def keep_top_per_class(scores: np.ndarray, labels: list[int], fraction: float) -> list[int]:
    """Indices (ascending) of the top ``fraction`` of each class by score (at least one per class).

    Under a freshly initialised classifier EL2N mostly measures the class prior: ‖p − e_y‖ is smallest for the
    class the untrained head happens to favour, and a global top-γ can drop that class altogether (on MiniLM /
    poem_sentiment, seed 0, a global top-half kept none of client 0's 37 class-0 examples)."""
    kept: list[int] = []
    for label in sorted(set(labels)):
        members = [i for i, y in enumerate(labels) if y == label]
        kept += [members[j] for j in keep_top(np.asarray(scores)[members], fraction)]
    return sorted(kept)


def select_kept(scores: np.ndarray, encoded: list[dict[str, Any]], sf: SFPromptConfig) -> list[int]:
    """Top-γ by EL2N: per class for classification data when ``sfprompt.keep_per_class``, else overall."""
    labels = [example["labels"] for example in encoded]
    if sf.keep_per_class and labels and all(isinstance(y, int) for y in labels):
        return keep_top_per_class(scores, labels, sf.keep_fraction)
    return keep_top(scores, sf.keep_fraction)


KEPT_KEY = "sfprompt.kept"


def kept_examples(context: Context, sf: SFPromptConfig, parts: SplitParts, encoded: list[dict[str, Any]],
                  batch_size: int, pad_id: int, server_round: int,
                  body: BodyFn | None = None) -> tuple[list[int], np.ndarray | None]:
    """The kept (top-γ EL2N) examples, and the scores when this round scored them (through ``body`` when
    ``sfprompt.el2n_path`` is split).

    γ = 1 keeps everything without scoring. Otherwise the selection is stored in ``context.state`` and reused
    until ``sfprompt.rescore_every`` rounds have passed (never, with 0) or the local data changed size.
    """
    if sf.keep_fraction >= 1:
        return list(range(len(encoded))), None
    if KEPT_KEY in context.state.config_records:
        stored = context.state[KEPT_KEY]
        fresh = sf.rescore_every == 0 or server_round - int(stored["round"]) < sf.rescore_every
        if fresh and int(stored["examples"]) == len(encoded) and float(stored["fraction"]) == sf.keep_fraction:
            return [int(i) for i in stored["indices"]], None
    scores = el2n_scores(parts, encoded, batch_size, pad_id, body if sf.el2n_path == "split" else None)
    kept = select_kept(scores, encoded, sf)
    context.state[KEPT_KEY] = ConfigRecord({"round": server_round, "examples": len(encoded),
                                            "fraction": sf.keep_fraction, "indices": kept})
    return kept, scores


# --------------------------------------------------------------------------------------------- training
class TimedSplitChannel(SplitChannel):
    """SplitChannel that also adds up the wall time spent waiting on the service (body + network)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.wait_seconds = 0.0

    def _invoke(self, method: str, request: Any) -> Any:
        start = time.perf_counter()
        try:
            return super()._invoke(method, request)
        finally:
            self.wait_seconds += time.perf_counter() - start


def phase_steps(epochs: float, num_examples: int, batch_size: int, cap: int) -> int:
    """Optimizer steps for ``epochs`` passes over ``num_examples`` (at most ``cap`` when cap > 0)."""
    steps = math.ceil(epochs * num_examples / batch_size) if epochs > 0 and num_examples else 0
    return min(steps, cap) if cap > 0 else steps


def train_prompts_and_tail(parts: SplitParts, local: ExampleStream, local_steps: int, kept: ExampleStream,
                           split_steps: int, body: BodyFn, cfg: RunConfig) -> dict[str, float]:
    """Local-loss steps (head -> tail), then split steps (head -> ``body`` -> tail); one AdamW for both."""
    prompt_params = list(parts.prompt.parameters()) if parts.prompt is not None else []
    prompt_ids = {id(p) for p in prompt_params}
    tail_params = [p for _, p in parts.trainable_parameters() if id(p) not in prompt_ids]
    groups = [{"params": tail_params, "lr": cfg.train.lr}]
    if prompt_params:
        groups.append({"params": prompt_params, "lr": cfg.sfprompt.prompt_lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.train.weight_decay)
    params = prompt_params + tail_params
    parts.head.train()
    parts.tail.train()

    def step(batch: dict[str, torch.Tensor], through: BodyFn | None) -> float:
        head_out = parts.head(batch["input_ids"], batch["attention_mask"])
        hidden = head_out.hidden if through is None else through(head_out.hidden, head_out.attention_mask)
        loss = parts.tail(hidden, head_out.attention_mask, batch["labels"], answers_only=True).loss
        loss.backward()
        if cfg.train.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    local_losses = [step(local.next_batch(), None) for _ in range(local_steps)]
    split_losses = [step(kept.next_batch(), body) for _ in range(split_steps)]
    losses = local_losses + split_losses
    return {
        "train_loss": float(np.mean(losses)) if losses else float("nan"),
        "local_loss": float(np.mean(local_losses)) if local_losses else float("nan"),
        "split_loss": float(np.mean(split_losses)) if split_losses else float("nan"),
    }


def train(msg: Message, cfg: RunConfig, context: Context) -> RecordDict:
    sf = cfg.sfprompt
    server_round = int(msg.content["config"]["server-round"])
    split = msg.content["split"]
    data = runtime.local_data(cfg, dict(context.node_config))
    parts = split_parts(cfg, data.num_labels)
    load_trainable_state(parts, record_to_arrays(msg.content["arrays"]))
    runtime.seed_everything(cfg, server_round, data.client_id)
    pad_id = runtime.tokenizer_for(cfg).pad_token_id
    batch_size = cfg.train.batch_size

    start = time.perf_counter()
    ca_pem = str(split["ca-pem"]) if "ca-pem" in split else ""
    with TimedSplitChannel(str(split["address"]), str(split["token"]), wire_dtype=str(split["wire-dtype"]),
                           timeout_s=sf.call_timeout_s, max_message_bytes=sf.max_message_bytes,
                           root_certificates=ca_pem.encode() or None) as channel:
        kept, scores = kept_examples(context, sf, parts, data.encoded, batch_size, pad_id, server_round,
                                     channel.body)
        seed = cfg.federation.seed * 7919 + server_round * 31 + data.client_id
        local = ExampleStream(data.encoded, batch_size, pad_id, seed=seed)
        kept_stream = ExampleStream([data.encoded[i] for i in kept], batch_size, pad_id, seed=seed + 1)
        local_steps = phase_steps(sf.local_epochs, data.num_examples, batch_size, sf.local_steps)
        split_steps = phase_steps(sf.split_epochs, len(kept), batch_size, sf.split_steps)
        stats = train_prompts_and_tail(parts, local, local_steps, kept_stream, split_steps, channel.body, cfg)
    total_s = time.perf_counter() - start
    client_s = max(total_s - channel.wait_seconds, 0.0)

    # The profile scales what this device computes; waiting on the server's body is not the device's compute.
    timing = runtime.profile_reply(cfg, dict(context.node_config), client_s)
    metrics = MetricRecord({
        "num-examples": data.num_examples, "client_id": data.client_id,
        "peak_rss_bytes": runtime.peak_rss_bytes(), "train_seconds": total_s,
        "compute_seconds": timing["compute_seconds"] + channel.wait_seconds,
        "client_compute_seconds": client_s, "split_wait_seconds": channel.wait_seconds,
        "client_time_share": client_s / total_s if total_s > 0 else 1.0,
        "kept_examples": len(kept), "local_steps": local_steps, "split_steps": split_steps,
        "split_bytes_up": channel.bytes_up, "split_bytes_down": channel.bytes_down,
        **({"el2n_mean_kept": float(scores[kept].mean()), "el2n_mean_all": float(scores.mean())}
           if scores is not None else {}),
        **{k: v for k, v in stats.items() if not math.isnan(v)},
    })
    return RecordDict({"arrays": arrays_to_record(trainable_state(parts)), "metrics": metrics,
                       "profile": timing["profile"]})
