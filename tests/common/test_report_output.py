"""What a run shows: progress lines stay one line in a log file (no wrapping at 80 columns), and the plots have
whole-number round ticks and titles naming the run."""

import matplotlib
import pytest
from matplotlib.figure import Figure

from pollinate.common.report import RunRecorder, write_plots

matplotlib.use("Agg")


def record(server_round: int) -> dict:
    return {"round": server_round, "train_loss": 1.5, "eval_loss": 1.25, "eval_metrics": {"exact_match": 0.5},
            "bytes_up": 123_456_789, "bytes_down": 98_765_432, "seconds": 12.5,
            "clients": [{"client_id": i} for i in range(12)]}


def test_a_progress_line_is_one_line_when_stderr_is_a_file(tmp_path, capsys):
    recorder = RunRecorder(tmp_path, {"rounds_planned": 3})
    recorder.round_done(record(1))
    out = capsys.readouterr().err
    assert len(out.strip()) > 100 and out.count("\n") == 1 and out.startswith("round 1/3:")


def test_plots_have_titles_and_whole_round_ticks(tmp_path, monkeypatch):
    saved: list[Figure] = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: saved.append(fig))
    report = {"method": "fedavg-lora", "task": "skills", "initial_eval": {"eval_loss": 2.0, "eval_metrics": {}},
              "rounds": [record(1), record(2), record(3)]}
    assert write_plots(tmp_path, report) == ["loss_metric.png", "bytes.png"]
    axes = [axis for fig in saved for axis in fig.axes]
    assert len(axes) == 3
    for axis in axes:
        assert axis.get_title().startswith("fedavg-lora on skills: ")
        ticks = [t for t in axis.get_xticks() if axis.get_xlim()[0] <= t <= axis.get_xlim()[1]]
        assert ticks and all(t == pytest.approx(round(t)) for t in ticks)
