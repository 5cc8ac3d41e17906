"""The learning-rate schedules of `train:` against torch's own schedulers (LinearLR for the warm-up,
CosineAnnealingLR and LinearLR for the decays), their validation, and per-variant overrides."""

from __future__ import annotations

import pytest
import torch

from scorelab.config import ConfigError, TrainConfig, parse_params
from scorelab.training import learning_rate, resolve_train


def torch_lrs(scheduler_for, lr: float, n: int) -> list[float]:
    """The lr of each of n steps under the torch scheduler scheduler_for(optimizer) builds."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    sched, out = scheduler_for(opt), []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("schedule, final", [("cosine", 0.0), ("cosine", 0.1), ("linear", 0.0), ("linear", 0.25)])
def test_warmup_then_decay_equals_torchs_schedulers(schedule, final):
    train = TrainConfig(steps=300, lr=2e-3, warmup_steps=40, lr_schedule=schedule, final_lr_fraction=final)
    ours = [learning_rate(train, s) for s in range(train.steps)]
    warm = torch_lrs(lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor=1 / 40, end_factor=1.0,
                                                                  total_iters=39), 2e-3, 40)
    span = train.steps - train.warmup_steps
    if schedule == "cosine":
        decay = torch_lrs(lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=span, eta_min=final * 2e-3),
                          2e-3, span)
    else:
        decay = torch_lrs(lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor=1.0, end_factor=final,
                                                                      total_iters=span), 2e-3, span)
    assert ours == pytest.approx(warm + decay, rel=1e-9, abs=1e-15)
    assert ours[39] == ours[40] == 2e-3 and min(ours[40:]) > final * 2e-3  # continuous; the floor is approached
    assert all(a >= b for a, b in zip(ours[40:], ours[41:]))  # monotone decay


def test_constant_is_the_warmup_then_lr_as_before():
    train = TrainConfig(steps=100, lr=1e-3, warmup_steps=10)
    assert [learning_rate(train, s) for s in range(100)] == [1e-3 * min(1.0, (s + 1) / 10) for s in range(100)]
    assert learning_rate(TrainConfig(steps=5, lr=1e-3, warmup_steps=0, lr_schedule="cosine"), 0) == 1e-3
    # a warm-up as long as the run leaves nothing to decay: no division by zero
    assert learning_rate(TrainConfig(steps=10, lr=1e-3, warmup_steps=10, lr_schedule="linear"), 9) == 1e-3


def test_schedule_settings_are_validated():
    with pytest.raises(ValueError, match="final_lr_fraction 0.1 is where a decay ends, but lr_schedule is constant"):
        TrainConfig(final_lr_fraction=0.1)
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig(lr_schedule="exponential")
    with pytest.raises(ValueError, match="final_lr_fraction"):
        TrainConfig(lr_schedule="cosine", final_lr_fraction=1.5)


def test_a_variant_overrides_the_schedule(tmp_path):
    variant = {"sde": {"type": "vp"}, "parameterization": {"type": "eps"},
               "samplers": [{"method": "ddim", "steps": [10]}]}
    params = parse_params({"data": {"source": "toy2d", "out_dir": str(tmp_path)},
                           "train": {"lr_schedule": "cosine", "final_lr_fraction": 0.1},
                           "variants": {"a": variant, "b": {**variant, "train": {"lr_schedule": "linear"}}}})
    assert (resolve_train(params, "a").lr_schedule, resolve_train(params, "b").lr_schedule) == ("cosine", "linear")
    assert resolve_train(params, "b").final_lr_fraction == 0.1
    with pytest.raises(ConfigError, match="lr_schedule"):
        parse_params({"data": {"source": "toy2d", "out_dir": str(tmp_path)},
                      "variants": {"a": {**variant, "train": {"lr_schedule": "step"}}}})
