"""FedPipe planner: model specs, cost-model calibration, exactness against brute force, constraints."""

import itertools
import math

import numpy as np
import pytest

from pollinate.common.models import FAMILY_ALL_LINEAR, SMOLLM2_SHAPE
from pollinate.common.profiles import GIB, TIER_PROFILES, ResourceProfile, assign_profiles, comm_seconds
from pollinate.methods.fedpipe.planner import (
    PlanInfeasible,
    PlanOptions,
    combine_importance,
    model_spec_from_model,
    plan_clients,
)
from pollinate.methods.fedpipe.planner.costs import CostModel, adapter_param_count, base_weight_bytes
from pollinate.methods.fedpipe.planner.spec import ModelSpec, ModuleSpec, model_spec_from_config

MIB = 2**20
SMOLLM2_135M_CONFIG = {"model_type": "llama", **SMOLLM2_SHAPE}
TINY_LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 128}


@pytest.fixture(scope="module")
def smollm2():
    return model_spec_from_config(SMOLLM2_135M_CONFIG)


def _importance(spec, seed=0):
    rng = np.random.default_rng(seed)
    return {m.name: float(v) for m, v in zip(spec.modules, rng.gamma(0.5, size=len(spec.modules)), strict=True)}


def plan_client(profile, importance, spec, options=None, client_id=None):
    cid = profile.name if client_id is None else client_id
    return plan_clients([profile], importance, spec, options, client_ids=[cid])[0]


def _plan_costs(costs, spec, ranks, bits, batch, u=0):
    """(memory bytes, compute seconds per round, comm seconds per round) of a plan, by the planner's cost model."""
    j, n_params = costs.combo(bits, batch), adapter_param_count(spec, ranks)
    compute = costs.options.local_steps * costs.step_seconds(u, j, n_params)
    return costs.memory_bytes(u, j, n_params), compute, costs.comm_seconds(u, n_params)


def _objective(importance, ranks, bits, batch, spec, options):
    """The planner's objective, written out from its definition (search.py's docstring)."""
    total = sum(importance.values())
    w = {m.name: importance.get(m.name, 0.0) / total if total > 0 else 1 / len(spec.modules) for m in spec.modules}
    gain = sum(w[n] * math.log2(1 + r) / math.log2(1 + max(options.ranks)) for n, r in ranks.items())
    return gain + options.bits_bonus[bits] + options.batch_bonus * math.log2(batch)


# ---- model specs ---------------------------------------------------------------------------------


def test_smollm2_spec_has_published_size_and_peft_names(smollm2):
    assert smollm2.num_params == 134_515_008
    assert len(smollm2.modules) == 30 * 7
    q3 = next(m for m in smollm2.modules if m.name == "model.layers.3.self_attn.q_proj")
    k3 = next(m for m in smollm2.modules if m.name == "model.layers.3.self_attn.k_proj")
    assert (q3.in_features, q3.out_features, q3.layer) == (576, 576, 3)
    assert (k3.in_features, k3.out_features) == (576, 192)  # 3 KV heads x head_dim 64


@pytest.mark.parametrize("extra", [{}, {"tie_word_embeddings": True}, {"attention_bias": True, "mlp_bias": True}])
def test_llama_spec_from_config_matches_the_instantiated_model(extra):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{k: v for k, v in TINY_LLAMA.items() if k != "model_type"}, **extra)
    model = LlamaForCausalLM(config)
    from_config = model_spec_from_config(config)
    from_dict = model_spec_from_config({**TINY_LLAMA, **extra})
    from_model = model_spec_from_model(model)
    assert from_config == from_model == from_dict
    assert from_config.num_params == model.num_parameters()


def test_bert_spec_from_config_matches_sequence_classification_model():
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        vocab_size=100, max_position_embeddings=32, num_labels=3)
    model = BertForSequenceClassification(config)
    spec = model_spec_from_config(config)
    assert spec == model_spec_from_model(model)
    assert spec.num_params == model.num_parameters()
    assert spec.logit_width == 3
    assert "bert.encoder.layer.1.attention.output.dense" in spec.module_names()
    assert "bert.encoder.layer.1.output.dense" in spec.module_names()


def test_spec_from_config_rejects_unknown_architecture():
    with pytest.raises(ValueError, match=r"model_type 'gpt2' is not described.*model_spec_from_model"):
        model_spec_from_config({"model_type": "gpt2"})


# ---- cost model calibration (measured: SmolLM2 + LoRA r8 on all 7 linears, B x T = 4 x 32) -------------


@pytest.mark.parametrize("bits, weights_mib, peak_mib", [(32, 513, 840), (8, 210, 591), (4, 161, 518)])
def test_memory_model_reproduces_measured_smollm2_numbers(smollm2, bits, weights_mib, peak_mib):
    costs = CostModel.build(smollm2, PlanOptions(seq_len=32), [TIER_PROFILES["medium"]])
    r8 = {m.name: 8 for m in smollm2.modules}
    assert base_weight_bytes(smollm2, bits) / MIB == pytest.approx(weights_mib, rel=0.01)
    assert _plan_costs(costs, smollm2, r8, bits, 4)[0] / MIB == pytest.approx(peak_mib, rel=0.01)


def test_compute_model_reproduces_measured_step_time(smollm2):
    # 0.81 s/step measured for fp32 + r8 on all modules, 4 x 32 tokens, on a 0.12 TFLOP/s CPU.
    cpu = ResourceProfile(1.0, 0.12, 10.0, 10.0)
    costs = CostModel.build(smollm2, PlanOptions(seq_len=32, local_steps=1), [cpu])
    seconds = _plan_costs(costs, smollm2, {m.name: 8 for m in smollm2.modules}, 32, 4)[1]
    assert seconds == pytest.approx(0.81, rel=0.1)


def test_cost_model_names_a_choice_outside_the_search_space(smollm2):
    costs = CostModel.build(smollm2, PlanOptions(bits=(32, 4)), [TIER_PROFILES["medium"]])
    with pytest.raises(ValueError, match=r"\(bits, batch_size\) = \(8, 4\) is not among"):
        costs.combo(8, 4)


def test_weak_tier_cannot_hold_fp32_r8_but_plans_with_a_quantized_base(smollm2):
    weak, options = TIER_PROFILES["weak"], PlanOptions()
    r8 = {m.name: 8 for m in smollm2.modules}
    costs = CostModel.build(smollm2, options, [weak])
    for batch in options.batch_sizes:
        assert _plan_costs(costs, smollm2, r8, 32, batch)[0] > weak.memory_bytes
    plan = plan_client(weak, _importance(smollm2), smollm2, options)
    assert plan.bits < 32
    assert plan.est_memory_bytes <= weak.memory_bytes
    assert plan.est_compute_s + plan.est_comm_s <= options.deadline_s
    # The deadline (2 Mbit/s uplink) cuts the adapter below uniform r16.
    assert sum(plan.ranks.values()) < 16 * len(smollm2.modules)


def test_medium_and_strong_tiers_keep_the_fp32_base(smollm2):
    for tier in ("medium", "strong"):
        assert plan_client(TIER_PROFILES[tier], _importance(smollm2), smollm2).bits == 32


# ---- exactness: brute force over every assignment ------------------------------------------------


def _small_spec():
    modules = [ModuleSpec("l0.a", 16, 8, 0), ModuleSpec("l0.b", 8, 24, 0), ModuleSpec("l1.a", 24, 16, 1),
               ModuleSpec("l1.b", 16, 12, 1)]
    return ModelSpec(num_params=3_000, hidden=16, num_layers=2, vocab=64, modules=modules)


def _brute_force(profile, importance, spec, options):
    costs = CostModel.build(spec, options, [profile])
    best = None
    for bits, batch in itertools.product(options.bits, options.batch_sizes):
        for choice in itertools.product(options.ranks, repeat=len(spec.modules)):
            ranks = {m.name: r for m, r in zip(spec.modules, choice, strict=True) if r > 0}
            if not ranks:
                continue
            memory, compute, comm = _plan_costs(costs, spec, ranks, bits, batch)
            if memory <= profile.memory_bytes and compute + comm <= options.deadline_s:
                value = _objective(importance, ranks, bits, batch, spec, options)
                best = value if best is None else max(best, value)
    return best


@pytest.mark.parametrize("ranks", [(0, 1, 2, 4), (1, 3, 4)])
def test_plan_client_equals_brute_force_optimum(ranks):
    spec = _small_spec()
    options = PlanOptions(ranks=ranks, bits=(32, 8, 4), batch_sizes=(1, 2, 4), seq_len=4, local_steps=2,
                          deadline_s=1.0)
    rng = np.random.default_rng(42)
    binding = feasible = infeasible = 0
    full = {m.name: max(ranks) for m in spec.modules}
    costs = CostModel.build(spec, options, [TIER_PROFILES["medium"]])
    least = min(_plan_costs(costs, spec, {}, b, s)[0] for b, s in costs.combos)
    most = max(_plan_costs(costs, spec, full, b, s)[0] for b, s in costs.combos)
    for trial in range(20):
        importance = {m.name: float(v) for m, v in zip(spec.modules, rng.gamma(0.7, size=4), strict=True)}
        profile = ResourceProfile(
            memory_gib=float(rng.uniform(0.85 * least, 1.05 * most) / GIB),
            compute_tflops=float(10 ** rng.uniform(-6.3, -5.5)),
            uplink_mbps=float(10 ** rng.uniform(-2.0, -1.0)),
            downlink_mbps=float(10 ** rng.uniform(-1.5, -0.5)),
        )
        expected = _brute_force(profile, importance, spec, options)
        if expected is None:
            infeasible += 1
            with pytest.raises(PlanInfeasible):
                plan_client(profile, importance, spec, options, client_id=trial)
            continue
        plan = plan_client(profile, importance, spec, options, client_id=trial)
        feasible += 1
        assert plan.objective == pytest.approx(expected, abs=1e-12), trial
        assert plan.objective == pytest.approx(
            _objective(importance, plan.ranks, plan.bits, plan.batch_size, spec, options), abs=1e-12)
        assert plan.est_memory_bytes <= profile.memory_bytes
        assert plan.est_compute_s + plan.est_comm_s <= options.deadline_s
        binding += sum(plan.ranks.values()) < max(ranks) * len(spec.modules)
    # The draw must exercise all regimes, or the comparison proves little.
    assert feasible >= 8 and infeasible >= 1 and binding >= 4, (feasible, infeasible, binding)


# ---- constraints, determinism, caching -----------------------------------------------------------


def test_plans_respect_budgets_and_report_the_cost_model_of_their_ranks(smollm2):
    options = PlanOptions()
    profiles = assign_profiles("mixed", 40, seed=1) + list(TIER_PROFILES.values())
    plans = plan_clients(profiles, _importance(smollm2), smollm2, options)
    costs = CostModel.build(smollm2, options, profiles)
    for u, (profile, plan) in enumerate(zip(profiles, plans, strict=True)):
        assert plan.est_memory_bytes <= profile.memory_bytes
        assert plan.est_compute_s + plan.est_comm_s <= options.deadline_s
        memory, compute, comm = _plan_costs(costs, smollm2, plan.ranks, plan.bits, plan.batch_size, u)
        assert (plan.est_memory_bytes, plan.est_compute_s, plan.est_comm_s) == pytest.approx((memory, compute, comm))


def test_spare_deadline_becomes_extra_local_steps_within_the_fill(smollm2):
    options = PlanOptions(local_steps=5, max_local_steps=40, deadline_s=30.0, deadline_fill=0.8)
    fixed = PlanOptions(local_steps=5, deadline_s=30.0)
    profiles = list(TIER_PROFILES.values())
    plans = plan_clients(profiles, _importance(smollm2), smollm2, options)
    # Extra steps never change what is trained or sent: same modules, ranks, bits and batch.
    for plan, base in zip(plans, plan_clients(profiles, _importance(smollm2), smollm2, fixed), strict=True):
        assert (plan.ranks, plan.bits, plan.batch_size) == (base.ranks, base.bits, base.batch_size)
        assert base.local_steps == 5 and 5 <= plan.local_steps <= 40
        step_s = base.est_compute_s / 5
        assert plan.est_compute_s == pytest.approx(plan.local_steps * step_s)
        if plan.local_steps > 5:  # raised only within the fill, and as far as it goes
            assert plan.est_compute_s + plan.est_comm_s <= 0.8 * 30.0 + 1e-9
        if plan.local_steps < 40:
            assert (plan.local_steps + 1) * step_s + plan.est_comm_s > 0.8 * 30.0
    assert len({p.local_steps for p in plans}) > 1  # faster tiers get more steps
    with pytest.raises(ValueError, match="max_local_steps"):
        PlanOptions(max_local_steps=-1)


def test_stronger_tiers_never_score_lower(smollm2):
    importance = _importance(smollm2)
    weak, medium, strong = (plan_client(TIER_PROFILES[t], importance, smollm2) for t in ("weak", "medium", "strong"))
    assert weak.objective <= medium.objective <= strong.objective


def test_plan_clients_is_deterministic_and_caches_identical_profiles(smollm2):
    profiles = assign_profiles("tiers", 9, seed=2)
    importance = _importance(smollm2)
    first = plan_clients(profiles, importance, smollm2, client_ids=range(100, 109))
    assert first == plan_clients(profiles, importance, smollm2, client_ids=range(100, 109))
    assert [p.client_id for p in first] == [str(i) for i in range(100, 109)]
    twins = [i for i, p in enumerate(profiles) if p == profiles[0]]
    assert len(twins) == 3
    a, b = first[twins[0]], first[twins[1]]
    assert a.ranks == b.ranks and a.bits == b.bits
    a.ranks.clear()  # each client's plan owns its ranks dict
    assert b.ranks


def test_zero_importance_modules_are_not_adapted_when_others_fit(smollm2):
    names = smollm2.module_names()
    importance = {n: 1.0 for n in names if n.endswith(("q_proj", "v_proj"))}
    plan = plan_client(TIER_PROFILES["strong"], importance, smollm2)
    assert set(plan.ranks) == set(importance)


def test_all_zero_importance_means_uniform(smollm2):
    plan = plan_client(TIER_PROFILES["strong"], {}, smollm2)
    assert set(plan.ranks) == set(smollm2.module_names())


def test_infeasible_client_error_names_client_budget_and_minimum(smollm2):
    tiny = ResourceProfile(memory_gib=0.1, compute_tflops=0.03, uplink_mbps=2, downlink_mbps=10, name="watch")
    with pytest.raises(PlanInfeasible) as info:
        plan_clients([TIER_PROFILES["weak"], tiny], {}, smollm2, client_ids=["ok", "c7"])
    message = str(info.value)
    assert "'c7' (watch)" in message and "0.10 GiB memory" in message and "120 s round deadline" in message
    # NF4 base 160 MiB + one 128-token batch of activations is the least it needs.
    needs = float(message.split("needs ")[1].split(" GiB")[0])
    assert 0.4 < needs < 0.6


def test_importance_with_unknown_module_is_rejected(smollm2):
    with pytest.raises(ValueError, match=r"'base_model\.model\.model\.layers\.0\.self_attn\.q_proj'.*"
                                         r"expected names like 'model\.layers\.0\.self_attn\.q_proj'"):
        plan_client(TIER_PROFILES["strong"], {"base_model.model.model.layers.0.self_attn.q_proj": 1.0}, smollm2)
    with pytest.raises(ValueError, match="finite and >= 0, got -1.0"):
        plan_client(TIER_PROFILES["strong"], {"model.layers.0.self_attn.q_proj": -1.0}, smollm2)


def test_plan_options_validation_names_the_field():
    with pytest.raises(ValueError, match=r"PlanOptions\.bits must be a non-empty subset of \(32, 16, 8, 4\)"):
        PlanOptions(bits=(32, 3))
    with pytest.raises(ValueError, match=r"PlanOptions\.ranks"):
        PlanOptions(ranks=(0,))
    with pytest.raises(ValueError, match=r"PlanOptions\.deadline_s must be > 0, got -1"):
        PlanOptions(deadline_s=-1)
    with pytest.raises(ValueError, match=r"PlanOptions\.bits_bonus has no entry for bits \[16\]"):
        PlanOptions(bits=(32, 16), bits_bonus={32: 0.1})


# ---- importance --------------------------------------------------------------------------------


def test_combine_importance_normalises_each_client_then_weights():
    combined = combine_importance([{"a": 10.0, "b": 30.0}, {"a": 1.0}], weights=[1.0, 3.0])
    # client 0 -> a 0.25, b 0.75; client 1 -> a 1.0; weighted mean with weights 1:3.
    assert combined == pytest.approx({"a": (0.25 + 3.0) / 4, "b": 0.75 / 4})
    assert math.isclose(sum(combined.values()), 1.0)


def test_combine_importance_skips_all_zero_clients_and_rejects_negatives():
    assert combine_importance([{"a": 0.0, "b": 0.0}, {"a": 2.0, "b": 2.0}]) == {"a": 0.5, "b": 0.5}
    assert combine_importance([{"a": 0.0, "b": 0.0}]) == {"a": 0.5, "b": 0.5}
    with pytest.raises(ValueError, match=r"importance of 'b' from client 0 must be finite and >= 0, got -1"):
        combine_importance([{"a": 1.0, "b": -1.0}])
    with pytest.raises(ValueError, match="got 1 weights for 2 importance maps"):
        combine_importance([{"a": 1.0}, {"a": 1.0}], weights=[1.0])


def test_param_budget_caps_every_plan_and_keeps_the_most_important_modules():
    spec = model_spec_from_config(SMOLLM2_135M_CONFIG)
    names = spec.module_names()
    importance = {name: (10.0 if ".v_proj" in name else 1.0) for name in names}
    profiles = assign_profiles("tiers", 3, seed=0)
    capped = plan_clients(profiles, importance, spec, PlanOptions(max_adapter_params=50_000))
    free = plan_clients(profiles, importance, spec, PlanOptions())
    for plan in capped:
        assert adapter_param_count(spec, plan.ranks) <= 50_000
        assert sum(".v_proj" in m for m in plan.ranks) >= len(plan.ranks) / 2
    assert max(adapter_param_count(spec, p.ranks) for p in free) > 50_000


# ---- a classifier's head: trained in full and sent every round -------------------------------------


def test_spec_counts_the_head_a_bert_classifier_trains_in_full():
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        vocab_size=100, max_position_embeddings=32, num_labels=3)
    model = BertForSequenceClassification(config)
    targets = FAMILY_ALL_LINEAR["bert"]
    assert model_spec_from_model(model, targets).head_params == 0
    assert model_spec_from_model(model, targets, ["classifier"]).head_params == 64 * 3 + 3
    cls = model_spec_from_model(model, targets, ["classifier", "pooler"])
    assert cls.head_params == 64 * 3 + 3 + 64 * 64 + 64
    assert len(cls.modules) == 2 * 6 and "classifier" not in cls.module_names()
    with pytest.raises(ValueError, match="head_params"):
        ModelSpec(num_params=3_000, hidden=16, num_layers=2, vocab=64, modules=cls.modules[:1], head_params=-1)


def test_head_params_cost_memory_compute_and_bytes_whatever_the_ranks():
    head = 5_000
    bare = _small_spec()
    with_head = ModelSpec(num_params=bare.num_params, hidden=16, num_layers=2, vocab=64, modules=bare.modules,
                          head_params=head)
    options = PlanOptions(bits=(32,), batch_sizes=(4,), local_steps=10, update_bytes_per_param=0.5)
    profile = TIER_PROFILES["weak"]
    a, b = (CostModel.build(spec, options, [profile]) for spec in (bare, with_head))
    assert b.fixed_memory[0] - a.fixed_memory[0] == pytest.approx(16.0 * head)
    comm = comm_seconds(0.5 * head, 0.5 * head, profile)
    compute = 10 * 2.0 * 4 * head / b.speed[0, 0]  # weight gradients, per sequence
    assert b.fixed_seconds[0, 0] - a.fixed_seconds[0, 0] == pytest.approx(comm + compute)
    assert b.comm_seconds(0, 100) - a.comm_seconds(0, 100) == pytest.approx(comm)
    assert np.array_equal(a.seconds_per_param, b.seconds_per_param)  # the adapter's cost is unchanged
    plans = [plan_client(profile, {}, spec, options) for spec in (bare, with_head)]
    assert plans[0].ranks == plans[1].ranks
    assert plans[1].est_memory_bytes - plans[0].est_memory_bytes == pytest.approx(16.0 * head)
    assert plans[1].est_comm_s - plans[0].est_comm_s == pytest.approx(comm)


def test_a_head_that_does_not_fit_makes_the_client_infeasible_and_says_so():
    bare = _small_spec()
    options = PlanOptions(bits=(32,), batch_sizes=(1,), seq_len=4)
    needs = CostModel.build(bare, options, [TIER_PROFILES["weak"]]).memory_bytes(0, 0, 8 * (16 + 8))
    profile = ResourceProfile(memory_gib=(needs + 1_000) / GIB, compute_tflops=1, uplink_mbps=10, downlink_mbps=10)
    assert plan_client(profile, {}, bare, options).ranks  # fits without a head
    with_head = ModelSpec(num_params=bare.num_params, hidden=16, num_layers=2, vocab=64, modules=bare.modules,
                          head_params=1_000)
    with pytest.raises(PlanInfeasible, match="with the 1000 head parameters trained in full"):
        plan_client(profile, {}, with_head, options)
