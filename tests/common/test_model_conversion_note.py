"""The SmolLM2 preset's one-time conversion says so before it starts (it takes a while), once, and not when quiet."""

import json

import pytest

import pollinate.common.models as models


@pytest.fixture
def fake_conversion(tmp_path, monkeypatch):
    """A cache in tmp_path and a builder that writes a config.json instead of converting the GGUF."""
    monkeypatch.setenv("POLLINATE_CACHE", str(tmp_path))
    built = []

    def build(dst):
        built.append(dst)
        (dst / "config.json").write_text(json.dumps({"model_type": "llama"}))

    monkeypatch.setattr(models, "_build_smollm2", build)
    return built


def test_converting_the_preset_prints_one_line_first_and_only_the_first_time(fake_conversion, capsys):
    info = models.resolve_model("smollm2-135m")
    err = capsys.readouterr().err
    assert len(fake_conversion) == 1 and info.family == "llama"
    assert err.strip() == f"converting SmolLM2-135M-Instruct from its GGUF into {info.path} (once)..."
    models.resolve_model("smollm2-135m")  # cached now: nothing to convert, nothing to say
    assert len(fake_conversion) == 1 and capsys.readouterr().err == ""


def test_quiet_conversion_prints_nothing(fake_conversion, capsys):
    models.resolve_model("smollm2-135m", quiet=True)
    assert len(fake_conversion) == 1 and capsys.readouterr().err == ""
