"""SFPrompt's config section ``[sfprompt]``."""

from __future__ import annotations

import math
from dataclasses import dataclass

from pollinate.common.config import config_field, one_of, require
from pollinate.common.limits import MAX_MESSAGE_BYTES

SPLIT_WIRE_DTYPES = ("fp32", "fp16", "bf16")
EL2N_PATHS = ("split", "local")


@dataclass
class SFPromptConfig:
    """SFPrompt: split model (client head + tail, server body), soft prompts, EL2N pruning, local-loss epochs."""

    head_layers: int = config_field("Transformer blocks in the client's head (after the embeddings)", default=1)
    tail_layers: int = config_field("Transformer blocks in the client's tail (before the output head)", default=1)
    num_prompt_tokens: int = config_field("Learnable soft-prompt tokens prepended after the embeddings", default=8)
    prompt_init: str = config_field("Prompt initialisation: vocab-sample | random", default="vocab-sample")
    prompt_lr: float = config_field("AdamW learning rate of the prompts (the tail uses train.lr)", default=1e-2)
    keep_fraction: float = config_field("γ: share of local examples with the highest EL2N score kept for split steps",
                                 default=0.5)
    keep_per_class: bool = config_field(
        "Classification: keep the top γ of each class rather than of all examples, so EL2N under a fresh "
        "classifier (which mostly measures the class prior) cannot drop a whole class", default=True)
    el2n_path: str = config_field(
        "Model EL2N scores with: local = the client's head output straight into its tail (no server, no bytes, "
        "as SFPrompt scores; γ = 0.5 then halves the split plane) | split = head -> server body -> tail, the "
        "model the split steps train (a forward-only pass over the split plane: every example's activations "
        "up and body output down, each round it scores)", default="local")
    rescore_every: int = config_field(
        "Re-score EL2N and re-select the kept data every this many rounds (1 = every round, as SFPrompt does; "
        "0 = once, at the client's first round, which saves a forward pass over all local data per round)",
        default=1)
    local_epochs: float = config_field(
        "Local-loss passes over all local data per round (head output straight into the tail, no server; 0 = off). "
        "Best left off: it trains the tail on first-block features the tail never sees behind the body, and "
        "cost more than the split steps regained (docs/methods/sfprompt.md)",
        default=0.0)
    local_steps: int = config_field("Cap on local-loss steps per round (0 = no cap)", default=0)
    split_epochs: float = config_field(
        "Split-training passes over the kept data per round (head -> server body -> tail)", default=3.0)
    split_steps: int = config_field("Cap on split steps per round (0 = no cap)", default=0)
    wire_dtype: str = config_field(f"Activations and gradients on the split plane: {' | '.join(SPLIT_WIRE_DTYPES)}",
                            default="fp32")
    activation_noise: float = config_field(
        "σ of the Gaussian noise a client adds to every activation tensor it sends to the split service, as a "
        "multiple of that tensor's RMS, so one value is one signal-to-noise ratio at any model and cut (0 = off; "
        "heuristic protection of the inputs, no DP guarantee: docs/privacy.md)", default=0.0)
    host: str = config_field(
        "Interface the server's split service binds; left at 127.0.0.1 under `pollinate coordinator`, the "
        "coordinator's --host", default="127.0.0.1")
    port: int = config_field("Port of the split service (0 = an ephemeral port)", default=0)
    public_address: str = config_field(
        "host:port clients dial; empty = the bound port on host, or under `pollinate coordinator` on the host of "
        "its --public-address (else its --host)", default="")
    token_ttl_s: float = config_field("Lifetime of a per-round split token (also revoked when its round ends)",
                               default=1800.0)
    session_ttl_s: float = config_field("An idle split session is dropped with its graph after this many seconds",
                                 default=300.0)
    max_sessions: int = config_field("Split sessions the service holds at once", default=64)
    sessions_per_client: int = config_field("Split sessions one node may hold at once", default=2)
    max_batch: int = config_field("Sequences in one split request (0 = train.batch_size)", default=0)
    max_seq_len: int = config_field(
        "Positions of one sequence in a split request, prompt included (0 = model.max_seq_len + "
        "num_prompt_tokens); never above the model's maximum positions", default=0)
    max_concurrent_rpcs: int = config_field(
        "Split-service calls in progress at once; more are refused (RESOURCE_EXHAUSTED) and retried by clients",
        default=16)
    compute_slots: int = config_field(
        "Body forwards and backwards the split service runs at once; further ones wait in arrival order, one per "
        "node at most (1 = each node's step waits for at most one step of every other node)", default=1)
    client_activation_budget_bytes: int = config_field(
        "Activation memory one node's split steps may hold (0 = sessions_per_client steps of max_batch x "
        "max_seq_len, as the service estimates them)", default=0)
    max_message_bytes: int = config_field("Largest split-plane message, both directions", default=MAX_MESSAGE_BYTES)
    max_graph_bytes: int = config_field("Bound on the activations the service keeps for pending backward passes",
                                 default=4 * 1024**3)
    call_timeout_s: float = config_field("Deadline of each split-service call from a client", default=60.0)
    tls_certs: str = config_field(
        "Directory from `pollinate keys init` (server.crt, server.key, ca.crt): serve the split plane over TLS; "
        "empty = the coordinator's --certs directory when deployed with one, else plaintext (simulation on "
        "loopback, --insecure)", default="")

    def __post_init__(self) -> None:
        require(self.head_layers >= 1, "sfprompt.head_layers", self.head_layers, "an int >= 1")
        require(self.tail_layers >= 1, "sfprompt.tail_layers", self.tail_layers, "an int >= 1")
        require(self.num_prompt_tokens >= 0, "sfprompt.num_prompt_tokens", self.num_prompt_tokens, "an int >= 0")
        one_of("sfprompt.prompt_init", self.prompt_init, ("vocab-sample", "random"))
        require(self.prompt_lr > 0, "sfprompt.prompt_lr", self.prompt_lr, "a float > 0")
        require(0 < self.keep_fraction <= 1, "sfprompt.keep_fraction", self.keep_fraction, "a float in (0, 1]")
        one_of("sfprompt.el2n_path", self.el2n_path, EL2N_PATHS)
        require(self.rescore_every >= 0, "sfprompt.rescore_every", self.rescore_every, "an int >= 0")
        require(self.local_epochs >= 0, "sfprompt.local_epochs", self.local_epochs, "a float >= 0")
        require(self.local_steps >= 0, "sfprompt.local_steps", self.local_steps, "an int >= 0")
        require(self.split_epochs >= 0, "sfprompt.split_epochs", self.split_epochs, "a float >= 0")
        require(self.split_steps >= 0, "sfprompt.split_steps", self.split_steps, "an int >= 0")
        require(self.local_epochs > 0 or self.split_epochs > 0, "sfprompt.local_epochs", self.local_epochs,
                 "> 0 when sfprompt.split_epochs is 0 (otherwise nothing trains)")
        one_of("sfprompt.wire_dtype", self.wire_dtype, SPLIT_WIRE_DTYPES)
        require(math.isfinite(self.activation_noise) and self.activation_noise >= 0, "sfprompt.activation_noise",
                self.activation_noise, "a finite float >= 0 (0 = off)")
        require(bool(self.host), "sfprompt.host", self.host, "an interface address such as 127.0.0.1")
        require(0 <= self.port <= 65535, "sfprompt.port", self.port, "an int in [0, 65535]")
        require(not self.public_address or ":" in self.public_address, "sfprompt.public_address",
                 self.public_address, "empty or host:port")
        require(self.token_ttl_s > 0, "sfprompt.token_ttl_s", self.token_ttl_s, "a float > 0")
        require(self.session_ttl_s > 0, "sfprompt.session_ttl_s", self.session_ttl_s, "a float > 0")
        require(self.max_sessions >= 1, "sfprompt.max_sessions", self.max_sessions, "an int >= 1")
        require(1 <= self.sessions_per_client <= self.max_sessions, "sfprompt.sessions_per_client",
                self.sessions_per_client, "an int in [1, sfprompt.max_sessions]")
        require(self.max_batch >= 0, "sfprompt.max_batch", self.max_batch, "an int >= 0 (0 = train.batch_size)")
        require(self.max_seq_len >= 0, "sfprompt.max_seq_len", self.max_seq_len,
                "an int >= 0 (0 = model.max_seq_len + num_prompt_tokens)")
        require(self.max_concurrent_rpcs >= 1, "sfprompt.max_concurrent_rpcs", self.max_concurrent_rpcs, "an int >= 1")
        require(self.compute_slots >= 1, "sfprompt.compute_slots", self.compute_slots, "an int >= 1")
        require(self.client_activation_budget_bytes >= 0, "sfprompt.client_activation_budget_bytes",
                self.client_activation_budget_bytes, "an int >= 0 (0 = derived)")
        require(self.max_message_bytes > 0, "sfprompt.max_message_bytes", self.max_message_bytes, "an int > 0")
        require(self.max_graph_bytes > 0, "sfprompt.max_graph_bytes", self.max_graph_bytes, "an int > 0")
        require(self.call_timeout_s > 0, "sfprompt.call_timeout_s", self.call_timeout_s, "a float > 0")
