"""Robust aggregation with 1 malicious client of 5: the robust aggregators keep the global near the honest-only
FedAvg, the norm bound alone rejects a model replacement, NaN is caught by the finite check, parameters are
validated, and every aggregator is translation-equivariant (states or updates give the same result)."""

import numpy as np
import pytest
from flwr.server.strategy.aggregate import aggregate_krum

from pollinate.server.robust import (
    AGGREGATORS,
    AggregatorError,
    aggregate,
    check_aggregator,
    fedavg,
    krum_select,
    nonfinite_clients,
    norm_outliers,
    update_norms,
)

SHAPES = {"layer.w": (6, 4), "layer.b": (6,), "head.w": (3, 6)}
ROBUST = ("median", "trimmed-mean", "krum", "multi-krum")
PARAMS = {"trim_fraction": 0.2, "byzantine": 1, "keep": 3}
ATTACKER = 4
HONEST_WEIGHTS = [120.0, 80.0, 100.0, 90.0]


def _state(rng: np.random.Generator, scale: float) -> dict[str, np.ndarray]:
    return {k: (scale * rng.standard_normal(s)).astype(np.float32) for k, s in SHAPES.items()}


def _flat(state: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([state[k].astype(np.float64).ravel() for k in SHAPES])


def _distance(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return float(np.linalg.norm(_flat(a) - _flat(b)))


def _add(a: dict[str, np.ndarray], b: dict[str, np.ndarray], scale: float = 1.0) -> dict[str, np.ndarray]:
    return {k: (a[k].astype(np.float64) + scale * b[k].astype(np.float64)).astype(np.float32) for k in a}


@pytest.fixture(scope="module")
def round_():
    """A round: the global state, 4 honest clients (a shared direction of norm ~0.35 plus per-client noise of
    0.01 per coordinate), the attacker's own honest-looking update and its target (an update of norm ~7)."""
    rng = np.random.default_rng(11)
    global_ = _state(rng, 1.0)
    direction = _state(rng, 0.05)
    honest = [_add(global_, _add(direction, _state(rng, 0.01))) for _ in HONEST_WEIGHTS]
    own = _add(direction, _state(rng, 0.01))
    target = _add(global_, _state(rng, 1.0))
    ideal = fedavg(honest, HONEST_WEIGHTS)
    return {"global": global_, "honest": honest, "own": own, "target": target, "ideal": ideal}


def _attack(round_, name: str) -> tuple[list[dict[str, np.ndarray]], list[float]]:
    """Client 4's state and weight under attack ``name``; clients 0-3 are honest."""
    honest, weights = round_["honest"], HONEST_WEIGHTS + [100.0]
    if name == "replacement":  # the state that makes the weighted mean of all 5 equal the target
        honest_sum = {k: sum(w * h[k].astype(np.float64) for w, h in zip(HONEST_WEIGHTS, honest, strict=True))
                      for k in SHAPES}
        crafted = {k: ((sum(weights) * round_["target"][k].astype(np.float64) - honest_sum[k]) / weights[-1])
                   .astype(np.float32) for k in SHAPES}
        return honest + [crafted], weights
    if name == "sign-flip-x20":
        return honest + [_add(round_["global"], round_["own"], scale=-20.0)], weights
    assert name == "weight-1e15"  # an example count that makes the attacker's state the FedAvg
    return honest + [round_["target"]], HONEST_WEIGHTS + [1e15]


def _bound(round_, name: str) -> float:
    """How far each aggregator may land from the honest-only FedAvg with 1 of 5 clients malicious.

    median, trimmed mean (1 cut at each end): each coordinate lies within the honest clients' range there
    (at most one value is outside it, and it is never the middle one, nor kept by the trim), and so does the
    honest FedAvg, so the distance is at most the L2 norm of the per-coordinate honest range.
    krum, multi-krum: they keep honest clients only (asserted below), so the result is an honest state or a
    mean of some, at most the largest honest client's distance from the honest FedAvg.
    """
    honest = np.stack([_flat(h) for h in round_["honest"]])
    if name in ("median", "trimmed-mean"):
        return float(np.linalg.norm(honest.max(axis=0) - honest.min(axis=0)))
    return float(np.max(np.linalg.norm(honest - _flat(round_["ideal"]), axis=1)))


ATTACKS = ("replacement", "sign-flip-x20", "weight-1e15")


@pytest.mark.parametrize("attack", ATTACKS)
def test_fedavg_is_steered_by_each_attack(round_, attack):
    states, weights = _attack(round_, attack)
    result = aggregate("fedavg", states, weights)
    assert _distance(result, round_["ideal"]) > 10 * max(_bound(round_, name) for name in ROBUST)
    if attack != "sign-flip-x20":  # the attacker chose the global
        assert _distance(result, round_["target"]) < 1e-5


@pytest.mark.parametrize("attack", ATTACKS)
@pytest.mark.parametrize("name", ROBUST)
def test_robust_aggregators_stay_near_the_honest_fedavg(round_, name, attack):
    states, weights = _attack(round_, attack)
    bound = _bound(round_, name)
    result = aggregate(name, states, weights, **PARAMS)
    assert _distance(result, round_["ideal"]) <= bound + 1e-6
    if name in ("krum", "multi-krum"):
        assert ATTACKER not in krum_select(states, PARAMS["byzantine"], 1 if name == "krum" else PARAMS["keep"])


def test_robust_aggregators_ignore_example_weights(round_):
    states, _ = _attack(round_, "replacement")
    for name in ROBUST:
        a = aggregate(name, states, [1.0] * 5, **PARAMS)
        b = aggregate(name, states, HONEST_WEIGHTS + [1e15], **PARAMS)
        assert all(np.array_equal(a[k], b[k]) for k in SHAPES)


@pytest.mark.parametrize("attack", ("replacement", "sign-flip-x20"))
def test_the_norm_bound_alone_rejects_the_attacker(round_, attack):
    states, weights = _attack(round_, attack)
    norms = update_norms(states, reference=round_["global"])
    honest_max = float(norms[:ATTACKER].max())
    assert norm_outliers(norms, relative_bound=3.0).keys() == {ATTACKER}
    assert norm_outliers(norms, absolute_bound=3 * honest_max).keys() == {ATTACKER}
    kept = [i for i in range(len(states)) if i not in norm_outliers(norms, relative_bound=3.0)]
    result = aggregate("fedavg", [states[i] for i in kept], [weights[i] for i in kept])
    assert all(np.array_equal(result[k], round_["ideal"][k]) for k in SHAPES)


def test_nan_is_caught_by_the_finite_check_before_aggregation(round_):
    poisoned = {k: v.copy() for k, v in round_["honest"][0].items()}
    poisoned["layer.b"][2] = np.nan
    states = round_["honest"] + [poisoned]
    assert nonfinite_clients(states) == [ATTACKER]
    norms = update_norms(states, reference=round_["global"])
    assert not np.isfinite(norms[ATTACKER])
    assert norm_outliers(norms, absolute_bound=1e6, relative_bound=3.0) == {ATTACKER: "update norm is not finite"}
    for name in ("fedavg", *ROBUST):  # aggregating it anyway is refused, never a NaN global
        with pytest.raises(AggregatorError, match=r"states \[4\] contain NaN"):
            aggregate(name, states, HONEST_WEIGHTS + [1.0], **PARAMS)


def test_relative_bound_needs_three_finite_norms():
    assert norm_outliers([1.0, 100.0], relative_bound=3.0) == {}
    assert norm_outliers([1.0, 100.0, float("nan")], relative_bound=3.0).keys() == {2}
    assert norm_outliers([1.0, 1.2, 100.0], relative_bound=3.0).keys() == {2}
    assert norm_outliers([1.0, 1.2, 100.0], absolute_bound=0, relative_bound=None) == {}


def test_update_norms_match_the_flattened_norm(round_):
    states = round_["honest"]
    updates = [_add(s, round_["global"], scale=-1.0) for s in states]
    expected = [np.linalg.norm(_flat(s) - _flat(round_["global"])) for s in states]
    np.testing.assert_allclose(update_norms(states, reference=round_["global"]), expected, rtol=1e-12)
    np.testing.assert_allclose(update_norms(updates), expected, rtol=1e-6)


def test_krum_selects_what_flower_selects():
    rng = np.random.default_rng(5)
    states = [_state(rng, 1.0) for _ in range(7)]
    as_lists = [([s[k] for k in SHAPES], 1) for s in states]
    ours = aggregate("krum", states, [1.0] * 7, byzantine=2)
    theirs = aggregate_krum(as_lists, num_malicious=2, to_keep=0)
    assert all(np.array_equal(ours[k], t) for k, t in zip(SHAPES, theirs, strict=True))
    ours = aggregate("multi-krum", states, [1.0] * 7, byzantine=2, keep=4)
    theirs = aggregate_krum(as_lists, num_malicious=2, to_keep=4)
    assert all(np.allclose(ours[k], t, atol=1e-6) for k, t in zip(SHAPES, theirs, strict=True))


@pytest.mark.parametrize("name", list(AGGREGATORS))
def test_states_and_updates_give_the_same_global(round_, name):
    states, weights = _attack(round_, "sign-flip-x20")
    updates = [_add(s, round_["global"], scale=-1.0) for s in states]
    from_states = aggregate(name, states, weights, **PARAMS)
    from_updates = _add(aggregate(name, updates, weights, **PARAMS), round_["global"])
    assert all(np.allclose(from_states[k], from_updates[k], atol=1e-6) for k in SHAPES)


@pytest.mark.parametrize(("name", "clients", "params", "message"), [
    ("mean", 5, {}, "aggregator must be one of fedavg, median, trimmed-mean, krum, multi-krum, got 'mean'"),
    ("trimmed-mean", 5, {"trim_fraction": 0.5}, r"trim_fraction must be a number in \[0, 0.5\), got 0.5"),
    ("trimmed-mean", 5, {"trim_fraction": -0.1}, "trim_fraction must be"),
    ("krum", 4, {"byzantine": 1}, r"krum needs more than 2 x byzantine \+ 2 = 4 clients, got 4 \(byzantine=1\)"),
    ("krum", 5, {"byzantine": -1}, "byzantine must be an integer >= 0, got -1"),
    ("multi-krum", 5, {"byzantine": 1, "keep": 0}, r"keep must be an integer in \[1, clients - byzantine\]"),
    ("multi-krum", 5, {"byzantine": 1, "keep": 5}, r"= \[1, 4\], got 5"),
    ("median", 0, {}, "at least 1 client state, got 0"),
])
def test_parameters_are_validated(name, clients, params, message):
    with pytest.raises(AggregatorError, match=message):
        check_aggregator(name, clients, **params)


def test_inputs_are_validated(round_):
    honest = round_["honest"]
    with pytest.raises(AggregatorError, match=r"weights must have one entry per state \(4\), got 3"):
        aggregate("median", honest, [1.0] * 3)
    with pytest.raises(AggregatorError, match="weights must be finite, >= 0 and sum to > 0"):
        aggregate("fedavg", honest, [0.0] * 4)
    with pytest.raises(AggregatorError, match="weights must be finite"):
        aggregate("fedavg", honest, [1.0, 1.0, 1.0, float("inf")])
    reshaped = {**honest[1], "layer.b": np.zeros(7, np.float32)}
    with pytest.raises(AggregatorError, match=r"state 1 tensor 'layer.b' has shape \(7,\), expected \(6,\)"):
        aggregate("median", [honest[0], reshaped], [1.0, 1.0])
    with pytest.raises(AggregatorError, match="state 1 has tensors"):
        aggregate("median", [honest[0], {"layer.b": honest[1]["layer.b"]}], [1.0, 1.0])
    with pytest.raises(AggregatorError, match="relative_bound must be None, 0 .off. or a finite number >= 1"):
        norm_outliers([1.0, 2.0, 3.0], relative_bound=0.5)
    with pytest.raises(AggregatorError, match="absolute_bound must be"):
        norm_outliers([1.0], absolute_bound=-1.0)
