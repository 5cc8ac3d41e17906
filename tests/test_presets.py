"""The presets of `make run PRESET=name`: each a whole params file that validates, and `digits` is the default."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from scorelab.config import load_params

REPO = Path(__file__).resolve().parents[1]
PRESETS = sorted(p.stem for p in (REPO / "presets").glob("*.yaml"))


def test_the_documented_presets_exist():
    assert set(PRESETS) == {"digits", "sweep_digits", "toy2d", "mnist", "cifar10"}


def test_sweep_digits_is_the_default_with_a_real_sweep():
    """Everything but the tune section is the default's, so its run adds only the sweep's time to the default's."""
    default, sweep = load_params(REPO / "params.yaml"), load_params(REPO / "presets" / "sweep_digits.yaml")
    assert sweep.model_dump(exclude={"tune"}) == default.model_dump(exclude={"tune"})
    assert sweep.tune.num_trials >= 24 and {c.sde["type"] for c in sweep.tune.space} >= {
        "vp", "subvp", "ve", "ddpm", "ncsn"}


@pytest.mark.parametrize("name", PRESETS)
def test_preset_validates_with_all_five_variants_and_a_sweep(name):
    params = load_params(REPO / "presets" / f"{name}.yaml")
    assert set(params.variants) == {"ddpm", "ncsn", "vp", "subvp", "ve"}
    assert params.tune is not None and params.tune.num_trials >= 2


def test_digits_preset_is_the_committed_default():
    """`make run PRESET=digits` must restore exactly the committed params.yaml (the committed one: the working
    copy is the user's to change, e.g. by `make run PRESET=toy2d`)."""
    shown = subprocess.run(["git", "show", "HEAD:params.yaml"], cwd=REPO, capture_output=True, text=True)
    committed = shown.stdout if shown.returncode == 0 else (REPO / "params.yaml").read_text()  # not a git checkout
    assert (REPO / "presets" / "digits.yaml").read_text() == committed


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_gpu_presets_require_inception_and_sample_50k_per_seed(name):
    params = load_params(REPO / "presets" / f"{name}.yaml")
    assert params.data.source == name
    assert params.evaluate.require_inception and params.sample.n == 50_000 and len(params.sample.seeds) >= 3
    assert params.ray.use_gpu


def test_toy2d_preset_is_cpu_and_two_dimensional():
    params = load_params(REPO / "presets" / "toy2d.yaml")
    assert params.data.source == "toy2d" and not params.ray.use_gpu
    assert all(v.net is not None and v.net.type == "mlp" for v in params.variants.values())
