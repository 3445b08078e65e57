"""Every seed a run uses is derived from its one run seed (``federation.seed``), here and nowhere else.

Each purpose is a named stream: a linear mix of the run seed and the stream's parts (round, client id, ...)
with fixed coefficients. The coefficients are the ones the first published runs used, so results reproduce;
a new purpose gets its own stream (its own coefficients), never an inline formula.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SeedStream:
    """``seed = run · run_factor + Σ part_i · part_factors[i] + offset``.

    Parameters
    ----------
    run_factor : int
        Multiplier of the run seed.
    part_factors : tuple of int
        Multiplier of each part, in the order ``derive_seed`` receives them.
    offset : int, default 0
        Added last (separates streams that share factors).
    """

    run_factor: int
    part_factors: tuple[int, ...]
    offset: int = 0


SEED_STREAMS: dict[str, SeedStream] = {
    # torch's global RNG on a client (dropout, fresh weights) per (round, client)
    "client-torch": SeedStream(1_000_003, (1_009, 1)),
    # a client's batch order per (round, client); the pruned-data stream is its sibling
    "client-batches": SeedStream(7919, (31, 1)),
    "client-kept-batches": SeedStream(7919, (31, 1), offset=1),
    # batches a client scores its weights on before round 1, per client
    "client-scoring-batches": SeedStream(1, (1,)),
    # what the server draws afresh each round (e.g. new adapter factors), per round
    "server-round": SeedStream(1_000_003, (1,)),
    # which of a client's rows it holds out for client-side evaluation, per client
    "client-eval-rows": SeedStream(104_729, (7_927,), offset=3),
    # differential privacy: the server's noise per round, a client's (local DP) per (round, client)
    "server-dp-noise": SeedStream(1_000_003, (1,), offset=17),
    "client-dp-noise": SeedStream(1_000_003, (1_009, 1), offset=19),
    # SFPrompt: a client's noise on the activations it sends, per (round, client, phase: 0 training, 1 evaluation)
    "client-activation-noise": SeedStream(1_000_003, (1_009, 1, 500_009), offset=23),
    # secure aggregation: a client's stochastic rounding of its update before masking, per (round, client)
    "client-secagg-rounding": SeedStream(1_000_003, (1_009, 1), offset=29),
    # the built-in task's held-out examples (the training examples use the run seed itself)
    "eval-examples": SeedStream(1, (), offset=1_000_003),
}


def derive_seed(run_seed: int, stream: str, *parts: int) -> int:
    """The seed of ``stream`` for ``parts`` (e.g. ``derive_seed(seed, "client-batches", round, client)``)."""
    try:
        spec = SEED_STREAMS[stream]
    except KeyError:
        raise ValueError(f"unknown seed stream {stream!r}; expected one of {sorted(SEED_STREAMS)}") from None
    if len(parts) != len(spec.part_factors):
        raise ValueError(f"seed stream {stream!r} takes {len(spec.part_factors)} parts, got {len(parts)}")
    return (int(run_seed) * spec.run_factor + sum(int(p) * f for p, f in zip(parts, spec.part_factors, strict=True))
            + spec.offset)
