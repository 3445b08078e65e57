"""Differential privacy on the server: Opacus's accountant gives ε (checked by hand where the RDP is closed-form),
target_epsilon derives a noise that meets it, central DP clips every client to clip_norm / n of the mean and
adds seeded noise of std σ·C/n, adaptive clipping moves C towards the median norm, and misconfigurations fail
at start with a message naming the field."""

import math
import sys
import uuid

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from pollinate.common.config import ConfigError
from pollinate.common.config_io import build_config
from pollinate.common.privacy import DP_CLIP_KEY, DP_NOISE_KEY, add_noise, clip_update, update_norm
from pollinate.common.report import RunRecorder
from pollinate.common.seeds import derive_seed
from pollinate.common.wire import arrays_to_record, record_to_arrays
from pollinate.server import robust
from pollinate.server.privacy import ServerPrivacy
from pollinate.server.privacy_accountant import RoundAccountant, noise_for_epsilon

opacus = pytest.importorskip("opacus")
NODES = [11, 12, 13]


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """Messages take their run and source from Flower's task identity, which a ServerApp process sets."""
    for name, value in (("_run_id", 1), ("_node_id", 1), ("_task_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)


def _fedavg(states, weights):
    return robust.aggregate("fedavg", states, weights)


# --- the accountant -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("sigma", "rate", "rounds"), [(1.1, 0.01, 1000), (0.8, 0.1, 50), (2.0, 0.3, 20)])
def test_the_accountant_is_opacus_rdp_stepped_round_by_round(sigma, rate, rounds):
    from opacus.accountants import RDPAccountant

    stepped = RDPAccountant()
    for _ in range(rounds):
        stepped.step(noise_multiplier=sigma, sample_rate=rate)
    ours = RoundAccountant(sigma, rate, 1e-5).epsilon(rounds)
    assert ours == pytest.approx(stepped.get_epsilon(delta=1e-5), rel=1e-9)
    assert RoundAccountant(sigma, rate, 1e-5).epsilon(rounds // 2) < ours  # ε grows with the rounds


def test_without_sampling_epsilon_is_the_gaussian_mechanisms_rdp_by_hand():
    # No subsampling: T releases have RDP T·α/(2σ²); Balle et al. 2020's conversion to (ε, δ), min over α.
    from opacus.accountants import RDPAccountant

    sigma, rounds, delta = 2.0, 10, 1e-5
    alphas = np.array(RDPAccountant.DEFAULT_ALPHAS, dtype=float)
    rdp = rounds * alphas / (2 * sigma**2)
    eps = rdp - (np.log(delta) + np.log(alphas)) / (alphas - 1) + np.log((alphas - 1) / alphas)
    assert RoundAccountant(sigma, 1.0, delta).epsilon(rounds) == pytest.approx(float(np.nanmin(eps)), rel=1e-9)
    # and it is below the classic bound T/(2σ²) + σ⁻¹·sqrt(2T·ln(1/δ)) (≈ 8.84 here)
    assert RoundAccountant(sigma, 1.0, delta).epsilon(rounds) < rounds / 8 + math.sqrt(20 * math.log(1e5)) / 2


def test_no_noise_is_no_guarantee_and_no_round_spends_nothing():
    assert RoundAccountant(0.0, 0.5, 1e-5).epsilon(3) == math.inf
    assert RoundAccountant(1.0, 0.5, 1e-5).epsilon(0) == 0.0


@pytest.mark.parametrize("target", [8.0, 2.0])
def test_target_epsilon_derives_a_noise_whose_epsilon_meets_it(target):
    sigma = noise_for_epsilon(target, 1e-5, 0.4, 20)
    spent = RoundAccountant(sigma, 0.4, 1e-5).epsilon(20)
    assert target - 0.05 < spent <= target
    cfg = build_config(None, ["privacy.dp=central", f"privacy.target_epsilon={target}", "federation.clients=10",
                              "federation.fraction_train=0.4", "federation.rounds=20"])
    assert ServerPrivacy(cfg, sampled=4).noise_multiplier == pytest.approx(sigma)


def test_an_unreachable_target_is_a_config_error():
    with pytest.raises(ConfigError, match="privacy.target_epsilon"):
        noise_for_epsilon(1e-6, 1e-5, 1.0, 1000)


def test_missing_opacus_is_one_line_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "opacus.accountants", None)
    cfg = build_config(None, ["privacy.dp=central"])
    with pytest.raises(ConfigError, match=r"pollinate\[privacy\]") as err:
        ServerPrivacy(cfg, sampled=4)
    assert "\n" not in str(err.value)


# --- central DP: clipping and noise ------------------------------------------------------------------------
def test_noise_std_is_sigma_clip_over_n():
    cfg = build_config(None, ["privacy.dp=central", "privacy.noise_multiplier=1.5", "privacy.clip_norm=2.0"])
    privacy = ServerPrivacy(cfg, sampled=4)
    base = {"w": np.zeros(200_000, np.float32)}
    noised = privacy.aggregate(1, [dict(base) for _ in range(4)], [1.0] * 4, base, _fedavg, [{}] * 4)
    assert noised["w"].dtype == np.float32
    assert float(noised["w"].std()) == pytest.approx(1.5 * 2.0 / 4, rel=0.01)
    assert abs(float(noised["w"].mean())) < 0.01


def test_clip_update_scales_only_updates_above_the_norm():
    base = {"a": np.ones(3, np.float32), "b": np.zeros(4, np.float32)}
    big = {"a": base["a"] + 30, "b": base["b"] - 40}
    clipped, was = clip_update(big, base, 2.0)
    assert was and update_norm(clipped, base) == pytest.approx(2.0, rel=1e-5)
    assert big["a"][0] == 31  # the input is left as it was
    small = {"a": base["a"] + 0.1, "b": base["b"]}
    kept, was = clip_update(small, base, 2.0)
    assert not was and np.array_equal(kept["a"], small["a"])
    same, was = clip_update(base, base, 2.0)  # a zero update (Flower would divide by its norm)
    assert not was and np.array_equal(same["a"], base["a"])


def _strategy(tmp_path, *overrides: str):
    from pollinate.methods.fedavg_full.server import FedAvgFull

    cfg = build_config(None, ["model.name=tiny-llama", "method=fedavg-full", "federation.clients=3",
                              "federation.rounds=3", "data.builtin_examples=12", "data.eval_examples=2",
                              "federation.update_norm_bound=0", "federation.relative_norm_bound=0", *overrides])
    return FedAvgFull(cfg, RunRecorder(tmp_path, {"rounds_planned": 3}, quiet=True), tmp_path)


class FakeGrid:
    def get_node_ids(self) -> list[int]:
        return list(NODES)


def _round(strategy, shifts: list[float]):
    """Round 1 in which client ``c`` returns the global shifted by ``shifts[c]`` in every coordinate."""
    initial = strategy.initial_arrays()
    messages = list(strategy.configure_train(1, initial, ConfigRecord(), FakeGrid()))
    replies = []
    for message in sorted(messages, key=lambda m: m.metadata.dst_node_id):
        message.metadata.__dict__["_message_id"] = str(uuid.uuid4())
        client = NODES.index(message.metadata.dst_node_id)
        state = {k: v + np.float32(shifts[client]) for k, v in record_to_arrays(message.content["arrays"]).items()}
        metrics = MetricRecord({"client_id": client, "num-examples": 10 + 90 * client, "train_loss": 1.0})
        replies.append(Message(RecordDict({"arrays": arrays_to_record(state), "metrics": metrics}),
                               reply_to=message))
    new, _ = strategy.aggregate_train(1, replies)
    return record_to_arrays(initial), record_to_arrays(new), messages


def test_a_huge_update_moves_the_global_by_at_most_clip_norm_over_n(tmp_path):
    strategy = _strategy(tmp_path, "privacy.dp=central", "privacy.noise_multiplier=0", "privacy.clip_norm=0.5")
    base, new, _ = _round(strategy, [1000.0, 0.0, 0.0])
    assert update_norm(new, base) == pytest.approx(0.5 / 3, rel=1e-4)
    record = strategy.round_fields()["privacy"]
    assert record == {"epsilon": None, "delta": 1e-5, "noise_multiplier": 0.0, "clip_norm": 0.5,
                      "clipped_fraction": pytest.approx(1 / 3)}


def test_central_noise_is_seeded_and_the_clipped_mean_is_what_remains(tmp_path):
    overrides = ("privacy.dp=central", "privacy.noise_multiplier=0.7", "privacy.clip_norm=0.5")
    base, new, _ = _round(_strategy(tmp_path, *overrides), [1000.0, -1000.0, 0.001])
    clipped = [clip_update({k: v + np.float32(s) for k, v in base.items()}, base, 0.5)[0]
               for s in (1000.0, -1000.0, 0.001)]
    mean = _fedavg(clipped, [1.0, 1.0, 1.0])  # equal weights, whatever the example counts
    rng = np.random.default_rng(derive_seed(0, "server-dp-noise", 1))
    expected = add_noise(mean, 0.7 * 0.5 / 3, rng)
    assert all(np.array_equal(new[k], expected[k]) for k in expected)
    _, again, _ = _round(_strategy(tmp_path, *overrides), [1000.0, -1000.0, 0.001])
    assert all(np.array_equal(new[k], again[k]) for k in new)  # the same run seed, the same noise
    record = _strategy(tmp_path, *overrides).privacy.accountant.epsilon(1)
    assert record > 0 and math.isfinite(record)


def test_without_dp_the_round_is_unchanged(tmp_path):
    base, new, messages = _round(_strategy(tmp_path), [0.01, 0.02, 0.03])
    expected = _fedavg([{k: v + np.float32(s) for k, v in base.items()} for s in (0.01, 0.02, 0.03)],
                       [10.0, 100.0, 190.0])
    assert all(np.array_equal(new[k], expected[k]) for k in new)
    assert all(DP_CLIP_KEY not in dict(m.content["config"]) for m in messages)
    assert _strategy(tmp_path).round_fields() == {}


def test_local_dp_rounds_tell_the_clients_and_report_their_clipping(tmp_path):
    strategy = _strategy(tmp_path, "privacy.dp=local", "privacy.noise_multiplier=0.3", "privacy.clip_norm=0.2")
    messages = list(strategy.configure_train(1, strategy.initial_arrays(), ConfigRecord(), FakeGrid()))
    assert {(m.content["config"][DP_CLIP_KEY], m.content["config"][DP_NOISE_KEY]) for m in messages} == {(0.2, 0.3)}
    assert strategy.privacy.accountant.sample_rate == 1.0  # the server knows who took part: no amplification
    states = [{"w": np.ones(2, np.float32)}] * 2
    strategy.privacy.aggregate(1, states, [1.0, 3.0], {"w": np.zeros(2, np.float32)}, _fedavg,
                               [{"dp_clipped": 1}, {"dp_clipped": 0}])
    assert strategy.privacy.take_round_record()["clipped_fraction"] == 0.5
    assert strategy.privacy.take_round_record() is None  # a round that aggregates nothing records nothing


def test_adaptive_clipping_moves_the_clip_norm_towards_the_median_norm():
    cfg = build_config(None, ["privacy.dp=central", "privacy.adaptive_clipping=true", "privacy.noise_multiplier=0",
                              "privacy.clip_norm=1.0"])
    privacy = ServerPrivacy(cfg, sampled=4)
    base = {"w": np.zeros(1, np.float32)}
    norms = [0.01, 0.02, 0.03, 0.04]
    for server_round in range(1, 60):
        privacy.aggregate(server_round, [{"w": np.float32([n])} for n in norms], [1.0] * 4, base, _fedavg, [{}] * 4)
    assert 0.01 < privacy.clip_norm < 0.05  # from 1.0 down to the updates' norms, and held there


@pytest.mark.parametrize(("overrides", "match"), [
    (["privacy.dp=global"], "privacy.dp"),
    (["privacy.clip_norm=0"], "privacy.clip_norm"),
    (["privacy.noise_multiplier=-1"], "privacy.noise_multiplier"),
    (["privacy.target_epsilon=-2"], "privacy.target_epsilon"),
    (["privacy.delta=0"], "privacy.delta"),
    (["privacy.dp=local", "privacy.adaptive_clipping=true"], "privacy.adaptive_clipping"),
])
def test_config_validation_names_the_field(overrides, match):
    with pytest.raises(ConfigError, match=match):
        build_config(None, overrides)


def test_central_dp_needs_fedavg_and_adaptive_needs_enough_clients():
    with pytest.raises(ConfigError, match="federation.aggregator"):
        ServerPrivacy(build_config(None, ["privacy.dp=central", "federation.aggregator=median"]), sampled=4)
    with pytest.raises(ConfigError, match="privacy.adaptive_clipping"):
        ServerPrivacy(build_config(None, ["privacy.dp=central", "privacy.adaptive_clipping=true"]), sampled=4)
    ServerPrivacy(build_config(None, ["privacy.dp=local", "federation.aggregator=median"]), sampled=4)
