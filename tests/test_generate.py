"""Batch sampling (scorelab.generate, pipeline/sample.py) through a real local Ray on 2 CPUs.

One Ray session serves the module. The models are built directly (random weights, exported like a
trained one): sampling's bookkeeping is under test here, not sample quality.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from scorelab.config import VariantConfig
from scorelab.generate import (FINGERPRINT, BlockedScore, GenerateError, generate, load_samples,
                               sampler_settings)
from scorelab.modality import dequantize, quantize
from scorelab.sampling import sample
from scorelab.checkpoint import build_model, export_model, load_trained

REPO = Path(__file__).resolve().parents[1]
MLP = {"type": "mlp", "hidden": 32, "layers": 2, "emb_dim": 16}
UNET = {"type": "unet", "channels": 8, "channel_mult": [1], "num_res_blocks": 1, "attn_resolutions": [],
        "dropout": 0.0}
DDIM = {"method": "ddim", "steps": [4]}
ANCESTRAL = {"method": "ancestral", "steps": [6]}  # stochastic: exercises the per-sample noise
ODE = {"method": "ode", "rtol": 1e-3, "atol": 1e-3}


def variant(samplers: list[dict], net: dict = MLP, sde: dict | None = None, param: str = "eps") -> VariantConfig:
    return VariantConfig.model_validate({"sde": sde or {"type": "vp"}, "parameterization": {"type": param},
                                         "net": net, "samplers": samplers})


def make_model(path: Path, v: VariantConfig, data_shape: tuple[int, ...], seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = build_model(v, data_shape)
    with torch.no_grad():  # the U-Net's output layer starts at zero: perturb so the score depends on x
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    sd = model.state_dict()
    state = {"ema": {"module." + k: t for k, t in sd.items()}, "step": 0, "config_hash": "x", "run_id": "r"}
    return export_model(state, v, data_shape, path)


@pytest.fixture(scope="module", autouse=True)
def ray_local():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def toy_model(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("toy") / "model.pt", variant([DDIM, ANCESTRAL, ODE]), (2,))


@pytest.fixture(scope="module")
def image_model(tmp_path_factory) -> Path:
    # edm: a random network's denoiser stays near sigma_data, so pixels spread over 0..255 (eps would saturate)
    v = variant([DDIM], net=UNET, param="edm")
    return make_model(tmp_path_factory.mktemp("img") / "model.pt", v, (1, 8, 8))


def run(model: Path, out: Path, samplers: list[dict], **kw):
    kw = {"n_samples": 30, "seeds": (0,), "batch_size": 7, "num_workers": 2, "progress": False, **kw}
    saved = load_trained(model).variant.model_dump(mode="json")
    return generate(model, out, variant=VariantConfig.model_validate({**saved, "samplers": samplers}), **kw)


def chunk_mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("chunk-*.npz")}


# ---------------------------------------------------------------------------------------------


def test_sampler_settings_keys():
    v = variant([{"method": "ddim", "steps": [10, 20]}, {"method": "ddim", "steps": [10], "eta": 0.5},
                 {"method": "ddim", "steps": [20]}, ODE, {"method": "dpm_solver", "steps": [10]}])
    keys = [s.key for s in sampler_settings(v)]
    # ddim-20 appears twice with the same options: one setting; ddim-10 twice with different options: hashed
    assert keys[1:] == ["ddim-20", keys[2], "ode-adaptive", "dpm_solver-10"]
    assert keys[0].startswith("ddim-10-") and keys[2].startswith("ddim-10-") and keys[0] != keys[2]
    assert keys == [s.key for s in sampler_settings(v)]  # stable
    ncsn = variant([{"method": "ald", "steps_each": 2}, {"method": "ald", "steps": [5], "steps_each": 2}],
                   sde={"type": "ncsn"})
    assert [s.key for s in sampler_settings(ncsn)] == ["ald-levels", "ald-5"]
    assert [(s.steps, s.options["steps_each"]) for s in sampler_settings(ncsn)] == [(None, 2), (5, 2)]


def test_samples_do_not_depend_on_batch_size_or_tasks(toy_model, image_model, tmp_path):
    a = run(toy_model, tmp_path / "a", [DDIM, ANCESTRAL], batch_size=7, num_workers=1)
    b = run(toy_model, tmp_path / "b", [DDIM, ANCESTRAL], batch_size=64, num_workers=2)
    assert [r["chunks_drawn"] for r in a] == [5, 5] and [r["chunks_drawn"] for r in b] == [1, 1]
    trained = load_trained(toy_model)
    for key in ("ddim-4", "ancestral-6"):
        xa, xb = load_samples(tmp_path / "a", key, 0), load_samples(tmp_path / "b", key, 0)
        assert xa.dtype == np.float32 and xa.shape == (30, 2)
        np.testing.assert_array_equal(xa, xb)
    # and equal to one in-process call for the same indices, with the network run the same way
    direct = sample(BlockedScore(trained.model, 64), trained.model.sde, (30, 2), "ancestral", 6, seed=0).x.numpy()
    np.testing.assert_array_equal(load_samples(tmp_path / "a", "ancestral-6", 0), direct)

    c = run(image_model, tmp_path / "c", [DDIM], n_samples=12, batch_size=5, num_workers=2)
    d = run(image_model, tmp_path / "d", [DDIM], n_samples=12, batch_size=16, num_workers=1)
    assert c[0]["chunks_drawn"] == 3 and d[0]["chunks_drawn"] == 1
    xc, xd = load_samples(tmp_path / "c", "ddim-4", 0), load_samples(tmp_path / "d", "ddim-4", 0)
    assert xc.dtype == np.uint8 and xc.shape == (12, 8, 8, 1)  # NHWC
    np.testing.assert_array_equal(xc, xd)
    assert len(np.unique(xc)) > 10  # real pixel values, not a clipped 0/255 pattern
    manifest = json.loads((tmp_path / "c" / "ddim-4" / "seed0" / "manifest.json").read_text())
    assert (manifest["count"], manifest["shape"], manifest["dtype"], manifest["layout"]) == (12, [8, 8, 1],
                                                                                             "uint8", "NHWC")
    assert (tmp_path / "c" / "ddim-4" / "grid.png").stat().st_size > 0


def test_quantize_rounds_and_clips():
    x = np.array([-1.5, -1.0, 0.0, 1.0, 2.0, -1 + 2 / 255], np.float32).reshape(1, 1, 2, 3)
    v = quantize(x)
    assert v.dtype == np.uint8 and v.shape == (1, 2, 3, 1)
    assert v.ravel().tolist() == [0, 0, 128, 255, 255, 1]  # 0.0 -> 127.5 -> 128
    pixels = np.arange(256, dtype=np.uint8).reshape(4, 8, 8, 1)  # the data's own x = 2 v / 255 - 1 round trips
    np.testing.assert_array_equal(quantize(dequantize(pixels)), pixels)


def test_interrupted_run_redraws_only_damaged_chunks(toy_model, tmp_path):
    out = tmp_path / "s"
    run(toy_model, out, [DDIM, ANCESTRAL], seeds=(0, 1))
    folder = out / "ancestral-6" / "seed1"
    reference = {(k, s): load_samples(out, k, s) for k in ("ddim-4", "ancestral-6") for s in (0, 1)}
    before = {f: chunk_mtimes(out / f) for f in ("ddim-4/seed0", "ddim-4/seed1", "ancestral-6/seed0",
                                                   "ancestral-6/seed1")}
    (folder / "chunk-7-14.npz").unlink()
    data = (folder / "chunk-21-28.npz").read_bytes()
    (folder / "chunk-21-28.npz").write_bytes(data[: len(data) // 2])  # a write cut short

    rows = run(toy_model, out, [DDIM, ANCESTRAL], seeds=(0, 1))
    assert [(r["setting"], r["seed"], r["chunks_drawn"], r["chunks_reused"]) for r in rows] == [
        ("ddim-4", 0, 0, 5), ("ddim-4", 1, 0, 5), ("ancestral-6", 0, 0, 5), ("ancestral-6", 1, 2, 3)]
    for f, mtimes in before.items():
        after = chunk_mtimes(out / f)
        assert set(after) == set(mtimes)
        changed = {name for name in mtimes if after[name] != mtimes[name]}
        assert changed == ({"chunk-7-14.npz", "chunk-21-28.npz"} if f == "ancestral-6/seed1" else set())
    assert not list(out.rglob("*.tmp"))
    for (k, s), x in reference.items():
        np.testing.assert_array_equal(load_samples(out, k, s), x)


def test_load_samples_reports_gaps(toy_model, tmp_path):
    run(toy_model, tmp_path, [DDIM])
    folder = tmp_path / "ddim-4" / "seed0"
    original = (folder / "chunk-7-14.npz").read_bytes()
    (folder / "chunk-7-14.npz").unlink()
    with pytest.raises(ValueError, match=r"seed0: samples 7\.\.13 are missing") as e:
        load_samples(tmp_path, "ddim-4", 0)
    assert str(folder) in str(e.value)
    (folder / "chunk-7-14.npz").write_bytes((folder / "chunk-0-7.npz").read_bytes())  # wrong contents
    with pytest.raises(ValueError, match=r"chunk-7-14\.npz does not hold samples 7\.\.13"):
        load_samples(tmp_path, "ddim-4", 0)
    (folder / "chunk-7-14.npz").write_bytes(original)
    (folder / "chunk-28-30.npz").unlink()  # a missing last chunk leaves no hole: the manifest's count tells
    with pytest.raises(ValueError, match="chunks hold 28 samples, the manifest says 30"):
        load_samples(tmp_path, "ddim-4", 0)
    (folder / "manifest.json").unlink()
    with pytest.raises(ValueError, match="did not finish"):
        load_samples(tmp_path, "ddim-4", 0)


def test_seeds_nfe_and_grids(toy_model, tmp_path):
    rows = run(toy_model, tmp_path, [DDIM, ODE], n_samples=20, batch_size=8, seeds=(0, 1))
    assert [(r["setting"], r["seed"]) for r in rows] == [("ddim-4", 0), ("ddim-4", 1), ("ode-adaptive", 0),
                                                         ("ode-adaptive", 1)]
    assert not np.array_equal(load_samples(tmp_path, "ddim-4", 0), load_samples(tmp_path, "ddim-4", 1))
    assert not np.array_equal(load_samples(tmp_path, "ode-adaptive", 0), load_samples(tmp_path, "ode-adaptive", 1))

    trained = load_trained(toy_model)
    ddim_nfe = sample(trained.model, trained.model.sde, (8, 2), "ddim", 4).nfe
    manifest = json.loads((tmp_path / "ddim-4" / "seed1" / "manifest.json").read_text())
    assert manifest["nfe"] == ddim_nfe == 4 and rows[1]["nfe"] == 4
    assert manifest["count"] == 20 and manifest["seed"] == 1 and manifest["setting"]["key"] == "ddim-4"
    assert [(c["start"], c["end"]) for c in manifest["chunks"]] == [(0, 8), (8, 16), (16, 20)]

    # the adaptive ODE: one NFE per chunk, each the one its batch made
    ode = json.loads((tmp_path / "ode-adaptive" / "seed0" / "manifest.json").read_text())
    opts = {"rtol": 1e-3, "atol": 1e-3}
    expected = [sample(trained.model, trained.model.sde, (b - a, 2), "ode", seed=0, indices=torch.arange(a, b),
                       **opts).nfe for a, b in [(0, 8), (8, 16), (16, 20)]]
    assert ode["nfe"] == expected and all(n > 2 for n in expected)
    for setting in ("ddim-4", "ode-adaptive"):
        assert (tmp_path / setting / "grid.png").stat().st_size > 0


def test_changed_model_discards_old_chunks(tmp_path):
    v = variant([DDIM])
    model = make_model(tmp_path / "model.pt", v, (2,), seed=0)
    run(model, tmp_path / "out", [DDIM], n_samples=10, batch_size=5)
    first = load_samples(tmp_path / "out", "ddim-4", 0)
    make_model(model, v, (2,), seed=1)  # retrained in place
    rows = run(model, tmp_path / "out", [DDIM], n_samples=12, batch_size=5)  # and more samples asked for
    assert rows[0]["chunks_drawn"] == 3 and rows[0]["chunks_reused"] == 0
    assert sorted(chunk_mtimes(tmp_path / "out" / "ddim-4" / "seed0")) == [
        "chunk-0-5.npz", "chunk-10-12.npz", "chunk-5-10.npz"]
    assert not np.array_equal(load_samples(tmp_path / "out", "ddim-4", 0)[:10], first)


def test_bf16_redraws_the_fixed_step_settings_in_bfloat16_and_keeps_the_adaptive_ode(toy_model, tmp_path):
    from scorelab.runtime import bf16_problem

    run(toy_model, tmp_path, [DDIM, ODE], n_samples=16, batch_size=8)
    fp32 = {key: load_samples(tmp_path, key, 0) for key in ("ddim-4", "ode-adaptive")}
    problem = bf16_problem(torch.device("cpu"))
    rows = run(toy_model, tmp_path, [DDIM, ODE], n_samples=16, batch_size=8, bf16="auto")
    assert [(r["setting"], r["chunks_drawn"], r["chunks_reused"]) for r in rows] == [
        ("ddim-4", 2, 0), ("ode-adaptive", 0, 2)]  # the fingerprint tells float32 chunks from others
    manifest = json.loads((tmp_path / "ddim-4" / "seed0" / "manifest.json").read_text())
    assert manifest["bf16"] is (problem is None) and [c["bf16"] for c in manifest["chunks"]] == [problem is None] * 2
    assert json.loads((tmp_path / "ode-adaptive" / "seed0" / "manifest.json").read_text())["bf16"] is False
    auto = load_samples(tmp_path, "ddim-4", 0)
    np.testing.assert_array_equal(load_samples(tmp_path, "ode-adaptive", 0), fp32["ode-adaptive"])
    if problem:  # auto ran float32 here; true is refused by name, not emulated slowly
        np.testing.assert_array_equal(auto, fp32["ddim-4"])
        with pytest.raises(GenerateError, match="sample.bf16 is true but"):
            run(toy_model, tmp_path, [DDIM, ODE], n_samples=16, batch_size=8, bf16=True)
        return
    run(toy_model, tmp_path, [DDIM, ODE], n_samples=16, batch_size=8, bf16=True)
    assert json.loads((tmp_path / "ddim-4" / "seed0" / FINGERPRINT).read_text())["bf16"] is True
    np.testing.assert_array_equal(load_samples(tmp_path, "ddim-4", 0), auto)  # auto is true where it runs
    gap = np.abs(auto - fp32["ddim-4"]).max()
    # the network ran in bfloat16 (different bits), whose relative rounding of 2^-9 per evaluation moves little
    assert 0 < gap < 0.05 * np.abs(fp32["ddim-4"]).max(), gap


# ---------------------------------------------------------------------------------------------
# The stage script


def write_params(path: Path, sde: dict | None = None) -> Path:
    params = {"seed": 0, "variants": {"toy": {"sde": sde or {"type": "vp"}, "parameterization": {"type": "eps"},
                                              "net": MLP, "samplers": [DDIM]}}}
    path.write_text(yaml.safe_dump(params))
    return path


def stage(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    return subprocess.run([sys.executable, str(REPO / "pipeline" / "sample.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60)


def test_stage_exit_codes(tmp_path):
    params = write_params(tmp_path / "params.yaml")
    missing = stage("--params", str(params), "--variant", "toy", cwd=tmp_path)
    assert missing.returncode == 1
    assert str(Path("outputs") / "train" / "toy" / "model.pt") in missing.stderr and "train stage" in missing.stderr
    unknown = stage("--params", str(params), "--variant", "nope", cwd=tmp_path)
    assert unknown.returncode == 2 and "'nope'" in unknown.stderr and "valid: toy" in unknown.stderr
    (tmp_path / "bad.yaml").write_text("seed: 0\nvariants: {toy: {sde: {type: vpp}}}\n")
    bad = stage("--params", str(tmp_path / "bad.yaml"), "--variant", "toy", cwd=tmp_path)
    assert bad.returncode == 2 and "problem(s)" in bad.stderr


def load_stage():
    spec = importlib.util.spec_from_file_location("sample_stage", REPO / "pipeline" / "sample.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_stage_runs_in_process(toy_model, tmp_path, capsys):
    main = load_stage().main
    params = write_params(tmp_path / "params.yaml")
    out = tmp_path / "samples"
    args = ["--params", str(params), "--variant", "toy", "--model", str(toy_model), "--out", str(out),
            "--n", "10", "--seeds", "0", "3", "--batch-size", "4", "--no-progress"]
    assert main(args) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("ddim-4: 2 seed(s) x 10 samples, NFE 4,") and "6 chunk(s) drawn, 0 reused" in line
    summary = json.loads((out / "summary.json").read_text())
    assert [(r["setting"], r["seed"], r["count"]) for r in summary] == [("ddim-4", 0, 10), ("ddim-4", 3, 10)]
    assert load_samples(out, "ddim-4", 3).shape == (10, 2)
    # params whose variant no longer matches the weights: the model is stale
    assert main([*args[:1], str(write_params(tmp_path / "ve.yaml", {"type": "ve"})), *args[2:]]) == 1
    assert "rerun the train stage" in capsys.readouterr().err


def test_divergence_guard_marks_exploding_and_non_finite_seeds(toy_model, tmp_path):
    """Issue 20's guard: a seed whose samples reach |x| > diverged_above, or are not finite, is marked diverged
    in its manifest and the summary; max_abs is the samples' own largest |x| (before any clipping)."""
    rows = run(toy_model, tmp_path / "ok", [DDIM], seeds=(0, 1), diverged_above=1e9)  # random weights: far out
    x = load_samples(tmp_path / "ok", "ddim-4", 0)
    assert rows[0]["max_abs"] == pytest.approx(float(np.abs(x).max()), rel=1e-6)
    assert not any(r["diverged"] for r in rows)
    summary = json.loads((tmp_path / "ok" / "summary.json").read_text())
    assert [r["diverged"] for r in summary] == [False, False]

    # the same samples against a threshold below their range: diverged, no redraw needed (the chunks keep max_abs)
    rows = run(toy_model, tmp_path / "ok", [DDIM], seeds=(0, 1), diverged_above=0.5 * float(np.abs(x).max()))
    assert all(r["diverged"] and r["chunks_drawn"] == 0 for r in rows)
    manifest = json.loads((tmp_path / "ok" / "ddim-4" / "seed0" / "manifest.json").read_text())
    assert manifest["diverged"] is True and manifest["finite"] is True and manifest["max_abs"] == rows[0]["max_abs"]

    # a chunk written before the guard (no max_abs) still loads, and a re-run draws it again to learn its |x|
    old = tmp_path / "ok" / "ddim-4" / "seed0" / "chunk-0-7.npz"
    with np.load(old) as z:
        arrays = {k: z[k] for k in z.files if k != "max_abs"}
    np.savez(old, **arrays)
    assert np.array_equal(load_samples(tmp_path / "ok", "ddim-4", 0), x)
    rows = run(toy_model, tmp_path / "ok", [DDIM], seeds=(0, 1), diverged_above=1e9)
    assert [r["chunks_drawn"] for r in rows] == [1, 0] and not rows[0]["diverged"]

    # a network that returns NaN: not finite, max_abs null, no grid drawn
    nan_model = make_model(tmp_path / "nan" / "model.pt", variant([DDIM]), (2,))
    trained = load_trained(nan_model)
    with torch.no_grad():
        for p in trained.model.parameters():
            p.fill_(float("nan"))
    v = variant([DDIM])
    sd = trained.model.state_dict()
    export_model({"ema": {"module." + k: t for k, t in sd.items()}, "step": 0, "config_hash": "x", "run_id": "r"},
                 v, (2,), nan_model)
    rows = run(nan_model, tmp_path / "nan_out", [DDIM])
    assert rows[0]["diverged"] is True and rows[0]["max_abs"] is None
    assert not (tmp_path / "nan_out" / "ddim-4" / "grid.png").exists()
    with pytest.raises(ValueError, match="diverged_above must be > 0"):
        run(toy_model, tmp_path / "ok", [DDIM], diverged_above=0.0)


def test_a_thresholded_setting_says_so_in_its_key():
    v = variant([{"method": "ddim", "steps": [10], "x0_threshold": "dynamic"}, {"method": "ddim", "steps": [10]},
                 {"method": "heun", "steps": [5], "x0_threshold": "clip"}])
    settings = sampler_settings(v)
    assert [s.key for s in settings] == ["ddim-10-dynamic", "ddim-10", "heun-5-clip"]
    assert settings[0].options["x0_threshold"] == "dynamic" and "x0_threshold" not in settings[1].options
