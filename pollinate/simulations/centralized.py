"""Centralized references for ``pollinate bench --centralized``: the baseline method run as ONE client that holds
every training row the federated clients hold together, as a yardstick for what federation costs.

Two references, each a ``pollinate simulate`` of the baseline method with the overrides below:
``centralized-total`` takes as many optimizer steps per round as all sampled clients together
(``train.local_steps`` x clients per round), ``centralized-sequential`` as many as one client (``train.local_steps``).
Everything else that shapes learning (model, data source and cap, eval split, seed, batch size, learning rates,
LoRA, the learning-rate schedule) is the baseline's. Mechanisms that only exist because of federation are off:
the single client holds out no client-side eval slice, its update is applied as it is (FedAvg of one, no server
optimizer, no FedProx pull, no norm bounds) and it runs on the uniform profile.
"""

from __future__ import annotations

from pollinate.common.config import ConfigError, RunConfig

REFERENCES = ("centralized-total", "centralized-sequential")
# Methods whose local optimizer steps per round are exactly ``train.local_steps`` (FedPipe plans its own steps and
# batch sizes, SFPrompt counts epochs), so "the same steps" has one meaning.
STEP_COUNTED_METHODS = ("fedavg-lora", "fedavg-full")


def clients_per_round(cfg: RunConfig) -> int:
    """Clients the server samples per round, as ``PollinateStrategy.sample`` draws them."""
    n, fraction = cfg.federation.clients, cfg.federation.fraction_train
    return max(int(n * fraction), max(1, round(n * fraction)))


def reference_overrides(cfg: RunConfig, train_rows: int | None = None) -> dict[str, list[str]]:
    """``--set`` overrides of each reference run, applied on top of the baseline method's own config ``cfg``.

    ``train_rows`` is how many training rows the federated clients hold together (default: loaded and partitioned
    as the run will, see ``federated_train_rows``); the reference's one client holds them all, and its FedAvg
    weight must pass ``federation.max_examples_per_client``.
    """
    if cfg.method not in STEP_COUNTED_METHODS:
        raise ConfigError(f"--centralized: the baseline (first of --methods) is {cfg.method!r}, whose local steps "
                          f"train.local_steps does not set; put one of {list(STEP_COUNTED_METHODS)} first")
    train_rows = federated_train_rows(cfg) if train_rows is None else train_rows
    fed = cfg.federation
    common = [
        "federation.clients=1", "federation.fraction_train=1.0", "federation.min_clients=0",
        'data.partition="iid"', 'federation.scenario="uniform"', "eval.client_fraction=0.0",
        'federation.aggregator="fedavg"', 'federation.server_optimizer="fedavg"', "train.prox_mu=0.0",
        "federation.update_norm_bound=0.0", "federation.relative_norm_bound=0.0",
        f"federation.max_examples_per_client={max(fed.max_examples_per_client, train_rows)}",
    ]
    steps = cfg.train.local_steps
    return {"centralized-total": [*common, f"train.local_steps={steps * clients_per_round(cfg)}"],
            "centralized-sequential": [*common, f"train.local_steps={steps}"]}


def federated_train_rows(cfg: RunConfig) -> int:
    """Training rows the federated clients hold together; refuses a partition that leaves rows with no client
    (the reference would then train on rows no client holds)."""
    from pollinate.simulations.run import preflight

    summary = preflight(cfg)
    held = sum(summary["examples_per_client"])
    if held != summary["train_examples"]:
        raise ConfigError(f"--centralized: data.partition = {cfg.data.partition!r} gives the {cfg.federation.clients} "
                          f"clients {held} of the {summary['train_examples']} training rows; the centralized "
                          "reference needs a partition that uses every row (iid or dirichlet)")
    return held
