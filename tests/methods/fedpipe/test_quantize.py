"""Quantized frozen base (bitsandbytes NF4 / int8) with LoRA on top, on a tiny Llama."""

import bitsandbytes as bnb
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from transformers import LlamaConfig, LlamaForCausalLM

from pollinate.common.models import load_model
from pollinate.common.quantize import is_quantized, prepare_quantized_model, quantization_config

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NUM_LINEARS = 2 * len(TARGETS)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny layers gain nothing from threads, and on a busy 2-core machine torch's spinning intra-op
    # threads make each step ~30x slower (measured: 0.8 s vs 0.03 s).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    # hidden 128 / intermediate 256: multiples of bitsandbytes' 64-weight NF4 blocks.
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


def load_quantized(path, bits):
    """The base at ``bits`` as a FedPipe client builds it (``load_model``, then ``prepare_quantized_model``)."""
    return prepare_quantized_model(load_model(path, "generation", quantization_config=quantization_config(bits)))


def _lora(model, seed=1):
    torch.manual_seed(seed)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS))


def _batch(model):
    # load_model puts models on CUDA when there is one.
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(2)).to(model.device)
    return {"input_ids": ids, "labels": ids}


def test_quantization_config_maps_bits_to_bitsandbytes():
    assert quantization_config(32) is None and quantization_config(16) is None
    assert quantization_config(8).load_in_8bit
    nf4 = quantization_config(4)
    assert nf4.load_in_4bit and nf4.bnb_4bit_quant_type == "nf4" and nf4.bnb_4bit_use_double_quant
    assert nf4.bnb_4bit_compute_dtype == torch.bfloat16


def test_quantization_config_error_lists_allowed_bits():
    with pytest.raises(ValueError, match=r"bits must be one of \(32, 16, 8, 4\), got 5"):
        quantization_config(5)


@pytest.mark.parametrize("bits, layer", [(4, bnb.nn.Linear4bit), (8, bnb.nn.Linear8bitLt)])
def test_load_quantized_quantizes_every_block_linear_and_keeps_lm_head(tiny_dir, bits, layer):
    model = load_quantized(tiny_dir, bits)
    assert sum(isinstance(m, layer) for m in model.modules()) == NUM_LINEARS
    assert type(model.lm_head) is torch.nn.Linear
    assert is_quantized(model)
    assert not any(p.requires_grad for p in model.parameters())  # kbit preparation froze the base


def test_full_precision_base_is_plain(tiny_dir):
    model = load_quantized(tiny_dir, 32)
    assert not is_quantized(model) and model.dtype == torch.float32


@pytest.mark.parametrize("bits", [32, 8, 4])
def test_lora_training_step_changes_the_adapter(tiny_dir, bits):
    model = _lora(load_quantized(tiny_dir, bits))
    before = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    loss = model(**_batch(model)).loss
    loss.backward()
    optimizer.step()
    after = get_peft_model_state_dict(model)
    assert torch.isfinite(loss)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) == len(before)  # every LoRA A and B moved


def test_prepare_disables_avx512bf16_repacking_on_every_4bit_layer(tiny_dir, monkeypatch):
    # Pretend to be an AVX512-BF16 CPU so the layers come up with the buggy repacking enabled.
    monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: True)
    model = load_quantized(tiny_dir, 4)
    flags = [m.support_avx512bf16_for_cpu for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(flags) == NUM_LINEARS and not any(flags)


def test_eval_forward_does_not_stop_lora_gradients(tiny_dir, monkeypatch):
    """Regression: bitsandbytes 0.50 repacks 4-bit weights during an eval no-grad forward on AVX512-BF16
    CPUs, after which gradients stop flowing through the base layers."""
    monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: True)
    fresh = _lora(load_quantized(tiny_dir, 4))
    batch = _batch(fresh)
    fresh.train()
    fresh(**batch).loss.backward()
    reference = {n: p.grad.clone() for n, p in fresh.named_parameters() if "lora_B" in n}

    model = _lora(load_quantized(tiny_dir, 4))
    model.eval()
    with torch.no_grad():
        model(**batch)
    model.train()
    model(**batch).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if "lora_B" in n}

    assert len(grads) == NUM_LINEARS
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference[name], msg=name)


def test_adapter_save_and_load_round_trip_on_nf4_base(tiny_dir, tmp_path):
    model = _lora(load_quantized(tiny_dir, 4))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)  # B starts at zero; make the adapter change the output
    model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(load_quantized(tiny_dir, 4), tmp_path / "adapter")
    saved, restored = get_peft_model_state_dict(model), get_peft_model_state_dict(loaded)
    assert saved.keys() == restored.keys()
    for key in saved:
        torch.testing.assert_close(restored[key], saved[key])
    ids = _batch(model)["input_ids"]
    model.eval()
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_adapter_keys_and_shapes_are_identical_across_bits(tiny_dir):
    shapes = {}
    for bits in (32, 8, 4):
        state = get_peft_model_state_dict(_lora(load_quantized(tiny_dir, bits)))
        shapes[bits] = {k: tuple(v.shape) for k, v in state.items()}
        assert all(v.dtype == torch.float32 for v in state.values())
    assert len(shapes[32]) == 2 * NUM_LINEARS
    assert shapes[32] == shapes[8] == shapes[4]


def test_prepare_leaves_unquantized_models_untouched():
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=4, vocab_size=64))
    assert prepare_quantized_model(model) is model
    assert all(p.requires_grad for p in model.parameters())
