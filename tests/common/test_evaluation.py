"""Evaluation core: classification takes loss and accuracy from one forward pass per batch, with the numbers the
two-pass evaluation gave; generation scores greedy answers; a client's held-out rows are drawn reproducibly."""

import json
import math
import random

import pytest
import torch

from pollinate.client.runtime import LocalData, evaluation_reply
from pollinate.common.config_io import build_config
from pollinate.common.data import encode_classification, encode_generation, generate_skills
from pollinate.common.evaluation import (
    EvalExamples,
    evaluate_model,
    exact_match,
    generation_loss,
    held_out_indices,
    loss_and_accuracy,
)
from pollinate.common.models import load_model, load_tokenizer, resolve_model
from pollinate.server.evaluation import ServerEvaluator


@pytest.fixture(scope="module")
def tiny_bert():
    path = resolve_model("tiny-bert").path
    torch.manual_seed(0)
    return load_model(path, "classification", num_labels=3, pooling="cls").eval(), load_tokenizer(path)


@pytest.fixture(scope="module")
def tiny_llama():
    path = resolve_model("tiny-llama").path
    torch.manual_seed(0)
    return load_model(path, "generation").eval(), load_tokenizer(path)


@pytest.fixture(scope="module")
def classification_file(tmp_path_factory):
    rng = random.Random(0)
    words = ["red apple", "blue sea", "green leaf", "grey stone", "gold sun"]
    path = tmp_path_factory.mktemp("data") / "colors.jsonl"
    path.write_text("".join(json.dumps({"text": " ".join(rng.choices(words, k=3)), "label": rng.randrange(3)}) + "\n"
                            for _ in range(80)))
    return path


def two_pass(model, encoded, pad_id, batch_size):
    """The evaluation before it was one pass: the loss pass, then a logits-only pass for accuracy."""
    from pollinate.common.data import collate

    total, weight, correct = 0.0, 0, []
    with torch.no_grad():
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start: start + batch_size]
            batch = collate(chunk, pad_id)
            total, weight = total + float(model(**batch).loss) * len(chunk), weight + len(chunk)
        for start in range(0, len(encoded), batch_size):
            batch = collate(encoded[start: start + batch_size], pad_id)
            guess = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.argmax(-1)
            correct += [int(a == b) for a, b in zip(batch["labels"].tolist(), guess.tolist(), strict=True)]
    return total / weight, sum(correct) / len(correct)


def test_one_pass_gives_the_two_pass_loss_and_accuracy_on_tiny_bert(tiny_bert):
    model, tokenizer = tiny_bert
    rows = [{"text": f"example {i} " + "word " * (i % 5), "label": i % 3} for i in range(11)]
    encoded = [encode_classification(r, tokenizer, 32) for r in rows]
    calls = []
    hook = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        loss, accuracy = loss_and_accuracy(model, encoded, tokenizer.pad_token_id, batch_size=4)
    finally:
        hook.remove()
    assert len(calls) == 3  # one forward per batch of 4 over 11 examples
    ref_loss, ref_accuracy = two_pass(model, encoded, tokenizer.pad_token_id, batch_size=4)
    assert loss == pytest.approx(ref_loss, rel=1e-6, abs=1e-9) and accuracy == ref_accuracy


def test_server_evaluator_reports_the_two_pass_numbers(tiny_bert, classification_file):
    model, tokenizer = tiny_bert
    cfg = build_config(None, ["model.name=tiny-bert", f"data.source={classification_file}", "data.eval_examples=9",
                              "eval.batch_size=4"])
    evaluator = ServerEvaluator(cfg)
    result = evaluator.evaluate(model)
    ref_loss, ref_accuracy = two_pass(model, evaluator.encoded, tokenizer.pad_token_id, batch_size=4)
    assert result["eval_loss"] == pytest.approx(ref_loss, rel=1e-6, abs=1e-9)
    assert result["eval_metrics"] == {"accuracy": ref_accuracy}


def test_generation_loss_is_per_target_token_and_exact_match_is_per_group(tiny_llama):
    model, tokenizer = tiny_llama
    rows = generate_skills(5, seed=1)
    encoded = [encode_generation(r, tokenizer, 64) for r in rows]
    result = evaluate_model(model, EvalExamples("generation", rows, encoded, "skill"), tokenizer, 2, 2)
    assert result["eval_loss"] == pytest.approx(generation_loss(model, encoded, tokenizer.pad_token_id, 5), rel=1e-5)
    assert set(result["eval_metrics"]) == {"exact_match", *(f"exact_match/{r['skill']}" for r in rows)}
    answers = [rows[0]["response"], "no", rows[2]["response"] + "!", "no", rows[4]["response"]]
    assert exact_match(rows, answers) == {"exact_match": 0.4}


def test_examples_whose_answer_was_cut_off_count_for_nothing_in_the_generation_loss(tiny_llama):
    """An example truncated before its answer has no target token: its batch's loss is 0/0 and must not turn the
    mean into NaN (a legitimate client's evaluation reply was rejected for it); with no target token at all the
    loss is NaN and a client reports that it evaluated nothing."""
    model, tokenizer = tiny_llama
    rows = generate_skills(3, seed=1)
    encoded = [encode_generation(r, tokenizer, 64) for r in rows]
    cut = {**encoded[0], "labels": [-100] * len(encoded[0]["labels"])}
    pad = tokenizer.pad_token_id
    assert generation_loss(model, [cut, *encoded[1:]], pad, 1) == pytest.approx(
        generation_loss(model, encoded[1:], pad, 1), rel=1e-6)
    assert math.isnan(generation_loss(model, [cut], pad, 1))
    cfg = build_config(None, ["model.name=tiny-llama"])
    data = LocalData(client_id=3, encoded=encoded[1:], num_labels=0, task_type="generation", eval_rows=rows[:1],
                     eval_encoded=[cut])
    assert dict(evaluation_reply(cfg, data, model)["metrics"]) == {"num-examples": 0, "client_id": 3}


def test_held_out_rows_are_a_reproducible_capped_share_and_never_all():
    assert held_out_indices(100, 0.1, 50, seed=3) == held_out_indices(100, 0.1, 50, seed=3)
    assert held_out_indices(100, 0.1, 50, seed=3) != held_out_indices(100, 0.1, 50, seed=4)
    assert len(held_out_indices(100, 0.1, 50, 0)) == 10
    assert len(held_out_indices(1000, 0.1, 50, 0)) == 50  # capped by client_max_examples
    assert len(held_out_indices(3, 0.1, 50, 0)) == 1  # at least one
    assert len(held_out_indices(2, 0.9, 50, 0)) == 1  # at least one row still trains
    assert held_out_indices(1, 0.5, 50, 0) == [] and held_out_indices(100, 0.0, 50, 0) == []
