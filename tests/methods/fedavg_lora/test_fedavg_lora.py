"""Reply validation of the state-averaging methods (server side): every rejection names the tensor and why."""

import numpy as np
import pytest

from pollinate.common.checks import UpdateRejected, check_arrays


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
