"""Evaluation of a trained variant: its samples against the test split, a real-vs-real baseline at the
same sample size, and the model's likelihood of test data. The library behind the DVC stage `evaluate`;
image distances use the featurizer stage's folder (scorelab.featurizer).

    evaluate_variant(params, "vp", samples_dir=..., featurizer_dir=..., model_path=..., out_dir=..., root=root)

An evaluation folder holds metrics.json (schema in evaluate_variant's docstring) and fid_vs_nfe.csv, one
row per sampler setting with the mean and std over seeds of every metric, against the setting's NFE.
Where local Inception weights exist (scorelab.inception; never downloaded), it also holds
inception_ref_train.npz: the Inception statistics of the whole train split, the reference of the standard
FID, reused while the weights file (by sha256) and the dataset are the same.

Distances are biased at small N (the Frechet distance most of all), so every number comes with the same
metric for N real training images against the same test split: a model cannot be expected to beat it.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from . import storage
from .checkpoint import CheckpointMismatchError, check_same_model, load_trained
from .config import Params
from .data import Manifest, load_manifest, read_split
from .featurizer import FeaturizerError, load_featurizer
from .generate import FINGERPRINT, MANIFEST, SamplerSetting, load_samples, sampler_settings
from .inception import (inception_baseline_images, inception_network, inception_scorer, inception_summary,
                        inception_weights)
from .layout import METRICS_FILE, Layout
from .metrics import check_samples, frechet_distance, gaussian_stats, kid, mmd_rbf, precision_recall, sliced_wasserstein
from .modality import Modality

CURVE_FILE = "fid_vs_nfe.csv"
INCEPTION_REF_FILE = "inception_ref_train.npz"
DEQUANTIZATION = "uniform, y = (x + u)/256, model x = 2y - 1"

_MIN_SAMPLES = 4  # per seed: precision/recall's k = 3 nearest neighbours need at least 4 points
_KNN_K = 3
_KID_SUBSET, _KID_SUBSETS = 1000, 100
_SW_PROJECTIONS = 256
_MMD_REFERENCE = 2000  # test points MMD compares against: its memory is O((N + M)^2)
_SEED_DIR = re.compile(r"^seed(\d+)$")

_DESCRIPTIONS = {
    "domain_fd": "Frechet distance between DigitClassifier features of the samples and of the test split "
                 "(lower is better; biased upwards at small N)",
    "inception_fid": "standard FID: Frechet distance between pytorch-fid InceptionV3 pool3 features (2048-d, images "
                     "resized to 299) of the samples and of the whole train split (lower is better; biased upwards "
                     "at small N)",
    "kid": "kernel distance (unbiased MMD^2, cubic polynomial kernel) between classifier features of the samples "
           "and of the test split, mean over subsets (lower is better; about 0 for real data)",
    "precision": "fraction of samples inside the k=3 nearest-neighbour manifold of test features (higher is better)",
    "recall": "fraction of test features inside the k=3 nearest-neighbour manifold of the samples (higher is better)",
    "sliced_w2": "sliced 2-Wasserstein distance to the test split, 256 directions (lower is better)",
    "mmd": f"unbiased MMD^2, RBF kernels at the median distance x (0.5, 1, 2), against up to {_MMD_REFERENCE} test "
           "points (lower is better; about 0 for real data)",
    "data_loglik": "mean log-density in nats of the samples under the exact data mixture (higher is better; "
                   "the baseline is about minus the data's entropy)",
}


class EvaluateError(RuntimeError):
    """An input is missing or does not fit (the message names the file and the stage that makes it), or
    samples fail their checks (the message names the setting's folder)."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


# ---------------------------------------------------------------------------------------------
# Small helpers


def _num(v: float) -> float | None:
    """JSON has no NaN or infinity: a value that is not finite is written as null."""
    v = float(v)
    return v if math.isfinite(v) else None


# ---------------------------------------------------------------------------------------------
# Metrics of one set of samples, for each kind of data

Scorer = Callable[[torch.Tensor], dict[str, float]]


def _image_scorer(featurizer_dir: Path, manifest: Manifest,
                  x_test: torch.Tensor) -> tuple[Scorer, dict[str, Any], float]:
    """Domain FD against ref_test.npz, KID and precision/recall against the test split's features; also
    what the classifier is, and the domain FD of all train images (the distance's floor at full size)."""
    from .features import extract_features

    try:
        clf, meta, (ref_mu, ref_sigma), (train_mu, train_sigma) = load_featurizer(featurizer_dir, manifest)
    except FeaturizerError as e:
        raise EvaluateError(str(e)) from None
    test_features = extract_features(clf, x_test)

    def score(x: torch.Tensor) -> dict[str, float]:
        f = extract_features(clf, x)
        m = min(_KID_SUBSET, len(f), len(test_features))
        precision, recall = precision_recall(test_features, f, k=_KNN_K)
        return {"domain_fd": frechet_distance(*gaussian_stats(f), ref_mu, ref_sigma),  # = features.domain_frechet
                "kid": kid(f, test_features, subset_size=m, subsets=_KID_SUBSETS, seed=0)[0],
                "precision": precision, "recall": recall}

    info = {"classifier": {"test_accuracy": meta.get("test_accuracy"), "seed": meta.get("seed")}}
    return score, info, frechet_distance(train_mu, train_sigma, ref_mu, ref_sigma)


def _point_scorer(manifest: Manifest, x_test: torch.Tensor) -> Scorer:
    """Sliced W2 and MMD against the test split; for mixture data, the exact data log-density."""
    mixture = manifest.gaussian_mixture() if manifest.params.get("mixture") else None
    mmd_reference = x_test[:_MMD_REFERENCE]  # the split is in random order: its head is a random subset

    def score(x: torch.Tensor) -> dict[str, float]:
        out = {"sliced_w2": sliced_wasserstein(x, x_test, n_projections=_SW_PROJECTIONS, seed=0),
               "mmd": mmd_rbf(x, mmd_reference)}
        if mixture is not None:
            out["data_loglik"] = float(mixture.log_prob(x.double()).mean())
        return out

    return score


def _summary(per_seed: dict[int, dict[str, float]]) -> dict[str, Any]:
    """<metric>_mean and <metric>_std (ddof 1; null with one seed) over seeds, and the values per seed."""
    out: dict[str, Any] = {"seeds": len(per_seed), "seed_ids": sorted(per_seed)}
    names = next(iter(per_seed.values())).keys()
    for name in names:
        v = np.array([m[name] for m in per_seed.values()], dtype=np.float64)
        out[f"{name}_mean"] = _num(v.mean())
        out[f"{name}_std"] = _num(v.std(ddof=1)) if len(v) > 1 else None
    out["per_seed"] = {str(k): {n: _num(v) for n, v in m.items()} for k, m in sorted(per_seed.items())}
    return out


# ---------------------------------------------------------------------------------------------
# Loading what the earlier stages made


def _load_model(model_path: Path, params: Params, variant: str, manifest: Manifest):
    if not model_path.is_file():
        raise EvaluateError(f"{model_path}: model file not found; run the train stage first "
                            f"(python pipeline/train.py --variant {variant}, or dvc repro)")
    try:
        trained = load_trained(model_path)
    except Exception as e:  # torch.load and the state dict fail in many ways on a foreign file
        raise EvaluateError(f"{model_path}: not a readable scorelab model ({type(e).__name__}); rerun the train "
                            "stage") from None
    try:
        check_same_model(params.variants[variant], trained.variant, model_path)
    except CheckpointMismatchError as e:
        raise EvaluateError(str(e)) from None
    if tuple(trained.data_shape) != tuple(manifest.shape):
        raise EvaluateError(f"{model_path} models data of shape {tuple(trained.data_shape)}, but {manifest.root} "
                            f"holds {tuple(manifest.shape)}: rerun the train stage")
    return trained


def _load_setting(samples_dir: Path, setting: SamplerSetting, variant: str, modality: Modality,
                  data_shape: tuple[int, ...], model_sha: str) -> tuple[dict[int, torch.Tensor], list[int]]:
    """{seed: samples in model space, checked} of every seed folder of the setting, and the NFE of every
    chunk (one per seed for a fixed-step sampler)."""
    folder = samples_dir / setting.key
    seeds = sorted(int(m[1]) for p in (folder.iterdir() if folder.is_dir() else [])
                   if p.is_dir() and (m := _SEED_DIR.match(p.name)))
    if not seeds:
        raise EvaluateError(f"{folder}: no samples for setting {setting.key}; run the sample stage "
                            f"(python pipeline/sample.py --variant {variant})")
    xs, nfes = {}, []
    for seed in seeds:
        seed_dir = folder / f"seed{seed}"
        try:
            fingerprint = json.loads((seed_dir / FINGERPRINT).read_text())
        except (OSError, ValueError):
            fingerprint = {}
        if fingerprint.get("model_sha256", model_sha) != model_sha:
            raise EvaluateError(f"{seed_dir}: drawn from another model file than the one evaluated; rerun the sample "
                                "stage")
        try:
            stored = load_samples(samples_dir, setting.key, seed)
            x = modality.from_stored(stored) if stored.dtype == np.uint8 and stored.ndim == 4 else stored
            check_samples(x, shape=data_shape, value_range=modality.value_range,
                          name=str(seed_dir))
        except ValueError as e:  # load_samples' own messages name the folder; numpy's may not
            message = str(e) if str(seed_dir) in str(e) else f"{seed_dir}: {e}"
            raise EvaluateError(f"setting {setting.key}: {message}") from None
        xs[seed] = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        nfe = json.loads((seed_dir / MANIFEST).read_text())["nfe"]
        nfes += nfe if isinstance(nfe, list) else [nfe]
    return xs, nfes


def _mlflow_logger(params: Params, root: Path, run_id: str, model_path: Path):
    """The variant's training run, checked to exist before any work is done."""
    from . import tracking

    uri = tracking.resolve_tracking_uri(params.mlflow.tracking_uri, root)
    try:
        tracking.check_server(uri, params.mlflow.connect_timeout_s)  # MLflow's client retries for minutes
        tracking.client(uri).get_run(run_id)
    except tracking.TrackingError as e:
        raise EvaluateError(f"{e}; or pass --no-mlflow") from None
    except Exception as e:  # MlflowException for an unknown run, others for an unreachable store
        raise EvaluateError(f"MLflow run {run_id!r} (from {model_path}) is not in {uri} "
                            f"({' '.join(str(e).split())[:160]}); rerun the train stage, or pass --no-mlflow") from None
    return tracking.RunLogger(uri, run_id)


def _log_new_metrics(logger, points: list[tuple[str, float | None, int]]) -> None:
    """Log the (key, value, step) points the run does not hold yet: a rerun adds nothing to the charts."""
    from . import tracking

    history = tracking.client(logger.uri).get_metric_history
    for key, value, step in points:
        if value is None or any(m.step == step and m.value == value for m in history(logger.run_id, key)):
            continue
        logger.metrics({key: value}, step=step)


# ---------------------------------------------------------------------------------------------
# Likelihood of test data under the model


def _bits_per_dim(trained, x_test: torch.Tensor, n: int, probes: int, seed: int, rtol: float,
                  atol: float) -> dict[str, Any]:
    from .likelihood import bits_per_dim

    x_int = torch.round((x_test[:n].double() + 1) * 127.5).to(torch.uint8)  # the stored pixels, exactly
    res = bits_per_dim(trained.model, trained.model.sde, x_int, bits=8, scale=2.0, shift=-1.0, probes=probes,
                       seed=seed, rtol=rtol, atol=atol)
    bpd = res.bpd.cpu()
    return {"mean": _num(bpd.mean()), "stderr": _num(bpd.std() / math.sqrt(n)) if n > 1 else None,
            "n": n, "split": "test", "probes": probes, "estimator": "Hutchinson, Rademacher probes",
            "ode_rtol": rtol, "ode_atol": atol,
            "hutchinson_stderr_mean": _num(res.stderr.mean()), "nfe": res.nfe, "dequantization": DEQUANTIZATION,
            "note": "stderr is over test images (probe noise included); a one-draw upper bound on the discrete NLL"}


def _test_loglik(trained, manifest: Manifest, x_test: torch.Tensor, n: int, seed: int) -> dict[str, Any]:
    from .likelihood import log_likelihood

    x = x_test[:n]
    logp = log_likelihood(trained.model, trained.model.sde, x, exact=True, seed=seed).cpu()
    out = {"mean": _num(logp.mean()), "stderr": _num(logp.std() / math.sqrt(n)) if n > 1 else None,
           "n": n, "split": "test", "units": "nats", "divergence": "exact",
           "note": "mean log p_model(x) of test points through the probability-flow ODE (higher is better)"}
    if manifest.params.get("mixture"):
        out["data_mean"] = _num(manifest.gaussian_mixture().log_prob(x.double()).mean())  # the true density's
    return out


# ---------------------------------------------------------------------------------------------
# The evaluate stage


def evaluate_variant(
    params: Params,
    variant: str,                   # a key of params.variants
    *,
    samples_dir: Path,              # the sample stage's folder: <setting>/seed<k>/...
    featurizer_dir: Path,           # the featurizer stage's folder (image data only)
    model_path: Path,               # the train stage's model.pt
    out_dir: Path,                  # gets metrics.json and fid_vs_nfe.csv
    root: Path,                     # repository root: the dataset and the MLflow store are relative to it
    bpd_samples: int | None = None, # test images for bits/dim (2-D: test points for the log-likelihood); 0 skips;
                                    # None: params.evaluate.bpd_samples
    probes: int | None = None,      # Hutchinson probes per image for bits/dim; None: params.evaluate.probes
    log_to_mlflow: bool = True,     # log into the variant's training run (its id is in model.pt)
) -> dict[str, Any]:
    """Evaluate every sampler setting of the variant on every seed present, write out_dir/metrics.json
    (last, atomically: it exists only after a complete evaluation) and out_dir/fid_vs_nfe.csv, log to
    MLflow, and return the metrics:

        variant, sde, data, n_per_seed (N), seeds (k), seed_ids, primary_metric, metrics (descriptions)
        settings: {key: {method, steps, nfe, seeds, seed_ids, <metric>_mean, <metric>_std, per_seed}}
        baseline: the same metrics for N random train points per seed against the test split (images
                  also domain_fd_train_full: every train image, the distance's floor at full size)
        bits_per_dim (images) or test_loglik (2-D): the model's likelihood of test data
        inception_fid: the lowest inception_fid_mean over the settings, inception_fid_setting, and
                  inception_fid_reason saying what it is; null, with the reason, when there are no local
                  Inception weights (or for 2-D data)
        inception (when computed): the weights file, its sha256, whether it is the standard file, the network
                  and the reference (the whole train split); every setting and the baseline then also hold
                  inception_fid_mean, inception_fid_std and per-seed values
        classifier (images): its test accuracy and seed

    Image metrics: domain_fd, kid, precision, recall; 2-D: sliced_w2, mmd (and data_loglik for mixture
    data). std is over seeds (ddof 1, null with one seed). EvaluateError for a missing input, samples
    that fail check_samples, an invalid Inception weights file, a missing evaluate.inception_weights file,
    or no weights at all with evaluate.require_inception; DataError when the dataset is not prepared.
    """
    root, samples_dir, featurizer_dir = Path(root).resolve(), Path(samples_dir), Path(featurizer_dir)
    model_path, out_dir = Path(model_path), Path(out_dir)
    for name in (METRICS_FILE, CURVE_FILE):  # a failed evaluation must not leave the last one's results
        (out_dir / name).unlink(missing_ok=True)
    bpd_samples = params.evaluate.bpd_samples if bpd_samples is None else bpd_samples  # callers check flags
    probes = params.evaluate.probes if probes is None else probes
    vcfg = params.variants[variant]
    manifest = load_manifest(Layout(root).dataset(params.data.dataset_dir))
    modality = manifest.modality
    # Inception first: required-but-absent or invalid weights fail the stage before anything expensive runs.
    try:
        weights, inception_reason = inception_weights(params, root, modality.is_image)
        inception_net = inception_network(weights) if weights is not None else None
    except ValueError as e:
        raise EvaluateError(str(e)) from None
    trained = _load_model(model_path, params, variant, manifest)
    logger = _mlflow_logger(params, root, trained.run_id, model_path) if log_to_mlflow else None
    data_shape = tuple(manifest.shape)

    # Every sample first: a bad file fails the stage before anything expensive runs.
    settings = sampler_settings(vcfg)
    model_sha = storage.sha256_file(model_path)
    loaded = {s.key: _load_setting(samples_dir, s, variant, modality, data_shape, model_sha) for s in settings}
    counts = {len(x) for xs, _ in loaded.values() for x in xs.values()}
    if len(counts) != 1:
        raise EvaluateError(f"{samples_dir}: settings and seeds hold different numbers of samples "
                            f"({sorted(counts)}); rerun the sample stage with one --n")
    n = counts.pop()
    if n < _MIN_SAMPLES:
        raise EvaluateError(f"{samples_dir}: {n} samples per seed; the metrics need at least {_MIN_SAMPLES} "
                            "(pipeline/sample.py --n)")

    x_test, x_train = read_split(manifest.root, "test"), read_split(manifest.root, "train")
    if modality.is_image:
        domain_score, info, fd_train_full = _image_scorer(featurizer_dir, manifest, x_test)
    else:
        domain_score, info, fd_train_full = _point_scorer(manifest, x_test), {}, None
    primary = modality.primary_metric
    inception_fid: Callable[[torch.Tensor], float] | None = None
    inception_info: dict[str, Any] = {}
    if inception_net is not None:
        inception_fid, inception_info = inception_scorer(inception_net, weights, manifest, x_train,
                                                         out_dir / INCEPTION_REF_FILE)

    def score(x: torch.Tensor) -> dict[str, float]:
        """Every setting and seed: the domain (or point) metrics, and the standard FID where it is computed."""
        out = domain_score(x)
        if inception_fid is not None:
            out["inception_fid"] = inception_fid(x)
        return out

    results: dict[str, Any] = {}
    for s in settings:
        xs, nfes = loaded[s.key]
        nfe = nfes[0] if len(set(nfes)) == 1 else round(float(np.mean(nfes)), 1)
        row = {"method": s.method, "steps": s.steps, "nfe": nfe}
        if len(set(nfes)) > 1:
            row["nfe_range"] = [min(nfes), max(nfes)]  # the adaptive ODE: its NFE differs per chunk
        results[s.key] = {**row, **_summary({seed: score(x) for seed, x in xs.items()})}
    seed_ids = sorted({seed for xs, _ in loaded.values() for seed in xs})

    baseline: dict[str, Any] = {"description": f"{n} random train points per seed (drawn from (params.seed, seed)) "
                                               "against the test split, with the same metrics"}
    train_idx: dict[int, torch.Tensor] | None = None
    if len(x_train) >= n:
        train_idx = {seed: torch.from_numpy(np.sort(np.random.default_rng([params.seed, seed]).choice(
            len(x_train), n, replace=False))) for seed in seed_ids}
        # domain metrics only: Inception FID's reference is the train split itself, its baseline is apart
        baseline.update(_summary({seed: domain_score(x_train[idx]) for seed, idx in train_idx.items()}))
    else:
        baseline["skipped"] = f"the train split has {len(x_train)} points, fewer than N = {n}"
    if inception_fid is not None:  # N real images per seed against the train statistics, where there are N
        images, how = inception_baseline_images(x_test, x_train, train_idx, seed_ids, n, params.seed)
        if images is None:
            baseline["inception_fid_skipped"] = how
        else:
            summary = _summary({s: {"inception_fid": inception_fid(x)} for s, x in images.items()})
            baseline["description"] = f"{baseline['description']}; inception_fid: {how}"
            baseline.update({k: summary[k] for k in ("inception_fid_mean", "inception_fid_std")})
            for s, values in summary["per_seed"].items():
                baseline.setdefault("per_seed", {}).setdefault(s, {}).update(values)
    if fd_train_full is not None:  # all train images against the test split: the floor at full size
        baseline["domain_fd_train_full"] = _num(fd_train_full)

    metrics: dict[str, Any] = {
        "variant": variant, "sde": vcfg.sde.type, "data": manifest.source, "n_per_seed": n,
        "seeds": min(r["seeds"] for r in results.values()), "seed_ids": seed_ids, "primary_metric": primary,
        "metrics": {k: v for k, v in _DESCRIPTIONS.items() if f"{k}_mean" in next(iter(results.values()))},
        "std": "sample standard deviation over seeds (ddof 1); null with one seed",
        "baseline": baseline, "settings": results, **info,
    }
    n_lik, ev = min(bpd_samples, len(x_test)), params.evaluate
    if not n_lik:
        metrics[modality.likelihood] = None
    elif modality.is_image:
        metrics[modality.likelihood] = _bits_per_dim(trained, x_test, n_lik, probes, params.seed, ev.bpd_rtol,
                                                     ev.bpd_atol)
    else:
        metrics[modality.likelihood] = _test_loglik(trained, manifest, x_test, n_lik, params.seed)
    if inception_fid is not None:
        metrics.update(inception_summary(results, inception_info, n, metrics["seeds"]))
    else:
        metrics.update({"inception_fid": None, "inception_fid_reason": inception_reason})

    storage.write_text(out_dir / CURVE_FILE, _curve_csv(variant, results))
    storage.write_json(out_dir / METRICS_FILE, metrics, indent=2)
    if logger is not None:
        _log(logger, metrics, primary, samples_dir, out_dir)
    return metrics


def _curve_csv(variant: str, results: dict[str, Any]) -> str:
    """One row per setting: mean and std over seeds of every metric, for `dvc plots` (x: nfe)."""
    names = [k for k in next(iter(results.values())) if k.endswith(("_mean", "_std"))]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["variant", "setting", "method", "steps", "nfe", *names])
    for key, r in results.items():
        w.writerow([variant, key, r["method"], "" if r["steps"] is None else r["steps"], r["nfe"],
                    *["" if r[k] is None else r[k] for k in names]])
    return buf.getvalue()


def _log(logger, metrics: dict[str, Any], primary: str, samples_dir: Path, out_dir: Path) -> None:
    """Into the training run: eval_<primary>_<method> at step = NFE (the chart is distance against NFE,
    one line per sampler), the baseline, the likelihood, and metrics.json and the grids under eval/."""
    points = [(f"eval_{primary}_{r['method']}", r[f"{primary}_mean"], int(round(r["nfe"])))
              for r in metrics["settings"].values()]
    points.append((f"eval_{primary}_baseline", metrics["baseline"].get(f"{primary}_mean"), 0))
    if metrics.get("inception"):  # the standard FID against NFE too
        points += [(f"eval_inception_fid_{r['method']}", r.get("inception_fid_mean"), int(round(r["nfe"])))
                   for r in metrics["settings"].values()]
        points.append(("eval_inception_fid_baseline", metrics["baseline"].get("inception_fid_mean"), 0))
    if metrics.get("bits_per_dim"):
        points.append(("eval_bits_per_dim", metrics["bits_per_dim"]["mean"], 0))
    if metrics.get("test_loglik"):
        points.append(("eval_test_loglik", metrics["test_loglik"]["mean"], 0))
    _log_new_metrics(logger, points)
    logger.artifacts([out_dir / METRICS_FILE, out_dir / CURVE_FILE], "eval")
    for key in metrics["settings"]:
        grid = samples_dir / key / "grid.png"
        if grid.is_file():
            logger.artifact(grid, f"eval/{key}")


__all__ = ["CURVE_FILE", "DEQUANTIZATION", "EvaluateError", "INCEPTION_REF_FILE", "METRICS_FILE", "evaluate_variant"]
