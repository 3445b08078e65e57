"""FedPipe's plans that hold: round 0 reports token lengths and a measured step, the planner uses both per client,
and each round's measured compute is checked against the plan's estimate (re-planning the clients that missed)."""

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from pollinate.client import runtime
from pollinate.common.checks import UpdateRejected
from pollinate.common.config_io import build_config
from pollinate.common.models import FAMILY_ALL_LINEAR, SMOLLM2_SHAPE
from pollinate.common.profiles import GIB, TIER_PROFILES, ResourceProfile
from pollinate.common.report import RunRecorder
from pollinate.methods.fedpipe import client as fedpipe_client
from pollinate.methods.fedpipe import step_probe
from pollinate.methods.fedpipe.calibration import initial_workload, modelled_step_seconds
from pollinate.methods.fedpipe.plan_options import plan_options
from pollinate.methods.fedpipe.planner import PlanOptions, Workload, model_spec_from_model, plan_clients
from pollinate.methods.fedpipe.planner.costs import CostModel
from pollinate.methods.fedpipe.planner.spec import model_spec_from_config
from pollinate.methods.fedpipe.round_zero import MAX_TOKEN_LEVELS, MeasuredStep, PrepareReply, read_prepare_reply
from pollinate.methods.fedpipe.server import FedPipe
from pollinate.server.identity import NodeIdentity
from pollinate.simulations.bench import compute_estimate, estimate_table

ROOT = Path(__file__).resolve().parents[3]
TINY = ['model.name="tiny-llama"', 'method="fedpipe"', "federation.clients=2", "fedpipe.score_batches=1"]


def _task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in (("_run_id", 1), ("_node_id", 1), ("_task_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    _task_identity(monkeypatch)


def _prepare(cfg, node_config: dict) -> RecordDict:
    """The real client half's round-0 reply."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        _task_identity(monkeypatch)
        config = ConfigRecord({"server-round": 0, "run-config": cfg.to_json()})
        message = Message(content=RecordDict({"config": config}), dst_node_id=1, message_type="train.prepare")
    context = Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})
    return fedpipe_client.prepare(message, cfg, context)


@pytest.fixture(scope="module")
def tiny_reply():
    cfg = build_config(None, [*TINY, "fedpipe.bits=[32, 4]"])
    return cfg, _prepare(cfg, {"partition-id": 0, "num-partitions": 2})


def test_the_prepare_reply_carries_token_lengths_and_a_measured_step_the_server_accepts(tiny_reply):
    cfg, content = tiny_reply
    quantiles = content["tokens"]["quantiles"]
    assert len(quantiles) == 16 and quantiles == sorted(quantiles) and 1 <= quantiles[0] <= quantiles[-1] <= 64
    read = read_prepare_reply(content, 7, NodeIdentity(), set(content["scores"].keys()), cfg)
    assert read.token_quantiles == tuple(quantiles) and read.examples == content["metrics"]["num-examples"]
    step = read.measured
    assert step is not None and set(step.bits) == {32, 4} and all(s > 0 for s in step.seconds)
    assert (step.batch_size, step.rank) == (2, 2) and 1 <= step.tokens <= 2 * quantiles[-1]
    # and again at the largest batch size (tiny-llama fits every one), over more tokens per step
    assert step.large_batch_size == 8 and len(step.large_seconds) == 2 and all(s > 0 for s in step.large_seconds)
    assert step.tokens < step.large_tokens <= 8 * quantiles[-1]


def test_without_measure_step_the_reply_has_token_lengths_only(tmp_path):
    cfg = build_config(None, [*TINY, "fedpipe.measure_step=false"])
    content = _prepare(cfg, {"partition-id": 1, "num-partitions": 2})
    assert "measured_step" not in content.metric_records and len(content["tokens"]["quantiles"]) == 16
    assert read_prepare_reply(content, 8, NodeIdentity(), set(), cfg).measured is None


def test_a_device_whose_memory_holds_no_fp32_base_measures_only_the_bits_that_fit(tmp_path, tiny_reply):
    cfg, content = tiny_reply
    spec = model_spec_from_model(runtime.base_model(cfg, 0), FAMILY_ALL_LINEAR["llama"])
    lengths = list(content["tokens"]["quantiles"])
    costs = CostModel.build(spec, plan_options(cfg), [TIER_PROFILES["weak"]], [Workload(tuple(lengths))])
    adapter = sum(m.lora_params(2) for m in spec.modules)
    need = {bits: costs.memory_bytes(0, costs.combo(bits, 2), adapter) for bits in (32, 4)}
    assert need[4] < need[32]
    profile = tmp_path / "edge.toml"
    profile.write_text(f"memory_gib = {(need[4] + need[32]) / 2 / GIB!r}\ncompute_tflops = 0.1\n"
                       "uplink_mbps = 10\ndownlink_mbps = 10\n")
    assert step_probe.fitting_bits(cfg, {"profile": str(profile)}, spec, lengths) == [4]
    # a batch of 8 that fits at one bits only is not measured when the other is: it must fit at every bits
    need8 = {bits: costs.memory_bytes(0, costs.combo(bits, 8), adapter) for bits in (32, 4)}
    fits, other = sorted(need8, key=need8.get)
    assert need8[fits] < need8[other]
    roomier = tmp_path / "roomier.toml"
    roomier.write_text(f"memory_gib = {(need8[fits] + need8[other]) / 2 / GIB!r}\ncompute_tflops = 0.1\n"
                       "uplink_mbps = 10\ndownlink_mbps = 10\n")
    node = {"profile": str(roomier)}
    assert step_probe.largest_fitting_batch(cfg, node, spec, lengths, [fits]) == 8
    assert step_probe.largest_fitting_batch(cfg, node, spec, lengths, [32, 4]) in (4, None)


def _valid(cfg) -> RecordDict:
    return RecordDict({
        "scores": MetricRecord({}), "profile": ConfigRecord(TIER_PROFILES["medium"].to_dict()),
        "metrics": MetricRecord({"client_id": 3, "num-examples": 10}),
        "tokens": MetricRecord({"quantiles": [4, 9, 30]}),
        "measured_step": MetricRecord({"bits": [32, 8], "seconds": [0.5, 1.5], "batch_size": 2, "rank": 2,
                                       "tokens": 40.0, "large_batch_size": 8, "large_seconds": [0.9, 2.5],
                                       "large_tokens": 200.0}),
    })


def _with(record: str, **values):
    def mutate(content: RecordDict) -> RecordDict:
        if record in content.metric_records:
            content[record] = MetricRecord({**dict(content[record]), **values})
        return content
    return mutate


def _without(record: str):
    def mutate(content: RecordDict) -> RecordDict:
        del content[record]
        return content
    return mutate


@pytest.mark.parametrize("mutate, message", [
    (_with("measured_step", seconds=[math.nan, 1.0]), "finite numbers"),
    (_with("measured_step", seconds=[-1.0, 1.0]), "finite numbers"),
    (_with("measured_step", seconds=[1e12, 1.0]), "finite numbers"),
    (_with("measured_step", seconds=[1.0]), "list of 2 to 2 numbers"),
    (_with("measured_step", bits=[32, 16]), "distinct values of fedpipe.bits"),
    (_with("measured_step", bits=[32, 32]), "distinct values of fedpipe.bits"),
    (_with("measured_step", batch_size=3), "not one of fedpipe.batch_sizes"),
    (_with("measured_step", rank=3), "not one of fedpipe.ranks"),
    (_with("measured_step", tokens=math.inf), "tokens per step"),
    (_with("measured_step", tokens=61.0), "tokens per step"),  # more than a batch of 2 of its longest (30)
    (_with("measured_step", large_batch_size=2), "must be above batch_size = 2"),
    (_with("measured_step", large_batch_size=5), "large_batch_size = 5 is not one of fedpipe.batch_sizes"),
    (_with("measured_step", large_seconds=[0.9]), "large_seconds: expected a list of 2 to 2"),
    (_with("measured_step", large_seconds=[math.inf, 1.0]), "large_seconds per step must be finite"),
    (_with("measured_step", large_tokens=241.0), "large_tokens per step"),  # a batch of 8 of 30 is 240
    (_with("tokens", quantiles=list(range(1, MAX_TOKEN_LEVELS + 2))), "list of 2 to 64 numbers"),
    (_with("tokens", quantiles=[5]), "list of 2 to 64 numbers"),
    (_with("tokens", quantiles=[9, 4, 30]), "non-decreasing"),
    (_with("tokens", quantiles=[0, 4, 30]), "token length quantile"),
    (_with("tokens", quantiles=[4, 9, 65]), "token length quantile"),  # over model.max_seq_len
    (_with("tokens", quantiles=[4.5, 9.0, 30.0]), "token length quantile"),
    (_without("tokens"), "no 'tokens' MetricRecord"),
    (_without("profile"), "no 'profile' ConfigRecord"),
])
def test_hostile_prepare_fields_are_rejected_with_one_line_reasons(tmp_path, mutate, message):
    strategy = FedPipe(build_config(None, TINY), RunRecorder(tmp_path, {"rounds_planned": 1}, quiet=True), tmp_path)
    read_prepare_reply(_valid(strategy.cfg), 5, NodeIdentity(), set(), strategy.cfg)  # the valid reply passes

    class Grid:
        def send_and_receive(self, messages, timeout):
            (sent,) = messages
            sent.metadata.__dict__["_message_id"] = "m1"
            return [Message(mutate(_valid(strategy.cfg)), reply_to=sent)]

    strategy._prepare_nodes(Grid(), [41], server_round=0)
    (rejected,) = strategy.recorder.rejected
    assert message in rejected["reason"] and "\n" not in rejected["reason"] and not strategy.plans
    with pytest.raises(UpdateRejected, match=message):
        read_prepare_reply(mutate(_valid(strategy.cfg)), 5, NodeIdentity(), set(), strategy.cfg)


# ------------------------------------------------------------------------------------------------- the planner
@pytest.fixture(scope="module")
def smollm2():
    return model_spec_from_config({"model_type": "llama", **SMOLLM2_SHAPE})


def test_long_examples_get_a_smaller_plan_than_short_ones_on_the_same_profile(smollm2):
    options = PlanOptions(ranks=(0, 2, 4, 8, 16), batch_sizes=(2, 4, 8), seq_len=64, local_steps=5,
                          max_local_steps=20, deadline_s=30.0, max_adapter_params=250_000)
    importance = {m.name: 1.0 for m in smollm2.modules}
    short, long = (Workload((lo, lo + 2, lo + 4)) for lo in (8, 60))
    medium = TIER_PROFILES["medium"]
    plan_short, plan_long = plan_clients([medium, medium], importance, smollm2, options, ["s", "l"], [short, long])
    # fewer examples per round (steps x batch), or as many with a lower objective (ranks, bits)
    size = {p.client_id: (p.local_steps * p.batch_size, p.objective) for p in (plan_short, plan_long)}
    assert size["l"] < size["s"]
    assert plan_long.est_compute_s + plan_long.est_comm_s <= options.deadline_s


def test_a_measured_step_twice_the_model_halves_the_speed_at_its_bits_only(smollm2):
    options = PlanOptions(bits=(32, 8, 4), seq_len=64)
    medium = TIER_PROFILES["medium"]
    measured = MeasuredStep(bits=(8,), seconds=(0.0,), batch_size=2, rank=2, tokens=70.0)
    modelled = modelled_step_seconds(smollm2, options, medium, 8, measured)
    workload = initial_workload(smollm2, options, medium, (20, 35, 40), replace(measured, seconds=(2 * modelled,)))
    assert workload.time_factor(8) == pytest.approx(2.0) and workload.time_factor(32) == 1.0
    plain, corrected = (CostModel.build(smollm2, options, [medium], [w])
                        for w in (Workload((20, 35, 40)), workload))
    for j, (bits, _) in enumerate(plain.combos):
        assert corrected.speed[0, j] == pytest.approx(plain.speed[0, j] / (2.0 if bits == 8 else 1.0))


def test_two_measured_batch_sizes_give_a_line_that_reproduces_both_measurements(smollm2):
    options = PlanOptions(bits=(32, 8), batch_sizes=(2, 4, 8), seq_len=64, local_steps=5)
    medium = TIER_PROFILES["medium"]
    # a CPU-like step: 0.30 s whatever the tokens, plus 1 ms per token (batch 2 of 32 tokens: 0.364 s; 8: 0.556 s)
    measured = MeasuredStep(bits=(32,), seconds=(0.364,), batch_size=2, rank=2, tokens=64.0, large_batch_size=8,
                            large_seconds=(0.556,), large_tokens=256.0)
    workload = initial_workload(smollm2, options, medium, (32, 32, 32), measured)
    assert workload.overhead_flops(32) > 0 and workload.overhead_flops(8) == 0.0
    costs = CostModel.build(smollm2, options, [medium], [workload])
    adapter = sum(m.lora_params(2) for m in smollm2.modules)
    for batch, seconds in ((2, 0.364), (8, 0.556)):
        assert costs.step_seconds(0, costs.combo(32, batch), adapter) == pytest.approx(seconds, rel=1e-6)
    assert costs.step_seconds(0, costs.combo(32, 4), adapter) == pytest.approx(0.428, rel=1e-6)  # 0.30 + 128 ms
    # from the small batch alone, batch 8 would have been charged 4x its cost: 1.456 s for 0.556
    alone = CostModel.build(smollm2, options, [medium], [initial_workload(
        smollm2, options, medium, (32, 32, 32), replace(measured, large_batch_size=0, large_seconds=()))])
    assert alone.step_seconds(0, alone.combo(32, 8), adapter) == pytest.approx(4 * 0.364, rel=1e-6)


@pytest.mark.parametrize("large_seconds, expected_overhead", [
    (4.0, 0.0),  # 4x the FLOPs took more than 4x the time: proportional, no overhead
    (0.9, 0.0),  # the larger batch measured faster: noise, no overhead
    (1.000001, 10.0 * 4.0),  # nearly flat: overhead capped at MAX_OVERHEAD_RATIO x the larger batch's FLOPs
])
def test_noisy_measurements_give_no_negative_or_unbounded_overhead(large_seconds, expected_overhead):
    from pollinate.methods.fedpipe.calibration import fitted_step

    rate, overhead = fitted_step((1.0, 1.0), (4.0, large_seconds))
    assert overhead == pytest.approx(expected_overhead) and rate > 0
    if overhead == 0:
        assert rate == pytest.approx((1.0 + large_seconds) / 5.0)
    assert fitted_step((2.0, 1.0), None) == (0.5, 0.0)


# ------------------------------------------------------------------------------------------ each round's check
def _planned(tmp_path: Path, deadline: float = 10.0) -> FedPipe:
    """A tiny-llama FedPipe with client 0 planned on a profile slow enough that its steps take about 0.4 s."""
    cfg = build_config(None, [*TINY, f"federation.deadline_s={deadline}", "fedpipe.bits=[32]",
                              "fedpipe.batch_sizes=[2]"])
    strategy = FedPipe(cfg, RunRecorder(tmp_path, {"rounds_planned": 3}, quiet=True), tmp_path)
    importance = {name: 1.0 for name in strategy.shapes}
    fast = ResourceProfile(memory_gib=4.0, compute_tflops=1.0, uplink_mbps=1e4, downlink_mbps=1e4, name="edge")
    step = plan_clients([fast], importance, strategy.spec, strategy.book.options, [0])[0]
    slow = replace(fast, compute_tflops=step.est_compute_s / step.local_steps / 0.4)
    strategy.importance = importance
    strategy.book.plan_new([PrepareReply(0, importance, 10, slow, (20, 40, 64), None)], importance, 0)
    strategy.node_client = {50: 0}
    return strategy


def _trained(strategy: FedPipe, compute_seconds: float) -> dict:
    """What the strategy records of client 0's training reply with this measured compute."""
    content = RecordDict({"metrics": MetricRecord({"client_id": 0, "num-examples": 10, "train_loss": 1.0,
                                                   "compute_seconds": compute_seconds}),
                          "profile": ConfigRecord(strategy.book.profiles[0].to_dict())})
    return strategy.client_record(0, content, 1000, 1000)


class Nodes:
    def get_node_ids(self):
        return [50]


def _events(strategy: FedPipe, kind: str) -> list[dict]:
    lines = (strategy.run_dir / "metrics.jsonl").read_text().splitlines()
    return [event for event in map(json.loads, lines) if event["type"] == kind]


def test_client_records_carry_the_estimated_next_to_the_measured_compute(tmp_path):
    strategy = _planned(tmp_path)
    record = _trained(strategy, 3.0)
    assert record["estimated_compute_seconds"] == round(strategy.plans[0].est_compute_s, 3) > 0
    assert strategy.book.timings[0]["compute_seconds"] == 3.0  # kept for the next round's check


def test_a_client_over_the_deadline_is_re_planned_smaller_and_starts_from_a_full_download(tmp_path):
    strategy = _planned(tmp_path)
    before = strategy.plans[0]
    assert before.est_compute_s <= 0.8 * strategy.cfg.federation.deadline_s
    strategy.held[0], strategy.held_version[0] = {}, 3
    _trained(strategy, 1.5 * strategy.cfg.federation.deadline_s)
    strategy.begin_round(Nodes(), 2)
    after = strategy.plans[0]
    assert after.local_steps * after.batch_size < before.local_steps * before.batch_size or after.ranks != before.ranks
    ratio = 1.5 * strategy.cfg.federation.deadline_s / before.est_compute_s
    assert strategy.book.workloads[0].time_factor(32) == pytest.approx(ratio)
    assert after.est_compute_s + after.est_comm_s <= strategy.cfg.federation.deadline_s
    (event,) = _events(strategy, "replan")
    assert event["round"] == 2 and event["client_id"] == 0 and "over the 10 s deadline" in event["reason"]
    assert event["after"]["local_steps"] == after.local_steps and _events(strategy, "plans")[-1]["round"] == 2
    if after.ranks != before.ranks:
        assert 0 not in strategy.held


def test_a_round_so_slow_that_no_plan_fits_keeps_the_client_and_its_plan(tmp_path):
    strategy = _planned(tmp_path)
    before, workload = strategy.plans[0], strategy.book.workloads[0]
    _trained(strategy, 1000 * strategy.cfg.federation.deadline_s)  # one throttled round: 1000x the deadline
    strategy.begin_round(Nodes(), 2)
    assert strategy.plans[0] is before and strategy.book.workloads[0] == workload  # not dropped for the run
    assert not strategy.recorder.rejected
    (event,) = _events(strategy, "replan")
    assert "no plan fits at that speed" in event["reason"] and "keeps its plan" in event["reason"]
    assert event["after"] == event["before"]
    _trained(strategy, before.est_compute_s)  # the next round is on plan again: nothing to re-plan
    strategy.begin_round(Nodes(), 3)
    assert strategy.plans[0] is before and len(_events(strategy, "replan")) == 1


def test_a_client_within_15_percent_keeps_its_plan(tmp_path):
    strategy = _planned(tmp_path)
    before = strategy.plans[0]
    _trained(strategy, 1.1 * before.est_compute_s)
    strategy.begin_round(Nodes(), 2)
    assert strategy.plans[0] is before and not _events(strategy, "replan")


def test_compute_well_under_the_estimate_is_recalibrated_too_and_replan_off_keeps_every_plan(tmp_path):
    strategy = _planned(tmp_path / "on")
    before = strategy.plans[0]
    _trained(strategy, 0.5 * before.est_compute_s)
    strategy.begin_round(Nodes(), 2)
    (event,) = _events(strategy, "replan")
    assert "0.50x the estimated" in event["reason"] and strategy.plans[0].local_steps >= before.local_steps
    assert strategy.book.workloads[0].time_factor(32) == pytest.approx(0.5**0.5, rel=1e-3)  # fast: grown halfway
    off = _planned(tmp_path / "off")
    off.cfg.fedpipe.replan = False
    kept = off.plans[0]
    _trained(off, 3 * off.cfg.federation.deadline_s)
    off.begin_round(Nodes(), 2)
    assert off.plans[0] is kept and not _events(off, "replan")


def test_the_bench_shows_measured_over_estimated_compute_of_planned_runs():
    def client(measured):
        return {"compute_seconds": measured, "estimated_compute_seconds": 1.0}

    rounds = [{"round": 1, "clients": [client(2.0), client(1.0)]},
              {"round": 2, "clients": [client(1.1), client(0.95)]}]
    stats = compute_estimate(rounds)
    assert stats["client_rounds"] == 4 and stats["within_15"] == 0.75 and stats["within_15_from_round_2"] == 1.0
    assert stats["worst_gap"] == pytest.approx(1.0) and compute_estimate([{"round": 1, "clients": [{}]}]) is None
    table = estimate_table([{"method": "fedavg-lora", "compute_estimate": None},
                            {"method": "fedpipe", "compute_estimate": stats}])
    assert table[-1] == "| fedpipe | 4 | 0.75 | 1.00 | 1.00 | 1.26 |" and not estimate_table([])


@pytest.mark.slow
def test_simulated_tiers_run_records_estimates_beside_measured_compute(tmp_path):
    out = tmp_path / "fp"
    cmd = [sys.executable, "-m", "pollinate.cli", "simulate", "--method", "fedpipe", "--model", "tiny-llama",
           "--clients", "3", "--rounds", "2", "--scenario", "tiers", "--out", str(out), "--quiet"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=os.environ.copy())
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    clients = [c for r in report["rounds"] for c in r["clients"]]
    assert len(report["rounds"]) == 2 and {c["profile"] for c in clients} == {"strong", "medium", "weak"}
    assert all(c["estimated_compute_seconds"] > 0 and c["compute_seconds"] >= 0 for c in clients)
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(e["type"] == "plans" and e["round"] == 0 and len(e["plans"]) == 3 for e in events)
