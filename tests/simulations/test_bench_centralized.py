"""``pollinate bench --centralized``: the references' overrides, the rows they train on, and the learning-quality
and per-round tables built from synthetic reports (the slow test runs the real thing on a tiny model)."""

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from pollinate.cli import main
from pollinate.common.config import ConfigError
from pollinate.common.config_io import build_config
from pollinate.common.data import load_task, partition_indices
from pollinate.simulations.bench import client_eval_stats, relate_to_references, summarize, write_bench
from pollinate.simulations.centralized import clients_per_round, federated_train_rows, reference_overrides

ROOT = Path(__file__).resolve().parents[2]


def cfg_with(*overrides):
    return build_config(None, list(overrides))


@pytest.mark.parametrize(("clients", "fraction", "expected"), [(10, 1.0, 10), (10, 0.3, 3), (10, 0.25, 2),
                                                              (10, 0.01, 1), (3, 0.5, 2)])
def test_clients_per_round_follows_the_strategys_sampling(clients, fraction, expected):
    cfg = cfg_with(f"federation.clients={clients}", f"federation.fraction_train={fraction}")
    assert clients_per_round(cfg) == expected


BASE = ["federation.clients=10", "federation.fraction_train=0.5", "train.local_steps=20", 'data.partition="dirichlet"',
        'federation.aggregator="krum"', "federation.min_clients=4", 'federation.scenario="tiers"',
        'federation.server_optimizer="fedadam"', "train.prox_mu=0.01", "train.lr=3e-4", "train.batch_size=16"]


def test_references_take_the_total_and_the_sequential_steps_of_one_round():
    refs = reference_overrides(cfg_with(*BASE), train_rows=2_000_000)
    assert list(refs) == ["centralized-total", "centralized-sequential"]
    total, sequential = (cfg_with(*BASE, *refs[name]) for name in refs)
    assert total.train.local_steps == 100 and sequential.train.local_steps == 20
    for ref in (total, sequential):
        assert ref.federation.clients == 1 and ref.federation.fraction_train == 1.0
        assert ref.federation.min_clients == 0 and ref.data.partition == "iid"
        assert ref.federation.scenario == "uniform" and ref.eval.client_fraction == 0
        assert ref.federation.aggregator == "fedavg" and ref.federation.server_optimizer == "fedavg"
        assert ref.train.prox_mu == 0 and ref.federation.max_examples_per_client == 2_000_000
        assert (ref.train.lr, ref.train.batch_size) == (3e-4, 16)  # the baseline's recipe stays


def test_a_baseline_that_plans_its_own_steps_is_refused():
    with pytest.raises(ConfigError, match="'sfprompt', whose local steps train.local_steps does not set"):
        reference_overrides(cfg_with('method="sfprompt"'), train_rows=10)


def test_the_cli_refuses_before_any_run(tmp_path, capsys):
    code = main(["bench", "--methods", "fedpipe,fedavg-lora", "--centralized", "--out", str(tmp_path / "b")])
    assert code == 2 and "--centralized: the baseline (first of --methods) is 'fedpipe'" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


@pytest.fixture
def labelled_file(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"text": f"example {i}", "label": f"c{i % 5}"}) + "\n" for i in range(100)))
    return path


def test_the_centralized_client_holds_exactly_the_rows_the_clients_hold_together(labelled_file):
    """Same eval split, same max_train_examples cap: the reference's one partition is the union of the clients'."""
    shared = [f'data.source="{labelled_file}"', "data.max_train_examples=50",
              "federation.clients=4", "data.dirichlet_alpha=0.3", "federation.seed=3"]
    fed = cfg_with(*shared)
    ref = cfg_with(*shared, *reference_overrides(fed, train_rows=50)["centralized-total"])
    fed_data, ref_data = (load_task(c.data, "classification", c.federation.seed) for c in (fed, ref))
    assert fed_data.eval == ref_data.eval and len(fed_data.train) == 50
    fed_rows = [fed_data.train[i]["text"] for part in partition_indices(
        fed_data.train, 4, fed.data, fed_data.partition_by, 3) for i in part]
    (ref_part,) = partition_indices(ref_data.train, 1, ref.data, ref_data.partition_by, 3)
    assert sorted(fed_rows) == sorted(ref_data.train[i]["text"] for i in ref_part)
    assert len(fed_rows) == len(set(fed_rows)) == 50


@pytest.mark.filterwarnings("ignore:Classes:UserWarning")
def test_a_partition_that_leaves_rows_unused_is_refused(labelled_file):
    shared = ['model.name="tiny-bert"', f'data.source="{labelled_file}"', "federation.clients=2"]
    with pytest.raises(ConfigError, match=r"gives the 2 clients \d+ of the 90 training rows"):
        federated_train_rows(cfg_with(*shared, 'data.partition="pathological"'))
    assert federated_train_rows(cfg_with(*shared, 'data.partition="iid"')) == 90


def report(method, accuracies, losses, bytes_per_round=100, client_eval=None, examples=(30, 20)):
    rounds = [{"round": i + 1, "eval_loss": loss, "eval_metrics": {"accuracy": acc}, "bytes_up": bytes_per_round,
               "bytes_down": bytes_per_round, "seconds": 1.0,
               "clients": [{"client_id": c, "num_examples": n, "round_seconds": 1.0} for c, n in enumerate(examples)]}
              for i, (acc, loss) in enumerate(zip(accuracies, losses, strict=True))]
    if client_eval is not None:
        rounds[-1]["client_eval"] = client_eval
    return {"method": method, "rounds": rounds, "initial_eval": {"eval_loss": 3.0},
            "totals": {"bytes_up": bytes_per_round * len(rounds), "bytes_down": bytes_per_round * len(rounds)}}


@pytest.fixture
def bench_rows():
    reports = {
        "fedavg-lora": report("fedavg-lora", [0.2, 0.4], [2.0, 1.6],
                              client_eval={"mean": {"accuracy": 0.35}, "worst": {"accuracy": 0.1}}),
        "fedpipe": report("fedpipe", [0.3, 0.5, 0.6], [1.8, 1.5, 1.2], bytes_per_round=10),
        "centralized-total": report("fedavg-lora", [0.5, 0.8], [1.0, 0.8], examples=(55,)),
        "centralized-sequential": report("fedavg-lora", [0.25, 0.5], [1.5, 1.0], examples=(55,)),
    }
    rows = [summarize(r, 1.6, name) for name, r in reports.items()]
    relate_to_references(rows)
    return reports, rows


def test_rows_relate_metric_and_loss_to_both_references(bench_rows):
    _, rows = bench_rows
    lora, pipe, total, _ = rows
    assert total["method"] == "centralized-total" and total["train_rows"] == 55 and lora["train_rows"] == 50
    assert lora["metric_vs_centralized_total"] == pytest.approx(0.5)
    assert lora["metric_vs_centralized_sequential"] == pytest.approx(0.8)
    assert lora["eval_loss_vs_centralized_total"] == pytest.approx(2.0)
    assert pipe["metric_vs_centralized_sequential"] == pytest.approx(1.2)
    assert (lora["client_eval_mean"], lora["client_eval_worst"]) == (0.35, 0.1)
    assert pipe["client_eval_mean"] is None and pipe["metric_per_round"] == [0.3, 0.5, 0.6]


def test_bench_md_has_the_quality_and_per_round_tables(tmp_path, bench_rows):
    reports, rows = bench_rows
    refs = {"centralized-total": ["train.local_steps=10"], "centralized-sequential": ["train.local_steps=5"]}
    write_bench(tmp_path, rows, reports, None, references=refs)
    text = (tmp_path / "bench.md").read_text()
    assert "- `centralized-total`: `train.local_steps=10`\n" in text and "holds out none" in text
    lora = next(line for line in text.splitlines() if line.startswith("| fedavg-lora | 50 |"))
    assert lora == "| fedavg-lora | 50 | 0.400 | 0.500 | 0.800 | 1.6000 | 2.000 | 1.600 | 0.350 | 0.100 | 1.000 |"
    pipe = next(line for line in text.splitlines() if line.startswith("| fedpipe | 50 |"))
    assert "| - | - | 0.150 |" in pipe  # no client-side evaluation; 60 of the baseline's 400 bytes
    per_round = text[text.index("Per round, accuracy:"):]
    assert "| round | fedavg-lora | fedpipe | centralized-total | centralized-sequential |" in per_round
    assert "| 3 | - | 0.600 | - | - |" in per_round  # runs of different lengths line up by round
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["references"] == refs and saved["rows"][0]["metric_vs_centralized_total"] == pytest.approx(0.5)


def test_without_references_the_ratio_columns_are_dashes(tmp_path):
    reports = {"fedavg-lora": report("fedavg-lora", [0.2], [2.0])}
    rows = [summarize(reports["fedavg-lora"], 2.0)]
    relate_to_references(rows)
    write_bench(tmp_path, rows, reports, None)
    text = (tmp_path / "bench.md").read_text()
    assert "| fedavg-lora | 50 | 0.200 | - | - | 2.0000 | - | - | - | - | 1.000 |" in text
    assert "Centralized references" not in text


@pytest.mark.parametrize(("stats", "expected"), [
    ({"clients": [], "mean": {"eval_loss": 1.0, "accuracy": 0.5, "num_examples": 9},
      "worst": {"client_id": 3, "num_examples": 4, "eval_loss": 2.0, "accuracy": 0.2}}, (0.5, 0.2)),
    ({"mean": {"exact_match": 0.6}, "worst": None}, (None, None)),
    ("garbled", (None, None)),
])
def test_client_eval_stats_read_what_the_round_record_holds(stats, expected):
    assert client_eval_stats({"client_eval": stats}, "accuracy") == expected
    assert client_eval_stats({}, "accuracy") == (None, None)


@pytest.mark.slow
def test_bench_centralized_end_to_end(tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run(
        [sys.executable, "-m", "pollinate.cli", "bench", "--model", "tiny-llama", "--clients", "2", "--rounds", "1",
         "--methods", "fedavg-lora", "--centralized", "--set", "train.local_steps=2", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=900, env=os.environ.copy())
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = {}
    for name in ("centralized-total", "centralized-sequential"):
        saved = tomllib.loads((out / name / "config.toml").read_text())
        assert saved["method"] == "fedavg-lora" and saved["federation"]["clients"] == 1
        assert saved["data"]["partition"] == "iid" and saved["eval"]["client_fraction"] == 0
        steps[name] = saved["train"]["local_steps"]
    assert steps == {"centralized-total": 4, "centralized-sequential": 2}
    fed = json.loads((out / "fedavg-lora" / "report.json").read_text())
    ref = json.loads((out / "centralized-total" / "report.json").read_text())
    assert [len(r["clients"]) for r in ref["rounds"]] == [1]
    assert ref["rounds"][0]["clients"][0]["num_examples"] >= sum(c["num_examples"] for c in fed["rounds"][0]["clients"])
    rows = {r["method"]: r for r in json.loads((out / "bench.json").read_text())["rows"]}
    assert set(rows) == {"fedavg-lora", "centralized-total", "centralized-sequential"}
    assert rows["fedavg-lora"]["eval_loss_vs_centralized_sequential"] > 0
    assert "Per round, exact_match:" in (out / "bench.md").read_text()


def test_resume_reuses_finished_runs_and_resumes_stopped_ones(tmp_path, monkeypatch):
    from pollinate.simulations import bench as bench_module

    finished, stopped, fresh = tmp_path / "done", tmp_path / "stopped", tmp_path / "fresh"
    finished.mkdir()
    (finished / "report.json").write_text('{"method": "fedavg-lora"}')
    (stopped / "checkpoints" / "round-0002").mkdir(parents=True)
    calls = []

    def fake_run(cmd, **_kwargs):
        calls.append(cmd)
        out = Path(cmd[cmd.index("--out") + 1])
        out.mkdir(exist_ok=True)
        (out / "report.json").write_text('{"method": "x"}')
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(bench_module.subprocess, "run", fake_run)
    assert bench_module.run_method("fedavg-lora", [], finished, resume=True) == {"method": "fedavg-lora"}
    assert not calls
    bench_module.run_method("fedavg-lora", [], stopped, resume=True)
    bench_module.run_method("fedavg-lora", [], fresh, resume=True)
    assert calls[0][-2:] == ["--resume", str(stopped)] and "--resume" not in calls[1]
