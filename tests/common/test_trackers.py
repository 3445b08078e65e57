"""output.loggers: every round's metrics, bytes, client evaluation, per-client records and plans reach the trackers."""

from __future__ import annotations

import pytest
from rich.console import Console

from pollinate.common import trackers
from pollinate.common.config import ConfigError
from pollinate.common.config_io import build_config
from pollinate.common.report import RunRecorder
from pollinate.common.trackers import check_trackers, open_trackers, round_scalars, round_texts
from pollinate.server import app as server_app

RECORD = {
    "round": 1, "train_loss": 0.5, "eval_loss": 0.25, "eval_metrics": {"exact_match": 0.75, "exact_match/add": 1.0},
    "bytes_up": 100, "bytes_down": 300, "seconds": 2.0, "under_training_rate": None, "bytes_eval_up": 7,
    "client_eval": {"clients": [], "mean": {"eval_loss": 0.3, "exact_match": 0.5},
                    "worst": {"client_id": 1, "eval_loss": 0.4, "exact_match": 0.25}},
    "clients": [{"client_id": 0, "bytes_up": 40, "train_loss": 0.6, "met_deadline": True, "profile": {"memory_gib": 2},
                 "plan": {"modules": 3, "bits": 4}},
                {"client_id": 1, "bytes_up": 60, "train_loss": None, "met_deadline": False}],
}


def test_a_round_becomes_scalars_and_plan_texts():
    scalars = round_scalars(RECORD, {"bytes_up": 150, "bytes_down": 400})
    assert scalars == {
        "eval/loss": 0.25, "eval/exact_match": 0.75, "eval/exact_match/add": 1.0, "train/loss": 0.5,
        "round/bytes_up": 100.0, "round/bytes_down": 300.0, "round/seconds": 2.0, "round/bytes_eval_up": 7.0,
        "total/bytes_up": 150.0, "total/bytes_down": 400.0,
        "client_eval/mean/eval_loss": 0.3, "client_eval/mean/exact_match": 0.5,
        "client_eval/worst/client_id": 1.0, "client_eval/worst/eval_loss": 0.4, "client_eval/worst/exact_match": 0.25,
        "client/0/bytes_up": 40.0, "client/0/train_loss": 0.6, "client/0/met_deadline": 1.0,
        "client/0/profile/memory_gib": 2.0, "client/1/bytes_up": 60.0, "client/1/met_deadline": 0.0,
    }
    assert round_texts(RECORD) == {"client/0/plan": '{"bits": 4, "modules": 3}'}


class FakeTracker:
    opened: list[FakeTracker] = []

    def __init__(self, run_dir, run_name, config):
        self.run_name, self.config, self.logged, self.closed = run_name, config, [], False
        FakeTracker.opened.append(self)

    def log(self, step, scalars, texts):
        self.logged.append((step, scalars, texts))

    def close(self):
        self.closed = True


def test_the_recorder_feeds_every_round_to_its_trackers(tmp_path, monkeypatch):
    monkeypatch.setitem(trackers.FACTORIES, "wandb", FakeTracker)
    monkeypatch.setitem(trackers.TRACKER_MODULES, "wandb", "json")  # any importable module stands in for wandb
    cfg = build_config(None, ['output.loggers = ["wandb"]'])
    opened = open_trackers(cfg.output.loggers, tmp_path / "run-7", cfg.to_dict())
    recorder = RunRecorder(tmp_path / "run-7", {"rounds_planned": 2}, console=Console(quiet=True), quiet=True,
                           trackers=opened)
    recorder.initial({"eval_loss": 1.0, "eval_metrics": {"exact_match": 0.0}})
    recorder.round_done(RECORD)
    recorder.round_done({**RECORD, "round": 2, "client_eval": None})
    recorder.write(plots=False)
    (tracker,) = opened
    assert tracker.run_name == "run-7" and tracker.config["output"]["loggers"] == ["wandb"] and tracker.closed
    assert [step for step, _, _ in tracker.logged] == [0, 1, 2]
    assert tracker.logged[0][1] == {"eval/loss": 1.0, "eval/exact_match": 0.0}
    assert tracker.logged[2][1]["total/bytes_up"] == 200.0 and tracker.logged[2][2] == round_texts(RECORD)


def test_a_run_that_fails_closes_its_trackers_once(tmp_path, monkeypatch):
    monkeypatch.setitem(trackers.FACTORIES, "wandb", FakeTracker)
    monkeypatch.setitem(trackers.TRACKER_MODULES, "wandb", "json")
    cfg = build_config(None, ['output.loggers = ["wandb"]', "model.name=tiny-llama"])
    opened = []
    monkeypatch.setattr(server_app, "open_trackers", lambda *a: opened.extend(open_trackers(*a)) or opened)
    monkeypatch.setattr(server_app, "server_half", lambda method: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        server_app.run_server(None, cfg, tmp_path / "run")
    (tracker,) = opened
    assert tracker.closed


def test_a_missing_tracker_package_is_one_line_naming_the_extra(monkeypatch):
    monkeypatch.setitem(trackers.TRACKER_MODULES, "mlflow", "pollinate_no_such_module")
    with pytest.raises(ConfigError, match=r"pip install 'pollinate\[mlflow\]'") as caught:
        check_trackers(["mlflow"])
    assert "\n" not in str(caught.value)


def test_logger_names_are_checked_with_a_suggestion():
    with pytest.raises(ConfigError, match="did you mean 'tensorboard'"):
        build_config(None, ['output.loggers = ["tensorbord"]'])
    with pytest.raises(ConfigError, match="no repeated logger"):
        build_config(None, ['output.loggers = ["mlflow", "mlflow"]'])
    assert set(trackers.TRACKER_MODULES) == set(trackers.FACTORIES)


def test_tensorboard_receives_the_rounds(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = build_config(None, ['output.loggers = ["tensorboard"]'])
    recorder = RunRecorder(tmp_path, {"rounds_planned": 1}, console=Console(quiet=True), quiet=True,
                           trackers=open_trackers(cfg.output.loggers, tmp_path, cfg.to_dict()))
    recorder.initial({"eval_loss": 1.0, "eval_metrics": {"exact_match": 0.0}})
    recorder.round_done(RECORD)
    recorder.write(plots=False)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("eval/loss")] == [(0, 1.0), (1, 0.25)]
    assert [e.value for e in events.Scalars("client/1/bytes_up")] == [60.0]
