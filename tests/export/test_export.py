"""`pollinate export`: a portable PEFT adapter (Hub id, model card) or a merged model, of any checkpointed round."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import LABELS, classification_file, make_run
from peft import PeftModel
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from pollinate.cli import main
from pollinate.common.pooling import use_mean_pooling
from pollinate.export.export import hub_id
from pollinate.export.run import open_run
from pollinate.export.weights import trained_model

IDS = torch.tensor([[5, 40, 41, 42, 7, 60]])


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=IDS, attention_mask=torch.ones_like(IDS)).logits


def test_each_round_exports_a_peft_adapter_that_reproduces_that_round(lora_run, tmp_path):
    run = open_run(lora_run)
    exported = {}
    for server_round in (1, 2):
        out = tmp_path / f"round-{server_round}"
        assert main(["export", str(lora_run), "--adapter", str(out), "--round", str(server_round),
                     "--base-id", "org/tiny-llama"]) == 0
        config = json.loads((out / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == "org/tiny-llama" and config["peft_type"] == "LORA"
        loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(run.model.path), out)
        assert torch.allclose(logits(loaded), logits(trained_model(run, server_round).model), atol=1e-5)
        exported[server_round] = load_file(str(out / "adapter_model.safetensors"))
    assert any(not np.array_equal(exported[1][k], exported[2][k]) for k in exported[1])


def test_the_model_card_has_the_runs_method_data_rounds_bytes_and_metrics(lora_run, tmp_path):
    out = tmp_path / "adapter"
    assert main(["export", str(lora_run), "--adapter", str(out), "--base-id", "org/tiny-llama"]) == 0
    card = (out / "README.md").read_text()
    for text in ("base_model: org/tiny-llama", "library_name: peft", "fedavg-lora", "`skills`", "round 2 of 2",
                 "| 1 | 2.0000 | 3.0000 | 0.100 | 1000 | 2000 |", "| 2 | 1.0000 | 1.5000 | 0.200 | 2000 | 4000 |",
                 "3.00 KB up, 6.00 KB down", "exact_match per group after round 2: add 0.40",
                 "Question: {prompt}\\nAnswer:", f'PeftModel.from_pretrained(base, "{out}")'):
        assert text in card, text
    assert "Model Card for Model ID" not in card  # not the empty template peft writes


def test_a_merged_model_loads_with_auto_model_and_matches_the_adapter(lora_run, tmp_path):
    run = open_run(lora_run)
    out = tmp_path / "merged"
    assert main(["export", str(lora_run), "--merged", str(out)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert torch.allclose(logits(merged), logits(trained_model(run).model), atol=1e-4)
    assert len(AutoTokenizer.from_pretrained(out)) == len(AutoTokenizer.from_pretrained(run.model.path))
    assert "library_name: transformers" in (out / "README.md").read_text()


def test_a_cls_pooled_classifier_merges_with_its_class_names(tmp_path):
    data = classification_file(tmp_path)
    run_dir = make_run(tmp_path, model="tiny-bert", overrides=(f'data.source="{data}"', 'model.pooling="cls"'))
    out = tmp_path / "merged"
    assert main(["export", str(run_dir), "--merged", str(out)]) == 0
    merged = AutoModelForSequenceClassification.from_pretrained(out)
    assert merged.config.id2label == dict(enumerate(LABELS))
    assert torch.allclose(logits(merged), logits(trained_model(open_run(run_dir)).model), atol=1e-4)


def test_a_mean_pooled_classifier_is_not_merged_but_its_adapter_loads_over_mean_pooling(tmp_path, capsys):
    data = classification_file(tmp_path)
    run_dir = make_run(tmp_path, model="tiny-bert", overrides=(f'data.source="{data}"', 'model.pooling="mean"'))
    capsys.readouterr()
    assert main(["export", str(run_dir), "--merged", str(tmp_path / "merged")]) == 2
    error = capsys.readouterr().err
    assert "mean" in error and "--adapter" in error and len(error.strip().splitlines()) == 2  # loading line + error
    assert not (tmp_path / "merged").exists()
    out = tmp_path / "adapter"
    assert main(["export", str(run_dir), "--adapter", str(out)]) == 0
    run = open_run(run_dir)
    base = use_mean_pooling(AutoModelForSequenceClassification.from_pretrained(run.model.path, num_labels=3,
                                                                                ignore_mismatched_sizes=True))
    loaded = PeftModel.from_pretrained(base, out)
    assert torch.allclose(logits(loaded), logits(trained_model(run).model), atol=1e-5)
    assert "use_mean_pooling(base)" in (out / "README.md").read_text()


def test_a_fedpipe_adapter_holds_the_global_factors_at_their_own_ranks(tmp_path):
    run_dir = make_run(tmp_path, method="fedpipe")
    out = tmp_path / "adapter"
    assert main(["export", str(run_dir), "--adapter", str(out), "--round", "1"]) == 0
    run = open_run(run_dir)
    state, _ = run.global_state(1)
    base = AutoModelForCausalLM.from_pretrained(run.model.path)
    original = {name: m.weight.detach().clone() for name, m in base.named_modules() if name.endswith("q_proj")}
    merged = PeftModel.from_pretrained(base, out).merge_and_unload()
    modules = dict(merged.named_modules())
    adapted = sorted(k[:-2] for k in state if k.endswith(".a"))
    assert len(adapted) == 2
    for name in adapted:
        expected = original[name] + torch.from_numpy(state[f"{name}.b"] @ state[f"{name}.a"])
        assert torch.allclose(modules[name].weight, expected, atol=1e-5)


def test_fedavg_full_exports_a_merged_model_and_no_adapter(tmp_path, capsys):
    run_dir = make_run(tmp_path, method="fedavg-full", rounds=1)
    assert main(["export", str(run_dir), "--adapter", str(tmp_path / "a")]) == 2
    assert "--merged" in capsys.readouterr().err
    assert main(["export", str(run_dir), "--merged", str(tmp_path / "m")]) == 0
    state, _ = open_run(run_dir).global_state(1)
    merged = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "m").named_parameters())
    assert all(np.allclose(merged[k].detach().numpy(), v) for k, v in state.items())


def test_methods_with_their_own_checkpoint_state_are_refused_by_name(tmp_path, capsys):
    run_dir = make_run(tmp_path, rounds=1)
    text = (run_dir / "config.toml").read_text().replace('method = "fedavg-lora"', 'method = "sfprompt"')
    (run_dir / "config.toml").write_text(text)
    assert main(["export", str(run_dir), "--adapter", str(tmp_path / "a")]) == 2
    error = capsys.readouterr().err
    assert "'sfprompt'" in error and "fedavg-lora" in error and "fedpipe" in error


def test_bad_requests_are_one_line_errors(lora_run, tmp_path, capsys):
    assert main(["export", str(lora_run), "--adapter", str(tmp_path / "a"), "--round", "7"]) == 2
    assert "checkpointed rounds are [1, 2]" in capsys.readouterr().err
    assert main(["export", str(tmp_path), "--adapter", str(tmp_path / "a")]) == 2
    assert "not a Pollinate run directory" in capsys.readouterr().err
    assert main(["export", str(lora_run)]) == 2
    assert "--adapter OUT and/or --merged OUT" in capsys.readouterr().err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    assert main(["export", str(lora_run), "--adapter", str(busy)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["export", str(lora_run), "--adapter", str(busy), "--overwrite"]) == 0


@pytest.mark.parametrize(("name", "path", "base_id", "expected"), [
    ("smollm2-135m", "/cache/smollm2", None, "HuggingFaceTB/SmolLM2-135M-Instruct"),
    ("minilm", "/site/minilm", None, "sentence-transformers/all-MiniLM-L6-v2"),
    ("/hf/hub/models--org--name/snapshots/abc", "/hf/hub/models--org--name/snapshots/abc", None, "org/name"),
    ("tiny-llama", "/cache/tiny", None, None),
    ("tiny-llama", "/cache/tiny", "me/base", "me/base"),
])
def test_the_base_models_hub_id(name, path, base_id, expected):
    run = SimpleNamespace(cfg=SimpleNamespace(model=SimpleNamespace(name=name)), model=SimpleNamespace(path=path))
    assert hub_id(run, base_id) == expected


def test_export_help_names_the_options():
    with pytest.raises(SystemExit):
        main(["export", "--help"])


def test_a_stopped_run_without_checkpoints_says_so(tmp_path, capsys):
    run_dir = make_run(tmp_path, rounds=1)
    for path in sorted((run_dir / "checkpoints").rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    assert main(["export", str(run_dir), "--adapter", str(tmp_path / "a")]) == 2
    assert "no checkpointed round" in capsys.readouterr().err
    assert not Path(tmp_path / "a").exists()
