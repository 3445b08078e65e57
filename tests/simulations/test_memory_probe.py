"""memory_probe: one JSON line with the training high-water mark, the resident set after build and step time."""

import json

import pytest

from pollinate.simulations import memory_probe

TINY = ["--model", "tiny-llama", "--batch-size", "1", "--seq-len", "16", "--steps", "2", "--threads", "1"]


@pytest.fixture(autouse=True)
def on_cpu(monkeypatch):
    monkeypatch.setenv("POLLINATE_DEVICE", "cpu")


@pytest.mark.parametrize("bits", [32, 4])
def test_probe_prints_one_json_line_with_peak_resident_and_step_time(capsys, bits):
    memory_probe.main([*TINY, "--bits", str(bits), "--rank", "2", "--targets", "q_proj,v_proj"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert result["bits"] == bits and result["targets"] == ["q_proj", "v_proj"] and result["threads"] == 1
    assert result["peak_bytes"] >= result["resident_bytes"] > 0
    assert result["step_seconds"] > 0
    assert result["train_peak_rss_mib"] == pytest.approx(result["peak_bytes"] / 2**20, abs=0.1)


def test_high_water_mark_reset_forgets_earlier_memory():
    held = bytearray(64 * 2**20)  # touched: counted in the RSS
    for i in range(0, len(held), 4096):
        held[i] = 1
    del held
    memory_probe.release_freed_memory()
    before = memory_probe._status_bytes("VmHWM")
    memory_probe.reset_high_water_mark()
    assert memory_probe._status_bytes("VmHWM") <= before - 32 * 2**20


def test_probe_rejects_a_zero_batch():
    with pytest.raises(SystemExit):
        memory_probe.parse_args(["--batch-size", "0"])
