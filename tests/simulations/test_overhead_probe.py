"""The overhead probe: its plain Flower baseline imports nothing from Pollinate and runs the same work; the
comparison's arithmetic; the Pollinate side's command line is a valid config."""

import argparse
import ast
import json
from pathlib import Path

import pytest

from pollinate.common.config_io import build_config
from pollinate.common.models import resolve_model
from pollinate.simulations import overhead_probe
from pollinate.simulations.plain_flower_app import PlainConfig, run

PLAIN_APP = Path(overhead_probe.__file__).with_name("plain_flower_app.py")


def test_the_plain_app_imports_nothing_from_pollinate():
    tree = ast.parse(PLAIN_APP.read_text())
    modules = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    modules |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert modules and not [m for m in modules if m.split(".")[0] == "pollinate"]


def test_summary_compares_wall_time_with_training_spread_over_the_slots_after_round_one():
    rounds = [{"round": 1, "seconds": 100.0, "client_train_seconds": [50.0, 50.0]},
              {"round": 2, "seconds": 12.0, "client_train_seconds": [10.0, 10.0]},
              {"round": 3, "seconds": 14.0, "client_train_seconds": [10.0, 14.0]}]
    row = overhead_probe.summarize("x", rounds, slots=2)
    assert row["round_seconds"] == 13.0 and row["client_train_seconds_sum"] == 22.0
    assert row["ideal_seconds"] == 11.0 and row["wall_over_ideal"] == pytest.approx(13 / 11, abs=1e-3)
    assert row["overhead_seconds"] == 2.0
    assert "| x | 13.0 | 22.0 | 11.0 | 1.18 | 2.0 |" in overhead_probe.table([row])


def test_pollinate_side_is_a_valid_config_doing_the_plain_apps_work(tmp_path):
    args = argparse.Namespace(
        model="tiny-llama", data="d", clients=8, rounds=3, local_steps=5, batch_size=8, seed=0)
    argv = overhead_probe.pollinate_argv(args, tmp_path)
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    cfg = build_config(None, sets)
    assert cfg.lora.target_modules == ["q_proj", "v_proj"] and cfg.lora.r == 8
    assert (cfg.train.local_steps, cfg.train.batch_size, cfg.model.max_seq_len) == (5, 8, 64)
    assert cfg.data.partition == "pathological" and cfg.data.classes_per_client == 1
    assert cfg.eval.client_fraction == 0 and cfg.eval.every == 3


def test_pollinate_rounds_leave_out_server_and_client_evaluation(tmp_path):
    record = {"round": 1, "seconds": 20.0, "timing": {"eval_seconds": 3.0, "client_eval_seconds": 2.0},
              "clients": [{"train_seconds": 4.0}, {"train_seconds": 5.0}]}
    (tmp_path / "report.json").write_text(json.dumps({"rounds": [record]}))
    assert overhead_probe.pollinate_rounds(tmp_path) == [
        {"round": 1, "seconds": 15.0, "client_train_seconds": [4.0, 5.0]}]


@pytest.mark.slow
def test_the_plain_app_trains_each_client_on_its_own_file_and_records_the_round(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("a", "b"):
        rows = [{"instruction": f"say {name} {i}", "response": f"{name} {i}"} for i in range(20)]
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "rounds.jsonl"
    run(PlainConfig(model_path=resolve_model("tiny-llama").path, data_dir=str(data), out=str(out), clients=2,
                    rounds=1, local_steps=2, batch_size=4), cpus=2)
    (line,) = [json.loads(x) for x in out.read_text().splitlines()]
    assert line["round"] == 1 and len(line["client_train_seconds"]) == 2 and line["seconds"] > 0
