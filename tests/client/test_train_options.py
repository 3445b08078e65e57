"""The local loop's training options: micro-batches add up to the whole batch's gradient, autocast runs the
forward in bf16 (fp16 only on CUDA), activation checkpointing keeps the gradients, and the config validates
them."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pollinate.client.step import (
    PrecisionError,
    StepOptions,
    accumulated_step,
    autocast_dtype,
    checkpointing_on,
    micro_batches,
    use_gradient_checkpointing,
)
from pollinate.common.adapters import peft_lora_config, wrap_with_lora
from pollinate.common.config import ConfigError, LoraConfig
from pollinate.common.config_io import build_config
from pollinate.common.lmloss import IGNORE_INDEX, training_loss

CPU = torch.device("cpu")


def lora_decoder():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    model = wrap_with_lora(LlamaForCausalLM(config), peft_lora_config(LoraConfig(dropout=0.0), "llama", "generation"))
    for name, p in model.named_parameters():  # B starts at zero: give A a gradient too
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    return model


def generation_batch() -> dict[str, torch.Tensor]:
    """Four right-padded rows with different answer lengths (so micro-batches hold different token counts)."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 40, (4, 10), generator=generator)
    lengths = [10, 7, 9, 5]
    mask = torch.tensor([[1] * n + [0] * (10 - n) for n in lengths])
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    labels[:, :3] = IGNORE_INDEX  # the prompt
    labels[0, 3:6] = IGNORE_INDEX
    return {"input_ids": ids * mask, "attention_mask": mask, "labels": labels}


def step_gradients(model, batch, options: StepOptions) -> dict[str, torch.Tensor]:
    """The gradients the optimizer sees in one ``accumulated_step`` (captured just before it steps)."""
    params = [p for p in model.parameters() if p.requires_grad]
    names = {id(p): n for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(params, lr=0.0)
    seen = {}
    optimizer.register_step_pre_hook(
        lambda *_: seen.update({names[id(p)]: p.grad.clone() for p in params if p.grad is not None}))
    accumulated_step(model, batch, optimizer, params, 0.0, options, CPU)
    return seen


def test_micro_batches_split_rows_weight_by_labelled_tokens_and_drop_shared_padding():
    batch = generation_batch()
    parts = micro_batches(batch, 2)
    tokens = [int((p["labels"][:, 1:] != IGNORE_INDEX).sum()) for p, _ in parts]
    assert [len(p["input_ids"]) for p, _ in parts] == [2, 2]
    assert [share for _, share in parts] == pytest.approx([t / sum(tokens) for t in tokens])
    assert parts[1][0]["input_ids"].shape[1] == 9  # rows of length 9 and 5: the last column is padding in both
    assert micro_batches(batch, 1) == [(batch, 1.0)]
    assert len(micro_batches({k: v[:1] for k, v in batch.items()}, 4)) == 1


def test_accumulated_micro_batches_give_the_whole_batchs_gradient_and_loss():
    batch = generation_batch()
    whole = step_gradients(lora_decoder(), batch, StepOptions())
    split = step_gradients(lora_decoder(), batch, StepOptions(grad_accumulation=3))
    assert whole.keys() == split.keys() and len(whole) > 0
    assert all(torch.allclose(whole[n], split[n], atol=1e-6) for n in whole)
    params = [p for p in lora_decoder().parameters() if p.requires_grad]
    loss = accumulated_step(lora_decoder(), batch, torch.optim.SGD(params, lr=0.0), params, 0.0,
                            StepOptions(grad_accumulation=2), CPU)
    assert loss == pytest.approx(float(training_loss(lora_decoder(), batch).detach()), rel=1e-5)


def test_bf16_autocast_runs_the_forward_in_bf16_and_keeps_fp32_weights():
    model = lora_decoder()
    dtypes = set()
    model.base_model.model.model.layers[0].mlp.up_proj.register_forward_hook(
        lambda _m, _i, out: dtypes.add(out.dtype))
    grads = step_gradients(model, generation_batch(), StepOptions(precision="bf16"))
    assert dtypes == {torch.bfloat16}
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads.values())
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


def test_fp16_needs_cuda_and_says_what_to_use_instead():
    with pytest.raises(PrecisionError, match=r"train.precision = 'fp16' needs a CUDA device.*bf16"):
        autocast_dtype("fp16", CPU)
    assert autocast_dtype("fp32", CPU) is None and autocast_dtype("bf16", CPU) is torch.bfloat16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 autocast with loss scaling needs CUDA")
def test_fp16_on_cuda_scales_the_loss_and_steps():
    from pollinate.client.step import loss_scaler

    cuda = torch.device("cuda")
    model = lora_decoder().to(cuda)
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    batch = {k: v.to(cuda) for k, v in generation_batch().items()}
    scaler = loss_scaler("fp16", cuda)
    loss = accumulated_step(model, batch, optimizer, params, 1.0, StepOptions(2, "fp16"), cuda, scaler=scaler)
    assert scaler is not None and loss > 0 and scaler.get_scale() > 1
    assert any(not torch.equal(a, p) for a, p in zip(before, params, strict=True))


def test_gradient_checkpointing_recomputes_the_same_gradients():
    batch = generation_batch()
    plain = step_gradients(lora_decoder(), batch, StepOptions())
    model = lora_decoder()
    use_gradient_checkpointing(model, True)
    assert checkpointing_on(model)
    model.train()
    checkpointed = step_gradients(model, batch, StepOptions())
    assert all(torch.allclose(plain[n], checkpointed[n], atol=1e-6) for n in plain)
    use_gradient_checkpointing(model, False)
    assert not checkpointing_on(model)


def test_the_options_validate_with_one_line_errors():
    cfg = build_config(None, ["train.grad_accumulation=4", "train.precision=bf16", "train.gradient_checkpointing=true",
                              "lora.base_bits=4"])
    assert (cfg.train.grad_accumulation, cfg.train.precision, cfg.lora.base_bits) == (4, "bf16", 4)
    for bad, field in (("train.grad_accumulation=9", "train.grad_accumulation"), ("train.precision=fp8", "precision"),
                       ("lora.base_bits=16", "lora.base_bits")):
        with pytest.raises(ConfigError, match=field):
            build_config(None, [bad])


def test_a_simulation_refuses_fp16_on_clients_without_a_gpu():
    from pollinate.client.step import check_simulated_precision

    with pytest.raises(ConfigError, match="fp16.*federation.client_gpus"):
        check_simulated_precision("fp16", 0.0, "")
    check_simulated_precision("fp16", 0.5, "")
    check_simulated_precision("bf16", 0.0, "")
