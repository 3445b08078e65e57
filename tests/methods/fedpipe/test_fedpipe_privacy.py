"""Differential privacy for FedPipe (docs/privacy.md#fedpipe).

Central: each client's change of the model (ΔW of its modules and its head's change) is clipped as one vector, the
clipped changes are averaged with equal weights, noise of std σ·C/n is added to the dense mean of every planned
module and the head, ε is reported per round. Local: the client clips and noises its factor change before error
feedback and encoding, and the round config leaves the dense methods' client step out of it."""

import json

import numpy as np
import pytest
from flwr.app import Context, MetricRecord, RecordDict
from test_fedpipe_client_eval import (  # noqa: F401  (task_identity: the autouse fixture applies here too)
    ClientGrid,
    context_of,
    fedpipe_strategy,
    task_identity,
    train_round,
    write_colors,
)

from pollinate.client.privacy import privatize_reply
from pollinate.common.config import ConfigError
from pollinate.common.privacy import DP_CLIP_KEY, DP_CLIPPED_METRIC, DP_NOISE_KEY, add_noise, clip_update
from pollinate.common.seeds import derive_seed
from pollinate.common.wire import record_to_arrays, record_to_bytes
from pollinate.methods.fedpipe.client import RESIDUAL_KEY
from pollinate.methods.fedpipe.codec import decode_bundle
from pollinate.methods.fedpipe.head import HEAD_PREFIX
from pollinate.methods.fedpipe.planner import ClientPlan
from pollinate.methods.fedpipe.server import FedPipe, lora_keys
from pollinate.server.strategy import Reply

pytest.importorskip("opacus")
UP, DOWN = "bert.encoder.layer.0.intermediate.dense", "bert.encoder.layer.0.output.dense"  # (128, 64), (64, 128)
EXACT = ("federation.clients=4", "fedpipe.global_rank=64", "federation.update_norm_bound=0")  # no truncation


@pytest.fixture(scope="module")
def colors(tmp_path_factory):
    return write_colors(tmp_path_factory.mktemp("data") / "colors.jsonl")


def _strategy(tmp_path, colors, *overrides: str) -> FedPipe:
    strategy = fedpipe_strategy(tmp_path, "tiny-bert", colors, *EXACT, *overrides)
    strategy.global_arrays = strategy.initial_arrays()
    return strategy


def _replies(strategy: FedPipe, plans: dict[int, dict[str, int]], scales: list[float], seed: int = 0) -> list[Reply]:
    """Clients planned on ``plans`` (module -> rank): random start factors, trained = start + ``scales[c]`` × noise
    on every factor and head tensor (0: no change)."""
    rng = np.random.default_rng(seed)
    replies = []
    for client, ranks in plans.items():
        strategy.plans[client] = ClientPlan(str(client), ranks, 4, 32, 1.0, 1.0, 1.0, 1.0)
        start = dict(strategy.initial_head)
        for module, rank in ranks.items():
            out_features, in_features = strategy.shapes[module]
            key_a, key_b = lora_keys(module)
            start[key_a] = rng.normal(size=(rank, in_features)).astype(np.float32)
            start[key_b] = rng.normal(size=(out_features, rank)).astype(np.float32)
        trained = {k: (v + scales[client] * rng.normal(size=v.shape)).astype(np.float32) for k, v in start.items()}
        strategy.round_starts[client] = start
        content = RecordDict({"metrics": MetricRecord({"client_id": client, "num-examples": 10})})
        replies.append(Reply(client, client, 10, content, trained, strategy.update_norm(client, trained)))
    return replies


def _model_change(strategy: FedPipe, new) -> dict[str, np.ndarray]:
    """The global model's change from ``strategy.global_arrays`` to ``new``: ΔW per module and each head tensor."""
    old_factors, new_factors = strategy.global_factors(strategy.global_arrays), strategy.global_factors(new)
    change = {m: f.delta() - (old_factors[m].delta() if m in old_factors else 0.0) for m, f in new_factors.items()}
    old_head, new_head = strategy.global_head(strategy.global_arrays), strategy.global_head(new)
    return {**change, **{HEAD_PREFIX + k: new_head[k].astype(np.float64) - v for k, v in old_head.items()}}


def _norm(arrays: dict[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(np.sum(np.square(v, dtype=np.float64)) for v in arrays.values())))


def test_central_clipping_bounds_each_clients_change_of_the_model_and_its_head(tmp_path, colors):
    strategy = _strategy(tmp_path, colors, "privacy.dp=central", "privacy.noise_multiplier=0", "privacy.clip_norm=0.5")
    plans = {0: {UP: 2, DOWN: 4}, 1: {UP: 2}, 2: {UP: 2}, 3: {DOWN: 8}}
    replies = _replies(strategy, plans, [1000.0, 0.0, 0.0, 0.0])
    alone = _model_change(strategy, strategy.aggregate(1, replies))
    assert _norm(alone) == pytest.approx(0.5 / 4, rel=1e-4)  # C/n: however large its update
    record = strategy.round_fields()["privacy"]
    assert record["clipped_fraction"] == 0.25 and record["clip_norm"] == 0.5 and record["epsilon"] is None
    # and it is the client's own change, scaled: the head moved too, as much as its share of the clipped vector
    raw = {**{m: strategy.change_pairs(0, replies[0].update)[m] for m in (UP, DOWN)}}
    scale = 0.5 / replies[0].norm / 4
    for module, (u, v) in raw.items():
        np.testing.assert_allclose(alone[module], scale * (u @ v), atol=1e-6)
    for key, value in strategy.initial_head.items():
        np.testing.assert_allclose(alone[HEAD_PREFIX + key], scale * (replies[0].update[key] - value), atol=1e-6)


def test_without_noise_and_with_a_huge_clip_central_dp_is_the_plain_aggregate(tmp_path, colors):
    plans = {c: {UP: 2, DOWN: 4} for c in range(4)}
    plain = _strategy(tmp_path / "plain", colors)
    private = _strategy(tmp_path / "dp", colors, "privacy.dp=central", "privacy.noise_multiplier=0",
                        "privacy.clip_norm=1e9")
    expected = _model_change(plain, plain.aggregate(1, _replies(plain, plans, [0.3] * 4)))
    got = _model_change(private, private.aggregate(1, _replies(private, plans, [0.3] * 4)))
    assert got.keys() == expected.keys() and _norm(expected) > 1
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, atol=1e-5)
    assert private.round_fields()["privacy"]["clipped_fraction"] == 0


def test_central_noise_has_std_sigma_clip_over_n_on_every_planned_module_and_the_head(tmp_path, colors):
    overrides = ("privacy.dp=central", "privacy.noise_multiplier=1.5", "privacy.clip_norm=2.0")
    strategy = _strategy(tmp_path, colors, *overrides)
    plans = {0: {UP: 2}, 1: {UP: 4}, 2: {DOWN: 2}, 3: {DOWN: 2}}
    noise = _model_change(strategy, strategy.aggregate(1, _replies(strategy, plans, [0.0] * 4)))
    assert set(noise) == {UP, DOWN} | {HEAD_PREFIX + k for k in strategy.initial_head}
    pooled = np.concatenate([v.ravel() for v in noise.values()])
    assert pooled.size > 16_000
    assert float(pooled.std()) == pytest.approx(1.5 * 2.0 / 4, rel=0.02) and abs(float(pooled.mean())) < 0.02
    # exactly the dense methods' seeded draw (name order, stream server-dp-noise), through the re-factoring
    rng = np.random.default_rng(derive_seed(strategy.cfg.federation.seed, "server-dp-noise", 1))
    drawn = add_noise({name: np.zeros(v.shape, np.float32) for name, v in noise.items()}, 0.75, rng)
    for name, value in noise.items():
        np.testing.assert_allclose(value, drawn[name], atol=1e-4)


def test_central_epsilon_is_reported_per_round_from_the_accountant(tmp_path, colors):
    strategy = _strategy(tmp_path, colors, "privacy.dp=central", "privacy.noise_multiplier=1.0",
                         "federation.fraction_train=0.5")
    assert strategy.privacy.accountant.sample_rate == 0.5  # 2 of 4 clients per round
    epsilons = []
    for server_round in (1, 2):
        strategy.global_arrays = strategy.aggregate(server_round, _replies(strategy, {0: {UP: 2}, 1: {UP: 2}},
                                                                           [0.1, 0.1], seed=server_round))
        record = strategy.round_fields()["privacy"]
        assert record["epsilon"] == pytest.approx(strategy.privacy.accountant.epsilon(server_round))
        assert record["delta"] == 1e-5 and record["noise_multiplier"] == 1.0
        epsilons.append(record["epsilon"])
    assert 0 < epsilons[0] < epsilons[1] < np.inf
    assert strategy.round_fields() == {"privacy": None}  # a round that aggregated nothing records nothing


def test_central_dp_with_a_robust_aggregator_is_refused(tmp_path, colors):
    with pytest.raises(ConfigError, match="federation.aggregator"):
        _strategy(tmp_path, colors, "privacy.dp=central", "federation.aggregator='median'",
                  "federation.byzantine_clients=0")


def test_local_dp_noises_the_factor_change_before_error_feedback_and_encoding(tmp_path, colors):
    plain = fedpipe_strategy(tmp_path / "plain", "tiny-llama", colors, "fedpipe.uplink_encoding='dense-fp32'")
    private = fedpipe_strategy(tmp_path / "dp", "tiny-llama", colors, "privacy.dp=local", "privacy.clip_norm=0.05",
                               "privacy.noise_multiplier=0.5")  # nf4 uplink with error feedback: the defaults
    raw: dict[int, dict[str, np.ndarray]] = {}
    plain_contexts: dict[int, Context] = {}
    plain.prepare(ClientGrid(plain_contexts))
    for message, reply in zip(*train_round(plain, plain_contexts)[:2], strict=True):
        raw[plain.node_client[message.metadata.dst_node_id]] = decode_bundle(
            record_to_bytes(reply.content["arrays"])).tensors

    contexts: dict[int, Context] = {}
    private.prepare(ClientGrid(contexts))
    messages, replies, new = train_round(private, contexts)
    assert new is not None and private.recorder.rejected == []
    for message, reply in zip(messages, replies, strict=True):
        config = message.content["config"]
        assert DP_CLIP_KEY not in dict(config)  # the plan carries it: the dense methods' client step is not asked
        assert privatize_reply(message, reply.content, 0) is reply.content
        plan = json.loads(str(config["plan"]))
        assert (plan[DP_CLIP_KEY], plan[DP_NOISE_KEY]) == (0.05, 0.5)
        client = private.node_client[message.metadata.dst_node_id]
        clipped, was_clipped = clip_update(raw[client], {k: np.zeros_like(v) for k, v in raw[client].items()}, 0.05)
        seed = derive_seed(private.cfg.federation.seed, "client-dp-noise", 1, client)
        noised = add_noise(clipped, 0.5 * 0.05, np.random.default_rng(seed))
        sent = decode_bundle(record_to_bytes(reply.content["arrays"])).tensors
        residual = record_to_arrays(context_of(message.metadata.dst_node_id, contexts).state[RESIDUAL_KEY])
        assert was_clipped and reply.content["metrics"][DP_CLIPPED_METRIC] == 1
        assert max(float(np.abs(sent[k] - noised[k]).max()) for k in noised) > 1e-4  # nf4 rounded it, and
        for key, value in noised.items():  # error feedback keeps what it dropped of the *noised* change
            np.testing.assert_allclose(sent[key] + residual[key], value, atol=1e-6)
    record = private.round_fields()["privacy"]
    assert record["clipped_fraction"] == 1.0 and private.privacy.accountant.sample_rate == 1.0
    assert record["epsilon"] == pytest.approx(private.privacy.accountant.epsilon(1))
