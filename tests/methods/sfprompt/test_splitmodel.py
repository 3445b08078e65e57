"""U-shaped split of Llama and BERT models: exactness against the unsplit model, sharing, validation."""

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

from pollinate.common.lmloss import IGNORE_INDEX
from pollinate.methods.sfprompt.split import (
    SoftPrompt,
    TensorDecodeError,
    decode_tensor,
    encode_tensor,
    split_model,
    unsplit_forward,
)

VOCAB, SEQ, PROMPT = 128, 7, 3


def tiny_llama(tie: bool = True) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=tie)
    return LlamaForCausalLM(config).eval()


def tiny_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                        num_attention_heads=4, max_position_embeddings=32, num_labels=3)
    return BertForSequenceClassification(config).eval()


def padded_batch(kind: str) -> dict[str, torch.Tensor]:
    """Three sequences: full, right-padded, left-padded (so both padding sides are exercised)."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (3, SEQ), generator=gen)
    mask = torch.ones(3, SEQ, dtype=torch.long)
    mask[1, 4:] = 0
    mask[2, :2] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    if kind == "llama":
        labels = ids.clone()
        labels[mask == 0] = IGNORE_INDEX
        batch["labels"] = labels
    else:
        batch["labels"] = torch.tensor([0, 2, 1])
        batch["token_type_ids"] = torch.cat([torch.zeros(3, 4), torch.ones(3, SEQ - 4)], dim=1).long()
    return batch


def run_split(parts, batch, body=None):
    head_kwargs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
    head_out = parts.head(**head_kwargs)
    body_out = (body or parts.body)(head_out.hidden, head_out.attention_mask)
    return parts.tail(body_out, head_out.attention_mask, batch["labels"])


def grads_of(parts) -> dict[str, torch.Tensor]:
    grads = {name: p.grad.clone() for name, p in parts.trainable_parameters()}
    for _, p in parts.trainable_parameters():
        p.grad = None
    return grads


def assert_split_matches_unsplit(model, parts, batch, body=None, atol=1e-5) -> None:
    ref = unsplit_forward(model, parts.prompt, batch)
    ref.loss.backward()
    ref_grads = grads_of(parts)
    out = run_split(parts, batch, body)
    out.loss.backward()
    got_grads = grads_of(parts)
    torch.testing.assert_close(out.loss, ref.loss, atol=atol, rtol=0)
    torch.testing.assert_close(out.logits, ref.logits, atol=atol, rtol=0)
    assert got_grads.keys() == ref_grads.keys() and "head.prompt.weight" in got_grads
    assert any(name.startswith("tail.") for name in got_grads)
    for name in ref_grads:
        assert ref_grads[name].abs().sum() > 0, name  # a zero gradient would make the comparison vacuous
        torch.testing.assert_close(got_grads[name], ref_grads[name], atol=atol, rtol=0, msg=name)


@pytest.mark.parametrize("tail_layers", [1, 2])
@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_split_forward_backward_equals_unsplit_model_with_padding(kind, tail_layers):
    """Also checks the BERT tail's shortcut (its last block computes only the position the pooler reads)."""
    model = tiny_llama() if kind == "llama" else tiny_bert()
    parts = split_model(model, head_layers=1, tail_layers=tail_layers, num_prompt_tokens=PROMPT)
    assert_split_matches_unsplit(model, parts, padded_batch(kind))


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_body_rebuilt_on_server_from_travelling_tensors_only(kind):
    client_model = tiny_llama() if kind == "llama" else tiny_bert()
    server_model = tiny_llama() if kind == "llama" else tiny_bert()
    server_model.load_state_dict(client_model.state_dict())
    parts = split_model(client_model, 1, 1, num_prompt_tokens=PROMPT)
    server_body = split_model(server_model, 1, 1).body  # the server knows nothing of the prompt
    batch = padded_batch(kind)
    head_out = parts.head(batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(server_body(head_out.hidden, head_out.attention_mask),
                               parts.body(head_out.hidden, head_out.attention_mask), atol=0, rtol=0)


def test_causal_lm_loss_ignores_prompt_positions():
    model = tiny_llama()
    parts = split_model(model, 1, 1, num_prompt_tokens=PROMPT)
    batch = padded_batch("llama")
    out = run_split(parts, batch)
    assert out.logits.shape == (3, PROMPT + SEQ, VOCAB)
    # Position P-1+t predicts token t: the prompt's own positions carry no target.
    expected = torch.nn.functional.cross_entropy(out.logits[:, PROMPT - 1:-1].reshape(-1, VOCAB),
                                                 batch["labels"].reshape(-1), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(out.loss, expected)


@pytest.mark.parametrize("tail_layers", [1, 2])
def test_answers_only_tail_gives_the_full_tail_loss_and_gradients(tail_layers):
    """The answers-only tail runs its last block's queries, attention output and MLP only at answer positions
    (keys/values at all): the loss and every gradient, the body output's included, must not change."""
    model = tiny_llama()
    parts = split_model(model, 1, tail_layers, num_prompt_tokens=PROMPT)
    batch = padded_batch("llama")
    batch["labels"][:, :4] = IGNORE_INDEX  # an instruction example: only the end is the answer
    full = run_split(parts, batch)
    full.loss.backward()
    full_grads = grads_of(parts)
    head_out = parts.head(batch["input_ids"], batch["attention_mask"])
    body_out = parts.body(head_out.hidden, head_out.attention_mask)
    body_out.retain_grad()
    kept = parts.tail(body_out, head_out.attention_mask, batch["labels"], answers_only=True)
    kept.loss.backward()
    kept_grads = grads_of(parts)
    full_body_out = parts.body(head_out.hidden.detach(), head_out.attention_mask).requires_grad_(True)
    parts.tail(full_body_out, head_out.attention_mask, batch["labels"]).loss.backward()
    for _, param in parts.trainable_parameters():  # clear what that reference pass accumulated
        param.grad = None
    torch.testing.assert_close(body_out.grad, full_body_out.grad, atol=1e-6, rtol=0)
    # Only the labelled (example, position) pairs are projected onto the vocabulary.
    labelled = int((batch["labels"] != IGNORE_INDEX).sum())  # the prompt's last position predicts token 0
    assert kept.logits.shape == (labelled, VOCAB) and kept.targets.shape == kept.rows.shape == (labelled,)
    torch.testing.assert_close(kept.loss, full.loss, atol=1e-6, rtol=0)
    for name, grad in full_grads.items():
        torch.testing.assert_close(kept_grads[name], grad, atol=1e-6, rtol=0, msg=name)
    with pytest.raises(ValueError, match="answers_only needs labels"):
        parts.tail(body_out, head_out.attention_mask, answers_only=True)
    # Every answer truncated away: a zero loss that trains nothing (the full-logits mean would be NaN).
    head_out = parts.head(batch["input_ids"], batch["attention_mask"])
    none = parts.tail(parts.body(head_out.hidden, head_out.attention_mask), head_out.attention_mask,
                      torch.full_like(batch["labels"], IGNORE_INDEX), answers_only=True)
    none.loss.backward()
    assert float(none.loss) == 0.0 and all(float(g.abs().sum()) == 0 for g in grads_of(parts).values())


def test_head_extends_mask_with_ones_for_prompt():
    parts = split_model(tiny_bert(), 1, 1, num_prompt_tokens=PROMPT)
    batch = padded_batch("bert")
    out = parts.head(batch["input_ids"], batch["attention_mask"])
    assert out.hidden.shape == (3, PROMPT + SEQ, 64)
    assert torch.equal(out.attention_mask[:, :PROMPT], torch.ones(3, PROMPT, dtype=torch.long))
    assert torch.equal(out.attention_mask[:, PROMPT:], batch["attention_mask"])


def test_parts_share_the_models_parameters_without_copies():
    model = tiny_llama(tie=False)
    parts = split_model(model, 1, 2, num_prompt_tokens=PROMPT)
    model_ptrs = {p.data_ptr() for p in model.parameters()}
    part_params = [p for m in (parts.head, parts.body, parts.tail) for p in m.parameters()]
    non_prompt = [p for p in part_params if p is not parts.prompt.weight]
    assert {p.data_ptr() for p in non_prompt} == model_ptrs
    assert parts.head.embed_tokens is model.model.embed_tokens
    assert parts.tail.blocks.layers[-1] is model.model.layers[-1]
    assert len(parts.body.layers) == 1


def test_only_prompt_and_tail_are_trainable():
    parts = split_model(tiny_bert(), 1, 1, num_prompt_tokens=PROMPT)
    head_flags = [p.requires_grad for n, p in parts.head.named_parameters() if not n.startswith("prompt")]
    assert head_flags and not any(head_flags)
    assert not any(p.requires_grad for p in parts.body.parameters())
    assert parts.prompt.weight.requires_grad
    assert all(p.requires_grad for p in parts.tail.parameters())


def test_tied_lm_head_stays_frozen_untied_lm_head_trains():
    tied = split_model(tiny_llama(tie=True), 1, 1, num_prompt_tokens=PROMPT)
    untied = split_model(tiny_llama(tie=False), 1, 1, num_prompt_tokens=PROMPT)
    assert not tied.tail.lm_head.weight.requires_grad  # it is the head's frozen embedding
    assert tied.tail.norm.weight.requires_grad
    assert untied.tail.lm_head.weight.requires_grad


@pytest.mark.slow  # importing peft takes seconds
def test_lora_on_tail_through_peft_hook_trains_only_adapters_and_prompt():
    from peft import LoraConfig, inject_adapter_in_model

    model = tiny_llama()
    parts = split_model(model, 1, 1, num_prompt_tokens=PROMPT, train_tail="none")
    lora = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)  # B≠0: A gets grads
    inject_adapter_in_model(lora, parts.tail)
    names = [name for name, _ in parts.trainable_parameters()]
    assert names[0] == "head.prompt.weight"
    assert len(names) == 5 and all("lora_" in n for n in names[1:])
    assert_split_matches_unsplit(model, parts, padded_batch("llama"))


@pytest.mark.parametrize(("head", "tail", "match"), [
    (0, 1, "head_layers=0"), (1, 0, "tail_layers=0"), (2, 2, "num_layers=4"), (3, 1, "num_layers=4"),
])
def test_cut_points_that_leave_no_body_or_empty_ends_are_rejected(head, tail, match):
    with pytest.raises(ValueError, match=match):
        split_model(tiny_bert(), head, tail)


def test_unregistered_model_class_is_rejected_with_supported_list():
    with pytest.raises(ValueError, match="no split architecture.*LlamaForCausalLM"):
        split_model(torch.nn.Linear(2, 2))


def test_bert_sequence_longer_than_positions_with_prompt_is_rejected():
    parts = split_model(tiny_bert(), 1, 1, num_prompt_tokens=30)
    with pytest.raises(ValueError, match="max_position_embeddings=32"):
        parts.head(torch.ones(1, 5, dtype=torch.long))


def test_vocab_sampled_prompt_rows_are_vocabulary_embeddings():
    emb = torch.nn.Embedding(VOCAB, 16)
    prompt = SoftPrompt(5, 16, "vocab-sample", embedding=emb, generator=torch.Generator().manual_seed(0))
    is_row = (prompt.weight.detach()[:, None] == emb.weight.detach()[None]).all(dim=-1)
    assert is_row.any(dim=1).all()
    with pytest.raises(ValueError, match="init='nope'"):
        SoftPrompt(5, 16, "nope")  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool])
def test_tensor_wire_format_round_trips_every_dtype(dtype):
    tensor = (torch.randn(2, 3, 4) * 10).to(dtype)
    message = encode_tensor(tensor)
    assert len(message.data) == tensor.numel() * tensor.element_size()
    assert torch.equal(decode_tensor(message), tensor)


def test_tensor_with_inconsistent_byte_size_is_refused():
    message = encode_tensor(torch.zeros(2, 3))
    message.shape[:] = [2, 4]
    with pytest.raises(TensorDecodeError, match="hidden: 24 bytes of data, expected 32"):
        decode_tensor(message, name="hidden")


@pytest.mark.parametrize("tail_layers", [1, 2])
def test_mean_pooled_bert_split_equals_unsplit_model(tail_layers):
    """With mean pooling (all-MiniLM's own) the tail reads every position under the mask, prompt included."""
    from pollinate.common.pooling import use_mean_pooling

    model = use_mean_pooling(tiny_bert())
    parts = split_model(model, head_layers=1, tail_layers=tail_layers, num_prompt_tokens=PROMPT)
    assert_split_matches_unsplit(model, parts, padded_batch("bert"))
