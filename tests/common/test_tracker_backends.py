"""The real tracker backends, where installed (`pip install 'pollinate[mlflow]'` etc.; skipped otherwise): a run's
rounds arrive at each, offline and inside the run directory or the tracker's local store."""

import pytest

from pollinate.common.trackers import FACTORIES

CONFIG = {"method": "fedavg-lora", "train": {"lr": 0.001}}


def _two_rounds(name, run_dir):
    tracker = FACTORIES[name](run_dir, "run", CONFIG)
    tracker.log(0, {"eval/loss": 2.5}, {})
    tracker.log(1, {"eval/loss": 2.0}, {"plans/0": "r8 x 2"})
    tracker.close()


def test_mlflow_records_every_round_in_the_run_directory(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    _two_rounds("mlflow", tmp_path)
    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{tmp_path.resolve()}/mlflow.db")
    run = client.search_runs([client.get_experiment_by_name("pollinate").experiment_id])[0]
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "eval/loss")] == [(0, 2.5), (1, 2.0)]
    assert run.data.params["train.lr"] == "0.001"
    assert list((tmp_path / "mlartifacts").rglob("round-0001.json"))  # texts stay inside the run directory


def test_wandb_offline_run_lands_in_the_run_directory(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    _two_rounds("wandb", tmp_path)
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))


def test_trackio_stores_the_project_locally(tmp_path):
    pytest.importorskip("trackio")
    from trackio.utils import TRACKIO_DIR  # fixed when trackio is imported (TRACKIO_DIR / HF_HOME)

    _two_rounds("trackio", tmp_path)
    assert (TRACKIO_DIR / "pollinate.db").is_file()
