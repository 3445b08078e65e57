"""sfprompt: EL2N pruning, the client's two training phases, the eval wrapper, the server's token lifecycle,
and (slow) end-to-end simulations whose reports carry the split-plane bytes and the clients' evaluations."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

from pollinate.common.config import ConfigError, RunConfig
from pollinate.common.config_io import build_config
from pollinate.common.data import ExampleStream, collate
from pollinate.common.lmloss import IGNORE_INDEX
from pollinate.common.report import RunRecorder
from pollinate.methods.sfprompt.channel import SplitCallError, SplitChannel
from pollinate.methods.sfprompt.client import load_trainable_state, trainable_state
from pollinate.methods.sfprompt.pruning import (
    el2n,
    el2n_per_example,
    el2n_scores,
    keep_top,
    keep_top_per_class,
    select_kept,
)
from pollinate.methods.sfprompt.server import SFPrompt
from pollinate.methods.sfprompt.service import LocalBody
from pollinate.methods.sfprompt.split import PromptedSplitModel, split_model, unsplit_forward
from pollinate.methods.sfprompt.training import phase_steps, train_prompts_and_tail

VOCAB, PROMPT = 128, 3


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True, eos_token_id=1, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


def tiny_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                        num_attention_heads=4, max_position_embeddings=64, num_labels=3)
    return BertForSequenceClassification(config).eval()


def classification_examples(n: int, seed: int = 0, length: int | None = None) -> list[dict]:
    rng = random.Random(seed)
    return [{"input_ids": [rng.randrange(2, VOCAB) for _ in range(length or rng.randint(3, 9))],
             "labels": rng.randrange(3)} for _ in range(n)]


def generation_examples(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = [rng.randrange(2, VOCAB) for _ in range(rng.randint(2, 6))]
        answer = [rng.randrange(2, VOCAB) for _ in range(rng.randint(1, 3))] + [1]
        out.append({"input_ids": prompt + answer, "labels": [IGNORE_INDEX] * len(prompt) + answer})
    return out


# --------------------------------------------------------------------------------------------- EL2N
def test_el2n_classification_is_distance_of_softmax_to_one_hot():
    logits = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 3, 1, 1, 2])
    expected = (logits.softmax(-1) - torch.nn.functional.one_hot(labels, 4)).norm(dim=-1)
    torch.testing.assert_close(el2n(logits, labels), expected)


def test_el2n_causal_lm_averages_the_answer_tokens_only():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    parts = split_model(model, 1, 1, num_prompt_tokens=PROMPT)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 4, IGNORE_INDEX],
                           [IGNORE_INDEX, 2, 5, 0, 1],
                           [IGNORE_INDEX] * 5])
    ids = torch.randint(1, VOCAB, (3, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = parts.head(ids)
        full = parts.tail(out.hidden, out.attention_mask).logits  # (B, PROMPT + 5, V)
        scores = el2n_per_example(parts.tail(out.hidden, out.attention_mask, labels, answers_only=True), labels)
    for row in range(3):
        per_token = []
        for t in range(1, 5):  # token t is predicted at input position t - 1, i.e. PROMPT + t - 1 overall
            if labels[row, t] != IGNORE_INDEX:
                p = full[row, PROMPT + t - 1].softmax(-1)
                per_token.append(float((p - torch.nn.functional.one_hot(labels[row, t], VOCAB)).norm()))
        assert float(scores[row]) == pytest.approx(np.mean(per_token) if per_token else 0.0, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("fraction, n, expected", [(0.5, 10, 5), (0.3, 10, 3), (1.0, 7, 7), (0.01, 7, 1),
                                                   (0.25, 6, 2)])
def test_keep_top_keeps_exactly_the_highest_fraction(fraction, n, expected):
    scores = np.random.default_rng(n).permutation(n).astype(float)
    kept = keep_top(scores, fraction)
    assert len(kept) == expected
    assert kept == sorted(kept)
    assert min(scores[kept]) > max(np.delete(scores, kept), default=-1)


def test_keep_top_breaks_ties_by_position_and_rejects_bad_fraction():
    assert keep_top(np.array([1.0, 2.0, 2.0, 2.0, 0.0]), 0.4) == [1, 2]
    with pytest.raises(ValueError, match="keep fraction 0"):
        keep_top(np.ones(3), 0)


def test_per_class_selection_keeps_the_top_fraction_of_every_class():
    # Class 1 has the lowest scores overall (what a fresh classifier favouring class 1 gives): a global top-half
    # drops it entirely, the per-class top-half keeps its hardest half.
    labels = [0, 1, 0, 1, 2, 1, 0, 2, 1, 2]
    scores = np.array([0.9, 0.1, 0.8, 0.2, 0.7, 0.3, 0.95, 0.6, 0.15, 0.65])
    assert not {1, 3, 5, 8} & set(keep_top(scores, 0.5))
    kept = keep_top_per_class(scores, labels, 0.5)
    assert kept == [0, 3, 4, 5, 6, 9]  # class 0: 6, 0 of 3; class 1: 5, 3 of 4; class 2: 4, 9 of 3
    for label in set(labels):
        members = [i for i, y in enumerate(labels) if y == label]
        chosen = [i for i in kept if labels[i] == label]
        assert len(chosen) == -(-len(members) // 2)  # ceil(γ · n_c)
        assert min(scores[chosen]) >= max(scores[[i for i in members if i not in chosen]], default=-1)
    # Per-token labels (generation) and keep_per_class=false select over all examples.
    from pollinate.methods.sfprompt.config import SFPromptConfig
    classification = [{"labels": y} for y in labels]
    assert select_kept(scores, classification, SFPromptConfig()) == kept
    assert select_kept(scores, classification, SFPromptConfig(keep_per_class=False)) == keep_top(scores, 0.5)
    generation = [{"labels": [y, -100]} for y in labels]
    assert select_kept(scores, generation, SFPromptConfig()) == keep_top(scores, 0.5)


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_el2n_scores_do_not_depend_on_batching_or_padding(kind):
    model = tiny_llama() if kind == "llama" else tiny_bert()
    parts = split_model(model, 1, 1, PROMPT, generator=torch.Generator().manual_seed(0))
    data = generation_examples(7) if kind == "llama" else classification_examples(7)
    alone = el2n_scores(parts, data, batch_size=1, pad_id=0)
    batched = el2n_scores(parts, data, batch_size=4, pad_id=0)
    np.testing.assert_allclose(alone, batched, rtol=1e-4, atol=1e-5)
    assert alone.shape == (7,) and np.all(alone > 0)


def unsplit_el2n(model, prompt, example) -> float:
    """EL2N of one example from the unsplit model's full logits (mean over answer tokens for a causal LM)."""
    batch = collate([example], 0)
    logits = unsplit_forward(model, prompt, batch).logits
    if logits.dim() == 2:
        return float(el2n(logits, batch["labels"])[0])
    targets = prompt.extend_labels(batch["labels"])[0, 1:]
    answer = targets != IGNORE_INDEX
    return float(el2n(logits[0, :-1][answer], targets[answer]).mean())


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_el2n_through_the_body_scores_the_unsplit_model_and_holds_no_graph(kind):
    model = tiny_llama() if kind == "llama" else tiny_bert()
    parts = split_model(model, 1, 1, PROMPT, generator=torch.Generator().manual_seed(0))
    data = generation_examples(5) if kind == "llama" else classification_examples(5)
    body = LocalBody(parts.body)
    scores = el2n_scores(parts, data, batch_size=2, pad_id=0, body=body)
    with torch.no_grad():
        expected = [unsplit_el2n(model, parts.prompt, ex) for ex in data]
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-5)
    assert body.steps == 3 and body.bytes_up > 0 and body.bytes_down > 0  # 3 batches, forward only
    assert body.service.graph_bytes == 0 and not body.service.holds_graph(body.session_id)
    # The local path (head output straight into the tail) is another model: other scores, no server.
    local = el2n_scores(parts, data, batch_size=2, pad_id=0)
    assert body.steps == 3 and not np.allclose(local, scores)


def test_kept_examples_are_scored_once_and_reused_until_rescore_is_due():
    from flwr.app import Context, RecordDict

    from pollinate.methods.sfprompt.client import kept_examples
    from pollinate.methods.sfprompt.config import SFPromptConfig

    parts = split_model(tiny_bert(), 1, 1, PROMPT, generator=torch.Generator().manual_seed(0))
    data = classification_examples(10)
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    once = SFPromptConfig(keep_fraction=0.5, rescore_every=0)
    kept, scores = kept_examples(context, once, parts, data, 4, 0, server_round=1)
    assert scores is not None and kept == select_kept(scores, data, once)
    with torch.no_grad():  # the model moves on; with rescore_every=0 the first selection stays
        parts.tail.classifier.weight.add_(torch.randn_like(parts.tail.classifier.weight))
    assert kept_examples(context, once, parts, data, 4, 0, server_round=2) == (kept, None)
    every = SFPromptConfig(keep_fraction=0.5, rescore_every=2)
    assert kept_examples(context, every, parts, data, 4, 0, server_round=2)[1] is None  # 1 round since scoring
    rescored, new_scores = kept_examples(context, every, parts, data, 4, 0, server_round=3)
    assert new_scores is not None and rescored == select_kept(new_scores, data, every)
    # Another fraction or another data size is a new selection; keeping everything needs no scores at all.
    other_fraction = SFPromptConfig(keep_fraction=0.3, rescore_every=0)
    assert kept_examples(context, other_fraction, parts, data, 4, 0, 4)[1] is not None
    assert kept_examples(context, SFPromptConfig(keep_fraction=0.3), parts, data, 4, 0, 5)[1] is not None  # every round
    assert kept_examples(context, SFPromptConfig(keep_fraction=1.0), parts, data, 4, 0, 6) == (list(range(10)), None)


# --------------------------------------------------------------------------------------------- training
def _cfg(**sfprompt) -> RunConfig:
    return build_config(overrides=["train.batch_size=4", "train.lr=0.01"]
                        + [f"sfprompt.{k}={v}" for k, v in sfprompt.items()])


def test_round_trains_only_prompts_and_tail_and_sends_head_output_to_the_body():
    parts = split_model(tiny_bert(), 1, 1, PROMPT, generator=torch.Generator().manual_seed(0))
    named = [*parts.head.named_parameters(), *parts.body.named_parameters()]
    frozen = {n: p.detach().clone() for n, p in named if n != "prompt.weight"}
    before = trainable_state(parts)
    data = classification_examples(12)
    body = LocalBody(parts.body)
    local, kept = ExampleStream(data, 4, 0, seed=0), ExampleStream(data, 4, 0, seed=1)
    stats = train_prompts_and_tail(parts, local, 2, kept, 3, body, _cfg())
    after = trainable_state(parts)
    assert set(after) == set(before) and "head.prompt.weight" in after
    assert all(not np.allclose(after[k], before[k]) for k in ("head.prompt.weight",
                                                               "tail.classifier.weight"))
    for name, value in [*parts.head.named_parameters(), *parts.body.named_parameters()]:
        if name in frozen:
            torch.testing.assert_close(value, frozen[name], rtol=0, atol=0)
    assert body.steps == 3  # only the split phase reaches the server
    assert {"train_loss", "local_loss", "split_loss"} <= set(stats)


def test_keep_fraction_half_roughly_halves_split_plane_bytes():
    data = classification_examples(40, length=8)  # equal lengths: bytes are proportional to examples sent
    bytes_up = {}
    for fraction in (1.0, 0.5):
        parts = split_model(tiny_bert(), 1, 1, PROMPT, generator=torch.Generator().manual_seed(0))
        kept = keep_top(el2n_scores(parts, data, 8, 0), fraction)
        body = LocalBody(parts.body)
        steps = phase_steps(1.0, len(kept), 4, cap=0)
        train_prompts_and_tail(parts, ExampleStream(data, 4, 0, seed=0), 0,
                               ExampleStream([data[i] for i in kept], 4, 0, seed=1), steps, body, _cfg())
        bytes_up[fraction] = (body.bytes_up, body.bytes_down)
    for direction in range(2):
        assert bytes_up[0.5][direction] / bytes_up[1.0][direction] == pytest.approx(0.5, abs=0.05)


def test_phase_steps_cover_epochs_and_respect_the_cap():
    assert phase_steps(1.0, 10, 4, cap=0) == 3
    assert phase_steps(2.0, 10, 4, cap=0) == 5
    assert phase_steps(2.0, 10, 4, cap=2) == 2
    assert phase_steps(0.0, 10, 4, cap=0) == 0


def test_loading_a_state_of_another_split_is_refused():
    parts = split_model(tiny_bert(), 1, 1, PROMPT)
    other = trainable_state(split_model(tiny_bert(), 1, 2, PROMPT))
    with pytest.raises(ValueError, match="check sfprompt.head_layers/tail_layers"):
        load_trainable_state(parts, other)


def test_config_rejects_out_of_range_values_naming_the_field():
    with pytest.raises(ConfigError, match="'sfprompt.keep_fraction' = 0"):
        _cfg(keep_fraction=0)
    with pytest.raises(ConfigError, match="'sfprompt.wire_dtype' = 'int4'"):
        _cfg(wire_dtype='"int4"')
    with pytest.raises(ConfigError, match="'sfprompt.el2n_path' = 'body'"):
        _cfg(el2n_path='"body"')


# --------------------------------------------------------------------------------------------- eval wrapper
@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_eval_wrapper_equals_the_unsplit_model_with_prompts(kind):
    model = tiny_llama() if kind == "llama" else tiny_bert()
    parts = split_model(model, 1, 1, PROMPT, generator=torch.Generator().manual_seed(0))
    data = generation_examples(3) if kind == "llama" else classification_examples(3)
    batch = collate(data, 0)
    wrapper = PromptedSplitModel(parts).eval()
    with torch.no_grad():
        got, ref = wrapper(**batch), unsplit_forward(model, parts.prompt, batch)
    torch.testing.assert_close(got.loss, ref.loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.logits, ref.logits, rtol=1e-4, atol=1e-5)


def test_greedy_generate_matches_hugging_face_without_prompts():
    model = tiny_llama()
    parts = split_model(model, 1, 1, 0)
    ids = torch.tensor([[5, 17, 33, 2, 90]])
    ours = PromptedSplitModel(parts).generate(ids, torch.ones_like(ids), max_new_tokens=6, pad_token_id=0)
    theirs = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                            max_new_tokens=6, pad_token_id=0, eos_token_id=None)
    assert ours.tolist() == theirs.tolist()


def test_greedy_generate_of_a_left_padded_batch_equals_each_prompt_alone():
    parts = split_model(tiny_llama(), 1, 1, PROMPT, generator=torch.Generator().manual_seed(0))
    wrapper = PromptedSplitModel(parts)
    prompts = [[5, 17, 33, 2, 90], [44, 3], [7, 8, 9]]
    batch = collate([{"input_ids": p, "labels": [IGNORE_INDEX] * len(p)} for p in prompts], 0, pad_left=True)
    together = wrapper.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=4, pad_token_id=0)
    width = batch["input_ids"].shape[1]
    for row, prompt in enumerate(prompts):
        ids = torch.tensor([prompt])
        alone = wrapper.generate(ids, torch.ones_like(ids), max_new_tokens=4, pad_token_id=0)
        assert together[row, width:].tolist() == alone[0, len(prompt):].tolist()


# --------------------------------------------------------------------------------------------- server half
@pytest.fixture
def strategy(tmp_path):
    cfg = build_config(overrides=["model.name=tiny-llama", "method=sfprompt", "federation.clients=2",
                                  "data.builtin_examples=20", "data.eval_examples=4"])
    recorder = RunRecorder(tmp_path, {"rounds_planned": 1}, quiet=True)
    strategy = SFPrompt(cfg, recorder, tmp_path)
    strategy.prepare(None)
    yield strategy
    strategy.close()


def _forward(channel: SplitChannel) -> torch.Tensor:
    return channel.body(torch.zeros(1, 4, 64), torch.ones(1, 4, dtype=torch.long))


def test_round_token_opens_the_split_service_until_the_round_ends(strategy):
    content = strategy.train_content(7, 1, strategy.initial_arrays(), ConfigRecord({"server-round": 1}))
    split = content["split"]
    assert split["address"] == strategy.address and split["wire-dtype"] == "fp32"
    with SplitChannel(split["address"], split["token"], node_id="7") as channel:
        assert _forward(channel).shape == (1, 4, 64)
        strategy.aggregate_train(1, [])  # the round's replies are in: its tokens are revoked
        with pytest.raises(SplitCallError) as refused:
            _forward(channel)
    assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_split_service_refuses_a_token_it_never_issued(strategy):
    with SplitChannel(strategy.address, "not-a-token", node_id="7") as channel, \
            pytest.raises(SplitCallError) as refused:
        _forward(channel)
    assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_with_coordinator_certs_the_split_plane_is_tls_and_clients_get_the_ca(tmp_path):
    from pollinate.deploy.keys import init_certs

    certs = init_certs(tmp_path / "certs", ["localhost"]).ca_cert.parent
    cfg = build_config(overrides=["model.name=tiny-llama", "method=sfprompt", "federation.clients=2",
                                  "data.builtin_examples=20", "data.eval_examples=4",
                                  f'sfprompt.tls_certs="{certs}"'])
    tls = SFPrompt(cfg, RunRecorder(tmp_path, {"rounds_planned": 1}, quiet=True), tmp_path)
    tls.prepare(None)
    try:
        split = tls.train_content(3, 1, tls.initial_arrays(), ConfigRecord({"server-round": 1}))["split"]
        assert "BEGIN CERTIFICATE" in split["ca-pem"]
        with SplitChannel(split["address"], split["token"], node_id="3",
                          root_certificates=split["ca-pem"].encode()) as channel:
            assert _forward(channel).shape == (1, 4, 64)
        with SplitChannel(split["address"], split["token"], node_id="3", timeout_s=5) as plaintext, \
                pytest.raises(SplitCallError) as refused:
            _forward(plaintext)
        assert refused.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        tls.close()


def test_save_final_writes_the_prompt_and_tail_state(strategy, tmp_path):
    from safetensors.numpy import load_file

    arrays = strategy.initial_arrays()
    extra = strategy.save_final(arrays)
    saved = load_file(str(Path(extra["adapter_dir"]) / "sfprompt.safetensors"))
    assert set(saved) == set(arrays.keys()) and "head.prompt.weight" in saved
    settings = json.loads((Path(extra["adapter_dir"]) / "split_config.json").read_text())
    assert settings["num_prompt_tokens"] == 8 and settings["head_layers"] == 1


# --------------------------------------------------------------------------------------------- end to end
ROOT = Path(__file__).resolve().parents[3]


def simulate(out: Path, *args: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "pollinate.cli", "simulate", "--method", "sfprompt",
                           "--clients", "3", "--rounds", "2", "--out", str(out), "--quiet", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=900, env=os.environ.copy())
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "report.json").read_text())


@pytest.fixture(scope="module")
def classification_file(tmp_path_factory) -> Path:
    """A small 3-class text task whose label is readable from the words, so accuracy can rise."""
    rng = random.Random(0)
    words = {0: "red apple cherry", 1: "blue sea sky", 2: "green grass leaf"}
    path = tmp_path_factory.mktemp("data") / "colors.jsonl"
    with path.open("w") as fh:
        for _ in range(150):
            label = rng.randrange(3)
            text = " ".join(rng.choice(words[label].split()) for _ in range(4))
            fh.write(json.dumps({"text": text, "label": label}) + "\n")
    return path


def check_split_report(report: dict, method_extra: str) -> None:
    assert report["method"] == "sfprompt" and report["num_clients"] == 3
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    assert Path(report["adapter_dir"], "sfprompt.safetensors").is_file()
    for r in report["rounds"]:
        assert method_extra in r["eval_metrics"]
        assert sorted(c["client_id"] for c in r["clients"]) == [0, 1, 2]
        for c in r["clients"]:
            assert c["split_bytes_up"] > 0 and c["split_bytes_down"] > 0
            assert c["bytes_up"] == c["flower_bytes_up"] + c["split_bytes_up"]
            assert c["bytes_down"] == c["flower_bytes_down"] + c["split_bytes_down"]
            assert 0 < c["kept_examples"] <= c["num_examples"]
            assert 0 < c["client_time_share"] <= 1
        assert r["split_bytes_up"] == sum(c["split_bytes_up"] for c in r["clients"])
        assert r["bytes_up"] == sum(c["bytes_up"] for c in r["clients"])
        # Every client also evaluated the new global through the split plane; those bytes are the round's eval bytes.
        assert sorted(c["client_id"] for c in r["client_eval"]["clients"]) == [0, 1, 2]
        assert 0 < r["split_bytes_eval_up"] < r["bytes_eval_up"]
        assert 0 < r["split_bytes_eval_down"] < r["bytes_eval_down"]
    assert report["totals"]["bytes_up"] == sum(r["bytes_up"] for r in report["rounds"])


@pytest.mark.slow
def test_simulate_tiny_bert_reports_split_bytes_and_half_gamma_halves_them(tmp_path, classification_file):
    # Global top-γ, the rule (the per-class default keeps Σ ceil(γ · n_class), a few more).
    half = simulate(tmp_path / "half", "--model", "tiny-bert", "--data", str(classification_file),
                    "--set", "sfprompt.keep_per_class=false")
    check_split_report(half, "accuracy")
    full = simulate(tmp_path / "full", "--model", "tiny-bert", "--data", str(classification_file),
                    "--set", "sfprompt.keep_fraction=1.0")
    ratio = (sum(r["split_bytes_up"] for r in half["rounds"])
             / sum(r["split_bytes_up"] for r in full["rounds"]))
    assert 0.4 <= ratio <= 0.65, ratio
    for c in (c for r in half["rounds"] for c in r["clients"]):
        assert c["kept_examples"] == (c["num_examples"] + 1) // 2  # ceil(γ · n) with γ = 0.5


@pytest.mark.slow
def test_simulate_tiny_llama_reports_exact_match_and_split_bytes(tmp_path):
    report = simulate(tmp_path / "llama", "--model", "tiny-llama", "--set", "data.builtin_examples=120",
                      "--set", "data.eval_examples=10")
    check_split_report(report, "exact_match")
