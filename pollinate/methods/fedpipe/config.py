"""FedPipe's config section ``[fedpipe]``."""

from __future__ import annotations

from dataclasses import dataclass

from pollinate.common.config import config_field, one_of, require

ENCODING_CHOICES = ("dense-fp32", "dense-fp16", "int8", "nf4", "topk", "lowrank")


@dataclass
class FedPipeConfig:
    """FedPipe: importance scoring, the per-client plan, compressed exchange and heterogeneous aggregation."""

    candidate_modules: list[str] = config_field(
        "Module name suffixes the planner may adapt; empty = every attention and MLP projection",
        default_factory=list,
    )
    ranks: list[int] = config_field("LoRA ranks the planner may give a module", default_factory=lambda: [2, 4, 8, 16])
    bits: list[int] = config_field("Base-weight bits the planner may choose (32 = fp32, 8 = int8, 4 = NF4)",
                            default_factory=lambda: [32, 8, 4])
    batch_sizes: list[int] = config_field("Batch sizes the planner may choose", default_factory=lambda: [2, 4, 8])
    score_batches: int = config_field("Local batches used for importance scoring (|W * grad W|)", default=2)
    measure_step: bool = config_field(
        "Round 0: each client times a few training steps (a small adapter at the smallest and the largest batch "
        "size its memory holds, at each of fedpipe.bits it holds) and the planner corrects its speed estimate per "
        "bits by them, splitting a step into a part that grows with the tokens and one that does not",
        default=True)
    replan: bool = config_field(
        "After each round, re-plan a client whose round ran over federation.deadline_s or whose measured compute "
        "is more than 15% off the plan's estimate, with its speed estimate corrected by the measurement",
        server_only=True, default=True)
    param_budget: int = config_field(
        "Most adapter parameters a client trains (and sends) per round, on top of its memory and deadline "
        "(0 = no cap); the planner spends it on the most important modules", default=250_000)
    max_local_steps: int = config_field(
        "Most local steps a client trains when its plan leaves round deadline to spare (train.local_steps is "
        "the minimum every plan must fit); its update costs the same bytes however many steps it took",
        default=20)
    global_rank: int = config_field("Rank the server keeps the global ΔW at per module (higher = exact longer)",
                             default=32)
    uplink_encoding: str = config_field(f"Client->server delta encoding: {' | '.join(ENCODING_CHOICES)}", default="nf4")
    downlink_encoding: str = config_field("Server->client delta encoding (same choices)", default="nf4")
    error_feedback: bool = config_field("Keep the compression residual on the client and add it next round",
                                 default=True)
    topk_fraction: float = config_field("Share of entries kept by the topk encoding", default=0.1)
    block_size: int = config_field("Block size of the int8/nf4 encodings", default=64)
    norm_bound: float = config_field("Reject client updates whose L2 norm exceeds this", default=1e4)
    max_update_bytes: int = config_field("Reject client payloads larger than this many bytes", default=64_000_000)

    def __post_init__(self) -> None:
        require(bool(self.ranks) and all(r >= 1 for r in self.ranks), "fedpipe.ranks", self.ranks,
                 "a non-empty list of ints >= 1")
        require(bool(self.bits) and set(self.bits) <= {32, 8, 4}, "fedpipe.bits", self.bits,
                 "a non-empty subset of [32, 8, 4]")
        require(bool(self.batch_sizes) and all(b >= 1 for b in self.batch_sizes), "fedpipe.batch_sizes",
                 self.batch_sizes, "a non-empty list of ints >= 1")
        require(self.score_batches >= 1, "fedpipe.score_batches", self.score_batches, "an int >= 1")
        require(self.param_budget >= 0, "fedpipe.param_budget", self.param_budget, "an int >= 0")
        require(self.max_local_steps >= 0, "fedpipe.max_local_steps", self.max_local_steps, "an int >= 0")
        require(self.global_rank >= 1, "fedpipe.global_rank", self.global_rank, "an int >= 1")
        one_of("fedpipe.uplink_encoding", self.uplink_encoding, ENCODING_CHOICES)
        one_of("fedpipe.downlink_encoding", self.downlink_encoding, ENCODING_CHOICES)
        require(0 < self.topk_fraction <= 1, "fedpipe.topk_fraction", self.topk_fraction, "a float in (0, 1]")
        require(self.block_size >= 8, "fedpipe.block_size", self.block_size, "an int >= 8")
        require(self.norm_bound > 0, "fedpipe.norm_bound", self.norm_bound, "a float > 0")
        require(self.max_update_bytes > 0, "fedpipe.max_update_bytes", self.max_update_bytes, "an int > 0")
