"""Power-function EMA profiles (scorelab.ema.PowerEMA) against exact answers, and their configuration."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from scorelab.config import ConfigError, EMAConfig, parse_params
from scorelab.ema import PowerEMA, gamma_of, sigma_rel_of

REPO = Path(__file__).resolve().parents[1]


class Scalar(nn.Module):
    """One float64 "weight": the average of scalars is then exact to float64 rounding."""

    def __init__(self, value: float):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(value, dtype=torch.float64))


def theta(tau: int) -> float:
    return math.sin(tau) + tau / 10


def power_average(t: int, gamma: float) -> float:
    """sum_tau tau^gamma theta_tau / sum_tau tau^gamma over the updates tau = 1..t: the definition."""
    weights = [tau ** gamma for tau in range(1, t + 1)]
    return math.fsum(w * theta(tau) for tau, w in zip(range(1, t + 1), weights)) / math.fsum(weights)


@pytest.mark.parametrize("sigma_rel", [0.05, 0.10, 0.20, 0.28])
def test_power_ema_is_the_power_weighted_average_across_a_save_and_load(sigma_rel):
    model = Scalar(1e6)  # the construction-time weights get no weight: a huge value would show
    ema = PowerEMA(model, sigma_rel)
    gamma = ema.gamma
    for tau in range(1, 21):
        model.w.data.fill_(theta(tau))
        ema.update(model)
        assert float(ema.module.w) == pytest.approx(power_average(tau, gamma), rel=1e-13, abs=1e-13), tau
    resumed = PowerEMA(Scalar(-5.0), sigma_rel)  # other weights and a fresh count, overwritten by the state
    resumed.load_state_dict(ema.state_dict())
    assert resumed.num_updates == 20
    for tau in range(21, 61):
        model.w.data.fill_(theta(tau))
        ema.update(model)
        resumed.update(model)
        assert torch.equal(resumed.module.w, ema.module.w), tau  # the resumed average continues exactly
    assert float(resumed.module.w) == pytest.approx(power_average(60, gamma), rel=1e-13)
    # not the classic EMA's, nor a uniform average
    assert abs(float(ema.module.w) - math.fsum(theta(t) for t in range(1, 61)) / 60) > 1e-3


def test_sigma_rel_and_gamma_follow_the_closed_form():
    # sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3)): at gamma = 1, 2 / (9 * 4)
    assert sigma_rel_of(1.0) == pytest.approx(math.sqrt(1 / 18), rel=1e-15)
    for gamma in (0.01, 0.5, 1.0, 6.94, 16.97, 300.0):
        assert gamma_of(sigma_rel_of(gamma)) == pytest.approx(gamma, rel=1e-9)
    # the paper's pairs (Karras et al. 2024, sec. 3.1): sigma_rel 0.05 <-> gamma 16.97, 0.10 <-> 6.94
    assert gamma_of(0.05) == pytest.approx(16.97, abs=0.005)
    assert gamma_of(0.10) == pytest.approx(6.94, abs=0.005)
    for bad in (0.0, -0.1, math.sqrt(1 / 12), 0.3):
        with pytest.raises(ValueError, match="sigma_rel must be in"):
            gamma_of(bad)


def _params_with_profiles(profiles, **ema) -> dict:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["variants"]["vp"]["ema"] = {**params["variants"]["vp"]["ema"], "profiles": profiles, **ema}
    return params


@pytest.mark.parametrize("profiles,message", [
    ([0.1, 0.3], r"variants\.vp\.ema\.profiles: each sigma_rel must be in \(0, sqrt\(1/12\) = 0\.2887\).*got 0\.3"),
    ([0.0], r"variants\.vp\.ema\.profiles: each sigma_rel must be in .*got 0"),
    ([0.1, 0.1], r"variants\.vp\.ema\.profiles: the profiles must differ"),
])
def test_invalid_profiles_are_refused_naming_the_field(profiles, message):
    with pytest.raises(ConfigError, match=message):
        parse_params(_params_with_profiles(profiles))


def test_selection_sampler_must_fit_the_sde():
    with pytest.raises(ConfigError, match=r"variants\.vp\.ema\.select\.sampler\.method: .*'ald'"):
        parse_params(_params_with_profiles([0.1], select={"sampler": {"method": "ald"}}))
    ok = parse_params(_params_with_profiles([0.05, 0.1]))
    ema = ok.variants["vp"].ema
    assert ema.candidates() == ["ema-0.995", "power-0.05", "power-0.10"]
    assert (ema.select.sampler.method, ema.select.sampler.steps, ema.select.n_samples, ema.select.seeds) == \
        ("dpm_solver", [10], 256, 2)


def test_without_profiles_the_ema_section_dumps_as_before():
    # the config hash and config.json of a variant without profiles must not change
    assert EMAConfig(decay=0.99).model_dump(mode="json") == {"decay": 0.99, "warmup": True}
    assert set(EMAConfig(profiles=[0.1]).model_dump(mode="json")) == {"decay", "warmup", "profiles", "select"}
