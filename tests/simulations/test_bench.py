"""The bench's summary and table, from synthetic reports (the runs themselves are covered end to end elsewhere)."""

import json

from pollinate.simulations.bench import bytes_to_reach, summarize, write_bench


def report(method, losses, bytes_per_round, client_seconds, key="train_seconds"):
    rounds = [{"round": i + 1, "eval_loss": loss, "eval_metrics": {"accuracy": 0.5 + i / 10},
               "bytes_up": bytes_per_round, "bytes_down": bytes_per_round, "seconds": 10.0,
               "under_training_rate": 0.0,
               "clients": [{"round_seconds": 4.0, "peak_rss_bytes": 2**20, key: client_seconds}]}
              for i, loss in enumerate(losses)]
    return {"method": method, "rounds": rounds, "initial_eval": {"eval_loss": 3.0},
            "totals": {"bytes_up": bytes_per_round * len(losses), "bytes_down": bytes_per_round * len(losses)}}


def test_bytes_to_reach_counts_until_the_first_round_at_or_below_the_target():
    r = report("m", [2.0, 1.0, 0.5], 10, 1.0)
    assert bytes_to_reach(r, 1.0) == 40
    assert bytes_to_reach(r, 0.1) is None


def test_table_relates_client_compute_to_federated_full_finetuning(tmp_path):
    reports = {"fedavg-full": report("fedavg-full", [1.0, 0.8], 1000, 10.0),
               "sfprompt": report("sfprompt", [1.1, 0.7], 300, 1.5, key="client_compute_seconds")}
    rows = [summarize(r, 0.8) for r in reports.values()]
    assert rows[1]["client_compute_seconds"] == 3.0 and rows[1]["bytes_to_baseline_loss"] == 1200
    write_bench(tmp_path, rows, reports, None, {"fedavg-full": ["train.lr=1e-4"]}, compute_baseline="fedavg-full")
    table = (tmp_path / "bench.md").read_text()
    assert "Only for `fedavg-full`: `train.lr=1e-4`." in table
    sf_row = next(line for line in table.splitlines() if line.startswith("| sfprompt"))
    assert "| 0.150 |" in sf_row and "| 0.300 |" in sf_row  # compute 3/20 s and bytes 1200/4000 of fedavg-full
    assert json.loads((tmp_path / "bench.json").read_text())["rows"][1]["method"] == "sfprompt"
    assert (tmp_path / "bench_loss_vs_bytes.png").stat().st_size > 0


def test_method_overrides_are_grouped_and_checked():
    import pytest

    from pollinate.cli import method_overrides
    from pollinate.common.config import ConfigError

    got = method_overrides(["fedavg-full:train.lr=1e-4", "fedavg-full:train.local_steps=3", "sfprompt:x.y=1"],
                           ["fedavg-full", "sfprompt"])
    assert got == {"fedavg-full": ["train.lr=1e-4", "train.local_steps=3"], "sfprompt": ["x.y=1"]}
    with pytest.raises(ConfigError, match="not in --methods"):
        method_overrides(["fedpipe:train.lr=1"], ["fedavg-full"])
    with pytest.raises(ConfigError, match="expected METHOD:section.key=value"):
        method_overrides(["train.lr=1"], ["fedavg-full"])
