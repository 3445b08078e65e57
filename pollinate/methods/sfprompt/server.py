"""sfprompt, server half: hosts the frozen body as a gRPC split service and averages prompts + tail.

Per round every sampled client receives, through Flower, the global prompts + tail, the split service's
address and a token issued for it and this round (revoked when the round's replies are in). Clients return
their trained prompts + tail; the new global is the example-weighted mean (``federation.aggregator``). The
global model is the base with the global prompts + tail: it is evaluated head -> body -> tail in process, and
saved as ``sfprompt/sfprompt.safetensors`` with the split settings beside it.

Client-side evaluation (``eval.client_fraction``): each node that trained gets the new global prompts + tail and a
forward-only token (Forward without a graph only: no Backward, nothing held for one), revoked when the evaluation
replies are in; the client runs its held-out examples head -> body -> tail through the service.

Bytes per client are Flower's messages plus the split plane (``split_bytes_up/down``, counted as serialized
protobuf by the client's channel); both are in ``bytes_up/down`` and shown apart in the report. The evaluation's
split-plane bytes count in the round's ``bytes_eval_up/down`` (and ``split_bytes_eval_up/down``), not there.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from safetensors.numpy import save_file

from pollinate.common.adapters import load_parameter_state, parameter_state
from pollinate.common.config import RunConfig
from pollinate.common.models import load_model
from pollinate.common.report import RunRecorder
from pollinate.common.wire import arrays_to_record, record_to_arrays
from pollinate.methods.sfprompt.config import SFPromptConfig
from pollinate.methods.sfprompt.service import SplitLimits, TokenRegistry, start_split_server
from pollinate.methods.sfprompt.split import PromptedSplitModel, split_model
from pollinate.server.client_eval import ClientEvaluation
from pollinate.server.deployment import Deployment
from pollinate.server.evaluation import ServerEvaluator
from pollinate.server.replies import integer_in, reply_metrics, reported_numbers
from pollinate.server.state_fedavg import StateFedAvg

SPLIT_FIELDS = ("split_bytes_up", "split_bytes_down", "kept_examples", "client_time_share",
                "client_compute_seconds", "split_wait_seconds", "local_steps", "split_steps", "local_loss",
                "split_loss")


class SFPrompt(StateFedAvg):
    """SFPrompt (Cao et al. 2024); settings in ``[sfprompt]``, ``[train]`` and ``[federation]``.

    The split service starts in ``prepare`` (before round 1) on ``sfprompt.host:port`` and stops in
    ``close``.
    """

    def __init__(self, cfg: RunConfig, recorder: RunRecorder, run_dir: Path, deployment: Deployment | None = None):
        super().__init__(cfg, recorder, run_dir, deployment)
        sf = cfg.sfprompt
        self.evaluator = ServerEvaluator(cfg)
        # Fresh classifier head and initial prompts are functions of the seed.
        torch.manual_seed(cfg.federation.seed)
        evaluator = self.evaluator
        model = load_model(evaluator.model_path, evaluator.task.task_type, evaluator.num_labels,
                           pooling=cfg.model.pooling)
        self.parts = split_model(model, sf.head_layers, sf.tail_layers, sf.num_prompt_tokens,
                                 prompt_init=sf.prompt_init,
                                 generator=torch.Generator().manual_seed(cfg.federation.seed))
        self.params = dict(self.parts.trainable_parameters())
        self.shapes = {name: tuple(p.shape) for name, p in self.params.items()}
        self.model = PromptedSplitModel(self.parts)
        self.tokens = TokenRegistry()
        self.eval_tokens: list[str] = []  # the forward-only tokens of the evaluation in progress
        self.client_eval = SplitClientEvaluation(cfg, recorder, self.client_eval.metric)
        self.server: grpc.Server | None = None
        self.address = ""
        self.ca_pem = ""  # the split plane's CA, sent through Flower's authenticated channel

    def initial_arrays(self) -> ArrayRecord:
        return arrays_to_record(parameter_state(self.params))

    # --- the split service ------------------------------------------------------------------------------
    def prepare(self, grid: Grid) -> None:
        sf = self.cfg.sfprompt
        cert = key = None
        # Deployed with certificates, the split plane uses the coordinator's (sfprompt.tls_certs overrides).
        certs_dir = sf.tls_certs or (str(self.deployment.certs_dir) if self.deployment and
                                     self.deployment.certs_dir else "")
        if certs_dir:  # activations can reveal inputs: off loopback, the split plane is TLS like Flower's
            certs = Path(certs_dir)
            cert, key = (certs / "server.crt").read_bytes(), (certs / "server.key").read_bytes()
            self.ca_pem = (certs / "ca.crt").read_text()
        host, public_host = split_service_hosts(sf, self.deployment)
        self.server, port = start_split_server(
            self.parts.body, tokens=self.tokens, host=host, port=sf.port, limits=split_limits(self.cfg),
            max_message_bytes=sf.max_message_bytes, session_ttl_s=sf.session_ttl_s,
            max_concurrent_rpcs=sf.max_concurrent_rpcs, compute_slots=sf.compute_slots,
            hidden_size=self.parts.architecture.hidden_size,
            tls_cert_chain=cert, tls_private_key=key,
        )
        self.address = sf.public_address or f"{public_host}:{port}"
        self.recorder.event("split_service", address=self.address, wire_dtype=sf.wire_dtype)

    def close(self) -> None:
        self.revoke_eval_tokens()
        if self.server is not None:
            self.server.stop(grace=1.0).wait()
            self.server = None

    def split_record(self, node_id: int, server_round: int, *, forward_only: bool = False) -> ConfigRecord:
        """What a client needs to reach the split service: address, a token bound to ``node_id`` (the service
        refuses it from a call naming another node id), wire dtype and CA."""
        if self.server is None:
            raise RuntimeError("the split service is not running: call prepare(grid) before round 1")
        token = self.tokens.issue(str(node_id), server_round, ttl_s=self.cfg.sfprompt.token_ttl_s,
                                  forward_only=forward_only)
        return ConfigRecord({"address": self.address, "token": token,
                             "wire-dtype": self.cfg.sfprompt.wire_dtype, "ca-pem": self.ca_pem})

    def train_content(self, node_id: int, server_round: int, arrays: ArrayRecord,
                      config: ConfigRecord) -> RecordDict | None:
        return RecordDict({"arrays": arrays, "config": config, "split": self.split_record(node_id, server_round)})

    def evaluate_content(self, node_id: int, server_round: int, arrays: ArrayRecord) -> RecordDict | None:
        """The global prompts + tail, and a forward-only token with the service's request bounds (the client cuts
        its evaluation batches and prompts to fit them)."""
        content = super().evaluate_content(node_id, server_round, arrays)
        split = self.split_record(node_id, server_round, forward_only=True)
        self.eval_tokens.append(str(split["token"]))
        limits = split_limits(self.cfg)
        split["max-batch"] = limits.max_batch
        split["max-seq-len"] = service_max_seq_len(limits, self.parts.architecture.config)
        content["split"] = split
        return content

    def replies_in(self, server_round: int) -> None:
        self.tokens.revoke_round(server_round)  # replies are in: this round's tokens are done

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        self.revoke_eval_tokens()  # the evaluation replies are in: its tokens are done
        return super().aggregate_evaluate(server_round, replies)

    def revoke_eval_tokens(self) -> None:
        """Invalidate the forward-only tokens of the evaluation in progress."""
        for token in self.eval_tokens:
            self.tokens.revoke(token)
        self.eval_tokens = []

    # --- replies ------------------------------------------------------------------------------------------
    def client_record(self, client_id: int, content: RecordDict, bytes_up: int, bytes_down: int) -> dict[str, Any]:
        """Adds split-plane bytes to Flower's (keeping both apart) and the pruning/compute-share fields."""
        record = super().client_record(client_id, content, bytes_up, bytes_down)
        metrics = content["metrics"]
        split_up, split_down, kept = (integer_in(metrics.get(key), 0, 2**62, key)
                                      for key in ("split_bytes_up", "split_bytes_down", "kept_examples"))
        return {**record, **reported_numbers(metrics, SPLIT_FIELDS), "split_bytes_up": split_up,
                "split_bytes_down": split_down, "kept_examples": kept,
                "flower_bytes_up": bytes_up, "flower_bytes_down": bytes_down,
                "bytes_up": bytes_up + split_up, "bytes_down": bytes_down + split_down}

    # --- the global model ---------------------------------------------------------------------------------
    def _load(self, arrays: ArrayRecord) -> None:
        load_parameter_state(self.params, record_to_arrays(arrays))

    def evaluate_global(self, arrays: ArrayRecord) -> dict[str, Any]:
        self._load(arrays)
        return self.evaluator.evaluate(self.model)

    def round_fields(self) -> dict[str, Any]:
        """Round totals of the split plane and the mean client compute share."""
        accepted = [c for c in self._clients if not c.get("rejected")]
        totals: dict[str, Any] = {key: sum(int(c.get(key, 0)) for c in self._clients)
                                  for key in ("split_bytes_up", "split_bytes_down", "kept_examples")}
        shares = [c["client_time_share"] for c in accepted if "client_time_share" in c]
        totals["client_time_share"] = float(np.mean(shares)) if shares else None
        return {**super().round_fields(), **totals}  # StateFedAvg's (privacy)

    def save_final(self, arrays: ArrayRecord) -> dict[str, Any]:
        self._load(arrays)
        out = self.run_dir / "sfprompt"
        out.mkdir(parents=True, exist_ok=True)
        save_file(record_to_arrays(arrays), str(out / "sfprompt.safetensors"))
        sf = self.cfg.sfprompt
        settings = {"model_path": self.evaluator.model_path, "task_type": self.evaluator.task.task_type,
                    "num_labels": self.evaluator.num_labels, "head_layers": sf.head_layers,
                    "tail_layers": sf.tail_layers, "num_prompt_tokens": sf.num_prompt_tokens}
        (out / "split_config.json").write_text(json.dumps(settings, indent=2))
        return {"adapter_dir": str(out)}


def split_service_hosts(sf: SFPromptConfig, deployment: Deployment | None) -> tuple[str, str]:
    """``(interface to bind, host clients dial)``: ``sfprompt.host`` unless left at its default under a
    deployment, which then supplies its ``--host`` and public host (clients on other machines must reach it)."""
    if deployment is None or sf.host != SFPromptConfig.host:
        return sf.host, sf.host
    return deployment.host, deployment.public_host


def split_limits(cfg: RunConfig) -> SplitLimits:
    """The split service's limits from ``[sfprompt]``; zeros derive from the run (batch size, sequence length)."""
    sf = cfg.sfprompt
    return SplitLimits(max_batch=sf.max_batch or cfg.train.batch_size,
                       max_seq_len=sf.max_seq_len or cfg.model.max_seq_len + sf.num_prompt_tokens,
                       max_sessions=sf.max_sessions, sessions_per_client=sf.sessions_per_client,
                       max_graph_bytes=sf.max_graph_bytes,
                       client_activation_budget_bytes=sf.client_activation_budget_bytes)


def service_max_seq_len(limits: SplitLimits, model_config: Any) -> int:
    """The positions the split service admits per sequence: ``limits.max_seq_len`` capped at the model's maximum
    positions, as ``SplitBodyService`` caps it."""
    positions = getattr(model_config, "max_position_embeddings", None)
    return min(limits.max_seq_len, int(positions)) if positions else limits.max_seq_len


class SplitClientEvaluation(ClientEvaluation):
    """Client-side evaluation whose replies also report the split-plane bytes of the evaluation
    (``split_bytes_up/down``): counted in the round's eval bytes, and apart as ``split_bytes_eval_up/down``."""

    def reset(self) -> None:
        super().reset()
        self.split_up = self.split_down = 0

    def plane_bytes(self, content: RecordDict) -> tuple[int, int]:
        metrics = reply_metrics(content)
        up, down = (integer_in(metrics.get(key), 0, 2**62, key) for key in ("split_bytes_up", "split_bytes_down"))
        self.split_up, self.split_down = self.split_up + up, self.split_down + down
        return up, down

    def round_fields(self) -> dict[str, Any]:
        split = {"split_bytes_eval_up": self.split_up, "split_bytes_eval_down": self.split_down}
        fields = super().round_fields()  # resets
        return {**fields, **split} if fields else {}


def make_strategy(cfg: RunConfig, recorder: RunRecorder, run_dir: Path,
                  deployment: Deployment | None = None) -> SFPrompt:
    return SFPrompt(cfg, recorder, run_dir, deployment)
