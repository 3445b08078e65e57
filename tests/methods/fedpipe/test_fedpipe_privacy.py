"""FedPipe refuses differential privacy for now: its updates are compressed factor deltas with error feedback,
and the noise would have to be added in ΔW space before compression (docs/privacy.md)."""

import pytest

from pollinate.common.config import ConfigError
from pollinate.common.config_io import build_config
from pollinate.common.report import RunRecorder
from pollinate.methods.fedpipe.server import FedPipe


@pytest.mark.parametrize("mode", ["central", "local"])
def test_fedpipe_refuses_dp(tmp_path, mode):
    cfg = build_config(None, ["method=fedpipe", "model.name=tiny-llama", f"privacy.dp={mode}",
                              "data.builtin_examples=12", "data.eval_examples=2"])
    with pytest.raises(ConfigError, match=f"privacy.dp = '{mode}'.*fedpipe"):
        FedPipe(cfg, RunRecorder(tmp_path, {"rounds_planned": 1}, quiet=True), tmp_path)
