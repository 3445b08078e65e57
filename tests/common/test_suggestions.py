"""Misspelled names get a "did you mean" (difflib): config keys, enum values, methods, presets, data fields."""

from __future__ import annotations

import json

import pytest

from pollinate.common.config import ConfigError, DataConfig
from pollinate.common.config_io import build_config
from pollinate.common.data import DataError, load_task
from pollinate.common.models import ModelError, resolve_model
from pollinate.common.suggest import closest, did_you_mean


def test_closest_and_its_message():
    assert closest("rouns", ["rounds", "clients"]) == "rounds"
    assert closest("zzz", ["rounds", "clients"]) is None
    assert did_you_mean("r", ["r", "alpha"], "lora.") == " (did you mean 'lora.r'?)"
    assert did_you_mean("zzz", ["rounds"]) == ""


@pytest.mark.parametrize(("override", "suggestion"), [
    ("federation.round=3", "'federation.rounds'"),
    ("lora.rank=4", None),  # nothing close: the allowed list is still there
    ("fedpip.ranks=[2]", "'fedpipe'"),
    ("methd='fedpipe'", "'method'"),
    ("fedration.rounds=2", "'federation'"),
    ("fedpipe.rank=[2]", "'fedpipe.ranks'"),
])
def test_unknown_config_keys_suggest_the_closest(override, suggestion):
    with pytest.raises(ConfigError) as caught:
        build_config(None, [override])
    message = str(caught.value)
    assert "allowed:" in message and "\n" not in message
    if suggestion:
        assert f"(did you mean {suggestion}?)" in message
    else:
        assert "did you mean" not in message


def test_enum_values_and_methods_suggest_the_closest():
    with pytest.raises(ConfigError, match="did you mean 'fedpipe'"):
        build_config(None, ['method="fedpip"'])
    with pytest.raises(ConfigError, match="did you mean 'dirichlet'"):
        build_config(None, ['data.partition="dirichlett"'])


def test_a_misspelled_preset_suggests_the_preset():
    with pytest.raises(ModelError, match="did you mean 'smollm2-135m'"):
        resolve_model("smolm2-135m")


def test_a_missing_data_field_shows_the_set_flag_that_fixes_it(tmp_path):
    close = tmp_path / "close.jsonl"
    close.write_text(json.dumps({"Prompt": "q", "answer": "a"}) + "\n")
    with pytest.raises(DataError, match=r"use --set data.prompt_field=Prompt$"):
        load_task(DataConfig(source=str(close), partition="iid"), "generation", 0)
    far = tmp_path / "far.jsonl"
    far.write_text(json.dumps({"instruction": "q", "output": "a"}) + "\n")
    with pytest.raises(DataError, match=r"its fields are \['instruction', 'output'\]: use --set "
                                        r"data.prompt_field=<one of them>"):
        load_task(DataConfig(source=str(far), partition="iid"), "generation", 0)
    with pytest.raises(DataError, match=r"use --set data.label_field=labels$"):
        labelled = tmp_path / "labels.jsonl"
        labelled.write_text(json.dumps({"text": "t", "labels": "x"}) + "\n")
        load_task(DataConfig(source=str(labelled), partition="iid"), "classification", 0)
