"""Faults on a real loopback deployment (pollinate.simulations.deploy_faults): 5 joined clients of which 2 are
SIGKILLed mid-round, and the tools the experiments rely on (killing a process tree, comparing tensors)."""

import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
from safetensors.numpy import save_file

from pollinate.simulations.deploy_faults import (
    FaultSetup,
    compare_tensors,
    crash_and_resume,
    kill_clients_mid_round,
    nothing_lost,
)
from pollinate.simulations.process_trees import kill_tree, process_tree


def test_kill_tree_kills_every_descendant_and_leaves_nothing_running():
    # A parent whose child forks a grandchild in a new session, as Flower's SuperNode detaches SuperExec.
    script = ("import subprocess, sys, time\n"
              "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], start_new_session=True)\n"
              "time.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, "-c",
                               f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {script!r}]); "
                               "time.sleep(60)"], start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while len(process_tree(parent.pid)) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        tree = process_tree(parent.pid)
        assert len(tree) == 3
        killed = kill_tree(parent.pid)
        assert killed == sorted(p.pid for p in tree)
        assert parent.poll() is not None  # reaped by kill_tree
        assert not [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    finally:
        if parent.poll() is None:
            kill_tree(parent.pid)


def test_compare_tensors_tells_bit_identical_from_the_smallest_difference(tmp_path):
    weights = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, dtype=np.float32)}
    save_file(weights, str(tmp_path / "x.safetensors"))
    save_file({k: v.copy() for k, v in weights.items()}, str(tmp_path / "y.safetensors"))
    nudged = {**weights, "b": np.nextafter(weights["b"], np.float32(2))}
    save_file(nudged, str(tmp_path / "z.safetensors"))
    same = compare_tensors(tmp_path / "x.safetensors", tmp_path / "y.safetensors")
    assert same == {"bit_identical": True, "max_abs_diff": 0.0, "tensors": 2, "differing": []}
    differ = compare_tensors(tmp_path / "x.safetensors", tmp_path / "z.safetensors")
    assert not differ["bit_identical"] and differ["differing"] == ["b"]
    assert differ["max_abs_diff"] == pytest.approx(float(np.spacing(np.float32(1))))


def test_nothing_lost_names_a_missing_round_checkpoint_or_adapter():
    whole = {"rounds": [{"round": 1}, {"round": 2}], "checkpoints": ["round-0001", "round-0002"], "adapter": True}
    assert all(nothing_lost(whole, 2).values())
    assert nothing_lost({**whole, "checkpoints": ["round-0001"]}, 2)["checkpoint_per_round"] is False
    assert nothing_lost({**whole, "rounds": [{"round": 1}]}, 2)["report_has_every_round"] is False
    assert nothing_lost({**whole, "adapter": False}, 2)["adapter_written"] is False


def test_fault_setup_refuses_what_cannot_be_run():
    with pytest.raises(ValueError, match="kill=5"):
        FaultSetup(clients=5, kill=5)
    with pytest.raises(ValueError, match="at_round=1"):
        FaultSetup(at_round=1)
    assert "federation.min_clients=3" in FaultSetup(clients=5, kill=2).run_options()


@pytest.mark.slow
def test_two_of_five_clients_killed_mid_round_are_dropped_and_the_run_loses_nothing(tmp_path):
    # 90 s: a healthy round of 5 clients takes up to ~60 s on the busy 2-core machine; the dead are found sooner.
    setup = FaultSetup(clients=5, rounds=3, kill=2, at_round=2, round_timeout_s=90)
    result = kill_clients_mid_round(setup, tmp_path)
    assert result["exit_code"] == 0, result.get("log_tail")
    # Each victim's whole tree went: `pollinate join`, its SuperNode, SuperExec and the round-2 ClientApp.
    assert sorted(result["killed_pids"]) == [3, 4]
    assert all(len(pids) >= 3 for pids in result["killed_pids"].values())
    rounds = {r["round"]: r for r in result["rounds"]}
    assert sorted(rounds) == [1, 2, 3]
    assert rounds[1]["clients"] == [0, 1, 2, 3, 4]
    assert rounds[2]["clients"] == [0, 1, 2] and rounds[2]["train_loss"] is not None
    assert rounds[3]["clients"] == [0, 1, 2]
    dropped = [d for d in result["dropped"] if d["round"] == 2]
    assert sorted(d["client_id"] for d in dropped) == [3, 4], result["dropped"]
    assert all("Node Unavailable" in d["reason"] or "dropped" in d["reason"] for d in dropped)
    assert result["checkpoints"] == ["round-0001", "round-0002", "round-0003"] and result["adapter"]
    assert all(result["checks"].values()), result["checks"]
    # Bounded: the round ends at Flower's heartbeat expiry (2 x 30 s) or the round timeout, whichever comes first.
    assert result["kill_to_round_recorded_s"] < setup.round_timeout_s + 30
    leftovers = [p for p in psutil.Process().children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE]
    assert leftovers == []


@pytest.mark.slow
def test_coordinator_killed_mid_round_and_resumed_ends_with_the_uninterrupted_adapter(tmp_path):
    # Smaller than the experiment's default (5 clients x 3 rounds) so that both runs fit in a few minutes.
    setup = FaultSetup(clients=2, rounds=2, kill=0, at_round=2, round_timeout_s=300)
    result = crash_and_resume(setup, tmp_path)
    assert result["exit_codes"] == [0, 0], result.get("log_tail")
    assert result["checkpoints_at_crash"] == ["round-0001"]  # round 2 was in flight, not recorded
    assert len(result["killed_pids"]) >= 4  # coordinator, SuperLink, gateway, flwr run, SuperExec, ServerApp
    resumed = result["resumed"]
    assert resumed["resumed_from"] == [1]
    assert [r["clients"] for r in resumed["rounds"]] == [[0, 1], [0, 1]]  # the clients rejoined on their own
    assert resumed["checkpoints"] == ["round-0001", "round-0002"] and resumed["adapter"]
    assert result["adapter"]["bit_identical"], result["adapter"]
    assert [d["bit_identical"] for d in result["global_per_round"].values()] == [True, True]
    assert [r["eval_loss"] for r in resumed["rounds"]] == [r["eval_loss"] for r in result["uninterrupted"]["rounds"]]
    leftovers = [p for p in psutil.Process().children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE]
    assert leftovers == []
