"""The learning rate across rounds: warmup, then constant, linear or cosine decay to min_lr_ratio; the server
sends the round's multiplier only when a schedule is on, and a client scales train.lr and head_lr by it."""

import math

import pytest

from pollinate.common.config import TrainConfig
from pollinate.common.config_io import build_config
from pollinate.common.lr_schedule import (
    LR_SCALE_KEY,
    lr_multiplier,
    lr_scale_entry,
    read_lr_scale,
    scaled_learning_rates,
)


def _schedule(schedule: str, rounds: int = 5, warmup: int = 0, floor: float = 0.1) -> list[float]:
    return [lr_multiplier(r, rounds, schedule, warmup, floor) for r in range(1, rounds + 1)]


def test_constant_is_one_every_round_after_warmup():
    assert _schedule("constant") == [1.0] * 5
    assert _schedule("constant", warmup=2) == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0, 1.0])


def test_linear_and_cosine_go_from_one_to_the_floor():
    assert _schedule("linear") == pytest.approx([1.0, 0.775, 0.55, 0.325, 0.1])
    cosine = _schedule("cosine")
    assert cosine[0] == 1.0 and cosine[-1] == pytest.approx(0.1) and cosine[2] == pytest.approx(0.55)
    assert cosine[1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert all(a > b for a, b in zip(cosine[:-1], cosine[1:], strict=True))


def test_warmup_ramps_up_to_the_schedule_which_then_decays_over_the_rest():
    assert _schedule("linear", rounds=6, warmup=2, floor=0.0) == pytest.approx([1 / 3, 2 / 3, 1.0, 2 / 3, 1 / 3, 0.0])


def test_a_single_round_after_warmup_trains_at_the_full_rate():
    assert _schedule("cosine", rounds=1) == [1.0] and _schedule("linear", rounds=3, warmup=2)[-1] == 1.0


def test_the_server_sends_a_multiplier_only_when_a_schedule_is_on():
    assert lr_scale_entry(TrainConfig(), 2, 5) == {}
    assert lr_scale_entry(TrainConfig(lr_schedule="linear"), 2, 5) == {LR_SCALE_KEY: pytest.approx(0.775)}
    assert lr_scale_entry(TrainConfig(warmup_rounds=1), 1, 5) == {LR_SCALE_KEY: 0.5}


def test_a_client_scales_lr_and_head_lr_and_defaults_to_one():
    cfg = build_config(None, ["train.lr=0.01", "train.head_lr=0.1"])
    assert read_lr_scale({}) == 1.0 and scaled_learning_rates(cfg, 1.0) is cfg
    scaled = scaled_learning_rates(cfg, read_lr_scale({LR_SCALE_KEY: 0.5}))
    assert (scaled.train.lr, scaled.train.head_lr) == (0.005, 0.05)
    assert scaled.train.local_steps == cfg.train.local_steps and cfg.train.lr == 0.01
    for bad in (0.0, -1.0, float("nan"), "0.5", True):
        with pytest.raises(ValueError, match="'lr-scale'"):
            read_lr_scale({LR_SCALE_KEY: bad})
