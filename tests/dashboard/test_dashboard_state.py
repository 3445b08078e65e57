"""What the dashboard makes of a run's events: rounds, clients, plans, rejections; bounded and sanitized."""

import json

import pytest

from pollinate.dashboard.source import DashboardData, RunSource, find_runs
from pollinate.dashboard.state import REASON_LIMIT, RunView

CONFIG = """method = "fedpipe"
[model]
name = "tiny-llama"
[data]
source = "skills"
[federation]
clients = 2
rounds = 3
deadline_s = 1.5
"""


def client(rnd, cid, **extra):
    return {"type": "client", "round": rnd, "client_id": cid, "bytes_up": 100, "bytes_down": 200,
            "compute_seconds": 0.5, "comm_seconds": 0.25, "round_seconds": 0.75, "met_deadline": True,
            "profile": "strong", "train_loss": 2.0, "num_examples": 10, **extra}


def round_event(rnd, loss):
    return {"type": "round", "round": rnd, "train_loss": loss + 0.1, "eval_loss": loss,
            "eval_metrics": {"exact_match": 0.5, "exact_match/add": 1.0}, "bytes_up": 200, "bytes_down": 400,
            "seconds": 1.0, "client_eval": {"mean": {"eval_loss": loss, "exact_match": 0.4},
                                            "worst": {"client_id": 1, "eval_loss": loss + 1, "exact_match": 0.1}}}


PLAN = {"modules": 2, "ranks": {"4": 1, "16": 1}, "bits": 8, "batch_size": 4, "local_steps": 7,
        "module_ranks": {"model.layers.10.q_proj": 16, "model.layers.2.q_proj": 4}}

EVENTS = [
    {"type": "plans", "round": 0, "plans": {"0": PLAN, "1": {**PLAN, "module_ranks": {"model.layers.2.q_proj": 2}}}},
    {"type": "initial_eval", "eval_loss": 3.0, "eval_metrics": {"exact_match": 0.0}},
    client(1, 0), client(1, 1, met_deadline=False, round_seconds=2.0, split_bytes_up=7, kept_examples=3),
    {"type": "rejected", "round": 1, "client_id": 1, "reason": "update norm 1e9 exceeds the bound"},
    round_event(1, 2.5),
    client(2, 0),
]


def fold(events):
    view = RunView()
    for event in events:
        view.apply(event)
    return view.snapshot()


def test_rounds_clients_plans_and_rejections_are_folded_from_events():
    snap = fold(EVENTS)
    assert snap["metric_name"] == "exact_match"
    zero, one, two = snap["rounds"]
    assert zero == {"round": 0, "eval_loss": 3.0, "metric": 0.0, "cum_bytes": 0}
    assert one["done"] and one["eval_loss"] == 2.5 and one["metric"] == 0.5 and one["cum_bytes"] == 600
    assert (one["replied"], one["missed"], one["rejected"], one["split_bytes_up"]) == (2, 1, 1, 7)
    assert one["client_mean_metric"] == 0.4 and one["client_worst_id"] == "1"
    assert not two.get("done") and two["replied"] == 1
    clients = {c["id"]: c for c in snap["clients"]}
    assert clients["0"]["status"] == "ok" and clients["0"]["round"] == 2 and clients["0"]["total_bytes_up"] == 200
    assert clients["0"]["plan"] == {"modules": 2, "bits": 8, "batch_size": 4, "local_steps": 7,
                                    "ranks": {"4": 1, "16": 1}}
    assert clients["1"]["status"] == "rejected" and "norm" in clients["1"]["reason"]
    assert snap["rejections"] == [{"round": 1, "client": "1", "reason": "update norm 1e9 exceeds the bound"}]
    assert snap["heatmap"] == {"modules": ["model.layers.2.q_proj", "model.layers.10.q_proj"], "clients": ["0", "1"],
                               "ranks": [[4, 16], [2, 0]]}


def test_a_run_without_dp_has_no_privacy():
    snap = fold(EVENTS)
    assert snap["privacy"] is None and not any("privacy" in row for row in snap["rounds"])


def private_round(rnd, epsilon, **extra):
    privacy = {"epsilon": epsilon, "delta": 1e-5, "noise_multiplier": 1.0, "clip_norm": 0.5,
               "clipped_fraction": 0.25, **extra}
    return {**round_event(rnd, 2.0), "privacy": privacy}


def test_epsilon_per_round_and_the_latest_with_its_delta_are_folded():
    snap = fold([{"type": "initial_eval", "eval_loss": 3.0}, private_round(1, 1.5), private_round(2, 2.25)])
    zero, one, two = snap["rounds"]
    assert "privacy" not in zero
    assert one["privacy"] == {"epsilon": 1.5, "delta": 1e-5, "noise_multiplier": 1.0, "clip_norm": 0.5,
                              "clipped_fraction": 0.25}
    assert two["privacy"]["epsilon"] == 2.25
    assert snap["privacy"] == {"round": 2, **two["privacy"]}


def test_a_null_epsilon_means_no_guarantee_and_is_kept_as_none():
    snap = fold([private_round(1, None, noise_multiplier=0.0)])
    assert snap["privacy"]["epsilon"] is None and snap["privacy"]["noise_multiplier"] == 0.0


def test_hostile_privacy_values_are_dropped_and_the_state_stays_strict_json():
    line = ('{"type": "round", "round": 1, "eval_loss": 1.0, "bytes_up": ' + "9" * 400 + ', "privacy": '
            '{"epsilon": NaN, "delta": "1e-5", "noise_multiplier": ' + "9" * 400 + ', "clip_norm": -Infinity, '
            '"clipped_fraction": 7}}')
    snap = fold([json.loads(line)])
    (row,) = snap["rounds"]
    assert row["privacy"] == {} and "bytes_up" not in row and row["cum_bytes"] == 0
    for epsilon, shown in (("3", "missing"), ([1], "missing"), (-1.0, "missing"), (float("inf"), None),
                           (1e308, 1e308), (10**400, "missing")):
        privacy = fold([private_round(1, epsilon, delta=float("nan"))])["privacy"]
        assert privacy.get("epsilon", "missing") == shown and "delta" not in privacy
    assert "privacy" not in fold([{**round_event(1, 2.0), "privacy": [1, 2]}])["rounds"][0]
    json.dumps(snap, allow_nan=False)


def test_a_deadline_miss_shows_as_missed():
    snap = fold([client(1, 5, met_deadline=False)])
    assert snap["clients"][0]["status"] == "missed" and snap["rounds"][0]["missed"] == 1


def test_hostile_text_is_cut_and_made_printable_and_odd_values_are_dropped():
    name = "<img src=x onerror=alert(1)>\x1b[31m" + "n" * 500
    reason = "<script>alert(1)</script>\n" + "r" * 5000
    snap = fold([client(1, name, bytes_up=float("nan"), train_loss="2.0", num_examples=True, profile={"x": 1}),
                 {"type": "rejected", "round": "1", "client_id": name, "reason": reason},
                 {"type": "round", "round": -3, "eval_loss": 1.0}, {"type": ["round"]}, {"no": "type"}])
    (entry,) = snap["clients"]
    assert entry["id"].startswith("<img src=x onerror=alert(1)>?[31m") and len(entry["id"]) <= 60
    assert "bytes_up" not in entry and "train_loss" not in entry and "num_examples" not in entry
    assert isinstance(entry["profile"], str)
    (rejection,) = snap["rejections"]
    assert rejection["round"] is None and rejection["reason"].startswith("<script>alert(1)</script>?")
    assert len(rejection["reason"]) == REASON_LIMIT
    assert snap["rounds"] == [{"round": 1, "replied": 1, "cum_bytes": 0}]  # round "1" and round -3 are not rounds
    json.dumps(snap, allow_nan=False)  # what the server sends must be strict JSON


def test_memory_is_bounded_however_many_clients_rounds_and_rejections():
    view = RunView(max_rounds=5, max_clients=3, max_rejections=2)
    for rnd in range(1, 21):
        view.apply(client(rnd, f"c{rnd}"))
        view.apply({"type": "rejected", "round": rnd, "client_id": f"c{rnd}", "reason": "x"})
        view.apply(round_event(rnd, 1.0))
    snap = view.snapshot()
    assert [r["round"] for r in snap["rounds"]] == [16, 17, 18, 19, 20]
    assert [c["id"] for c in snap["clients"]] == ["c18", "c19", "c20"]
    assert [r["round"] for r in snap["rejections"]] == [19, 20]


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text(CONFIG)
    (run / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in EVENTS))
    return run


def test_a_run_source_reports_round_in_progress_then_finished(run_dir):
    source = RunSource(run_dir, "run")
    assert source.refresh()
    snap = source.snapshot()
    assert snap["header"] == {"method": "fedpipe", "model": "tiny-llama", "task": "skills", "clients": 2,
                              "rounds": 3, "deadline_s": 1.5}
    assert snap["status"]["in_progress"] == 2 and snap["status"]["replied"] == 1 and not snap["status"]["finished"]
    assert not source.refresh()  # nothing new
    with open(run_dir / "metrics.jsonl", "a") as fh:
        for event in (round_event(2, 2.0), client(3, 0), client(3, 1), round_event(3, 1.5)):
            fh.write(json.dumps(event) + "\n")
    (run_dir / "report.json").write_text("{}")
    assert source.refresh()
    status = source.snapshot()["status"]
    assert status["finished"] and status["last_done"] == 3 and status["in_progress"] is None


def test_a_bench_directory_shows_each_method_run(tmp_path, run_dir):
    bench = tmp_path / "bench"
    for name in ("fedavg-lora", "fedpipe"):
        (bench / name).mkdir(parents=True)
        (bench / name / "metrics.jsonl").write_text(json.dumps(round_event(1, 2.0)) + "\n")
    (bench / "bench.md").write_text("table")
    assert find_runs(bench) == [bench / "fedavg-lora", bench / "fedpipe"]
    assert find_runs(run_dir) == [run_dir]
    assert find_runs(tmp_path / "not-yet") == [tmp_path / "not-yet"]
    _, text = DashboardData(bench).poll()
    assert [run["name"] for run in json.loads(text)["runs"]] == ["fedavg-lora", "fedpipe"]


def test_state_is_serialized_once_per_change(run_dir):
    data = DashboardData(run_dir, poll_s=0.0)
    version, text = data.poll()
    assert data.poll() == (version, text)
    with open(run_dir / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps(round_event(2, 2.0)) + "\n")
    new_version, new_text = data.poll()
    assert new_version == version + 1 and json.loads(new_text)["runs"][0]["status"]["last_done"] == 2
