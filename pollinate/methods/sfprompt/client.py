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
Only prompts and tail train; head and body stay frozen. Every activation tensor sent up first gets Gaussian noise
when ``sfprompt.activation_noise`` is set (``noise``). After the round, Flower's evaluate message brings the new
global prompts + tail and a forward-only token: ``evaluate`` runs the held-out examples head -> server body -> tail.
Scoring and selection live in ``pruning``, the two training phases in ``training``; this module is the Flower side
of a round.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict

from pollinate.client import runtime
from pollinate.common.adapters import load_parameter_state, parameter_state
from pollinate.common.config import RunConfig
from pollinate.common.data import ExampleStream
from pollinate.common.seeds import derive_seed
from pollinate.common.wire import arrays_to_record, record_to_arrays
from pollinate.methods.sfprompt.channel import SplitChannel
from pollinate.methods.sfprompt.config import SFPromptConfig
from pollinate.methods.sfprompt.noise import EVALUATION, TRAINING, activation_noise_seed, with_activation_noise
from pollinate.methods.sfprompt.pruning import BodyFn, el2n_scores, select_kept
from pollinate.methods.sfprompt.split import PromptedSplitModel, SplitParts, split_model
from pollinate.methods.sfprompt.training import phase_steps, train_prompts_and_tail


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


def open_channel(split: ConfigRecord, sf: SFPromptConfig, context: Context) -> TimedSplitChannel:
    """A session with the split service the message's ``split`` record names, with its token."""
    ca_pem = str(split["ca-pem"]) if "ca-pem" in split else ""
    return TimedSplitChannel(str(split["address"]), str(split["token"]), node_id=str(context.node_id),
                             wire_dtype=str(split["wire-dtype"]), timeout_s=sf.call_timeout_s,
                             max_message_bytes=sf.max_message_bytes, root_certificates=ca_pem.encode() or None)


def service_body(channel: SplitChannel, cfg: RunConfig, server_round: int, client_id: int, phase: int) -> BodyFn:
    """The body this client's ``phase`` calls: the channel's, behind ``sfprompt.activation_noise`` when set."""
    seed = activation_noise_seed(cfg.federation.seed, server_round, client_id, phase)
    return with_activation_noise(channel.body, cfg.sfprompt.activation_noise, seed)


def in_batches(body: BodyFn, max_batch: int) -> BodyFn:
    """``body`` called on at most ``max_batch`` sequences at a time (the split service refuses larger batches)."""
    if max_batch < 1:
        raise ValueError(f"max_batch={max_batch}: expected an int >= 1")

    def run(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if hidden.shape[0] <= max_batch:
            return body(hidden, attention_mask)
        return torch.cat([body(h, m) for h, m in zip(hidden.split(max_batch), attention_mask.split(max_batch),
                                                     strict=True)])

    return run


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
    with open_channel(split, sf, context) as channel:
        body = service_body(channel, cfg, server_round, data.client_id, TRAINING)
        kept, scores = kept_examples(context, sf, parts, data.encoded, batch_size, pad_id, server_round, body)
        run_seed = cfg.federation.seed
        local = ExampleStream(data.encoded, batch_size, pad_id,
                              seed=derive_seed(run_seed, "client-batches", server_round, data.client_id))
        kept_stream = ExampleStream([data.encoded[i] for i in kept], batch_size, pad_id,
                                    seed=derive_seed(run_seed, "client-kept-batches", server_round, data.client_id))
        local_steps = phase_steps(sf.local_epochs, data.num_examples, batch_size, sf.local_steps)
        split_steps = phase_steps(sf.split_epochs, len(kept), batch_size, sf.split_steps)
        stats = train_prompts_and_tail(parts, local, local_steps, kept_stream, split_steps, body, cfg)
    total_s = time.perf_counter() - start
    client_s = max(total_s - channel.wait_seconds, 0.0)

    stats = {**{k: v for k, v in stats.items() if not math.isnan(v)}, "train_seconds": total_s}
    el2n_means = ({"el2n_mean_kept": float(scores[kept].mean()), "el2n_mean_all": float(scores.mean())}
                  if scores is not None else {})
    # The profile scales what this device computes; waiting on the server's body is not the device's compute.
    return runtime.training_reply(
        cfg, dict(context.node_config), data, stats, arrays_to_record(trainable_state(parts)),
        device_seconds=client_s, server_seconds=channel.wait_seconds,
        client_compute_seconds=client_s, split_wait_seconds=channel.wait_seconds,
        client_time_share=client_s / total_s if total_s > 0 else 1.0,
        kept_examples=len(kept), local_steps=local_steps, split_steps=split_steps,
        split_bytes_up=channel.bytes_up, split_bytes_down=channel.bytes_down, **el2n_means)


# --------------------------------------------------------------------------------------------- evaluation
def evaluate(msg: Message, cfg: RunConfig, context: Context) -> RecordDict:
    """The global prompts + tail on this client's held-out examples: head -> the split service's body (a
    forward-only token from the evaluate message) -> tail, forward only; the split-plane bytes in the reply."""
    data = runtime.local_data(cfg, dict(context.node_config))
    if not data.eval_encoded:
        reply = runtime.evaluation_reply(cfg, data)
        reply["metrics"].update({"split_bytes_up": 0, "split_bytes_down": 0})
        return reply
    sf = cfg.sfprompt
    server_round = int(msg.content["config"]["server-round"])
    split = msg.content["split"]
    parts = split_parts(cfg, data.num_labels)
    load_trainable_state(parts, record_to_arrays(msg.content["arrays"]))
    with open_channel(split, sf, context) as channel:
        body = in_batches(service_body(channel, cfg, server_round, data.client_id, EVALUATION),
                          int(split["max-batch"]))
        model = PromptedSplitModel(parts, body, max_positions=int(split["max-seq-len"]))
        reply = runtime.evaluation_reply(cfg, data, model)
    reply["metrics"].update({"split_bytes_up": channel.bytes_up, "split_bytes_down": channel.bytes_down})
    return reply
