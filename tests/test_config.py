"""scorelab.config: params.yaml validates, every bad edit is reported at its location, the CLI reports them."""

from __future__ import annotations

import copy
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from scorelab.config import (
    ALDSampler, ConfigError, DDPMConfig, NCSNConfig, ODESampler, PCSampler, Params, SubVPConfig, VEConfig,
    VPConfig, VPCosineConfig, load_data_params, load_params, parse_params,
)
from scorelab import config
from scorelab.data import DataConfig
from scorelab.sampling import SAMPLER_FAMILIES
from scorelab.schema import describe_error
from scorelab.sde import SDE_FAMILY, SDE_TYPES

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PARAMS = ROOT / "presets" / "digits.yaml"  # the committed params.yaml

# A valid base; each bad case below is one small edit of it.
BASE: dict[str, Any] = {
    "seed": 0,
    "demo": {"n_samples": 100, "steps": 20},
    "variants": {
        "ddpm": {
            "sde": {"type": "ddpm", "num_steps": 1000, "schedule": "linear"},
            "parameterization": {"type": "eps"},
            "samplers": [{"method": "ancestral", "steps": [1000]}, {"method": "ddim", "steps": [10], "eta": 0.0}],
        },
        "ncsn": {
            "sde": {"type": "ncsn", "sigma_min": 0.01, "sigma_max": 1.0, "num_scales": 10},
            "parameterization": {"type": "score", "scale_by_sigma": True},
            "samplers": [{"method": "ald", "steps_each": 10}],
        },
        "vp": {
            "sde": {"type": "vp", "beta_min": 0.1, "beta_max": 20.0},
            "parameterization": {"type": "eps"},
            "loss": {"weighting": "std2", "reduction": "mean"},
            "ema": {"decay": 0.999},
            "samplers": [{"method": "pc", "steps": [100]}, {"method": "ode"}],
        },
        "ve": {
            "sde": {"type": "ve", "sigma_min": 0.01, "sigma_max": 50.0},
            "parameterization": {"type": "edm", "sigma_data": 0.5},
            "samplers": [{"method": "heun", "steps": [10, 20]}],
        },
    },
}

DELETE = object()


def edited(*edits: tuple[str, Any]) -> dict:
    """BASE with each (dotted.path, value) set; value DELETE removes the key, list indices are ints."""
    data = copy.deepcopy(BASE)
    for path, value in edits:
        *parents, last = path.split(".")
        node = data
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
        key: Any = int(last) if isinstance(node, list) else last
        if value is DELETE:
            del node[key]
        elif isinstance(node, list) and key == len(node):
            node.append(value)
        else:
            node[key] = value
    return data


def rename(path: str, new: str) -> list[tuple[str, Any]]:
    """Edits that rename the key at `path` to `new` (a typo)."""
    node: Any = BASE
    for p in path.split("."):
        node = node[int(p)] if isinstance(node, list) else node[p]
    return [(path.rsplit(".", 1)[0] + "." + new if "." in path else new, node), (path, DELETE)]


def problems_of(data: Any) -> list[str]:
    with pytest.raises(ConfigError) as e:
        parse_params(data)
    return e.value.problems


def test_base_is_valid():
    params = parse_params(BASE)
    assert list(params.variants) == ["ddpm", "ncsn", "vp", "ve"]


def test_committed_params_yaml_validates():
    # presets/digits.yaml is the committed params.yaml (tests/test_presets.py); the working copy of params.yaml
    # is the user's to change (`make run PRESET=toy2d` copies a preset over it), so tests never read it
    params = load_params(DEFAULT_PARAMS)
    assert isinstance(params, Params)
    assert set(params.variants) == {"ddpm", "ncsn", "vp", "subvp", "ve"}
    for name, v in params.variants.items():
        assert v.sde.type == name
        sde = v.sde.build()
        assert sde.family == v.sde.family


# ---------------------------------------------------------------------------------------------
# SDE configs build exactly what get_sde builds.

SDE_CASES = [
    VPConfig(), VPConfig(beta_min=0.05, beta_max=10.0, eps=1e-4),
    SubVPConfig(), SubVPConfig(beta_min=0.2, beta_max=15.0, eps=1e-3),
    VPCosineConfig(), VPCosineConfig(s=0.01, T=0.99, eps=1e-3),
    VEConfig(), VEConfig(sigma_min=0.02, sigma_max=80.0, eps=1e-4),
    DDPMConfig(), DDPMConfig(num_steps=100, schedule="cosine"), DDPMConfig(num_steps=500, beta_start=2e-4, beta_end=0.01),
    NCSNConfig(), NCSNConfig(sigma_min=0.05, sigma_max=8.0, num_scales=20),
]


def built_with(sde) -> dict[str, Any]:
    """What a built SDE was made with, read back from its schedule."""
    s = sde.schedule
    if sde.name in ("vp", "subvp"):
        return {"beta_min": s.beta_min, "beta_max": s.beta_max}
    if sde.name == "vp_cosine":
        return {"s": s.s, "T": s.T}
    if sde.name == "ve":
        return {"sigma_min": s.sigma_min, "sigma_max": s.sigma_max}
    if sde.name == "ncsn":
        return {"sigma_min": float(s.sigmas[-1]), "sigma_max": float(s.sigmas[0]), "num_scales": s.num_scales}
    n, betas = s.num_steps, s.betas  # ddpm: linear betas are scaled by 1000 / num_steps
    if torch.allclose(betas, torch.linspace(float(betas[0]), float(betas[-1]), n, dtype=torch.float64)):
        return {"num_steps": n, "schedule": "linear", "beta_start": float(betas[0]) * n / 1000,
                "beta_end": float(betas[-1]) * n / 1000}
    return {"num_steps": n, "schedule": "cosine"}  # beta_start and beta_end are the linear schedule's only


@pytest.mark.parametrize("cfg", SDE_CASES, ids=lambda c: repr(c))
def test_sde_build_uses_every_field(cfg):
    sde = cfg.build()
    assert sde.name == cfg.type
    assert sde.family == cfg.family == SDE_FAMILY[cfg.type]
    fields = cfg.model_dump(exclude={"type", "eps"}, exclude_none=True)
    got = built_with(sde)
    assert got == pytest.approx({k: fields[k] for k in got})
    assert set(fields) - set(got) == ({"beta_start", "beta_end"} if got.get("schedule") == "cosine" else set())
    if getattr(cfg, "eps", None) is not None:
        assert sde.eps == cfg.eps


def test_configs_cover_the_registries():
    def tags(union_alias, field: str) -> set:
        members = typing.get_args(typing.get_args(union_alias)[0])  # Annotated[Union[...], ...]
        return {t for m in members for t in typing.get_args(m.model_fields[field].annotation)}

    assert tags(config.SDEConfig, "type") == set(SDE_TYPES)
    assert tags(config.SamplerConfig, "method") == set(SAMPLER_FAMILIES)


def test_sampler_options_and_steps():
    pc = PCSampler(steps=[10, 20], snr=0.2)
    assert pc.options() == {"grid": "uniform", "predictor": "reverse_diffusion", "corrector": "langevin",
                            "snr": 0.2, "corrector_steps": 1}
    assert pc.step_list() == [10, 20]
    ode = ODESampler()
    assert ode.step_list() == [None]
    assert ode.options() == {"rtol": 1e-5, "atol": 1e-5, "solver": "dopri5", "denoise": True}
    assert ALDSampler().step_list() == [None]
    assert ALDSampler(steps=[5, 10]).step_list() == [5, 10]
    assert "steps" not in ALDSampler(steps=[5]).options()


# ---------------------------------------------------------------------------------------------
# Bad configurations: (edits, exact location, substring of the message). Each edit makes one problem.

BAD = {
    "top-level typo": (rename("seed", "sed"), "sed", "unknown key 'sed'; did you mean 'seed'? valid keys: data, demo, evaluate, mlflow, ray, sample, seed, train, tune, variants"),
    "sigma_mn": (rename("variants.ve.sde.sigma_min", "sigma_mn"), "variants.ve.sde.sigma_mn",
                 "unknown key 'sigma_mn'; did you mean 'sigma_min'? valid keys: eps, sigma_max, sigma_min, type"),
    "continuouse": ([("variants.vp.continuouse", True)], "variants.vp.continuouse",
                    "unknown key 'continuouse'; valid keys: ema, loss, net, parameterization, samplers, sde, train"),
    "typo in sampler": ([("variants.vp.samplers.0.corector", "none")], "variants.vp.samplers.0.corector",
                        "unknown key 'corector'; did you mean 'corrector'?"),
    "typo under ald": ([("variants.ncsn.samplers.0.steps_eachh", 5)], "variants.ncsn.samplers.0.steps_eachh",
                       "did you mean 'steps_each'? valid keys: denoise, method, step_lr, steps, steps_each"),
    "sigma_min >= sigma_max": ([("variants.ve.sde.sigma_min", 60.0)], "variants.ve.sde.sigma_max",
                               "must be > sigma_min (60.0) (got 50.0)"),
    "sigma_min above default sigma_max": ([("variants.ve.sde", {"type": "ve", "sigma_min": 60.0})],
                                          "variants.ve.sde.sigma_max", "must be > sigma_min (60.0) (got 50.0)"),
    "ncsn sigma_min == sigma_max": ([("variants.ncsn.sde.sigma_min", 1.0)], "variants.ncsn.sde.sigma_max",
                                    "must be > sigma_min"),
    "beta_min >= beta_max": ([("variants.vp.sde.beta_min", 30.0)], "variants.vp.sde.beta_max", "must be > beta_min (30.0)"),
    "negative sigma_min": ([("variants.ve.sde.sigma_min", -1.0)], "variants.ve.sde.sigma_min", "must be > 0 (got -1.0)"),
    "steps [0]": ([("variants.vp.samplers.0.steps", [0])], "variants.vp.samplers.0.steps.0", "must be >= 1 (got 0)"),
    "steps empty": ([("variants.vp.samplers.0.steps", [])], "variants.vp.samplers.0.steps", "at least 1 item"),
    "steps not a list": ([("variants.vp.samplers.0.steps", "ten")], "variants.vp.samplers.0.steps",
                         "must be a valid list (got 'ten')"),
    "steps not ints": ([("variants.vp.samplers.0.steps", ["ten"])], "variants.vp.samplers.0.steps.0",
                       "valid integer"),
    "eta 1.5": ([("variants.ddpm.samplers.1.eta", 1.5)], "variants.ddpm.samplers.1.eta", "must be <= 1 (got 1.5)"),
    "sde type vpp": ([("variants.vp.sde.type", "vpp")], "variants.vp.sde.type",
                     "unknown type 'vpp'; did you mean 'vp'? valid types: ddpm, ncsn, subvp, ve, vp, vp_cosine"),
    "sde type missing": ([("variants.vp.sde.type", DELETE)], "variants.vp.sde.type", "missing required key"),
    "method eulr_maruyama": ([("variants.vp.samplers.0.method", "eulr_maruyama")], "variants.vp.samplers.0.method",
                             "unknown method 'eulr_maruyama'; did you mean 'euler_maruyama'?"),
    "ald under vp": ([("variants.vp.samplers.2", {"method": "ald", "steps": [10]})], "variants.vp.samplers.2.method",
                     "'ald' is not defined for 'vp' SDEs; valid for 'vp': ancestral, euler_maruyama"),
    "eta under pc": ([("variants.vp.samplers.0.eta", 0.5)], "variants.vp.samplers.0.eta",
                     "unknown key 'eta'; valid keys: corrector, corrector_steps, grid, method, predictor, snr, steps"),
    "steps under ode": ([("variants.vp.samplers.1.steps", [10])], "variants.vp.samplers.1.steps", "unknown key 'steps'"),
    "seed -1": ([("seed", -1)], "seed", "must be >= 0 (got -1)"),
    "seed not int": ([("seed", 1.5)], "seed", "valid integer"),
    "ema decay 1.0": ([("variants.vp.ema.decay", 1.0)], "variants.vp.ema.decay", "must be < 1 (got 1.0)"),
    "predictor langevin": ([("variants.vp.samplers.0.predictor", "langevin")], "variants.vp.samplers.0.predictor",
                           "must be one of euler_maruyama, reverse_diffusion, ancestral (got 'langevin')"),
    "corrector foo": ([("variants.vp.samplers.0.corrector", "foo")], "variants.vp.samplers.0.corrector",
                      "must be one of none, langevin, ald (got 'foo')"),
    "snr 0": ([("variants.vp.samplers.0.snr", 0)], "variants.vp.samplers.0.snr", "must be > 0"),
    "bad variant name": (rename("variants.vp", "VP-1"), "variants.VP-1", "invalid name 'VP-1'; must match"),
    "no variants": ([("variants", {})], "variants", "at least 1 item"),
    "variants missing": ([("variants", DELETE)], "variants", "missing required key"),
    "ald steps missing for ve": ([("variants.ve.samplers.1", {"method": "ald"})], "variants.ve.samplers.1.steps",
                                 "required for a continuous 've' SDE"),
    "ddpm schedule quadratic": ([("variants.ddpm.sde.schedule", "quadratic")], "variants.ddpm.sde.schedule",
                                "must be one of linear, cosine (got 'quadratic')"),
    "ddpm betas above 1": ([("variants.ddpm.sde.num_steps", 10)], "variants.ddpm.sde.beta_end",
                           "beta_end * 1000 / num_steps must be < 1"),
    "ddpm eps is not a get_sde argument": ([("variants.ddpm.sde.eps", 1e-3)], "variants.ddpm.sde.eps",
                                           "unknown key 'eps'"),
    "vp_cosine eps >= T": ([("variants.vp.sde", {"type": "vp_cosine", "T": 0.9, "eps": 0.95})], "variants.vp.sde.eps",
                           "must be < T (0.9)"),
    "vp_cosine T below default eps": ([("variants.vp.sde", {"type": "vp_cosine", "T": 0.0005})],
                                      "variants.vp.sde.eps", "must be < T (0.0005); the default is 0.001"),
    "ncsn one scale": ([("variants.ncsn.sde.num_scales", 1)], "variants.ncsn.sde.num_scales", "must be >= 2"),
    "parameterization missing": ([("variants.vp.parameterization", DELETE)], "variants.vp.parameterization",
                                 "missing required key"),
    "param type": ([("variants.vp.parameterization.type", "x0")], "variants.vp.parameterization.type",
                   "unknown type 'x0'; valid types: edm, eps, score"),
    "edm sigma_data 0": ([("variants.ve.parameterization.sigma_data", 0)], "variants.ve.parameterization.sigma_data",
                         "must be > 0"),
    "loss weighting": ([("variants.vp.loss.weighting", "likelihood")], "variants.vp.loss.weighting",
                       "must be one of std2, g2"),
    "demo n_samples 0": ([("demo.n_samples", 0)], "demo.n_samples", "must be >= 1 (got 0)"),
    "demo not a mapping": ([("demo", [1, 2])], "demo", "must be a mapping (got [1, 2])"),
    "no samplers": ([("variants.ve.samplers", [])], "variants.ve.samplers", "at least 1 item"),
    # training, data, networks, cluster
    "batch smaller than workers": ([("train.batch_size", 1)], "train.batch_size",
                                   "must be >= ray.num_workers (2) (got 1)"),
    "batch not divisible": ([("train.batch_size", 129)], "train.batch_size",
                            "must be a multiple of ray.num_workers x micro_batch_size"),
    "variant batch not divisible": ([("variants.vp.train", {"batch_size": 6, "micro_batch_size": 2})],
                                    "variants.vp.train.batch_size", "must be a multiple"),
    "bf16 not a setting": ([("train.bf16", "fast")], "train.bf16", "must be true, false or auto (got 'fast')"),
    "sample bf16 not a setting": ([("sample.bf16", 1)], "sample.bf16", "must be true, false or auto (got 1)"),
    "lr 0": ([("train.lr", 0)], "train.lr", "must be > 0 (got 0)"),
    "train steps 0": ([("train.steps", 0)], "train.steps", "must be >= 1 (got 0)"),
    "workers 0": ([("ray.num_workers", 0)], "ray.num_workers", "must be >= 1 (got 0)"),
    "placement": ([("ray.placement_strategy", "STRICT")], "ray.placement_strategy", "PACK"),
    "ray typo": ([("ray.adress", "auto")], "ray.adress", "did you mean 'address'?"),
    "mlflow typo": ([("mlflow.tracking_url", "")], "mlflow.tracking_url", "did you mean 'tracking_uri'?"),
    "data source": ([("data.source", "mnistt")], "data.source", "mnist"),
    "hflip on digits": ([("data.hflip", True)], "data.hflip", "only for natural images"),
    "folder without path": ([("data.source", "folder"), ("data.image_size", 16)], "data.folder",
                            "required when source is 'folder'"),
    "net type": ([("variants.vp.net", {"type": "transformer"})], "variants.vp.net.type", "unknown type 'transformer'"),
    "net dropout 1": ([("variants.vp.net", {"type": "unet", "dropout": 1.0})], "variants.vp.net.dropout", "< 1"),
}


@pytest.mark.parametrize("edits, loc, message", BAD.values(), ids=BAD.keys())
def test_bad_config_reports_location_and_message(edits, loc, message):
    problems = problems_of(edited(*edits))
    assert len(problems) == 1, problems
    where, _, text = problems[0].partition(": ")
    assert where == loc, problems[0]
    assert message in text, problems[0]


def test_no_pydantic_noise_in_locations():
    problems = problems_of(edited(("variants.vp.sde", {"type": "vp_cosine", "s": 2.0}),
                                  ("variants.vp.samplers.0", {"method": "ddim", "steps": [0], "eta": 2})))
    assert problems == [
        "variants.vp.sde.s: must be < 1 (got 2.0)",
        "variants.vp.samplers.0.steps.0: must be >= 1 (got 0)",
        "variants.vp.samplers.0.eta: must be <= 1 (got 2)",
    ]


def test_all_problems_are_reported():
    data = edited(
        *rename("seed", "sed"),
        ("variants.ve.sde.sigma_min", -1.0),
        ("variants.vp.samplers.0.method", "eulr"),
        ("variants.ddpm.samplers.1.eta", 1.5),
        ("variants.ncsn.ema", {"decay": 1.0, "warmup": "maybe"}),
        ("demo.steps", 0),
    )
    locs = [p.partition(": ")[0] for p in problems_of(data)]
    assert sorted(locs) == sorted([
        "sed", "variants.ve.sde.sigma_min", "variants.vp.samplers.0.method", "variants.ddpm.samplers.1.eta",
        "variants.ncsn.ema.decay", "variants.ncsn.ema.warmup", "demo.steps",
    ])


def test_sampler_family_problems_all_reported():
    data = edited(("variants.vp.samplers.0", {"method": "ald", "steps": [1]}),
                  ("variants.vp.samplers.1", {"method": "ald"}))
    assert [p.partition(": ")[0] for p in problems_of(data)] == [
        "variants.vp.samplers.0.method", "variants.vp.samplers.1.method"]


@pytest.mark.parametrize("data, message", [(None, "is empty"), ([1, 2], "must be a mapping"), ("seed", "got str")])
def test_top_level_not_a_mapping(data, message):
    (problem,) = problems_of(data)
    assert message in problem


# ---------------------------------------------------------------------------------------------
# Files


def test_load_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as e:
        load_params(missing)
    assert e.value.problems == [f"{missing}: file not found"]

    broken = tmp_path / "broken.yaml"
    broken.write_text("seed: 0\nvariants:\n  vp: [1, 2\n")
    with pytest.raises(ConfigError) as e:
        load_params(broken)
    (problem,) = e.value.problems
    assert problem.startswith(f"{broken}: invalid YAML at line 4")

    listed = tmp_path / "list.yaml"
    listed.write_text("- seed: 0\n")
    with pytest.raises(ConfigError) as e:
        load_params(listed)
    assert e.value.problems == [f"{listed}: top level must be a mapping of sections, got list"]


def test_duplicate_keys_are_rejected(tmp_path):
    dup = tmp_path / "dup.yaml"
    dup.write_text("seed: 0\nseed: 1\nvariants: {}\n")
    with pytest.raises(ConfigError) as e:
        load_params(dup)
    (problem,) = e.value.problems
    assert problem.startswith(f"{dup}: invalid YAML at line 2") and "duplicate key 'seed'" in problem


def test_yaml_round_trip_of_base(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(BASE))
    assert load_params(path) == parse_params(BASE)


# ---------------------------------------------------------------------------------------------
# CLI


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scorelab", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_cli_validate_ok():
    r = run_cli("validate", "presets/digits.yaml")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 6  # the summary, then each variant's schedule as the code reads it
    assert lines[0].startswith("presets/digits.yaml: valid — seed 0; 5 variant(s): ddpm (ddpm), ncsn (ncsn)")
    assert lines[1].startswith("  ddpm (ddpm): 1000 steps, effective beta 0.0001..0.02; alpha(T) = 0.00635")
    assert lines[3].startswith("  vp (vp): beta(t) 0.1..20 over t in [0, 1]; alpha(T) = 0.00657")


# ---------------------------------------------------------------------------------------------
# Schedules: DDPM's beta_start/beta_end are the 1000-step values, scaled by 1000/num_steps (issue 20)

OLD_TOY2D_DDPM = {"type": "ddpm", "num_steps": 200, "schedule": "linear", "beta_start": 1e-3, "beta_end": 0.1}


def _ddpm_alpha_T(num_steps: int, beta_start: float, beta_end: float) -> float:
    """The chain's alpha(T) = sqrt(prod(1 - beta_i)) with the 1000/N scaling, computed here with numpy."""
    import numpy as np

    betas = np.linspace(beta_start, beta_end, num_steps) * 1000 / num_steps
    return float(np.sqrt(np.prod(1 - betas)))


def test_a_schedule_read_two_ways_is_refused_and_the_fix_named():
    assert _ddpm_alpha_T(200, 1e-3, 0.1) == pytest.approx(3.4e-14, rel=0.01)  # the toy2d preset before the fix
    problems = problems_of(edited(("variants.ddpm.sde", OLD_TOY2D_DDPM)))
    assert len(problems) == 1
    assert problems[0].startswith("variants.ddpm.sde: alpha(T) = 3.4e-14 is below 1e-05"), problems[0]
    assert "effective betas are 0.005..0.5" in problems[0]
    assert "write beta_start: 0.0002, beta_end: 0.02" in problems[0]
    assert "(got" not in problems[0]
    fixed = {**OLD_TOY2D_DDPM, "beta_start": 2e-4, "beta_end": 0.02}  # what the message says to write
    assert parse_params(edited(("variants.ddpm.sde", fixed))).variants["ddpm"].sde.num_steps == 200
    assert _ddpm_alpha_T(200, 2e-4, 0.02) == pytest.approx(0.0054, rel=0.02)  # the unscaled chain


@pytest.mark.parametrize("kind", ["vp", "subvp"])
def test_terminal_alpha_bound_of_the_continuous_vp_types(kind):
    # alpha(1) = exp(-(beta_min + beta_max) / 4) for the linear beta: 1e-5 at beta_max = 4 ln(1e5) - 0.1 = 45.95
    ok = parse_params(edited(("variants.vp.sde", {"type": kind, "beta_min": 0.1, "beta_max": 45.9})))
    assert ok.variants["vp"].sde.beta_max == 45.9
    problems = problems_of(edited(("variants.vp.sde", {"type": kind, "beta_min": 0.1, "beta_max": 46.0})))
    assert problems == ["variants.vp.sde: alpha(T) = 9.88e-06 is below 1e-05: the last steps carry no signal, and an "
                        "x0 estimate there multiplies the network's error by std/alpha = 1.01e+05"]


def test_tune_space_schedules_are_checked_too():
    data = edited(("tune", {"space": [{"sde": {"type": "vp", "beta_max": [20.0, 200.0]}}], "num_trials": 1,
                            "steps": 100, "samplers": [{"method": "ddim", "steps": [10]}]}))
    problems = problems_of(data)
    assert len(problems) == 1 and problems[0].startswith("tune.space.0.sde: alpha(T) = 1.88e-22"), problems


def test_cli_validate_prints_the_toy2d_chain_and_refuses_the_old_one(tmp_path):
    r = run_cli("validate", "presets/toy2d.yaml")
    assert r.returncode == 0, r.stderr
    line = r.stdout.splitlines()[1]
    assert line.startswith("  ddpm (ddpm): 200 steps, effective beta 0.0005..0.1; alpha(T) = ")
    assert float(line.split("alpha(T) = ")[1].split(",")[0]) == pytest.approx(_ddpm_alpha_T(200, 1e-4, 0.02), rel=1e-3)
    old = yaml.safe_load((ROOT / "presets" / "toy2d.yaml").read_text())
    old["variants"]["ddpm"]["sde"] = OLD_TOY2D_DDPM
    bad = tmp_path / "toy2d_old.yaml"
    bad.write_text(yaml.safe_dump(old))
    r = run_cli("validate", str(bad))
    assert r.returncode == 2
    assert "variants.ddpm.sde: alpha(T) = 3.4e-14 is below 1e-05" in r.stderr


def test_x0_thresholding_is_off_by_default_and_only_for_images():
    from scorelab.config import DDIMSampler, DPMSolverSampler, HeunSampler

    for cls in (DDIMSampler, DPMSolverSampler, HeunSampler):  # off: options as before (same folders, same keys)
        assert not {"x0_threshold", "threshold_ratio"} & set(cls(steps=[10]).options())
    assert DDIMSampler(steps=[10], x0_threshold="dynamic").options()["threshold_ratio"] == 0.995
    assert "threshold_ratio" not in DDIMSampler(steps=[10], x0_threshold="clip").options()
    points = edited(("data", {"source": "toy2d"}), ("variants.ddpm.samplers.1.x0_threshold", "clip"))
    assert problems_of(points) == ["variants.ddpm.samplers.1.x0_threshold: only for image data, bounded in [-1, 1]; "
                                   "data.source is 'toy2d' (unbounded points): use 'none' (got 'clip')"]
    images = parse_params(edited(("variants.ddpm.samplers.1.x0_threshold", "dynamic")))
    assert images.variants["ddpm"].samplers[1].x0_threshold == "dynamic"
    bad = problems_of(edited(("variants.ddpm.samplers.1.threshold_ratio", 1.0)))
    assert bad == ["variants.ddpm.samplers.1.threshold_ratio: must be < 1 (got 1.0)"]


def test_cli_validate_bad_file_lists_every_problem(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(edited(*rename("seed", "sed"), ("variants.ve.sde.sigma_min", -1.0))))
    r = run_cli("validate", str(bad))
    assert r.returncode == 2
    head, *lines = r.stderr.splitlines()
    assert head.startswith(f"{bad}: 2 problem(s); first: ") and head.split("; first: ", 1)[1] in lines
    assert sorted(lines) == [
        "sed: unknown key 'sed'; did you mean 'seed'? valid keys: data, demo, evaluate, mlflow, ray, sample, seed, train, tune, variants",
        "variants.ve.sde.sigma_min: must be > 0 (got -1.0)",
    ]


def test_cli_missing_and_broken_files(tmp_path):
    r = run_cli("validate", str(tmp_path / "nope.yaml"))
    assert r.returncode != 0 and "file not found" in r.stderr

    broken = tmp_path / "broken.yaml"
    broken.write_text("seed: [0\n")
    r = run_cli("validate", str(broken))
    assert r.returncode != 0 and f"{broken}: invalid YAML at line 2" in r.stderr


def test_cli_usage_errors_return_a_code():
    from scorelab.cli import main

    assert main(["validate", str(DEFAULT_PARAMS)]) == 0
    assert main([]) == 2


def test_schema_labels_and_union_tags_are_dropped_from_locations():
    loc = ("variants", "vp", "samplers", 0, "function-after[_check(), PCSampler]", "pc", "snr")
    err = {"type": "greater_than", "loc": loc, "msg": "Input should be greater than 0", "input": -1.0, "ctx": {"gt": 0}}
    assert describe_error(err, Params) == "variants.vp.samplers.0.snr: must be > 0 (got -1.0)"
    unknown = {"type": "extra_forbidden", "loc": loc[:-1] + ("snrr",), "msg": "Extra inputs are not permitted"}
    assert describe_error(unknown, Params).startswith("variants.vp.samplers.0.snrr: unknown key 'snrr'; did you mean 'snr'?")


# ---------------------------------------------------------------------------------------------
# What the prepare stage reads: the data section and the seed, nothing else


def test_load_data_params_reads_only_data_and_seed(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"seed": 3, "data": {"source": "toy2d"}, "variants": {"bad": {}}}))
    cfg, seed = load_data_params(path)
    assert seed == 3 and cfg.source == "toy2d"
    path.write_text("")
    cfg, seed = load_data_params(path)  # an empty file: the defaults
    assert seed == Params.model_fields["seed"].default and cfg == DataConfig()


def test_load_data_params_lists_every_problem(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"seed": -1, "data": {"test_fraction": 0.6, "sourc": "mnist"}}))
    with pytest.raises(ConfigError) as e:
        load_data_params(path)
    assert e.value.source == str(path)
    assert e.value.problems[0] == "seed: must be >= 0 (got -1)"  # as load_params says it
    assert [p.partition(":")[0] for p in e.value.problems[1:]] == ["data.test_fraction", "data.sourc"]
    for text, problem in [("seed: 0\nseed: 1\n", "duplicate key 'seed'"), ("- 1\n", "top level must be a mapping"),
                          ("seed: [0\n", "invalid YAML at line 2")]:
        path.write_text(text)
        with pytest.raises(ConfigError) as e:
            load_data_params(path)
        (got,) = e.value.problems
        assert got.startswith(f"{path}: ") and problem in got, got
    with pytest.raises(ConfigError, match="file not found"):
        load_data_params(tmp_path / "missing.yaml")
