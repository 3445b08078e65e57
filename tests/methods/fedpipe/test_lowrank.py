"""Heterogeneous-rank LoRA algebra: exact update-space aggregation, SVD refactorisation, peft's convention."""

import numpy as np
import pytest

from pollinate.methods.fedpipe.lowrank import (
    LoraFactors,
    apply_weighted_updates,
    factorize_delta,
    reproject_lora,
)

OUT, IN = 24, 40


def _factors(rng: np.random.Generator, rank: int, alpha: float, out: int = OUT, inp: int = IN) -> LoraFactors:
    a = rng.normal(size=(rank, inp)).astype(np.float32)
    b = rng.normal(size=(out, rank)).astype(np.float32)
    return LoraFactors(a=a, b=b, alpha=alpha)


def _reference(updates: list[LoraFactors], weights: list[float]) -> np.ndarray:
    """Σ p_k (α_k / r_k) B_k A_k, written out the obvious way."""
    p = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    total = np.zeros((updates[0].b.shape[0], updates[0].a.shape[1]))
    for p_k, u in zip(p, updates, strict=True):
        r = u.a.shape[0]
        total += p_k * (u.alpha / r) * (u.b.astype(np.float64) @ u.a.astype(np.float64))
    return total


def _rel_err(x: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def _from_zero(update: LoraFactors) -> LoraFactors:
    """Start factors of the same rank and alpha with B = 0: the trained factors' ΔW is all the change."""
    return LoraFactors(a=np.ones_like(update.a), b=np.zeros_like(update.b), alpha=update.alpha)


def _stack(updates: list[LoraFactors], weights: list[float]) -> LoraFactors:
    """The exact aggregate as one LoRA of rank Σ r_k: B = [p_k s_k B_k], A = [A_k], scaling 1."""
    p = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    b = np.concatenate([p_k * u.scaling * u.b.astype(np.float64) for p_k, u in zip(p, updates, strict=True)], axis=1)
    a = np.concatenate([u.a.astype(np.float64) for u in updates], axis=0)
    return LoraFactors(a=a, b=b, alpha=float(a.shape[0]))


def test_delta_applies_alpha_over_rank_scaling():
    rng = np.random.default_rng(0)
    f = _factors(rng, rank=4, alpha=16)
    expected = 4.0 * (f.b.astype(np.float64) @ f.a.astype(np.float64))
    np.testing.assert_allclose(f.delta(), expected, rtol=1e-12)
    assert f.scaling == 4.0 and f.rank == 4


def test_rslora_scales_by_alpha_over_sqrt_rank():
    rng = np.random.default_rng(0)
    f = _factors(rng, rank=4, alpha=16)
    rs = LoraFactors(f.a, f.b, alpha=16, rslora=True)
    np.testing.assert_allclose(rs.delta(), 2.0 * f.delta(), rtol=1e-12)  # 16/sqrt(4) = 8 = 2 · 16/4


def test_aggregate_matches_reference_for_mixed_ranks_and_alphas():
    rng = np.random.default_rng(1)
    updates = [_factors(rng, 2, 16), _factors(rng, 4, 8), _factors(rng, 8, 32), _factors(rng, 4, 4)]
    weights = [10.0, 3.0, 7.0, 0.0]  # a zero-weight client contributes nothing
    changes = [(w, _from_zero(u), u) for w, u in zip(weights, updates, strict=True)]
    agg, dropped = apply_weighted_updates(None, changes, max_rank=64)
    assert agg.delta().shape == (OUT, IN) and np.allclose(dropped, 0.0, atol=1e-8)
    assert _rel_err(agg.delta(), _reference(updates, weights)) <= 1e-5
    assert _rel_err(agg.delta(), _reference(updates[:3], weights[:3])) <= 1e-5


def test_factorize_delta_gives_rank_r_truncation_and_dropped_singular_values():
    rng = np.random.default_rng(4)
    delta = rng.normal(size=(OUT, IN))
    factors, dropped = factorize_delta(delta, rank=4, alpha=16)
    assert factors.a.shape == (4, IN) and factors.b.shape == (OUT, 4) and factors.scaling == 4.0
    u, s, vt = np.linalg.svd(delta, full_matrices=False)
    truncated = (u[:, :4] * s[:4]) @ vt[:4]
    np.testing.assert_allclose(factors.delta(), truncated, atol=1e-10)
    np.testing.assert_allclose(dropped, s[4:], rtol=1e-12)
    assert np.linalg.norm(delta - factors.delta()) == pytest.approx(np.linalg.norm(dropped), rel=1e-10)
    # Symmetric split: both factors carry sqrt(s / scaling), so their norms match.
    assert np.linalg.norm(factors.a) == pytest.approx(np.linalg.norm(factors.b), rel=1e-10)


def test_factorize_delta_is_exact_for_low_rank_input():
    rng = np.random.default_rng(5)
    original = _factors(rng, 3, 6)
    factors, dropped = factorize_delta(original.delta(), rank=3, alpha=6)
    assert _rel_err(factors.delta(), original.delta()) <= 1e-10
    assert np.linalg.norm(dropped) <= 1e-10 * np.linalg.norm(original.delta())


def test_factorize_delta_zero_pads_rank_beyond_matrix_size():
    rng = np.random.default_rng(6)
    delta = rng.normal(size=(3, 5))
    factors, dropped = factorize_delta(delta, rank=8, alpha=8, dtype=np.float32)
    assert factors.a.shape == (8, 5) and factors.b.shape == (3, 8) and factors.a.dtype == np.float32
    assert dropped.size == 0
    assert not factors.a[3:].any() and not factors.b[:, 3:].any()
    assert _rel_err(factors.delta(), delta) <= 1e-6


def test_reproject_lora_equals_factorize_of_the_aggregate():
    rng = np.random.default_rng(7)
    updates = [_factors(rng, 2, 16), _factors(rng, 4, 8), _factors(rng, 8, 16)]
    weights = [3.0, 1.0, 2.0]
    stacked = _stack(updates, weights)
    assert stacked.rank == 14 and _rel_err(stacked.delta(), _reference(updates, weights)) <= 1e-5
    dense, dense_dropped = factorize_delta(stacked.delta(), rank=4, alpha=8)
    cheap, cheap_dropped = reproject_lora(stacked, rank=4, alpha=8)
    assert _rel_err(cheap.delta(), dense.delta()) <= 1e-10
    np.testing.assert_allclose(cheap_dropped, dense_dropped, atol=1e-9)
    assert cheap.a.shape == (4, IN) and cheap.b.shape == (OUT, 4)


def test_errors_name_the_offending_client_and_weight():
    rng = np.random.default_rng(8)
    good = [(1.0, _from_zero(u), u) for u in (_factors(rng, 2, 16), _factors(rng, 4, 16))]
    narrow = _factors(rng, 2, 16, inp=32)
    with pytest.raises(ValueError, match=r"update 2's trained factors has ΔW shape \(24, 32\).*expected \(24, 40\)"):
        apply_weighted_updates(None, [*good, (1.0, good[0][1], narrow)], 8)
    with pytest.raises(ValueError, match=r"the current ΔW has ΔW shape \(24, 32\)"):
        apply_weighted_updates(narrow, good, 8)
    with pytest.raises(ValueError, match="weight -1.0 of update 1 is invalid"):
        apply_weighted_updates(None, [good[0], (-1.0, *good[1][1:])], 8)
    with pytest.raises(ValueError, match="weights sum to 0"):
        apply_weighted_updates(None, [(0.0, *g[1:]) for g in good], 8)
    with pytest.raises(ValueError, match="at least one client update"):
        apply_weighted_updates(None, [], 8)


def test_lora_factors_reject_inconsistent_shapes():
    with pytest.raises(
        ValueError, match=r"lora_A has shape \(4, 8\) \(rank 4\) but lora_B has shape \(6, 2\)"
    ):
        LoraFactors(np.zeros((4, 8)), np.zeros((6, 2)), alpha=8)
    with pytest.raises(ValueError, match="must be 2-D"):
        LoraFactors(np.zeros(8), np.zeros((6, 1)), alpha=8)
    with pytest.raises(ValueError, match="alpha must be a finite number > 0"):
        LoraFactors(np.zeros((1, 8)), np.zeros((6, 1)), alpha=0)


@pytest.mark.slow
def test_delta_convention_matches_peft_merge():
    """LoraFactors.delta() of get_peft_model_state_dict entries equals what peft adds to the base weight on merge."""
    import torch
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128,
    )  # fmt: skip
    base = LlamaForCausalLM(cfg)
    before = {k: v.detach().clone().numpy() for k, v in base.state_dict().items()}
    lcfg = LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(base, lcfg)
    state = {k: v.detach().numpy().copy() for k, v in get_peft_model_state_dict(model).items()}
    modules = [key.removesuffix(".lora_A.weight") for key in state if key.endswith(".lora_A.weight")]
    assert len(modules) == 4 and "base_model.model.model.layers.0.self_attn.q_proj" in modules
    merged = model.merge_and_unload().state_dict()
    for module in modules:
        factors = LoraFactors(state[f"{module}.lora_A.weight"], state[f"{module}.lora_B.weight"], alpha=12)
        weight_key = module.removeprefix("base_model.model.") + ".weight"
        added = merged[weight_key].numpy().astype(np.float64) - before[weight_key]
        assert _rel_err(factors.delta(), added) <= 1e-5


def test_update_space_fedavg_is_exact_with_mixed_ranks_and_a_current_global():
    rng = np.random.default_rng(7)
    out_f, in_f = 24, 16

    def factors(r, alpha):
        return LoraFactors(a=rng.normal(size=(r, in_f)), b=rng.normal(size=(out_f, r)), alpha=alpha)

    current = factors(4, 4.0)
    updates = [(10.0, factors(2, 4.0), factors(2, 4.0)), (30.0, factors(8, 16.0), factors(8, 16.0))]
    expected = current.delta() + sum(
        (w / 40.0) * (trained.delta() - start.delta()) for w, start, trained in updates)
    new, dropped = apply_weighted_updates(current, updates, max_rank=64)
    assert np.allclose(dropped, 0.0, atol=1e-8)
    assert np.linalg.norm(new.delta() - expected) / np.linalg.norm(expected) <= 1e-5
    assert new.scaling == 1.0
    small, dropped_small = apply_weighted_updates(current, updates, max_rank=3)
    assert np.isclose(np.linalg.norm(small.delta() - expected), np.linalg.norm(dropped_small), rtol=1e-6)
