"""The answer-only causal-LM loss equals Hugging Face's full-logits loss, gradients included."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pollinate.common.lmloss import IGNORE_INDEX, answer_positions, shifted_targets, training_loss

VOCAB = 96


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def instruction_batch() -> dict[str, torch.Tensor]:
    """Three rows with answers at different places, one left-padded."""
    ids = torch.randint(1, VOCAB, (3, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[2, :3] = 0
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, 6:9] = ids[0, 6:9]
    labels[1, 2:4] = ids[1, 2:4]
    labels[2, 10:] = ids[2, 10:]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def grads(model) -> list[torch.Tensor]:
    out = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return out


def test_positions_are_those_predicting_a_labelled_token_in_any_row():
    labels = instruction_batch()["labels"]
    positions = answer_positions(labels)
    assert positions.tolist() == [1, 2, 5, 6, 7, 9, 10]
    targets = shifted_targets(labels, positions)
    # Row 0 labels tokens 6..8: positions 5, 6, 7 predict them; its other kept positions carry no target.
    assert targets[0].tolist() == [IGNORE_INDEX] * 2 + labels[0, 6:9].tolist() + [IGNORE_INDEX] * 2
    with pytest.raises(ValueError, match="expected \\(batch, seq_len\\)"):
        answer_positions(torch.tensor([1, 2]))


def test_training_loss_equals_full_logits_loss_and_gradients():
    model = tiny_llama()
    batch = instruction_batch()
    reference = model(**batch).loss
    reference.backward()
    reference_grads = grads(model)
    loss = training_loss(model, batch)
    loss.backward()
    torch.testing.assert_close(loss, reference, atol=1e-6, rtol=0)
    for got, want in zip(grads(model), reference_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_training_loss_through_peft_lora_matches_too():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    batch = instruction_batch()
    torch.testing.assert_close(training_loss(model, batch), model(**batch).loss, atol=1e-6, rtol=0)


def test_batch_without_answers_trains_nothing_instead_of_a_nan_loss():
    model = tiny_llama()
    batch = instruction_batch()
    batch["labels"][:] = IGNORE_INDEX
    assert torch.isnan(model(**batch).loss)  # what the full-logits mean gives
    loss = training_loss(model, batch)
    loss.backward()
    assert float(loss) == 0.0 and all(p.grad is None for p in model.parameters())


def test_models_without_a_decoder_accessor_use_logits_to_keep_and_match_too():
    class NoDecoderAccessor(LlamaForCausalLM):
        def get_decoder(self):
            raise AttributeError("no decoder accessor")

    torch.manual_seed(0)
    model = NoDecoderAccessor(tiny_llama().config)
    batch = instruction_batch()
    torch.testing.assert_close(training_loss(model, batch), model(**batch).loss, atol=1e-6, rtol=0)
