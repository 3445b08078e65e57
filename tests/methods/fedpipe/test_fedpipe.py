"""FedPipe: exact downlink/uplink bookkeeping, reply validation, and an end-to-end run with per-client plans."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from pollinate.common.config_io import build_config
from pollinate.common.profiles import TIER_PROFILES
from pollinate.common.report import RunRecorder
from pollinate.common.wire import bytes_to_record
from pollinate.methods.fedpipe import update_space
from pollinate.methods.fedpipe.client import apply_downlink
from pollinate.methods.fedpipe.codec import encode_bundle
from pollinate.methods.fedpipe.lowrank import LoraFactors
from pollinate.methods.fedpipe.planner import ClientPlan
from pollinate.methods.fedpipe.server import FedPipe, factors_for_client, lora_keys
from pollinate.server.strategy import Reply, UpdateRejected

ROOT = Path(__file__).resolve().parents[3]
MODULE = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def strategy(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("fedpipe")
    cfg = build_config(None, ['model.name="tiny-llama"', "method=\"fedpipe\"", "federation.clients=2"])
    fedpipe = FedPipe(cfg, RunRecorder(run_dir, {"rounds_planned": 1}, quiet=True), run_dir)
    fedpipe.plans = {0: ClientPlan("0", {MODULE: 4}, 2, 32, 1.0, 1.0, 1.0, 1.0)}
    return fedpipe


def _context() -> Context:
    return Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})


def test_client_and_server_agree_exactly_on_held_factors_over_lossy_deltas(strategy):
    context = _context()
    rng = np.random.default_rng(0)
    for _ in range(3):  # first full, then deltas against the version held
        target = {k: rng.normal(size=s).astype(np.float32)
                  for k, s in zip(lora_keys(MODULE), [(4, 64), (64, 4)], strict=True)}
        payload = strategy._encode_downlink(0, target)
        client_view = apply_downlink(context, payload, {k: v.shape for k, v in target.items()})
        for key in target:
            np.testing.assert_array_equal(client_view[key], strategy.held[0][key])
            assert np.abs(client_view[key] - target[key]).mean() < 0.15  # nf4 error, not garbage


def test_fresh_and_padded_factors_keep_delta_and_can_learn():
    rng = np.random.default_rng(1)
    rank1 = LoraFactors(a=rng.normal(size=(1, 16)), b=rng.normal(size=(8, 1)), alpha=1.0)
    factors = factors_for_client(rank1, "m", 4, (8, 16), seed=0)
    np.testing.assert_allclose(factors.delta(), rank1.delta(), rtol=1e-5, atol=1e-6)
    assert np.all(np.linalg.norm(factors.a, axis=1) > 0)  # padded rows got a fresh A: gradients can flow
    fresh = factors_for_client(None, "m", 4, (8, 16), seed=0)
    assert np.all(fresh.b == 0) and np.linalg.norm(fresh.a) > 0


def _reply(strategy, tensors, client=0, **encode_kwargs) -> RecordDict:
    payload = encode_bundle(tensors, "dense-fp32", base_version=strategy.held_version[client], **encode_kwargs)
    return RecordDict({"arrays": bytes_to_record(payload),
                       "metrics": MetricRecord({"client_id": client, "num-examples": 10})})


@pytest.mark.parametrize("mutate, message", [
    (lambda t: {**t, lora_keys(MODULE)[0]: np.zeros((8, 64), np.float32)}, r"shape \(8, 64\), expected \(4, 64\)"),
    (lambda t: {**t, "base_model.model.extra.lora_A.weight": np.zeros((4, 64), np.float32)}, "unknown"),
    (lambda t: {k: v * 1e7 for k, v in t.items()}, "exceeds the bound"),
])
def test_bad_updates_are_rejected_with_specific_messages(strategy, mutate, message):
    strategy._encode_downlink(0, {lora_keys(MODULE)[0]: np.zeros((4, 64), np.float32),
                                  lora_keys(MODULE)[1]: np.zeros((64, 4), np.float32)})
    good = {lora_keys(MODULE)[0]: np.full((4, 64), 0.01, np.float32),
            lora_keys(MODULE)[1]: np.full((64, 4), 0.01, np.float32)}
    strategy.decode_reply(1, 0, _reply(strategy, good))  # a valid update passes
    with pytest.raises(UpdateRejected, match=message):
        strategy.decode_reply(1, 0, _reply(strategy, mutate(good)))


def test_truncated_payload_is_rejected(strategy):
    strategy._encode_downlink(0, {lora_keys(MODULE)[0]: np.zeros((4, 64), np.float32),
                                  lora_keys(MODULE)[1]: np.zeros((64, 4), np.float32)})
    payload = encode_bundle({lora_keys(MODULE)[0]: np.ones((4, 64), np.float32),
                             lora_keys(MODULE)[1]: np.ones((64, 4), np.float32)}, "nf4",
                            base_version=strategy.held_version[0])
    reply = RecordDict({"arrays": bytes_to_record(payload[: len(payload) // 2]),
                        "metrics": MetricRecord({"client_id": 0, "num-examples": 10})})
    with pytest.raises(UpdateRejected):
        strategy.decode_reply(1, 0, reply)


@pytest.mark.slow
def test_simulate_fedpipe_plans_differ_per_client_tier(tmp_path):
    out = tmp_path / "fp"
    cmd = [sys.executable, "-m", "pollinate.cli", "simulate", "--method", "fedpipe", "--model", "tiny-llama",
           "--clients", "3", "--rounds", "2", "--scenario", "tiers", "--out", str(out), "--quiet",
           "--set", "federation.deadline_s=0.1", "--set", "fedpipe.bits=[32, 8]",
           # plans by the FLOPs model alone: measured, this deadline would leave the slower tiers out
           "--set", "fedpipe.measure_step=false", "--set", "fedpipe.replan=false"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=os.environ.copy())
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    clients = report["rounds"][0]["clients"]
    assert {c["profile"] for c in clients} == {"strong", "medium", "weak"}
    plans = {c["profile"]: c["plan"] for c in clients}
    assert plans["strong"]["ranks"] != plans["weak"]["ranks"] or plans["strong"]["modules"] != plans["weak"]["modules"]
    assert report["rounds"][-1]["eval_loss"] < report["initial_eval"]["eval_loss"]
    assert all("met_deadline" in c and "compute_seconds" in c for c in clients)
    assert Path(report["adapter_dir"], "adapter_config.json").is_file()
    total = report["totals"]["bytes_up"] + report["totals"]["bytes_down"]
    assert total == sum(r["bytes_up"] + r["bytes_down"] for r in report["rounds"])


# --------------------------------------------------------------------------------------------- update space
def test_norms_and_distances_from_factors_equal_the_dense_ones():
    rng = np.random.default_rng(2)

    def change(rank: int) -> tuple[LoraFactors, LoraFactors]:
        start = LoraFactors(a=rng.normal(size=(rank, 12)), b=rng.normal(size=(9, rank)), alpha=2.0 * rank)
        trained = LoraFactors(a=start.a + rng.normal(size=start.a.shape), b=start.b + rng.normal(size=start.b.shape),
                              alpha=2.0 * rank)
        return start, trained

    changes = [{"m": change(r), "n": change(2)} for r in (1, 3)] + [{"m": change(4)}]
    dense = [{m: t.delta() - s.delta() for m, (s, t) in c.items()} for c in changes]
    pairs = [{m: update_space.factor_pair(*c) for m, c in client.items()} for client in changes]
    for client_pairs, client_dense in zip(pairs, dense, strict=True):
        expected = np.sqrt(sum(np.sum(d ** 2) for d in client_dense.values()))
        assert update_space.update_norm(client_pairs) == pytest.approx(expected, rel=1e-10)
    embedded = [e["x"] for e in update_space.distance_embedding(pairs)]
    for i in range(3):
        for j in range(3):
            gap = sum(np.sum((dense[i].get(m, 0) - dense[j].get(m, 0)) ** 2) for m in ("m", "n"))
            assert np.sum((embedded[i] - embedded[j]) ** 2) == pytest.approx(gap, rel=1e-8, abs=1e-8)


def _fedpipe(tmp_path, *overrides: str) -> FedPipe:
    cfg = build_config(None, ['model.name="tiny-llama"', 'method="fedpipe"', "federation.clients=3", *overrides])
    return FedPipe(cfg, RunRecorder(tmp_path, {"rounds_planned": 1}, quiet=True), tmp_path)


def _planned_replies(strategy: FedPipe, shifts: list[float]) -> list[Reply]:
    """Clients 0.. planned on MODULE at rank 4, all sent the same start, each trained to B = its shift."""
    replies = []
    key_a, key_b = lora_keys(MODULE)
    start = {key_a: np.random.default_rng(3).normal(size=(4, 64)).astype(np.float32),
             key_b: np.zeros((64, 4), np.float32)}
    for client, shift in enumerate(shifts):
        strategy.plans[client] = ClientPlan(str(client), {MODULE: 4}, 2, 32, 1.0, 1.0, 1.0, 1.0)
        strategy.round_starts[client] = start
        trained = {key_a: start[key_a], key_b: np.full((64, 4), shift, np.float32)}
        replies.append(Reply(client, client, 10, RecordDict(), trained, strategy.update_norm(client, trained)))
    return replies


@pytest.mark.parametrize("aggregator", ["median", "trimmed-mean", "multi-krum"])
def test_robust_aggregators_in_delta_w_space_agree_with_fedavg_on_equal_honest_clients(tmp_path, aggregator):
    """Three equally weighted clients with one same update: every aggregator returns that update."""
    fedavg = _fedpipe(tmp_path / "a", "federation.byzantine_clients=0")
    robust = _fedpipe(tmp_path / "b", f"federation.aggregator='{aggregator}'", "federation.byzantine_clients=0")
    expected = fedavg.global_factors(fedavg.aggregate(1, _planned_replies(fedavg, [0.01] * 3)))[MODULE]
    got = robust.global_factors(robust.aggregate(1, _planned_replies(robust, [0.01] * 3)))[MODULE]
    np.testing.assert_allclose(got.delta(), expected.delta(), atol=1e-5)


def test_krum_leaves_out_the_client_far_from_the_others(tmp_path):
    strategy = _fedpipe(tmp_path, "federation.clients=5", "federation.aggregator='krum'",
                        "federation.byzantine_clients=1")
    replies = _planned_replies(strategy, [0.01, 0.011, 0.012, 0.013, 50.0])
    assert replies[4].norm > 1000 * replies[0].norm
    chosen = strategy.global_factors(strategy.aggregate(1, replies))[MODULE].delta()
    assert np.abs(chosen).max() < 1.0  # one honest client's update, not the attacker's


def test_two_nodes_claiming_one_client_in_round_0_leave_the_second_refused(tmp_path, monkeypatch):
    for name, value in (("_run_id", 1), ("_node_id", 1), ("_task_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)
    strategy = _fedpipe(tmp_path)
    profile = ConfigRecord(TIER_PROFILES["strong"].to_dict())

    class Grid:
        def get_node_ids(self):
            return [21, 22, 23]

        def send_and_receive(self, messages, timeout):
            replies = []
            for message, claimed in zip(messages, [0, 1, 0], strict=True):
                message.metadata.__dict__["_message_id"] = f"m{claimed}-{message.metadata.dst_node_id}"
                content = RecordDict({"scores": MetricRecord({MODULE: 1.0}), "profile": profile,
                                      "metrics": MetricRecord({"client_id": claimed, "num-examples": 10}),
                                      "tokens": MetricRecord({"quantiles": [4, 8, 16]})})
                replies.append(Message(content, reply_to=message))
            return replies

    strategy.prepare(Grid())
    assert strategy.node_client == {21: 0, 22: 1} and set(strategy.plans) == {0, 1}
    (rejected,) = strategy.recorder.rejected
    assert rejected["client_id"] == "node-23" and "names client 0, which is node 21" in rejected["reason"]
