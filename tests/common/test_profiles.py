"""Resource profiles: validation, TOML loading, measurement, scenarios, communication time."""

import time
from collections import Counter

import pytest

from pollinate.common import profiles as profiles_mod
from pollinate.common.profiles import (
    SCENARIOS,
    TIER_PROFILES,
    ResourceProfile,
    assign_profiles,
    comm_seconds,
    load_profile,
    measure_compute,
)


def _profile(**overrides):
    values = {"memory_gib": 2.0, "compute_tflops": 0.1, "uplink_mbps": 10.0, "downlink_mbps": 50.0}
    values.update(overrides)
    return ResourceProfile(**values)


def test_profile_rejects_non_positive_field_naming_field_and_value():
    with pytest.raises(ValueError, match=r"profile field 'uplink_mbps' must be > 0, got -5"):
        _profile(uplink_mbps=-5)
    with pytest.raises(ValueError, match=r"'memory_gib' must be > 0, got 0"):
        _profile(memory_gib=0)
    with pytest.raises(ValueError, match=r"'compute_tflops' must be > 0, got nan"):
        _profile(compute_tflops=float("nan"))


def test_profile_rejects_non_numbers():
    with pytest.raises(TypeError, match=r"'downlink_mbps' must be a number, got '10'"):
        _profile(downlink_mbps="10")
    with pytest.raises(TypeError, match=r"'memory_gib' must be a number, got True"):
        _profile(memory_gib=True)


def test_load_profile_reads_top_level_keys_and_defaults_name_to_stem(tmp_path):
    path = tmp_path / "edge-a.toml"
    path.write_text("memory_gib = 1.5\ncompute_tflops = 0.05\nuplink_mbps = 4\ndownlink_mbps = 20\n")
    assert load_profile(path) == ResourceProfile(1.5, 0.05, 4, 20, name="edge-a")


def test_load_profile_reads_a_profile_table(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('[profile]\nname = "phone"\nmemory_gib = 1\ncompute_tflops = 0.02\n'
                    "uplink_mbps = 2\ndownlink_mbps = 10\n")
    assert load_profile(path).name == "phone"
    assert load_profile(path).memory_gib == 1


def test_load_profile_missing_field_names_field_and_file(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text("memory_gib = 1\ncompute_tflops = 0.02\nuplink_mbps = 2\n")
    with pytest.raises(ValueError, match=r"p\.toml.*missing field\(s\) \['downlink_mbps'\]"):
        load_profile(path)


def test_load_profile_negative_field_names_field_and_file(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text("memory_gib = 1\ncompute_tflops = 0.02\nuplink_mbps = -5\ndownlink_mbps = 10\n")
    with pytest.raises(ValueError, match=r"p\.toml.*'uplink_mbps' must be > 0, got -5"):
        load_profile(path)


def test_load_profile_unknown_key_lists_allowed_keys(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text("memory_gib = 1\ncompute_tflops = 0.02\nuplink_mbps = 2\ndownlink_mbps = 10\ngpu = 1\n")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['gpu'\]; allowed keys: \['memory_gib'"):
        load_profile(path)


def test_load_profile_measures_compute_on_request(tmp_path, monkeypatch):
    monkeypatch.setattr(profiles_mod, "measure_compute", lambda: 0.123)
    path = tmp_path / "p.toml"
    path.write_text('memory_gib = 1\ncompute_tflops = "measure"\nuplink_mbps = 2\ndownlink_mbps = 10\n')
    assert load_profile(path).compute_tflops == 0.123


def test_measure_compute_is_positive_and_under_a_second():
    import torch  # noqa: F401  -- the budget is for the benchmark, not for importing torch

    start = time.perf_counter()
    tflops = measure_compute()
    assert time.perf_counter() - start < 1.0
    # A 2-core CPU does ~0.1 TFLOP/s; anything outside this range means the FLOP count is wrong.
    assert 1e-3 < tflops < 1e3


def test_comm_seconds_counts_megabits_both_ways():
    profile = _profile(uplink_mbps=8.0, downlink_mbps=80.0)
    assert comm_seconds(1_000_000, 0, profile) == pytest.approx(1.0)
    assert comm_seconds(0, 1_000_000, profile) == pytest.approx(0.1)
    assert comm_seconds(1_000_000, 1_000_000, profile) == pytest.approx(1.1)
    with pytest.raises(ValueError, match="byte counts must be >= 0"):
        comm_seconds(-1, 0, profile)


def test_uniform_scenario_gives_equal_profiles():
    profiles = assign_profiles("uniform", 5, seed=1)
    assert len(profiles) == 5 and len(set(profiles)) == 1


@pytest.mark.parametrize("num_clients", [3, 4, 7, 10])
def test_tiers_scenario_has_every_tier_balanced(num_clients):
    names = Counter(p.name for p in assign_profiles("tiers", num_clients, seed=3))
    assert set(names) == {"strong", "medium", "weak"}
    assert max(names.values()) - min(names.values()) <= 1


def test_tiers_scenario_is_deterministic_in_seed():
    assert assign_profiles("tiers", 30, seed=5) == assign_profiles("tiers", 30, seed=5)
    assert assign_profiles("tiers", 30, seed=5) != assign_profiles("tiers", 30, seed=6)


def test_tiers_differ_by_several_times_in_every_resource():
    strong, weak = TIER_PROFILES["strong"], TIER_PROFILES["weak"]
    for field in ("memory_gib", "compute_tflops", "uplink_mbps", "downlink_mbps"):
        assert getattr(strong, field) >= 4 * getattr(weak, field), field


def test_mixed_scenario_stays_between_weak_and_strong_and_is_distinct():
    profiles = assign_profiles("mixed", 50, seed=0)
    assert len({(p.memory_gib, p.compute_tflops) for p in profiles}) == 50
    for field in ("memory_gib", "compute_tflops", "uplink_mbps", "downlink_mbps"):
        lo, hi = getattr(TIER_PROFILES["weak"], field), getattr(TIER_PROFILES["strong"], field)
        assert all(lo <= getattr(p, field) <= hi for p in profiles)


def test_assign_profiles_rejects_unknown_scenario_and_bad_count():
    with pytest.raises(ValueError, match=r"unknown profile scenario 'phones'; expected one of"):
        assign_profiles("phones", 3, seed=0)
    with pytest.raises(ValueError, match="num_clients must be an integer >= 1, got 0"):
        assign_profiles("tiers", 0, seed=0)
    assert set(SCENARIOS) >= {"uniform", "tiers"}
