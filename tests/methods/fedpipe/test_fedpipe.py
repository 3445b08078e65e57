"""FedPipe: exact downlink/uplink bookkeeping, reply validation, and an end-to-end run with per-client plans."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, MetricRecord, RecordDict

from pollinate.common.config_io import build_config
from pollinate.common.report import RunRecorder
from pollinate.common.wire import bytes_to_record
from pollinate.methods.fedpipe.client import apply_downlink
from pollinate.methods.fedpipe.codec import encode_bundle
from pollinate.methods.fedpipe.lowrank import LoraFactors
from pollinate.methods.fedpipe.planner import ClientPlan
from pollinate.methods.fedpipe.server import FedPipe, factors_for_client, lora_keys
from pollinate.server.strategy import UpdateRejected

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
    strategy.check_reply(1, _reply(strategy, good))  # a valid update passes
    with pytest.raises(UpdateRejected, match=message):
        strategy.check_reply(1, _reply(strategy, mutate(good)))


def test_truncated_payload_is_rejected(strategy):
    strategy._encode_downlink(0, {lora_keys(MODULE)[0]: np.zeros((4, 64), np.float32),
                                  lora_keys(MODULE)[1]: np.zeros((64, 4), np.float32)})
    payload = encode_bundle({lora_keys(MODULE)[0]: np.ones((4, 64), np.float32),
                             lora_keys(MODULE)[1]: np.ones((64, 4), np.float32)}, "nf4",
                            base_version=strategy.held_version[0])
    reply = RecordDict({"arrays": bytes_to_record(payload[: len(payload) // 2]),
                        "metrics": MetricRecord({"client_id": 0, "num-examples": 10})})
    with pytest.raises(UpdateRejected):
        strategy.check_reply(1, reply)


@pytest.mark.slow
def test_simulate_fedpipe_plans_differ_per_client_tier(tmp_path):
    out = tmp_path / "fp"
    cmd = [sys.executable, "-m", "pollinate.cli", "simulate", "--method", "fedpipe", "--model", "tiny-llama",
           "--clients", "3", "--rounds", "2", "--scenario", "tiers", "--out", str(out), "--quiet",
           "--set", "federation.deadline_s=0.1", "--set", "fedpipe.bits=[32, 8]"]
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
