"""FedAvg math and reply validation (server side), against a numpy reference."""

import numpy as np
import pytest

from pollinate.common.checks import UpdateRejected, check_arrays
from pollinate.server.strategy import weighted_average


def test_weighted_average_matches_numpy_reference():
    rng = np.random.default_rng(0)
    states = [{"a": rng.normal(size=(8, 16)).astype(np.float32), "b": rng.normal(size=(3,)).astype(np.float32)}
              for _ in range(3)]
    weights = [10.0, 30.0, 60.0]
    got = weighted_average(states, weights)
    for key in ("a", "b"):
        expected = np.average(np.stack([s[key] for s in states]), axis=0, weights=weights)
        np.testing.assert_allclose(got[key], expected, rtol=1e-6, atol=1e-7)
        assert got[key].dtype == np.float32


def test_weighted_average_rejects_zero_total_weight():
    with pytest.raises(ValueError, match="sum to > 0"):
        weighted_average([{"a": np.ones(2, np.float32)}], [0.0])


@pytest.mark.parametrize("arrays, message", [
    ({"w": np.zeros((4, 64), np.float32)}, r"tensor 'w' has shape \(4, 64\), expected \(8, 64\)"),
    ({"w": np.zeros((8, 64), np.float64)}, "dtype float64, expected float32"),
    ({"w": np.full((8, 64), np.nan, np.float32)}, "NaN or Inf"),
    ({"w": np.zeros((8, 64), np.float32), "x": np.zeros(1, np.float32)}, "unknown tensor name 'x'"),
    ({}, "missing tensor 'w'"),
    ({"w": np.full((8, 64), 100.0, np.float32)}, "L2 norm 2.26e\\+03 exceeds the bound 1e\\+03"),
])
def test_check_arrays_rejects_with_specific_message(arrays, message):
    with pytest.raises(UpdateRejected, match=message):
        check_arrays(arrays, {"w": (8, 64)}, norm_bound=1e3)


def test_check_arrays_accepts_a_valid_update():
    check_arrays({"w": np.ones((8, 64), np.float32)}, {"w": (8, 64)}, norm_bound=1e3)
