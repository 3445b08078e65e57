"""``eval.overlap``: round t's server evaluation runs on a background thread while round t+1 trains; round t's
record waits for it and is recorded before round t+1's, the last round is evaluated at once, an evaluation error
ends the run at the next round, a checkpoint taken while the evaluation was pending resumes, and with the setting
off nothing changes."""

import json
import logging
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from pollinate.common.config_io import build_config
from pollinate.common.report import RunRecorder
from pollinate.common.wire import arrays_to_record, record_to_arrays
from pollinate.methods.fedavg_full.server import FedAvgFull
from pollinate.server.checkpoint import config_hash, find_resume_point
from pollinate.server.round_timing import RoundTiming

ROOT = Path(__file__).resolve().parents[2]
NODES = [11, 12]
TIMING_KEYS = {"train_seconds", "eval_seconds", "client_eval_seconds", "aggregate_seconds", "checkpoint_seconds",
               "other_seconds"}


class FakeGrid:
    def get_node_ids(self) -> list[int]:
        return list(NODES)


class Clock:
    """Time moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class SignallingTiming(RoundTiming):
    """Sets ``waiting`` when ``end_round`` starts waiting for the previous round's evaluation (once armed)."""

    def __init__(self, clock: Clock) -> None:
        super().__init__(clock)
        self.armed = False
        self.waiting = threading.Event()

    def open(self, phase: str) -> None:
        super().open(phase)
        if phase == "eval_wait" and self.armed:
            self.waiting.set()


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    for name, value in (("_run_id", 1), ("_node_id", 1), ("_task_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)


def _strategy(run_dir: Path, rounds: int, overlap: bool, every: int = 1) -> FedAvgFull:
    cfg = build_config(None, ["model.name=tiny-llama", "method=fedavg-full", "federation.clients=2",
                              f"federation.rounds={rounds}", f"eval.every={every}",
                              f"eval.overlap={str(overlap).lower()}", "eval.client_fraction=0",
                              "data.builtin_examples=8", "data.eval_examples=2"])
    header = {"method": "fedavg-full", "model": "tiny-llama", "task": "skills", "num_clients": 2,
              "rounds_planned": rounds}
    return FedAvgFull(cfg, RunRecorder(run_dir, header, quiet=True), run_dir)


def _loss_of(arrays: ArrayRecord) -> float:
    """A stand-in evaluation: a number that differs for every global state."""
    return float(sum(value.astype(np.float64).sum() for value in record_to_arrays(arrays).values()))


class Evaluations:
    """A stand-in ``evaluate_global``: which round's state it saw and on which thread; ``gate`` can hold one."""

    def __init__(self, strategy: FedAvgFull) -> None:
        self.strategy = strategy
        self.threads: list[str] = []
        self.gates: dict[int, threading.Event] = {}
        self.fail_on: float | None = None

    def __call__(self, arrays: ArrayRecord) -> dict:
        loss = _loss_of(arrays)
        self.threads.append(threading.current_thread().name)
        gate = self.gates.pop(len(self.threads), None)
        if gate is not None:
            assert gate.wait(timeout=30)
        if loss == self.fail_on:
            raise RuntimeError("evaluation broke")
        return {"eval_loss": loss, "eval_metrics": {"exact_match": 0.5}}


def _train(strategy: FedAvgFull, server_round: int, arrays: ArrayRecord) -> ArrayRecord:
    """One round as Flower drives it up to ``end_round``: each client adds 0.1 to the global state."""
    messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), FakeGrid()))
    replies = []
    for message in messages:
        message.metadata.__dict__["_message_id"] = str(uuid.uuid4())  # what the grid does when it pushes it
        state = {k: v + np.float32(0.1) for k, v in record_to_arrays(message.content["arrays"]).items()}
        metrics = MetricRecord({"client_id": NODES.index(message.metadata.dst_node_id), "num-examples": 4,
                                "train_loss": 1.0})
        replies.append(Message(RecordDict({"arrays": arrays_to_record(state), "metrics": metrics}),
                               reply_to=message))
    new, _ = strategy.aggregate_train(server_round, replies)
    return new


def _run(strategy: FedAvgFull, rounds: int) -> tuple[list, list[float]]:
    """Flower's loop: what ``end_round`` returned each round (0 first) and each round's global, as a number."""
    arrays = strategy.initial_arrays()
    returned, globals_ = [strategy.end_round(0, arrays)], []
    for server_round in range(1, rounds + 1):
        arrays = _train(strategy, server_round, arrays)
        globals_.append(_loss_of(arrays))
        returned.append(strategy.end_round(server_round, arrays))
    return returned, globals_


def _round_lines(run_dir: Path) -> list[dict]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if x["type"] == "round"]


def _checkpointed_rounds(run_dir: Path, server_round: int) -> list[dict]:
    state = json.loads((run_dir / "checkpoints" / f"round-{server_round:04d}" / "state.json").read_text())
    return state["history"]["rounds"]


def test_each_round_is_evaluated_beside_the_next_and_recorded_in_order(tmp_path):
    strategy = _strategy(tmp_path, rounds=3, overlap=True)
    evaluations = Evaluations(strategy)
    strategy.evaluate_global = evaluations
    clock = Clock()
    strategy.timing = timing = SignallingTiming(clock)
    assert strategy.end_round(0, strategy.initial_arrays()) is not None  # the initial evaluation: at once
    held = evaluations.gates[2] = threading.Event()  # round 1's evaluation waits until round 2 waits for it

    arrays = _train(strategy, 1, strategy.initial_arrays())
    globals_ = [_loss_of(arrays)]
    assert strategy.end_round(1, arrays) is None  # its evaluation is running
    assert strategy.recorder.rounds == [] and _round_lines(tmp_path) == []
    (pending,) = _checkpointed_rounds(tmp_path, 1)  # checkpointed as usual, marked pending
    assert pending["eval_pending"] is True and pending["eval_loss"] is None

    arrays = _train(strategy, 2, arrays)  # round 2 trains while round 1 is evaluated
    globals_.append(_loss_of(arrays))
    timing.armed = True

    def release() -> None:  # once round 2 waits for round 1's evaluation: 2 s pass, then it ends
        assert timing.waiting.wait(timeout=30)
        clock.now += 2.0
        held.set()

    releaser = threading.Thread(target=release)
    releaser.start()
    assert strategy.end_round(2, arrays) is None
    releaser.join()
    arrays = _train(strategy, 3, arrays)
    globals_.append(_loss_of(arrays))
    assert strategy.end_round(3, arrays) is not None  # the last round: evaluated at once, recorded at once

    rounds = strategy.recorder.rounds
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert [r["eval_loss"] for r in rounds] == pytest.approx(globals_)  # each round's own global
    assert [r["round"] for r in _round_lines(tmp_path)] == [1, 2, 3]
    assert all(r["eval_metrics"] == {"exact_match": 0.5} and "eval_pending" not in r for r in rounds)
    assert evaluations.threads[0] == threading.main_thread().name  # round 0
    assert [name.startswith("pollinate-eval-") for name in evaluations.threads[1:]] == [True, True, False]
    # Round 1's evaluation took 2 s of the clock, all of it while round 2 waited; its round does not count it.
    assert rounds[0]["timing"]["eval_seconds"] == 2.0 and rounds[1]["timing"]["eval_wait_seconds"] == 2.0
    assert rounds[0]["timing"]["eval_wait_seconds"] == 0.0 and rounds[1]["timing"]["eval_seconds"] == 0.0
    for r in rounds:
        assert set(r["timing"]) == TIMING_KEYS | {"eval_wait_seconds"}
        assert r["seconds"] == pytest.approx(sum(v for k, v in r["timing"].items() if k != "eval_seconds")
                                             if r["round"] < 3 else sum(r["timing"].values()))
    assert [r["round"] for r in _checkpointed_rounds(tmp_path, 3)] == [1, 2, 3]
    assert not any(r.get("eval_pending") for r in _checkpointed_rounds(tmp_path, 3))


def test_each_round_records_the_evaluation_of_its_own_global(tmp_path):
    strategy = _strategy(tmp_path, rounds=4, overlap=True, every=2)
    strategy.evaluate_global = Evaluations(strategy)
    returned, globals_ = _run(strategy, rounds=4)
    rounds = strategy.recorder.rounds
    assert [r["eval_loss"] for r in rounds] == [None, pytest.approx(globals_[1]), None, pytest.approx(globals_[3])]
    assert [r is None for r in returned] == [False, True, True, True, False]
    assert [r["round"] for r in _round_lines(tmp_path)] == [1, 2, 3, 4]


def test_with_the_setting_off_records_are_as_before_and_match_the_overlapped_run(tmp_path):
    off, on = _strategy(tmp_path / "off", rounds=3, overlap=False), _strategy(tmp_path / "on", rounds=3, overlap=True)
    for strategy in (off, on):
        strategy.evaluate_global = Evaluations(strategy)
        _run(strategy, rounds=3)
    assert off.evaluate_global.threads == [threading.main_thread().name] * 4
    for r in off.recorder.rounds:
        assert list(r["timing"]) == ["train_seconds", "eval_seconds", "client_eval_seconds", "aggregate_seconds",
                                     "checkpoint_seconds", "other_seconds"]
    assert not any("eval_pending" in r for n in (1, 2, 3) for r in _checkpointed_rounds(tmp_path / "off", n))

    def steady(record: dict) -> dict:
        return {k: v for k, v in record.items() if k not in ("seconds", "timing", "server_rss_bytes")}

    assert [steady(r) for r in on.recorder.rounds] == [steady(r) for r in off.recorder.rounds]
    assert [list(r) for r in on.recorder.rounds] == [list(r) for r in off.recorder.rounds]  # same keys, same order


def test_a_failed_background_evaluation_ends_the_run_at_the_next_round(tmp_path, caplog):
    strategy = _strategy(tmp_path, rounds=3, overlap=True)
    evaluations = Evaluations(strategy)
    strategy.evaluate_global = evaluations
    strategy.end_round(0, strategy.initial_arrays())
    arrays = _train(strategy, 1, strategy.initial_arrays())
    evaluations.fail_on = _loss_of(arrays)
    assert strategy.end_round(1, arrays) is None
    arrays = _train(strategy, 2, arrays)
    with caplog.at_level(logging.ERROR), pytest.raises(RuntimeError, match="evaluation broke"):
        strategy.end_round(2, arrays)
    assert "round 1: the server evaluation (eval.overlap) failed" in caplog.text
    assert "evaluation broke" in caplog.text  # its traceback, logged when it failed
    assert strategy.recorder.rounds == [] and _round_lines(tmp_path) == []
    assert not (tmp_path / "checkpoints" / "round-0002").exists()  # as a synchronous failure: no round 2
    assert _checkpointed_rounds(tmp_path, 1)[0]["eval_pending"] is True  # a resume evaluates round 1 again

    sync = _strategy(tmp_path / "sync", rounds=3, overlap=False)  # what the same error does without overlap
    sync.evaluate_global = Evaluations(sync)
    sync.end_round(0, sync.initial_arrays())
    sync.evaluate_global.fail_on = evaluations.fail_on
    with pytest.raises(RuntimeError, match="evaluation broke"):
        sync.end_round(1, _train(sync, 1, sync.initial_arrays()))


def test_a_run_resumed_with_a_pending_evaluation_evaluates_and_records_that_round(tmp_path):
    strategy = _strategy(tmp_path, rounds=3, overlap=True)
    strategy.evaluate_global = Evaluations(strategy)
    strategy.end_round(0, strategy.initial_arrays())
    arrays = strategy.initial_arrays()
    for server_round in (1, 2):
        arrays = _train(strategy, server_round, arrays)
        strategy.end_round(server_round, arrays)  # the run stops here: round 2's evaluation never recorded
    round2_global = _loss_of(arrays)
    strategy.overlap._running.result()  # the stopped process's thread ends

    resumed = _strategy(tmp_path, rounds=3, overlap=True)
    resumed.evaluate_global = evaluations = Evaluations(resumed)
    point = find_resume_point(tmp_path, resumed.cfg)
    assert point.server_round == 2 and point.history["rounds"][-1]["eval_pending"] is True
    resumed.round_offset = point.server_round
    resumed.recorder.restore(point.history, point.server_round)
    restored = arrays_to_record(point.arrays)
    assert resumed.end_round(0, restored) is None  # Flower's round 0: round 2 is evaluated now, at once
    assert evaluations.threads == [threading.main_thread().name]
    assert [r["round"] for r in resumed.recorder.rounds] == [1, 2]
    assert resumed.recorder.rounds[1]["eval_loss"] == pytest.approx(round2_global)
    assert "eval_pending" not in resumed.recorder.rounds[1]
    arrays = _train(resumed, 1, restored)  # Flower's round 1 is the run's round 3
    assert resumed.end_round(1, arrays) is not None
    assert [r["round"] for r in resumed.recorder.rounds] == [1, 2, 3]
    assert [r["round"] for r in _round_lines(tmp_path)] == [1, 2, 3]  # round 2's line written on resume
    assert [r["round"] for r in resumed.recorder.report()["rounds"]] == [1, 2, 3]


@pytest.mark.slow
def test_an_overlapped_simulation_records_every_round_in_order_with_the_synchronous_numbers(tmp_path):
    def simulate(name: str, overlap: str) -> list[dict]:
        proc = subprocess.run([sys.executable, "-m", "pollinate.cli", "simulate", "--model", "tiny-llama", "--clients",
                               "2", "--rounds", "3", "--out", str(tmp_path / name), "--quiet", "--set",
                               f"eval.overlap={overlap}", "--set", "output.plots=false"],
                              cwd=ROOT, capture_output=True, text=True, timeout=400)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return _round_lines(tmp_path / name)

    overlapped, synchronous = simulate("overlapped", "true"), simulate("synchronous", "false")
    assert [r["round"] for r in overlapped] == [1, 2, 3]
    assert all(isinstance(r["eval_loss"], float) and "exact_match" in r["eval_metrics"] for r in overlapped)
    assert all(r["timing"]["eval_seconds"] > 0 and "eval_wait_seconds" in r["timing"] for r in overlapped)
    assert [r["eval_loss"] for r in overlapped] == [r["eval_loss"] for r in synchronous]
    assert [r["eval_metrics"] for r in overlapped] == [r["eval_metrics"] for r in synchronous]
    report = json.loads((tmp_path / "overlapped" / "report.json").read_text())
    assert [r["round"] for r in report["rounds"]] == [1, 2, 3] and (tmp_path / "overlapped" / "adapter").is_dir()


def test_the_setting_is_not_part_of_the_resume_hash_but_results_settings_are():
    def config(*overrides):
        return build_config(None, ["model.name=tiny-llama", *overrides])

    assert config_hash(config("eval.overlap=true")) == config_hash(config("eval.overlap=false"))
    assert config_hash(config("eval.every=2")) != config_hash(config("eval.every=1"))
