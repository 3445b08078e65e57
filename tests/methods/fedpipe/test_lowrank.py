"""Heterogeneous-rank LoRA algebra: exact aggregation, stacking, SVD refactorisation, peft state keys."""

import numpy as np
import pytest

from pollinate.methods.fedpipe.lowrank import (
    LoraFactors,
    aggregate_heterogeneous_lora,
    aggregate_lora_adapters,
    factorize_delta,
    group_lora_state,
    lora_delta,
    lora_state_from_factors,
    reproject_lora,
    stack_lora,
    stack_lora_adapters,
)

OUT, IN = 24, 40
PREFIX = "base_model.model.model.layers.0.self_attn"


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


def test_lora_delta_applies_alpha_over_rank_scaling():
    rng = np.random.default_rng(0)
    f = _factors(rng, rank=4, alpha=16)
    expected = 4.0 * (f.b.astype(np.float64) @ f.a.astype(np.float64))
    np.testing.assert_allclose(lora_delta(f.a, f.b, 16), expected, rtol=1e-12)
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
    agg = aggregate_heterogeneous_lora(updates, weights)
    assert agg.shape == (OUT, IN)
    assert _rel_err(agg, _reference(updates, weights)) <= 1e-5
    assert _rel_err(agg, _reference(updates[:3], weights[:3])) <= 1e-5


def test_stack_lora_has_summed_rank_and_equals_aggregate():
    rng = np.random.default_rng(2)
    updates = [_factors(rng, 2, 16), _factors(rng, 4, 8), _factors(rng, 8, 16)]
    weights = [1.0, 2.0, 3.0]
    stacked = stack_lora(updates, weights)
    assert stacked.rank == 14 and stacked.scaling == 1.0
    assert stacked.a.shape == (14, IN) and stacked.b.shape == (OUT, 14)
    assert _rel_err(stacked.delta(), aggregate_heterogeneous_lora(updates, weights)) <= 1e-12
    assert _rel_err(stacked.delta(), _reference(updates, weights)) <= 1e-5


def test_adapters_with_different_module_subsets_count_missing_modules_as_zero():
    rng = np.random.default_rng(3)
    q, k, v = f"{PREFIX}.q_proj", f"{PREFIX}.k_proj", f"{PREFIX}.v_proj"
    clients = [
        {q: _factors(rng, 2, 16), v: _factors(rng, 2, 16)},
        {q: _factors(rng, 8, 16), k: _factors(rng, 8, 16, out=12)},
        {v: _factors(rng, 4, 8)},
    ]
    weights = [1.0, 2.0, 5.0]
    p = np.asarray(weights) / sum(weights)
    agg = aggregate_lora_adapters(clients, weights)
    assert set(agg) == {q, k, v}
    # Normalised over all clients: a client that did not adapt a module moved it by zero.
    ref_q = p[0] * clients[0][q].delta() + p[1] * clients[1][q].delta()
    ref_k = p[1] * clients[1][k].delta()
    ref_v = p[0] * clients[0][v].delta() + p[2] * clients[2][v].delta()
    assert _rel_err(agg[q], ref_q) <= 1e-5
    assert _rel_err(agg[k], ref_k) <= 1e-5
    assert _rel_err(agg[v], ref_v) <= 1e-5
    assert agg[k].shape == (12, IN)
    stacked = stack_lora_adapters(clients, weights)
    assert stacked[q].rank == 10 and stacked[k].rank == 8 and stacked[v].rank == 6


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
    dense, dense_dropped = factorize_delta(aggregate_heterogeneous_lora(updates, weights), rank=4, alpha=8)
    cheap, cheap_dropped = reproject_lora(stack_lora(updates, weights), rank=4, alpha=8)
    assert _rel_err(cheap.delta(), dense.delta()) <= 1e-10
    np.testing.assert_allclose(cheap_dropped, dense_dropped, atol=1e-9)
    assert cheap.a.shape == (4, IN) and cheap.b.shape == (OUT, 4)


def test_errors_name_the_offending_client_and_weight():
    rng = np.random.default_rng(8)
    good = [_factors(rng, 2, 16), _factors(rng, 4, 16)]
    with pytest.raises(ValueError, match=r"update 2 has ΔW shape \(24, 32\).*expected \(24, 40\)"):
        aggregate_heterogeneous_lora([*good, _factors(rng, 2, 16, inp=32)], [1, 1, 1])
    with pytest.raises(ValueError, match="weight -1.0 of update 1 is invalid"):
        aggregate_heterogeneous_lora(good, [1, -1])
    with pytest.raises(ValueError, match="weights sum to 0"):
        aggregate_heterogeneous_lora(good, [0, 0])
    with pytest.raises(ValueError, match="got 3 weights for 2 updates"):
        aggregate_heterogeneous_lora(good, [1, 1, 1])
    with pytest.raises(ValueError, match="no updates"):
        aggregate_heterogeneous_lora([], [])
    clients = [{"m": _factors(rng, 2, 16)}, {"n": _factors(rng, 2, 16)}, {"m": _factors(rng, 2, 16, out=8)}]
    with pytest.raises(ValueError, match=r"module 'm' of client 2 has ΔW shape \(8, 40\)"):
        aggregate_lora_adapters(clients, [1, 1, 1])


def test_lora_factors_reject_inconsistent_shapes():
    with pytest.raises(
        ValueError, match=r"lora_A has shape \(4, 8\) \(rank 4\) but lora_B has shape \(6, 2\)"
    ):
        LoraFactors(np.zeros((4, 8)), np.zeros((6, 2)), alpha=8)
    with pytest.raises(ValueError, match="must be 2-D"):
        LoraFactors(np.zeros(8), np.zeros((6, 1)), alpha=8)
    with pytest.raises(ValueError, match="alpha must be a finite number > 0"):
        LoraFactors(np.zeros((1, 8)), np.zeros((6, 1)), alpha=0)


def test_group_lora_state_pairs_peft_keys_and_round_trips():
    rng = np.random.default_rng(9)
    state = {
        f"{PREFIX}.q_proj.lora_A.weight": rng.normal(size=(4, IN)).astype(np.float32),
        f"{PREFIX}.q_proj.lora_B.weight": rng.normal(size=(OUT, 4)).astype(np.float32),
        f"{PREFIX}.v_proj.lora_A.weight": rng.normal(size=(2, IN)).astype(np.float32),
        f"{PREFIX}.v_proj.lora_B.weight": rng.normal(size=(OUT, 2)).astype(np.float32),
        "base_model.model.score.modules_to_save.weight": np.zeros((2, IN), np.float32),
    }
    grouped = group_lora_state(state)
    assert set(grouped) == {f"{PREFIX}.q_proj", f"{PREFIX}.v_proj"}
    a, b = grouped[f"{PREFIX}.q_proj"]
    assert a.shape == (4, IN) and b.shape == (OUT, 4)
    back = lora_state_from_factors(grouped)
    assert set(back) == set(state) - {"base_model.model.score.modules_to_save.weight"}
    for key, value in back.items():
        np.testing.assert_array_equal(value, state[key])
    named = lora_state_from_factors(grouped, adapter_name="default")
    assert f"{PREFIX}.q_proj.lora_A.default.weight" in named
    assert set(group_lora_state(named)) == set(grouped)


def test_group_lora_state_rejects_unpaired_or_mismatched_factors():
    with pytest.raises(ValueError, match=r"module 'x.q_proj' has lora_A but no lora_B"):
        group_lora_state({"x.q_proj.lora_A.weight": np.zeros((2, 4))})
    with pytest.raises(ValueError, match="rank 2"):
        group_lora_state({"x.q.lora_A.weight": np.zeros((2, 4)), "x.q.lora_B.weight": np.zeros((3, 1))})


@pytest.mark.slow
def test_delta_convention_matches_peft_merge():
    """lora_delta on get_peft_model_state_dict entries equals what peft adds to the base weight on merge."""
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
    grouped = group_lora_state(state)
    assert len(grouped) == 4 and "base_model.model.model.layers.0.self_attn.q_proj" in grouped
    merged = model.merge_and_unload().state_dict()
    for module, (a, b) in grouped.items():
        weight_key = module.removeprefix("base_model.model.") + ".weight"
        added = merged[weight_key].numpy().astype(np.float64) - before[weight_key]
        assert _rel_err(lora_delta(a, b, alpha=12), added) <= 1e-5


def test_update_space_fedavg_is_exact_with_mixed_ranks_and_a_current_global():
    from pollinate.methods.fedpipe.lowrank import apply_weighted_updates

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
