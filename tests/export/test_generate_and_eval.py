"""`pollinate generate` (the run's template, greedy) and `pollinate eval` (the run's metric on any file)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import LABELS, classification_file, make_run

from pollinate.cli import main
from pollinate.common.data import format_prompt
from pollinate.export.evaluate import evaluate_file
from pollinate.export.generate import classify
from pollinate.export.run import ExportError, open_run
from pollinate.export.weights import trained_model
from pollinate.server.evaluation import ServerEvaluator


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cls")
    return make_run(root, model="tiny-bert", overrides=(f'data.source="{classification_file(root)}"',))


def _greedy(trained, prompt: str, max_new_tokens: int) -> str:
    tokenizer = trained.tokenizer
    ids = torch.tensor([tokenizer(format_prompt(prompt), add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        out = trained.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                     eos_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def test_generate_answers_a_prompt_in_the_runs_template(lora_run, capsys):
    assert main(["generate", str(lora_run), "--prompt", "What is 37 + 45?", "--max-new-tokens", "6",
                 "--round", "1"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed == [_greedy(trained_model(open_run(lora_run), 1), "What is 37 + 45?", 6)]


def test_generate_from_a_file_prints_one_json_object_per_prompt(lora_run, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "What is 10 + 12?"}\n\n"Sort from smallest to largest: 3, 1, 2."\n')
    assert main(["generate", str(lora_run), "--file", str(prompts), "--max-new-tokens", "4"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    trained = trained_model(open_run(lora_run))
    assert lines == [{"prompt": p, "response": _greedy(trained, p, 4)}
                     for p in ("What is 10 + 12?", "Sort from smallest to largest: 3, 1, 2.")]


def test_generate_names_a_missing_prompt_field(lora_run, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"question": "x"}\n')
    assert main(["generate", str(lora_run), "--file", str(prompts)]) == 2
    assert "no field 'prompt'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", str(lora_run)])  # --prompt or --file is required


def test_a_classifier_names_each_texts_class(classifier_run, capsys):
    assert main(["generate", str(classifier_run), "--prompt", "example about pos", "--prompt", "another"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 2 and set(printed) <= set(LABELS)


def test_eval_on_the_builtin_task_repeats_the_servers_evaluation(lora_run):
    run = open_run(lora_run)
    trained = trained_model(run, 2)
    result = evaluate_file(run, trained, "skills")
    expected = ServerEvaluator(run.cfg).evaluate(trained.model)
    assert result["examples"] == run.cfg.data.eval_examples and result["round"] == 2
    assert result["eval_loss"] == pytest.approx(expected["eval_loss"])
    assert result["eval_metrics"] == expected["eval_metrics"]


def test_eval_reads_a_file_with_the_runs_fields_and_shows_the_fix(lora_run, tmp_path, capsys):
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"Prompt": f"What is {i} + 1?", "Response": str(i + 1)}) + "\n"
                            for i in range(7)))
    assert main(["eval", str(lora_run), "--data", str(data)]) == 2
    assert "--set data.prompt_field=Prompt" in capsys.readouterr().err
    assert main(["eval", str(lora_run), "--data", str(data), "--set", "data.prompt_field=Prompt",
                 "--set", "data.response_field=Response", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["examples"] == 7 and "exact_match" in result["eval_metrics"] and result["eval_loss"] > 0
    assert main(["eval", str(lora_run), "--data", str(data), "--set", "model.name=tiny-bert"]) == 2
    assert "only data.* and eval.* keys" in capsys.readouterr().err


def test_eval_maps_a_files_classes_onto_the_runs(classifier_run, tmp_path):
    run = open_run(classifier_run)
    trained = trained_model(run)
    only_pos = classification_file(tmp_path, labels=["pos"], rows=9, name="pos.jsonl")
    result = evaluate_file(run, trained, str(only_pos))
    texts = [json.loads(line)["text"] for line in only_pos.read_text().splitlines()]
    predicted = classify(trained, texts, LABELS, 4, run.cfg.model.max_seq_len)
    assert result["eval_metrics"]["accuracy"] == pytest.approx(sum(p == "pos" for p in predicted) / 9)
    unknown = classification_file(tmp_path, labels=["pos", "spam"], rows=4, name="spam.jsonl")
    with pytest.raises(ExportError, match="never trained on: \\['spam'\\]"):
        evaluate_file(run, trained, str(unknown))


def test_eval_prints_the_metric_per_group(lora_run, capsys):
    assert main(["eval", str(lora_run), "--data", "skills", "--max-examples", "10"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("skills: 10 examples, round 2: eval_loss ") and "exact_match" in line and "(add " in line
