"""Config: defaults, TOML, overrides and the errors a user sees."""

import pytest

from pollinate.cli import main
from pollinate.common.config import ConfigError, RunConfig
from pollinate.common.config_io import build_config, describe_fields, to_toml


def test_defaults_are_valid_and_round_trip_through_json():
    cfg = RunConfig()
    assert RunConfig.from_json(cfg.to_json()) == cfg


def test_toml_then_overrides_take_precedence(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('method = "fedavg-lora"\n[federation]\nclients = 3\nrounds = 5\n[lora]\nr = 4\n')
    cfg = build_config(path, ["federation.rounds=2", "lora.target_modules=q_proj,k_proj", "train.lr=0.01"])
    assert (cfg.federation.clients, cfg.federation.rounds, cfg.lora.r) == (3, 2, 4)
    assert cfg.lora.target_modules == ["q_proj", "k_proj"]
    assert cfg.train.lr == pytest.approx(0.01)


def test_a_bracketed_list_of_bare_words_is_a_list_not_bracketed_names():
    """``[q_proj,v_proj]`` is not TOML (bare words), but it is what a user types for a list."""
    for text in ("[q_proj,v_proj]", "[q_proj, v_proj]", '["q_proj","v_proj"]', "q_proj,v_proj"):
        assert build_config(None, [f"lora.target_modules={text}"]).lora.target_modules == ["q_proj", "v_proj"]


def test_effective_config_toml_rebuilds_the_same_config(tmp_path):
    cfg = build_config(None, ["federation.clients=7", 'data.source="x.jsonl"'])
    path = tmp_path / "effective.toml"
    path.write_text(to_toml(cfg))
    assert build_config(path) == cfg


def test_unknown_key_names_it_and_lists_allowed():
    with pytest.raises(ConfigError, match=r"unknown config key 'federation.client'.*allowed: \[.*'clients'"):
        build_config(None, ["federation.client=3"])


def test_bad_value_names_field_value_and_expectation():
    with pytest.raises(ConfigError, match=r"'federation.rounds' = 0 is invalid: expected an int >= 1"):
        build_config(None, ["federation.rounds=0"])
    with pytest.raises(ConfigError, match=r"'data.partition' = 'random'.*one of \['iid', 'dirichlet'"):
        build_config(None, ["data.partition=random"])
    with pytest.raises(ConfigError, match=r"'train.batch_size' = 'eight' is invalid: expected an integer"):
        build_config(None, ["train.batch_size=eight"])


def test_every_field_has_help_text():
    rows = describe_fields()
    assert len(rows) > 30
    assert all(help_ for _, _, help_ in rows), [key for key, _, help_ in rows if not help_]


def test_cli_config_show_prints_effective_config(capsys):
    assert main(["config", "show", "--clients", "6", "--set", "lora.r=16"]) == 0
    out = capsys.readouterr().out
    assert "clients = 6" in out and "r = 16" in out


def test_cli_bad_config_exits_2_with_message(capsys):
    assert main(["config", "show", "--set", "lora.rank=4"]) == 2
    assert "unknown config key 'lora.rank'" in capsys.readouterr().err


def test_simulate_help_documents_every_config_key(capsys):
    with pytest.raises(SystemExit):
        main(["simulate", "--help"])
    out = capsys.readouterr().out
    for key, _, _ in describe_fields():
        assert key in out
