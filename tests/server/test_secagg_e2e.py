"""End to end: `pollinate simulate` with secure aggregation runs every SecAgg+ stage through Flower's simulation
(Ray workers, each node's Context kept between messages) and its report shows the protocol's rounds and bytes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def test_a_simulated_run_with_secure_aggregation_completes_every_round(tmp_path):
    out = tmp_path / "secagg"
    proc = subprocess.run(
        [sys.executable, "-m", "pollinate.cli", "simulate", "--model", "tiny-llama", "--clients", "3", "--rounds", "2",
         "--out", str(out), "--quiet", "--set", "privacy.secure_aggregation=true",
         "--set", "federation.update_norm_bound=0", "--set", "federation.relative_norm_bound=0"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env=os.environ.copy())
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["rejected"] == []
    for record in report["rounds"]:
        assert record["secagg"]["failed"] is None
        assert record["secagg"]["clients"] == {"sampled": 3, "setup": 3, "share_keys": 3, "unmasked": 3}
        assert record["bytes_secagg_up"] > 0 and record["bytes_secagg_down"] > 0
        assert record["eval_loss"] is not None and all("update_norm" not in c for c in record["clients"])
    assert report["rounds"][-1]["eval_loss"] < report["initial_eval"]["eval_loss"]  # the sums were real updates
