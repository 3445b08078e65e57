"""The FLOP counter and the SFPrompt compute probe."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from pollinate.common.config_io import build_config
from pollinate.simulations.compute_probe import FlopCounter, probe


def test_counter_agrees_with_torch_flop_counter_mode_forward_and_backward():
    layer = torch.nn.Linear(16, 8)
    x = torch.randn(4, 16, requires_grad=True)
    with FlopCounter() as ours:
        layer(x).sum().backward()
    with FlopCounterMode(display=False) as theirs:
        layer(x).sum().backward()
    assert ours.flops == theirs.get_total_flops() == 3 * 2 * 4 * 16 * 8  # forward, grad input, grad weight


@pytest.mark.slow
def test_probe_splits_client_and_server_flops_and_compares_with_full_finetuning():
    cfg = build_config(None, ['model.name="tiny-llama"', "federation.clients=4", "data.builtin_examples=96",
                              "sfprompt.local_epochs=1", "sfprompt.local_steps=2", "sfprompt.split_steps=2",
                              'sfprompt.el2n_path="split"'])
    out = probe(cfg, client=0)
    assert out["local_steps"] == 2 and out["split_steps"] == 2
    assert out["split_server_gflops"] > 0 and out["split_client_gflops"] > 0 and out["el2n_gflops"] > 0
    assert out["el2n_path"] == "split" and out["el2n_server_gflops"] > 0  # scoring ran the body on the server
    assert out["client_gflops"] == pytest.approx(out["el2n_gflops"] + out["local_gflops"]
                                                 + out["split_client_gflops"], rel=1e-3)
    # The client never runs the body and trains only prompts + tail: less than full fine-tuning of the same steps.
    assert 0 < out["client_share_vs_full_finetune"] < 1
    assert 0 < out["split_step_client_share"] < 1
