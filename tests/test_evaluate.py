"""The featurizer and evaluate stages (scorelab.featurizer, scorelab.evaluate, pipeline/featurizer.py,
pipeline/evaluate.py)
on real inputs: prepared digits and toy data, models with random weights exported like trained ones,
samples drawn by scorelab.generate through a real local Ray, and a local sqlite MLflow store.

A random model is far from the data, so its distances must come out far above the real-vs-real
baseline at the same N; per-seed values are checked against the metric functions called directly.
Inception FID runs on a small RGB folder dataset with randomly initialised Inception weights (a forward
at 299x299 and a 2048-d Frechet distance cost seconds each on one CPU thread).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from PIL import Image
from test_inception import save_random_inception

from scorelab import tracking
from scorelab.config import EvalConfig, RayConfig, load_params
from scorelab.data import load_manifest, prepare, read_split
from scorelab.evaluate import INCEPTION_REF_FILE, EvaluateError, evaluate_variant
from scorelab.features import (INCEPTION_WEIGHTS_ENV, INCEPTION_WEIGHTS_FILE, domain_frechet, extract_features,
                               inception_stats, load_classifier, load_inception)
from scorelab.generate import generate, load_samples
from scorelab.inception import read_reference, reference_key, inception_weights
from scorelab.metrics import (bootstrap_indices, bootstrap_interval, frechet_distance, frechet_replicates,
                              sliced_wasserstein, t_interval)
from scorelab.modality import dequantize
from scorelab.storage import sha256_file
from scorelab.checkpoint import build_model, export_model

REPO = Path(__file__).resolve().parents[1]
UNET = {"type": "unet", "channels": 8, "channel_mult": [1], "num_res_blocks": 1, "attn_resolutions": [],
        "dropout": 0.0}
MLP = {"type": "mlp", "hidden": 32, "layers": 2, "emb_dim": 16}
N = 32  # samples per seed (images); the 2-D data gets 64
SEEDS = (0, 1, 2)
FAST = ["--bpd-samples", "6", "--probes", "2"]  # a few test images suffice to check bits/dim's bookkeeping


def load_stage(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_stage", REPO / "pipeline" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


featurizer_main, evaluate_main = load_stage("featurizer"), load_stage("evaluate")


def make_project(root: Path, data: dict, variant: dict, n: int, seeds: tuple[int, ...] = SEEDS) -> dict:
    """params.yaml, the prepared data, an MLflow run, a random-weights model.pt carrying that run's id
    and n samples per seed of every setting: what the earlier stages leave under root."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump({"seed": 0, "data": data, "variants": {"v": variant}}))
    params = load_params(root / "params.yaml")
    manifest = prepare(params.data.model_copy(update={"out_dir": str(root / "data" / "prepared")}), seed=0)
    uri = tracking.resolve_tracking_uri("", root)
    exp = tracking.experiment_id(uri, f"scorelab-{manifest.source}", root)
    run_id = tracking.start_or_resume_run(uri, exp, "key-v", "v", {})

    vcfg = params.variants["v"]
    torch.manual_seed(0)
    model = build_model(vcfg, manifest.shape)
    with torch.no_grad():  # the U-Net's output layer starts at zero: perturb so the score depends on x
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    state = {"ema": {"module." + k: t for k, t in model.state_dict().items()}, "step": 0, "config_hash": "x",
             "run_id": run_id}
    model_path = export_model(state, vcfg, manifest.shape, root / "outputs" / "train" / "v" / "model.pt")
    samples = root / "outputs" / "samples" / "v"
    # random weights take an eps-network's DDIM far outside the data: the divergence guard is tested on its own
    generate(model_path, samples, n_samples=n, seeds=seeds, batch_size=n, num_workers=1, progress=False,
             diverged_above=1e12)
    return {"root": root, "params": params, "uri": uri, "exp": exp, "run_id": run_id, "samples": samples,
            "args": ["--params", str(root / "params.yaml"), "--variant", "v", "--root", str(root)]}


@pytest.fixture(scope="module", autouse=True)
def ray_local():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module", autouse=True)
def no_machine_inception_weights(tmp_path_factory):
    """Whatever this machine's torch hub cache holds, Inception FID runs only where a test asks for it."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("torch_home")))
        mp.delenv(INCEPTION_WEIGHTS_ENV, raising=False)
        yield


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> dict:
    # edm: a random network's denoiser stays near sigma_data, so pixels spread over 0..255
    variant = {"sde": {"type": "vp"}, "parameterization": {"type": "edm"}, "net": UNET,
               "samplers": [{"method": "ddim", "steps": [4, 8]}, {"method": "euler_maruyama", "steps": [5]}]}
    return make_project(tmp_path_factory.mktemp("digits"), {"source": "digits"}, variant, N)


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> dict:
    variant = {"sde": {"type": "vp"}, "parameterization": {"type": "eps"}, "net": MLP,
               "samplers": [{"method": "ddim", "steps": [4]}, {"method": "ancestral", "steps": [6]}]}
    data = {"source": "toy2d", "toy": {"kind": "gaussian_mixture", "n_train": 2000, "n_test": 500}}
    return make_project(tmp_path_factory.mktemp("toy"), data, variant, 64)


@pytest.fixture(scope="module")
def rgb(tmp_path_factory) -> dict:
    """A tiny RGB folder dataset (two classes of 10 images; 14 train, 6 test), 4 samples per seed from
    one DDIM setting, two seeds, and its featurizer: Inception FID's 299x299 forwards stay few."""
    folder = tmp_path_factory.mktemp("rgb_images")
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, 12)
    for c, name in enumerate(("rows", "cols")):
        (folder / name).mkdir()
        for i in range(10):
            base = np.tile(ramp[:, None], (1, 12)) if c == 0 else np.tile(ramp[None, :], (12, 1))
            img = np.clip(base[..., None] * rng.uniform(0.5, 1, 3) + rng.normal(0, 20, (12, 12, 3)), 0, 255)
            Image.fromarray(img.astype(np.uint8), "RGB").save(folder / name / f"{i}.png")
    variant = {"sde": {"type": "vp"}, "parameterization": {"type": "edm"}, "net": UNET,
               "samplers": [{"method": "ddim", "steps": [2]}]}
    data = {"source": "folder", "folder": str(folder), "image_size": 16, "test_fraction": 0.3}
    project = make_project(tmp_path_factory.mktemp("rgb"), data, variant, 4, seeds=(0, 1))
    assert featurizer_main(project["args"][:2] + ["--root", str(project["root"])]) == 0
    return project


def _evaluate(project: dict, params, out: Path, root: Path | None = None, bpd_samples: int = 0,
              probes: int | None = None) -> dict:
    """evaluate_variant on the project's samples, featurizer and model; the dataset under `root` (default:
    the project's)."""
    here = project["root"]
    return evaluate_variant(params, "v", samples_dir=project["samples"], featurizer_dir=here / "outputs" / "featurizer",
                            model_path=here / "outputs" / "train" / "v" / "model.pt", out_dir=out, root=root or here,
                            bpd_samples=bpd_samples, probes=probes, log_to_mlflow=False)


@pytest.fixture(scope="module")
def featurizer(digits) -> Path:
    assert featurizer_main(["--params", str(digits["root"] / "params.yaml"), "--root", str(digits["root"])]) == 0
    return digits["root"] / "outputs" / "featurizer"


# ---------------------------------------------------------------------------------------------


def test_featurizer_on_digits_and_toy(featurizer, toy, capsys):
    metrics = json.loads((featurizer / "metrics.json").read_text())
    assert metrics["test_accuracy"] >= 0.95 and metrics["train_seconds"] > 0
    model, meta = load_classifier(featurizer / "classifier.pt")
    assert meta["test_accuracy"] == metrics["test_accuracy"]
    x_test = read_split(load_manifest(featurizer.parents[1] / "data" / "prepared" / "digits").root, "test")
    with np.load(featurizer / "ref_test.npz") as z:
        assert z["mu"].shape == (64,) and z["sigma"].shape == (64, 64)
        assert domain_frechet(model, x_test, z["mu"], z["sigma"]) == pytest.approx(0, abs=1e-6)  # its own stats
    with np.load(featurizer / "ref_train.npz") as z:
        assert z["mu"].shape == (64,) and domain_frechet(model, x_test, z["mu"], z["sigma"]) > 0

    out = toy["root"] / "outputs" / "featurizer"
    assert featurizer_main(["--params", str(toy["root"] / "params.yaml"), "--root", str(toy["root"])]) == 0
    assert json.loads((out / "metrics.json").read_text()) == {
        "skipped": "2-D data: distances are computed on the points themselves"}
    assert [p.name for p in out.iterdir()] == ["metrics.json"]
    assert "skipped" in capsys.readouterr().out

    elsewhere = toy["root"] / "unprepared"  # the same params, a root without the prepared data
    assert featurizer_main(["--params", str(toy["root"] / "params.yaml"), "--root", str(elsewhere)]) == 1
    assert "manifest.json: not found" in capsys.readouterr().err
    (elsewhere / "bad.yaml").parent.mkdir()
    (elsewhere / "bad.yaml").write_text("seed: -1\nvariants: {}\n")
    assert featurizer_main(["--params", str(elsewhere / "bad.yaml")]) == 2
    assert "seed: must be >= 0" in capsys.readouterr().err


def test_inception_weights_lookup_never_downloads(rgb, tmp_path, monkeypatch):
    root, params = rgb["root"], rgb["params"]
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    path, reason = inception_weights(params, root, True)
    assert path is None and "no local Inception weights" in reason and "nothing is downloaded" in reason
    assert inception_weights(params, root, False) == (None, "2-D data: there are no images")
    hub = tmp_path / "hub" / "checkpoints" / INCEPTION_WEIGHTS_FILE
    hub.parent.mkdir(parents=True)
    hub.write_bytes(b"not read here")
    assert inception_weights(params, root, True) == (hub, None)
    monkeypatch.setenv(INCEPTION_WEIGHTS_ENV, str(tmp_path / "env.pth"))  # a typo in the variable: recorded
    path, reason = inception_weights(params, root, True)
    assert path is None and "env.pth: file not found" in reason
    (tmp_path / "env.pth").touch()
    assert inception_weights(params, root, True) == (tmp_path / "env.pth", None)
    (root / "weights").mkdir(exist_ok=True)
    (root / "weights" / "inc.pth").touch()  # params paths are relative to the repository root
    explicit = params.model_copy(update={"evaluate": EvalConfig(inception_weights="weights/inc.pth")})
    assert inception_weights(explicit, root, True) == (root / "weights" / "inc.pth", None)


def test_inception_fid_required_absent_or_invalid_fails_cleanly(rgb, tmp_path, monkeypatch, capsys):
    out = tmp_path / "eval"
    out.mkdir()
    (out / "metrics.json").write_text("{}")  # a stale result must not survive a failed evaluation
    params = rgb["params"]

    required = params.model_copy(update={"evaluate": EvalConfig(require_inception=True)})
    with pytest.raises(EvaluateError, match=r"evaluate\.require_inception is true, but no local Inception weights .*"
                                            r"set evaluate\.inception_weights to a local copy of pt_inception"):
        _evaluate(rgb, required, out)
    assert not (out / "metrics.json").exists()

    typo = params.model_copy(update={"evaluate": EvalConfig(inception_weights=str(tmp_path / "typo.pth"))})
    with pytest.raises(EvaluateError, match=r"evaluate\.inception_weights: .*typo\.pth not found"):
        _evaluate(rgb, typo, out)
    (tmp_path / "junk.pth").write_bytes(b"\x00" * 100)
    junk = params.model_copy(update={"evaluate": EvalConfig(inception_weights=str(tmp_path / "junk.pth"))})
    with pytest.raises(EvaluateError, match=r"junk\.pth: not a readable PyTorch weights file.*"
                                            r"evaluate\.inception_weights"):
        _evaluate(rgb, junk, out)

    # the stage: params.evaluate from the file, exit 1, one line naming the field, no metrics.json
    data = yaml.safe_load((rgb["root"] / "params.yaml").read_text())
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({**data, "evaluate": {"require_inception": True}}))
    args = ["--params", str(tmp_path / "params.yaml"), "--variant", "v", "--root", str(rgb["root"]), "--out", str(out),
            "--no-mlflow"]
    assert evaluate_main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("evaluate v: evaluate.require_inception is true") and err.count("\n") == 1
    assert not (out / "metrics.json").exists()


def test_stage_takes_bpd_samples_and_probes_from_params(rgb, tmp_path):
    data = yaml.safe_load((rgb["root"] / "params.yaml").read_text())
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({**data, "evaluate": {"bpd_samples": 3, "probes": 1}}))
    out = tmp_path / "eval"
    args = ["--params", str(tmp_path / "params.yaml"), "--variant", "v", "--root", str(rgb["root"]), "--out", str(out),
            "--no-mlflow"]
    assert evaluate_main(args) == 0
    bpd = json.loads((out / "metrics.json").read_text())["bits_per_dim"]
    assert (bpd["n"], bpd["probes"]) == (3, 1)
    assert evaluate_main(args + ["--probes", "2"]) == 0  # a flag given overrides params
    bpd = json.loads((out / "metrics.json").read_text())["bits_per_dim"]
    assert (bpd["n"], bpd["probes"]) == (3, 2)
    assert evaluate_main(args + ["--bpd-samples", "0"]) == 0
    assert json.loads((out / "metrics.json").read_text())["bits_per_dim"] is None


def test_inception_fid_with_local_weights(rgb, tmp_path):
    weights = save_random_inception(tmp_path / "random_inception.pth")
    params = rgb["params"].model_copy(update={"evaluate": EvalConfig(inception_weights=str(weights))})
    out = tmp_path / "eval"
    m = _evaluate(rgb, params, out)
    assert json.loads((out / "metrics.json").read_text()) == m
    assert (m["n_per_seed"], m["seeds"]) == (4, 2) and "inception_fid" in m["metrics"]
    r = m["settings"]["ddim-2"]
    assert np.isfinite(r["inception_fid_mean"]) and r["inception_fid_mean"] > 0 and r["inception_fid_std"] >= 0
    fids = [r["per_seed"][s]["inception_fid"] for s in ("0", "1")]
    assert r["inception_fid_mean"] == pytest.approx(np.mean(fids)) and r["domain_fd_mean"] is not None
    assert m["inception_fid"] == r["inception_fid_mean"] and m["inception_fid_setting"] == "ddim-2"
    assert "mean ± std over 2 seed(s), N = 4 per seed" in m["inception_fid_reason"]
    assert "not the standard file" in m["inception_fid_reason"]
    info = m["inception"]
    assert info["weights"] == str(weights) and info["weights_sha256"] == sha256_file(weights)
    assert info["standard_weights"] is False and info["reference_n"] == 14 and info["reference_cached"] is False

    base = m["baseline"]  # 4 test images per seed against the train statistics
    assert np.isfinite(base["inception_fid_mean"]) and base["inception_fid_std"] >= 0
    assert "inception_fid: 4 random test images per seed" in base["description"]
    assert base["inception_fid_mean"] < 0.5 * r["inception_fid_mean"]  # real images: closer than noise-like samples
    assert set(base["per_seed"]["1"]) == {"domain_fd", "precision", "recall", "inception_fid"}  # no KID at N = 4
    assert "inception_fid_mean" in (out / "fid_vs_nfe.csv").read_text().splitlines()[0]

    # the numbers are pytorch-fid's network on the stored samples against the train split's statistics
    manifest = load_manifest(rgb["root"] / "data" / "prepared" / "folder")
    x_train = read_split(manifest.root, "train")
    net = load_inception(weights)
    ref = inception_stats(net, x_train)
    with np.load(out / INCEPTION_REF_FILE) as z:
        np.testing.assert_allclose(z["mu"], ref[0], rtol=1e-6)
        assert json.loads(str(z["key"]))["weights_sha256"] == info["weights_sha256"]
    x = dequantize(load_samples(rgb["samples"], "ddim-2", 1))
    assert fids[1] == pytest.approx(frechet_distance(*inception_stats(net, x), *ref), rel=1e-6)

    # the reference is cached under the weights' sha256: the same file reuses it, another recomputes it
    cached = read_reference(out / INCEPTION_REF_FILE, reference_key(sha256_file(weights), manifest))
    assert cached is not None
    np.testing.assert_allclose(cached[0], ref[0], rtol=1e-6)
    other = save_random_inception(tmp_path / "other.pth", seed=1)
    assert read_reference(out / INCEPTION_REF_FILE, reference_key(sha256_file(other), manifest)) is None
    assert read_reference(tmp_path / "absent.npz", reference_key(sha256_file(weights), manifest)) is None


def test_evaluate_digits_settings_baseline_bpd_and_mlflow(digits, featurizer, capsys):
    out = digits["root"] / "outputs" / "eval" / "v"
    assert evaluate_main(digits["args"] + FAST) == 0
    printed = capsys.readouterr().out
    assert "real-vs-real baseline" in printed and "bits/dim" in printed
    m = json.loads((out / "metrics.json").read_text())
    assert (m["variant"], m["sde"], m["n_per_seed"], m["seeds"], m["seed_ids"]) == ("v", "vp", N, 3, [0, 1, 2])
    assert list(m["settings"]) == ["ddim-4", "ddim-8", "euler_maruyama-5"]
    names = ("domain_fd", "precision", "recall")
    assert "kid_x1e3_mean" not in m["settings"]["ddim-4"] and m["kid"] == "left out: N = 32 < 1000"
    assert m["precision_recall"] == {"k": 3, "n_samples": N, "n_reference": 1617}
    for key, r in m["settings"].items():
        assert r["seeds"] == 3 and isinstance(r["nfe"], int)
        for name in names:
            assert r[f"{name}_mean"] is not None and r[f"{name}_std"] >= 0
            low, high = r[f"{name}_ci"]
            assert low <= r[f"{name}_mean"] <= high
    assert [m["settings"][k]["nfe"] for k in ("ddim-4", "ddim-8")] == [4, 8]

    # per-seed distances are features.domain_frechet of the stored samples against the whole train split's
    # statistics; mean and std over seeds
    clf, _ = load_classifier(featurizer / "classifier.pt")
    with np.load(featurizer / "ref_train.npz") as z:
        ref = z["mu"], z["sigma"]
    fds = [domain_frechet(clf, dequantize(load_samples(digits["samples"], "ddim-8", s)), *ref) for s in SEEDS]
    r = m["settings"]["ddim-8"]
    assert [r["per_seed"][str(s)]["domain_fd"] for s in SEEDS] == pytest.approx(fds, rel=1e-9)
    assert r["domain_fd_mean"] == pytest.approx(np.mean(fds))
    assert r["domain_fd_std"] == pytest.approx(np.std(fds, ddof=1))
    # the default interval: Student t over seeds; no bootstrap
    assert r["domain_fd_ci"] == pytest.approx(t_interval(fds, 0.95)) and "domain_fd_replicates" not in r
    assert m["bootstrap"] is None and m["intervals"]["level"] == 0.95
    assert m["intervals"]["domain_fd"].startswith("Student t over seeds")

    base = m["baseline"]
    assert base["seeds"] == 3 and all(base[f"{n}_mean"] is not None for n in names)
    worst_model = min(r["domain_fd_mean"] for r in m["settings"].values())
    assert base["domain_fd_mean"] < 0.25 * worst_model  # real digits are far closer than noise-like samples
    assert (base["n"], base["same_n"]) == (N, True) and "held-out" in base["description"]
    assert base["domain_fd_test_full"] < base["domain_fd_mean"]  # the bias shrinks with N (180 test images)
    assert base["domain_fd_ci"][1] < min(r["domain_fd_ci"][0] for r in m["settings"].values())
    assert base["precision_mean"] > max(r["precision_mean"] for r in m["settings"].values())

    bpd = m["bits_per_dim"]
    assert np.isfinite(bpd["mean"]) and bpd["stderr"] > 0 and bpd["n"] == 6 and bpd["probes"] == 2
    assert bpd["dequantization"] == "uniform, y = (x + u)/256, model x = 2y - 1"
    assert m["inception_fid"] is None and m["inception_fid_reason"]
    assert m["classifier"]["test_accuracy"] >= 0.95
    # no cluster named: computed in this process, with no Ray of its own
    assert m["computed_on"] == {"node": socket.gethostname(), "ray_node_id": None, "device": "cpu"}
    assert "computed on" in printed
    rows = (out / "fid_vs_nfe.csv").read_text().splitlines()
    assert rows[0].startswith("variant,setting,method,steps,nfe,domain_fd_mean,domain_fd_std")
    assert rows[2].startswith("v,ddim-8,ddim,8,8,") and len(rows) == 4

    # MLflow: the training run gets the distance against NFE per sampler, the baseline, bits/dim, files
    client = tracking.client(digits["uri"])
    run_id = digits["run_id"]

    def history() -> dict[str, list[tuple[int, float]]]:
        keys = client.get_run(run_id).data.metrics
        return {k: sorted((p.step, p.value) for p in client.get_metric_history(run_id, k)) for k in keys}

    logged = history()
    assert logged["eval_domain_fd_ddim"] == [(4, m["settings"]["ddim-4"]["domain_fd_mean"]),
                                             (8, m["settings"]["ddim-8"]["domain_fd_mean"])]
    em = m["settings"]["euler_maruyama-5"]
    assert logged["eval_domain_fd_euler_maruyama"] == [(em["nfe"], em["domain_fd_mean"])]
    assert logged["eval_domain_fd_baseline"] == [(0, base["domain_fd_mean"])]
    assert logged["eval_bits_per_dim"] == [(0, bpd["mean"])]
    artifacts = {a.path for a in client.list_artifacts(run_id, "eval")}
    assert {"eval/metrics.json", "eval/fid_vs_nfe.csv", "eval/ddim-4"} <= artifacts
    assert [a.path for a in client.list_artifacts(run_id, "eval/ddim-4")] == ["eval/ddim-4/grid.png"]

    # a rerun: the same values into the same run, no new run and no repeated points
    assert evaluate_main(digits["args"] + FAST) == 0
    assert json.loads((out / "metrics.json").read_text()) == m
    assert len(client.search_runs([digits["exp"]])) == 1
    assert history() == logged


def test_evaluate_bootstrap_replicates_are_the_resampled_distances(digits, featurizer, tmp_path):
    """evaluate.bootstrap 200: each resample's domain FD, indices from (params.seed, seed), mean over seeds."""
    params = digits["params"].model_copy(update={"evaluate": EvalConfig(bootstrap=200)})
    m = _evaluate(digits, params, tmp_path / "eval")
    r = m["settings"]["ddim-8"]
    clf, _ = load_classifier(featurizer / "classifier.pt")
    with np.load(featurizer / "ref_train.npz") as z:
        ref = z["mu"], z["sigma"]
    reps = [frechet_replicates(extract_features(clf, dequantize(load_samples(digits["samples"], "ddim-8", s))),
                               bootstrap_indices(N, 200, [0, s]), *ref) for s in SEEDS]
    assert r["domain_fd_replicates"] == pytest.approx(np.mean(reps, axis=0).tolist(), rel=1e-9)
    assert r["domain_fd_ci"] == pytest.approx(bootstrap_interval(r["domain_fd_mean"], np.mean(reps, axis=0), 0.95))
    assert m["bootstrap"] == {"replicates": 200, "seed": 0, "n": N, "seed_ids": [0, 1, 2]}
    assert m["intervals"]["domain_fd"].startswith("bootstrap over samples")
    assert len(m["baseline"]["domain_fd_replicates"]) == 200


def test_evaluate_toy_mixture(toy):
    out = toy["root"] / "outputs" / "eval" / "v"
    m = evaluate_variant(toy["params"], "v", samples_dir=toy["samples"], featurizer_dir=toy["root"] / "none",
                         model_path=toy["root"] / "outputs" / "train" / "v" / "model.pt", out_dir=out,
                         root=toy["root"], bpd_samples=16, log_to_mlflow=False)
    assert json.loads((out / "metrics.json").read_text()) == m
    assert m["primary_metric"] == "sliced_w2" and m["n_per_seed"] == 64 and m["seeds"] == 3
    for r in m["settings"].values():
        for name in ("sliced_w2", "mmd", "data_loglik"):
            assert r[f"{name}_mean"] is not None and r[f"{name}_std"] >= 0
    assert "higher is better" in m["metrics"]["data_loglik"]
    base = m["baseline"]
    assert base["sliced_w2_mean"] < min(r["sliced_w2_mean"] for r in m["settings"].values())
    assert base["data_loglik_mean"] > max(r["data_loglik_mean"] for r in m["settings"].values())

    # the baseline is the documented subset: N test points drawn from (params.seed, seed), against the train split
    manifest = load_manifest(toy["root"] / "data" / "prepared" / "toy2d")
    x_train, x_test = read_split(manifest.root, "train"), read_split(manifest.root, "test")
    idx = np.sort(np.random.default_rng([0, 1]).choice(len(x_test), 64, replace=False))
    assert base["per_seed"]["1"]["sliced_w2"] == pytest.approx(sliced_wasserstein(x_test[idx], x_train), rel=1e-12)
    assert base["sliced_w2_ci"][0] <= base["sliced_w2_mean"] <= base["sliced_w2_ci"][1]

    lik = m["test_loglik"]
    assert lik["units"] == "nats" and lik["divergence"] == "exact" and lik["n"] == 16
    assert np.isfinite(lik["mean"]) and lik["stderr"] > 0
    assert lik["data_mean"] == pytest.approx(float(manifest.gaussian_mixture().log_prob(x_test[:16].double()).mean()))
    assert m["inception_fid"] is None and "bits_per_dim" not in m

    # a non-finite sample fails the check, naming the setting's folder, and leaves no metrics.json
    bad = toy["root"] / "bad_samples"
    shutil.copytree(toy["samples"], bad)
    chunk = bad / "ancestral-6" / "seed2" / "chunk-0-64.npz"
    with np.load(chunk) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["x"][5, 1] = np.nan
    np.savez(chunk, **arrays)
    with pytest.raises(EvaluateError, match=r"ancestral-6/seed2: expected finite values, found 1 NaN"):
        evaluate_variant(toy["params"], "v", samples_dir=bad, featurizer_dir=toy["root"] / "none",
                         model_path=toy["root"] / "outputs" / "train" / "v" / "model.pt", out_dir=out,
                         root=toy["root"], log_to_mlflow=False)
    assert not (out / "metrics.json").exists()


def test_stage_bad_samples_and_missing_inputs(digits, featurizer, tmp_path, capsys):
    out = tmp_path / "eval"
    out.mkdir()
    (out / "metrics.json").write_text("{}")  # a stale result must not survive a failed evaluation
    bad = tmp_path / "samples"
    shutil.copytree(digits["samples"], bad)
    chunk = bad / "ddim-8" / "seed1" / f"chunk-0-{N}.npz"
    with np.load(chunk) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["x"] = arrays["x"][:, ::2, ::2]  # a valid chunk file of 8x8 images where 16x16 belong
    np.savez(chunk, **arrays)
    args = digits["args"] + ["--samples", str(bad), "--out", str(out), "--no-mlflow"]
    assert evaluate_main(args) == 1
    err = capsys.readouterr().err
    assert f"{bad / 'ddim-8' / 'seed1'}: expected shape (N, 1, 16, 16), found ({N}, 1, 8, 8)" in err
    assert err.count("\n") == 1 and not (out / "metrics.json").exists()

    missing = [(["--model", str(tmp_path / "none.pt")], f"{tmp_path / 'none.pt'}: model file not found", "train stage"),
               (["--samples", str(tmp_path / "nothing")], str(tmp_path / "nothing" / "ddim-4"), "sample stage"),
               (["--featurizer", str(tmp_path)], str(tmp_path / "classifier.pt"), "featurizer stage")]
    for extra, path, stage in missing:
        assert evaluate_main(digits["args"] + ["--out", str(out), "--no-mlflow"] + extra) == 1
        err = capsys.readouterr().err
        assert path in err and stage in err
    assert evaluate_main(["--params", str(digits["root"] / "params.yaml"), "--variant", "nope"]) == 2
    assert "'nope'" in capsys.readouterr().err
    assert not (out / "metrics.json").exists()


# ---------------------------------------------------------------------------------------------
# On a Ray cluster. These come last: their fixture stops the module's local Ray.


@pytest.fixture(scope="module")
def two_nodes():
    """A real two-node Ray cluster on this machine whose head offers no CPU, so the evaluation's task must
    run on the other node. The module's local Ray is stopped first: evaluate_variant attaches to the
    cluster itself (ray.address), as the stage does."""
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    worker = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    yield cluster.address, worker.node_id
    ray.shutdown()
    cluster.shutdown()


def test_evaluate_on_a_two_node_cluster_equals_in_process(digits, featurizer, two_nodes, tmp_path):
    import ray

    address, worker_node = two_nodes
    kwargs = {"bpd_samples": 3, "probes": 1}  # bits/dim through the ODE too, on a few images
    here = _evaluate(digits, digits["params"], tmp_path / "here", **kwargs)
    assert not ray.is_initialized()  # no cluster named: no Ray started
    cluster = digits["params"].model_copy(update={"ray": RayConfig(address=address)})
    there = _evaluate(digits, cluster, tmp_path / "there", **kwargs)
    assert not ray.is_initialized()  # attached for the evaluation, and detached after it
    assert here["computed_on"] == {"node": socket.gethostname(), "ray_node_id": None, "device": "cpu"}
    assert there["computed_on"] == {"node": socket.gethostname(), "ray_node_id": worker_node, "device": "cpu"}
    assert {**there, "computed_on": None} == {**here, "computed_on": None}  # bit for bit, wherever it ran
    assert there["bits_per_dim"]["n"] == 3 and np.isfinite(there["bits_per_dim"]["mean"])
    csv = [(tmp_path / d / "fid_vs_nfe.csv").read_text() for d in ("here", "there")]
    assert csv[0] == csv[1]


def test_a_failed_task_is_an_evaluate_error_naming_the_variant_and_the_cause(digits, featurizer, two_nodes, tmp_path,
                                                                            monkeypatch):
    address, _ = two_nodes
    root = tmp_path / "project"  # a copy of the dataset whose test shard only the task reads, damaged
    shutil.copytree(digits["root"] / "data", root / "data")
    (root / "data" / "prepared" / "digits" / "test-00000.parquet").write_bytes(b"not parquet")
    cluster = digits["params"].model_copy(update={"ray": RayConfig(address=address)})
    with pytest.raises(EvaluateError) as e:
        _evaluate(digits, cluster, tmp_path / "eval", root=root)
    message = str(e.value)
    assert message.startswith("variant v: the evaluation task failed on the Ray cluster (DataError: ")
    assert "test-00000.parquet: unreadable Parquet shard" in message and "\n" not in message
    assert not (tmp_path / "eval" / "metrics.json").exists()

    monkeypatch.setenv("RAY_ADDRESS", address)  # the same through $RAY_ADDRESS, with ray.address unset
    with pytest.raises(EvaluateError, match=r"^variant v: the evaluation task failed on the Ray cluster"):
        _evaluate(digits, digits["params"], tmp_path / "eval", root=root)

    nowhere = digits["params"].model_copy(update={"ray": RayConfig(address="127.0.0.1:1", connect_timeout_s=1)})
    with pytest.raises(EvaluateError, match=r"ray\.address 127\.0\.0\.1:1: no Ray cluster answers there"):
        _evaluate(digits, nowhere, tmp_path / "eval")


def test_a_diverged_setting_is_reported_not_scored(toy):
    """Issue 20's guard: a setting with a seed the sample stage marked diverged (here: NaN samples) is written
    with diverged: true and no metrics, where before a non-finite sample failed the stage; the rest is scored."""
    out = toy["root"] / "outputs" / "eval" / "v_diverged"
    samples = toy["root"] / "diverged_samples"
    shutil.copytree(toy["samples"], samples)
    seed_dir = samples / "ancestral-6" / "seed1"
    chunk = seed_dir / "chunk-0-64.npz"
    with np.load(chunk) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["x"][3, 0] = np.nan
    np.savez(chunk, **arrays)
    manifest = json.loads((seed_dir / "manifest.json").read_text())
    (seed_dir / "manifest.json").write_text(json.dumps({**manifest, "max_abs": None, "finite": False,
                                                        "diverged_above": 100.0, "diverged": True}))
    m = evaluate_variant(toy["params"], "v", samples_dir=samples, featurizer_dir=toy["root"] / "none",
                         model_path=toy["root"] / "outputs" / "train" / "v" / "model.pt", out_dir=out,
                         root=toy["root"], bpd_samples=0, log_to_mlflow=False)
    assert m["diverged"] == ["ancestral-6"]
    row = m["settings"]["ancestral-6"]
    assert row["diverged"] is True and row["diverged_seeds"] == [1] and row["max_abs"] is None
    assert not any(k.endswith(("_mean", "_std")) for k in row)
    scored = m["settings"]["ddim-4"]
    assert scored["sliced_w2_mean"] is not None and "diverged" not in scored
    assert "sliced_w2" in m["metrics"] and m["seed_ids"] == [0, 1, 2]
    curve = (out / "fid_vs_nfe.csv").read_text().splitlines()
    assert curve[0].split(",")[5:7] == ["sliced_w2_mean", "sliced_w2_std"]
    assert next(line for line in curve if ",ancestral-6," in line).endswith(",,,,,,")
