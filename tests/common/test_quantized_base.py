"""Quantized CPU bases built one checkpoint tensor at a time (common/quantized_base.py via quantize.py)."""

import weakref

import bitsandbytes as bnb
import pytest
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from pollinate.common import quantized_base
from pollinate.common.models import load_model, resolve_model, write_random_checkpoint
from pollinate.common.quantize import load_quantized_base, prepare_quantized_model, quantization_config

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LAYER = {4: bnb.nn.Linear4bit, 8: bnb.nn.Linear8bitLt}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny layers gain nothing from threads on a busy machine
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", autouse=True)
def on_cpu():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("POLLINATE_DEVICE", "cpu")
        yield


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    # hidden 128 / intermediate 256: multiples of bitsandbytes' 64-weight NF4 blocks; two shards.
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, tie_word_embeddings=True)
    path = tmp_path_factory.mktemp("tiny-llama-sharded")
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(config)
    write_random_checkpoint(skeleton, 0.02, path, shard_bytes=200_000)
    config.save_pretrained(path)
    return str(path)


def _batch(seed=2):
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


def test_read_checkpoint_yields_every_tensor_in_storage_of_its_own(llama_dir):
    files = quantized_base.checkpoint_files(llama_dir)
    assert len(files) > 1
    expected = {k: v for f in files for k, v in load_file(f).items()}
    read = {}
    for name, tensor in quantized_base.read_checkpoint(llama_dir):
        assert tensor.untyped_storage().nbytes() == tensor.nbytes  # not a view into a mapped file
        read[name] = tensor
    assert read.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(read[name], tensor, rtol=0, atol=0)


def test_a_directory_without_safetensors_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no model.safetensors"):
        quantized_base.checkpoint_files(tmp_path)


@pytest.mark.parametrize("bits", [4, 8])
def test_loader_holds_at_most_one_fp32_weight_of_a_quantized_layer(llama_dir, monkeypatch, bits):
    alive: list[weakref.ref] = []
    most = 0
    reader = quantized_base.read_checkpoint

    def spy(path):
        nonlocal most
        for name, tensor in reader(path):
            most = max(most, sum(ref() is not None for ref in alive))
            if "layers." in name and name.endswith("proj.weight"):  # the buffer the tensor views
                alive.append(weakref.ref(tensor if tensor._base is None else tensor._base))
            yield name, tensor

    monkeypatch.setattr(quantized_base, "read_checkpoint", spy)
    model = load_quantized_base(llama_dir, "generation", 0, bits)
    assert len(alive) == 2 * len(TARGETS) and most <= 1
    assert sum(ref() is not None for ref in alive) == 0
    layers = [m for m in model.modules() if isinstance(m, LAYER[bits])]
    assert len(layers) == 2 * len(TARGETS)
    stored = torch.uint8 if bits == 4 else torch.int8
    for layer in layers:  # stored quantized: 4 or 8 bits per weight
        assert layer.weight.dtype == stored
        assert layer.weight.numel() == layer.in_features * layer.out_features * bits // 8


@pytest.mark.parametrize("bits", [4, 8])
def test_cpu_loader_builds_the_same_model_as_transformers_bitsandbytes_path(llama_dir, bits):
    streamed = load_quantized_base(llama_dir, "generation", 0, bits)
    reference = prepare_quantized_model(load_model(llama_dir, "generation",
                                                   quantization_config=quantization_config(bits)))
    ours, theirs = streamed.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0, msg=key)
    assert type(streamed.lm_head) is torch.nn.Linear and streamed.lm_head.weight is streamed.model.embed_tokens.weight
    assert not any(p.requires_grad for p in streamed.parameters())
    assert not any(p.is_meta for p in streamed.parameters())


@pytest.mark.parametrize("bits, tolerance", [(4, 0.25), (8, 0.05)])
def test_quantized_forward_is_close_to_fp32(llama_dir, bits, tolerance):
    full = load_model(llama_dir, "generation")
    quantized = load_quantized_base(llama_dir, "generation", 0, bits)
    ids = _batch()["input_ids"]
    with torch.no_grad():
        expected, got = full(input_ids=ids).logits, quantized(input_ids=ids).logits
    assert ((got - expected).norm() / expected.norm()).item() < tolerance


@pytest.mark.parametrize("bits", [4, 8])
def test_lora_on_the_quantized_base_lowers_the_loss(llama_dir, bits):
    torch.manual_seed(1)
    model = get_peft_model(load_quantized_base(llama_dir, "generation", 0, bits),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch, losses = _batch(), []
    model.train()
    for _ in range(6):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_adapter_keys_and_shapes_match_the_fp32_base(llama_dir):
    def shapes(base):
        torch.manual_seed(1)
        state = get_peft_model_state_dict(get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)))
        assert all(v.dtype == torch.float32 for v in state.values())
        return {k: tuple(v.shape) for k, v in state.items()}

    reference = shapes(load_model(llama_dir, "generation"))
    assert len(reference) == 2 * 2 * len(TARGETS)
    assert shapes(load_quantized_base(llama_dir, "generation", 0, 4)) == reference
    assert shapes(load_quantized_base(llama_dir, "generation", 0, 8)) == reference


@pytest.mark.parametrize("bits", [32, 16])
def test_full_precision_bits_load_the_plain_model(llama_dir, bits):
    model = load_quantized_base(llama_dir, "generation", 0, bits)
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear and model.dtype == torch.float32


def test_classifier_head_stays_fp32_and_is_initialized_fresh():
    path = resolve_model("tiny-bert").path
    model = load_quantized_base(path, "classification", 5, 4, ["classifier"])
    assert type(model.classifier) is torch.nn.Linear and model.classifier.out_features == 5
    assert not any(p.is_meta for p in model.parameters())
    assert model.classifier.weight.std() > 0
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()) > 0
    reference = load_model(path, "classification", 5)
    torch.testing.assert_close(model.bert.embeddings.word_embeddings.weight,
                               reference.bert.embeddings.word_embeddings.weight)


@pytest.mark.parametrize("avx512bf16, dtype", [(True, torch.bfloat16), (False, torch.float32)])
def test_nf4_computes_in_bf16_only_on_cpus_with_avx512_bf16(llama_dir, monkeypatch, avx512bf16, dtype):
    monkeypatch.setattr(bnb.functional, "has_avx512bf16", lambda: avx512bf16)
    layers = [m for m in load_quantized_base(llama_dir, "generation", 0, 4).modules()
              if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(m.compute_dtype == dtype for m in layers)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_the_base_is_loaded_by_transformers_bitsandbytes(llama_dir, monkeypatch):
    monkeypatch.setenv("POLLINATE_DEVICE", "cuda")
    monkeypatch.setattr(quantized_base, "load_quantized_cpu", lambda *a, **k: pytest.fail("CPU loader on CUDA"))
    model = load_quantized_base(llama_dir, "generation", 0, 4)
    assert next(model.parameters()).is_cuda
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()) == 2 * len(TARGETS)
