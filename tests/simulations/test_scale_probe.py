"""The scale probe's run arguments and its summary of round time and driver memory."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from pollinate.simulations import scale_probe


def _write_run(run_dir: Path, rss: list[int], seconds: list[float], trained: int) -> None:
    run_dir.mkdir(parents=True)
    lines = []
    for number, (memory, wall) in enumerate(zip(rss, seconds, strict=True), start=1):
        lines += [json.dumps({"type": "client", "round": number, "client_id": c}) for c in range(trained)]
        timing = {"train_seconds": wall / 2, "eval_seconds": 0.25}
        lines.append(json.dumps({"type": "round", "round": number, "seconds": wall, "server_rss_bytes": memory,
                                 "timing": timing}))
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def test_simulate_argv_samples_the_same_clients_whatever_the_registered_count(tmp_path):
    args = argparse.Namespace(sampled=10, examples_per_client=20, seed=3, model="tiny-llama",
                              method="fedavg-lora", rounds=20)
    argv = scale_probe.simulate_argv(1000, args, tmp_path / "run")
    assert "federation.fraction_train=0.01" in argv
    assert "data.builtin_examples=20000" in argv
    assert "eval.client_fraction=0" in argv
    assert argv[argv.index("--clients") + 1] == "1000"


def test_summary_skips_the_first_round_and_measures_the_memory_slope(tmp_path):
    rss = [900 * 2**20] + [500 * 2**20 + 2048 * r for r in range(2, 7)]  # +2 KiB per round after round 1
    _write_run(tmp_path / "run", rss, [9.0, 1.0, 1.2, 1.1, 1.0, 3.0], trained=10)
    row = scale_probe.summarize(1000, scale_probe.round_records(tmp_path / "run"))
    assert row["round_seconds_median"] == pytest.approx(1.1)
    assert row["round_seconds_max"] == pytest.approx(3.0)  # round 1's 9.0 s (workers' start) is left out
    assert row["driver_rss_slope_kib_per_round"] == pytest.approx(2.0)
    assert row["round_seconds_without_eval_median"] == pytest.approx(0.85)
    assert row["train_seconds_median"] == pytest.approx(0.55)
    assert row["driver_rss_mib_round2"] == pytest.approx(500.0, abs=0.1)
    assert row["trained_per_round"] == 10
    assert "| 1000 |" in scale_probe.markdown([row])


def test_summary_refuses_runs_too_short_to_have_a_trend(tmp_path):
    _write_run(tmp_path / "run", [1, 2], [1.0, 1.0], trained=1)
    with pytest.raises(ValueError, match="at least 3 rounds"):
        scale_probe.summarize(10, scale_probe.round_records(tmp_path / "run"))


def test_fewer_registered_than_sampled_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        scale_probe.main(["--registered", "5", "--sampled", "10", "--out", str(tmp_path), "--from-runs"])
    assert "--registered [5]" in capsys.readouterr().err


def test_from_runs_prints_rows_and_writes_the_figure(tmp_path, capsys):
    for registered in (10, 100):
        _write_run(tmp_path / f"registered-{registered}", [2**20 * 400] * 4, [5.0, 1.0, 1.0, 1.0], trained=10)
    figure = tmp_path / "scale.png"
    scale_probe.main(["--registered", "10,100", "--out", str(tmp_path), "--from-runs", "--plot", str(figure)])
    printed = capsys.readouterr().out.splitlines()
    assert [json.loads(line)["registered"] for line in printed[:2]] == [10, 100]
    assert figure.stat().st_size > 0
