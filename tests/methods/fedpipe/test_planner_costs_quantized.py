"""The planner's memory model against memory_probe on SmolLM2-360M / 1.7B-shaped models (batch 1 x 64, LoRA r8
on all seven projections); docs/results/2026-11-30-quantized-base-memory.md has the runs."""

import pytest

from pollinate.common.models import SMOLLM2_1_7B_SHAPE, SMOLLM2_360M_SHAPE
from pollinate.common.profiles import TIER_PROFILES
from pollinate.methods.fedpipe.planner import PlanOptions
from pollinate.methods.fedpipe.planner.costs import CostModel, adapter_param_count, dequant_workspace_bytes
from pollinate.methods.fedpipe.planner.spec import model_spec_from_config

MIB = 2**20
SHAPES = {"360m": SMOLLM2_360M_SHAPE, "1.7b": SMOLLM2_1_7B_SHAPE}
# torch.cuda.max_memory_allocated on an H200 (bitsandbytes through transformers), MiB.
CUDA_PEAKS = {("360m", 32): 1656.1, ("360m", 4): 611.6, ("360m", 8): 753.8,
              ("1.7b", 32): 6993.5, ("1.7b", 4): 1729.7, ("1.7b", 8): 2447.4}
# CPU training high-water mark above the process after imports (VmHWM, reset after loading), MiB.
CPU_PEAKS = {("360m", 32): 1744, ("360m", 4): 788, ("360m", 8): 1106,
             ("1.7b", 32): 7079, ("1.7b", 4): 1848, ("1.7b", 8): 2566}


def _predicted_mib(shape: str, bits: int) -> float:
    spec = model_spec_from_config({"model_type": "llama", **SHAPES[shape]})
    costs = CostModel.build(spec, PlanOptions(seq_len=64, batch_sizes=(1,)), [TIER_PROFILES["medium"]])
    ranks = {m.name: 8 for m in spec.modules}
    return costs.memory_bytes(0, costs.combo(bits, 1), adapter_param_count(spec, ranks)) / MIB


@pytest.mark.parametrize("shape, bits", sorted(CUDA_PEAKS))
def test_memory_model_is_within_ten_percent_of_the_cuda_peaks_and_not_below(shape, bits):
    measured = CUDA_PEAKS[shape, bits]
    assert measured * 0.98 <= _predicted_mib(shape, bits) <= measured * 1.10


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_memory_model_is_within_five_percent_of_the_cpu_fp32_peaks(shape):
    assert _predicted_mib(shape, 32) == pytest.approx(CPU_PEAKS[shape, 32], rel=0.05)


@pytest.mark.parametrize("shape, bits", [(s, b) for s in sorted(SHAPES) for b in (8, 4)])
def test_cpu_quantized_peaks_exceed_the_model_by_less_than_45_percent(shape, bits):
    # glibc keeps freed dequantization buffers: the CPU runs above the model, by a bounded margin.
    assert CPU_PEAKS[shape, bits] / 1.45 <= _predicted_mib(shape, bits) <= CPU_PEAKS[shape, bits]


def test_dequant_workspace_is_one_bf16_copy_of_the_largest_nf4_weight():
    spec = model_spec_from_config({"model_type": "llama", **SMOLLM2_1_7B_SHAPE})
    assert dequant_workspace_bytes(spec, 4) == 2 * 2048 * 8192
    assert dequant_workspace_bytes(spec, 8) == dequant_workspace_bytes(spec, 32) == 0
