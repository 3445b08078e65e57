"""The fuzzers of ``pollinate.simulations.fuzz`` on a few hundred cases (issue 11's fuzzing figure at small
scale): every fuzzed update reply and split-service request is accepted and valid, or rejected cleanly. Each
fuzzer also reports a validation bug planted on purpose, so a clean count means the checks held."""

import grpc
import numpy as np
import pytest
import torch

from pollinate.common.checks import UpdateRejected
from pollinate.methods.sfprompt.service import SplitBodyService, SplitRejected
from pollinate.methods.sfprompt.split import TensorDecodeError, decode_tensor
from pollinate.simulations.fuzz import bundles
from pollinate.simulations.fuzz.bundles import CodecTarget
from pollinate.simulations.fuzz.mutations import Mutator
from pollinate.simulations.fuzz.rounds import DenseRound, flower_task_identity
from pollinate.simulations.fuzz.split import fuzz_split
from pollinate.simulations.fuzz.tally import Tally
from pollinate.simulations.fuzz.updates import fuzz_updates

FAILURES = ("crash", "hang", "bad-accept")


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def failures(tally: Tally) -> dict[str, int]:
    return {outcome: tally.counts[outcome] for outcome in FAILURES}


def test_fuzzed_update_replies_are_accepted_and_valid_or_rejected(tmp_path):
    tallies = fuzz_updates(200, seed=0, timeout_s=5.0, run_dir=tmp_path)
    assert [t.target for t in tallies] == ["codec", "fedpipe-round", "dense-round"]
    assert sum(sum(t.counts.values()) for t in tallies) == 200
    for tally in tallies:
        assert failures(tally) == dict.fromkeys(FAILURES, 0), tally.findings
        assert tally.counts["accepted"] and tally.counts["rejected"]  # both paths were exercised
        assert not tally.notes, tally.notes  # no honest peer was rejected because of the attacker


def test_fuzzed_split_requests_get_a_clean_status_or_a_valid_answer():
    tally, memory = fuzz_split(200, seed=0, timeout_s=5.0, max_request_bytes=1 << 20)
    assert sum(tally.counts.values()) == 200
    assert failures(tally) == dict.fromkeys(FAILURES, 0), tally.findings
    assert tally.counts["accepted"] and tally.counts["rejected"]
    assert memory["serves_a_valid_step_after"]
    assert memory["sessions_left"] == 0 and memory["graph_bytes_left"] == 0


def run_cases(target, cases: int, target_number: int) -> Tally:
    tally = Tally("planted")
    for index in range(cases):
        mutator = Mutator(np.random.default_rng([0, target_number, index]), max_bytes=1 << 20)
        tally.run(5.0, lambda m=mutator: target.case(m), target.repro)
    return tally


def test_a_decoder_leaking_a_plain_error_is_reported_as_a_crash(monkeypatch):
    real = bundles.decode_bundle

    def leaky(payload, **kwargs):
        try:
            return real(payload, **kwargs)
        except UpdateRejected as exc:
            if exc.reason == "garbled":
                raise ValueError("not a bundle") from exc
            raise

    monkeypatch.setattr(bundles, "decode_bundle", leaky)
    target = CodecTarget({"w": (4, 8)}, max_update_bytes=1 << 20, norm_bound=1e4)
    tally = run_cases(target, 100, 0)
    assert tally.counts["crash"] > 0
    assert all(f["reason"].startswith("ValueError: not a bundle") and "payload_hex" in f for f in tally.findings)


@pytest.mark.filterwarnings("ignore::numpy.exceptions.ComplexWarning")  # complex updates get through on purpose
def test_a_dense_check_without_its_dtype_check_is_reported_as_bad_accepts(tmp_path, monkeypatch):
    def without_dtype(arrays, expected, norm_bound=None):
        if set(arrays) != set(expected) or any(a.shape != tuple(expected[k]) for k, a in arrays.items()):
            raise UpdateRejected("names or shapes")

    monkeypatch.setattr("pollinate.server.state_fedavg.check_arrays", without_dtype)
    with flower_task_identity():
        tally = run_cases(DenseRound(tmp_path), 50, 2)
    assert tally.counts["bad-accept"] > 0
    assert any("expected float32" in f["reason"] for f in tally.findings)


def test_a_split_service_admitting_nan_is_reported_as_bad_accepts(monkeypatch):
    def without_finite_check(self, message, name):
        try:
            return decode_tensor(message, name=name)
        except TensorDecodeError as exc:
            raise SplitRejected(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None

    monkeypatch.setattr(SplitBodyService, "_decode", without_finite_check)
    tally, _ = fuzz_split(100, seed=0, timeout_s=5.0, max_request_bytes=1 << 20)
    assert tally.counts["bad-accept"] > 0
    assert all("not finite" in f["reason"] for f in tally.findings if f["outcome"] == "bad-accept")
