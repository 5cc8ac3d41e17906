"""Evaluation of a trained variant: its samples against the whole train split (the largest real set, whose
statistics the featurizer stage caches), a real-vs-real baseline of held-out test data at the same sample
size against the same reference, an interval for every number, and the model's likelihood of test data. The library behind the DVC stage `evaluate`;
image distances use the featurizer stage's folder (scorelab.featurizer).

    evaluate_variant(params, "vp", samples_dir=..., featurizer_dir=..., model_path=..., out_dir=..., root=root)

An evaluation folder holds metrics.json (schema in evaluate_variant's docstring) and fid_vs_nfe.csv, one
row per sampler setting with the mean and std over seeds of every metric, against the setting's NFE.
Where local Inception weights exist (scorelab.inception; never downloaded), it also holds
inception_ref_train.npz: the Inception statistics of the whole train split, the reference of the standard
FID, reused while the weights file (by sha256) and the dataset are the same.

Distances are biased at small N (the Frechet distance most of all), so every number comes with the same
metric for N held-out real images (the test split; all of it when it holds fewer than N, said so) against
the same reference: a model cannot be expected to beat it. Intervals: Student t over seeds (the report pairs
the per-seed values of the same seeds across variants); with evaluate.bootstrap > 0 the primary metric's by
bootstrap over samples instead (resample indices shared by every variant, the replicates kept for pairing).

Where it runs: the driver (the stage's process) checks every input, reads and writes files and logs to
MLflow; the heavy compute (classifier and Inception features, KID, precision/recall, bits/dim through the
probability-flow ODE) runs where params say. With a cluster (ray.address, or $RAY_ADDRESS) it is one Ray
task there, with one GPU when ray.use_gpu: the task reads nothing of the driver's disk, only files shipped
through the object store (runtime.ship_files) and arrays passed as its argument. Without one it runs in
the stage's own process, on its GPU when ray.use_gpu and there is one, and starts no Ray (a local Ray
costs seconds per stage and buys nothing here). metrics.json's computed_on says where it ran; the numbers
do not depend on it (beyond a GPU's rounding).

Memory does not grow with N beyond the samples themselves: features stream into float64 running sums
(metrics.RunningStats) for the Frechet distances; KID and precision/recall see the first _ROWS feature
rows of each set.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import math
import os
import re
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from . import storage
from .checkpoint import CheckpointError, CheckpointMismatchError, check_same_model, load_trained
from .config import Params
from .data import Manifest, load_manifest, read_split
from .features import DigitClassifier, extract_features, stream_features
from .featurizer import CLASSIFIER_FILE, REF_TEST_FILE, REF_TRAIN_FILE, FeaturizerError, load_featurizer
from .generate import FINGERPRINT, MANIFEST, SamplerSetting, load_samples, sampler_settings
from .inception import (Stats, fid_scorer, inception_baseline_images, inception_info, inception_network,
                        inception_summary, inception_weights, read_reference, reference_key, reference_stats,
                        write_reference)
from .layout import METRICS_FILE, Layout
from .metrics import (bootstrap_indices, bootstrap_interval, check_samples, frechet_distance, frechet_replicates, kid,
                      mmd_rbf, precision_recall, sliced_wasserstein, sliced_wasserstein_replicates, t_interval)
from .modality import Modality
from .runtime import RuntimeSetupError, Shipment, ray_session, ship_files, task_device, unpack
from .schema import show

CURVE_FILE = "fid_vs_nfe.csv"
INCEPTION_REF_FILE = "inception_ref_train.npz"
DEQUANTIZATION = "uniform, y = (x + u)/256, model x = 2y - 1"

_MIN_SAMPLES = 4  # per seed: precision/recall's k = 3 nearest neighbours need at least 4 points
_KNN_K = 3
_KID_SUBSETS = 100
# Below this many samples per seed KID is left out: on digits' classifier features at N = 448 the 95% intervals of
# KID x 10^3 over 3 seeds were [-6.2e4, 1.7e3] for held-out real data and [-4.0e4, 4.2e4] for DDPM: it resolved nothing.
_KID_MIN_N = 1000
_KID_SCALE = 1e3  # KID is reported x 10^3, as is usual
_SW_PROJECTIONS = 256
_ROWS = 10_000  # feature rows per set (samples of a seed, test split) that KID and precision/recall see
_MMD_REFERENCE = 2000  # test points MMD compares against: its memory is O((N + M)^2)
_SEED_DIR = re.compile(r"^seed(\d+)$")

_DESCRIPTIONS = {
    "domain_fd": "Frechet distance between DigitClassifier features of the samples and of the whole train split "
                 "(lower is better; biased upwards at small N: compare with the baseline at the same N)",
    "inception_fid": "standard FID: Frechet distance between pytorch-fid InceptionV3 pool3 features (2048-d, images "
                     "resized to 299) of the samples and of the whole train split (lower is better; biased upwards "
                     "at small N)",
    "kid_x1e3": f"KID x 10^3: kernel distance (unbiased MMD^2, cubic polynomial kernel) between classifier features "
                f"of the samples and of the train split, mean over {_KID_SUBSETS} subsets of N (capped at the train "
                f"split's size, its first {_ROWS} rows at most), times 1000 (lower is better; about 0 for real data); "
                f"left out below N = {_KID_MIN_N}",
    "precision": f"fraction of the N samples inside the k={_KNN_K} nearest-neighbour manifold of the train split's "
                 f"features (its first {_ROWS} rows at most; higher is better)",
    "recall": f"fraction of the train split's features inside the k={_KNN_K} nearest-neighbour manifold of the N "
              f"samples (the first {_ROWS} rows of each at most; higher is better)",
    "sliced_w2": "sliced 2-Wasserstein distance to the whole train split, 256 directions (lower is better)",
    "mmd": f"unbiased MMD^2, RBF kernels at the median distance x (0.5, 1, 2), against up to {_MMD_REFERENCE} train "
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

Scorer = Callable[[torch.Tensor, np.ndarray | None], tuple[dict[str, float], np.ndarray | None]]
"""(samples, bootstrap indices (B, N) or None) -> (metrics, the primary metric of each resample or None)"""


def _featurizer(featurizer_dir: Path, manifest: Manifest) -> tuple[DigitClassifier, dict[str, Any], Stats, Stats]:
    """featurizer.load_featurizer, its error as the stage's."""
    try:
        return load_featurizer(featurizer_dir, manifest)
    except FeaturizerError as e:
        raise EvaluateError(str(e)) from None


def _image_scorer(featurizer_dir: Path, manifest: Manifest, x_train: torch.Tensor, device: torch.device) -> Scorer:
    """Domain FD against ref_train.npz (the whole train split's statistics, cached by the featurizer stage;
    every sample's features, streamed into float64 sums), KID and precision/recall against the train split's
    features (the first _ROWS rows of each set)."""
    clf, _, _, (ref_mu, ref_sigma) = _featurizer(featurizer_dir, manifest)
    clf = clf.to(device)
    ref_rows = extract_features(clf, x_train[:_ROWS])  # the split is in random order: its head is a random subset

    def score(x: torch.Tensor, boot: np.ndarray | None) -> tuple[dict[str, float], np.ndarray | None]:
        running = stream_features(clf, x, keep=len(x) if boot is not None else _ROWS)
        f = running.rows
        precision, recall = precision_recall(ref_rows, f[:_ROWS], k=_KNN_K)
        out = {"domain_fd": frechet_distance(*running.stats(), ref_mu, ref_sigma)}  # = features.domain_frechet
        if len(x) >= _KID_MIN_N:
            m = min(len(x), len(ref_rows))  # subsets sized to N
            out["kid_x1e3"] = _KID_SCALE * kid(f[:_ROWS], ref_rows, subset_size=m, subsets=_KID_SUBSETS, seed=0)[0]
        out.update(precision=precision, recall=recall)
        return out, None if boot is None else frechet_replicates(f, boot, ref_mu, ref_sigma)

    return score


def _point_scorer(manifest: Manifest, x_train: torch.Tensor, device: torch.device) -> Scorer:
    """Sliced W2 and MMD against the train split; for mixture data, the exact data log-density."""
    mixture = manifest.gaussian_mixture() if manifest.params.get("mixture") else None
    x_train = x_train.to(device)
    mmd_reference = x_train[:_MMD_REFERENCE]  # the split is in random order: its head is a random subset

    def score(x: torch.Tensor, boot: np.ndarray | None) -> tuple[dict[str, float], np.ndarray | None]:
        x = x.to(device)
        out = {"sliced_w2": sliced_wasserstein(x, x_train, n_projections=_SW_PROJECTIONS, seed=0),
               "mmd": mmd_rbf(x, mmd_reference)}
        if mixture is not None:
            out["data_loglik"] = float(mixture.log_prob(x.cpu().double()).mean())
        reps = None if boot is None else sliced_wasserstein_replicates(x, x_train, boot,
                                                                       n_projections=_SW_PROJECTIONS, seed=0)
        return out, reps

    return score


def _summary(per_seed: dict[int, dict[str, float]], level: float, primary: str,
             replicates: dict[int, np.ndarray] | None) -> dict[str, Any]:
    """<metric>_mean, <metric>_std (ddof 1; null with one seed) and <metric>_ci ([low, high] at `level`) over
    seeds, and the values per seed. The primary metric's interval is the bootstrap's over samples where there
    are replicates (then <primary>_replicates: the mean over seeds of each resample's value, for the report's
    paired comparisons); every other interval is Student t's over seeds (null with one seed)."""
    out: dict[str, Any] = {"seeds": len(per_seed), "seed_ids": sorted(per_seed)}
    names = next(iter(per_seed.values())).keys()
    reps = None if replicates is None else np.mean([replicates[s] for s in sorted(per_seed)], axis=0)
    for name in names:
        v = np.array([m[name] for m in per_seed.values()], dtype=np.float64)
        out[f"{name}_mean"] = _num(v.mean())
        out[f"{name}_std"] = _num(v.std(ddof=1)) if len(v) > 1 else None
        ci = bootstrap_interval(float(v.mean()), reps, level) if name == primary and reps is not None \
            else t_interval(v, level)
        out[f"{name}_ci"] = None if not all(map(math.isfinite, ci)) else [_num(ci[0]), _num(ci[1])]
    if reps is not None:
        out[f"{primary}_replicates"] = [_num(r) for r in reps]
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
        why = str(e) if isinstance(e, CheckpointError) else type(e).__name__  # ours say what is wrong, in one line
        raise EvaluateError(f"{model_path}: not a readable scorelab model ({why}); rerun the train stage") from None
    try:
        check_same_model(params.variants[variant], trained.variant, model_path)
    except CheckpointMismatchError as e:
        raise EvaluateError(str(e)) from None
    if tuple(trained.data_shape) != tuple(manifest.shape):
        raise EvaluateError(f"{model_path} models data of shape {tuple(trained.data_shape)}, but {manifest.root} "
                            f"holds {tuple(manifest.shape)}: rerun the train stage")
    return trained


def _from_stored(stored: np.ndarray, modality: Modality) -> np.ndarray:
    """Samples as a chunk stores them -> model space (a chunk of another dtype as it is: check_samples says so)."""
    return modality.from_stored(stored) if stored.dtype == np.uint8 and stored.ndim == 4 else stored


def _model_space(stored: np.ndarray, modality: Modality) -> torch.Tensor:
    """Checked samples as a chunk stores them -> float32 model space."""
    return torch.from_numpy(np.ascontiguousarray(_from_stored(stored, modality), dtype=np.float32))


def _load_setting(samples_dir: Path, setting: SamplerSetting, variant: str, modality: Modality,
                  data_shape: tuple[int, ...], model_sha: str) -> tuple[dict[int, np.ndarray], list[int]]:
    """{seed: samples as stored (checked in model space)} of every seed folder of the setting, and the NFE
    of every chunk (one per seed for a fixed-step sampler). Stored, not model space: uint8 pixels are a
    quarter of the float32 images on their way to the compute."""
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
            check_samples(_from_stored(stored, modality), shape=data_shape, value_range=modality.value_range,
                          name=str(seed_dir))
        except ValueError as e:  # load_samples' own messages name the folder; numpy's may not
            message = str(e) if str(seed_dir) in str(e) else f"{seed_dir}: {e}"
            raise EvaluateError(f"setting {setting.key}: {message}") from None
        xs[seed] = stored
        nfes += _nfes(json.loads((seed_dir / MANIFEST).read_text()), seed_dir / MANIFEST)
    return xs, nfes


def _nfes(manifest: Any, path: Path) -> list[int]:
    """A sample manifest's `nfe` (an integer, or one per chunk) as a list; EvaluateError names the file."""
    nfe = manifest.get("nfe") if isinstance(manifest, dict) else None
    values = nfe if isinstance(nfe, list) else [nfe]
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise EvaluateError(f"{path}: `nfe` must be an integer or a list of them (got {show(nfe)}); rerun the "
                            "sample stage")
    return values


def _divergence(samples_dir: Path, setting: SamplerSetting) -> dict[str, Any] | None:
    """The sample stage's divergence guard for one setting (its manifests' `diverged`): None when no seed
    diverged (or a manifest is missing: _load_setting reports that), else the row the report shows instead
    of metrics: a setting with one exploded seed has no meaningful mean over seeds."""
    folder = samples_dir / setting.key
    seeds, hits, nfes, manifest = [], {}, [], {}
    for p in sorted(folder.iterdir()) if folder.is_dir() else []:
        if not (p.is_dir() and (m := _SEED_DIR.match(p.name))):
            continue
        try:
            manifest = json.loads((p / MANIFEST).read_text())
        except (OSError, ValueError):
            return None
        seeds.append(int(m[1]))
        nfes += _nfes(manifest, p / MANIFEST)
        if manifest.get("diverged"):
            hits[int(m[1])] = manifest.get("max_abs")
    if not hits:
        return None
    worst = None if None in hits.values() else max(hits.values())
    return {"method": setting.method, "steps": setting.steps,
            "nfe": nfes[0] if len(set(nfes)) == 1 else round(float(np.mean(nfes)), 1),
            "seeds": len(seeds), "seed_ids": sorted(seeds), "diverged": True, "diverged_seeds": sorted(hits),
            "max_abs": worst, "diverged_above": manifest.get("diverged_above"), "count": manifest["count"]}


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


def _bits_per_dim(model, x_test: torch.Tensor, n: int, probes: int, seed: int, rtol: float,
                  atol: float, device: torch.device) -> dict[str, Any]:
    from .likelihood import bits_per_dim

    x_int = torch.round((x_test[:n].double() + 1) * 127.5).to(torch.uint8)  # the stored pixels, exactly
    res = bits_per_dim(model, model.sde, x_int.to(device), bits=8, scale=2.0, shift=-1.0, probes=probes,
                       seed=seed, rtol=rtol, atol=atol)
    bpd = res.bpd.cpu()
    return {"mean": _num(bpd.mean()), "stderr": _num(bpd.std() / math.sqrt(n)) if n > 1 else None,
            "n": n, "split": "test", "probes": probes, "estimator": "Hutchinson, Rademacher probes",
            "ode_rtol": rtol, "ode_atol": atol,
            "hutchinson_stderr_mean": _num(res.stderr.mean()), "nfe": res.nfe, "dequantization": DEQUANTIZATION,
            "note": "stderr is over test images (probe noise included); a one-draw upper bound on the discrete NLL"}


def _test_loglik(model, manifest: Manifest, x_test: torch.Tensor, n: int, seed: int,
                 device: torch.device) -> dict[str, Any]:
    from .likelihood import log_likelihood

    x = x_test[:n]
    logp = log_likelihood(model, model.sde, x.to(device), exact=True, seed=seed).cpu()
    out = {"mean": _num(logp.mean()), "stderr": _num(logp.std() / math.sqrt(n)) if n > 1 else None,
           "n": n, "split": "test", "units": "nats", "divergence": "exact",
           "note": "mean log p_model(x) of test points through the probability-flow ODE (higher is better)"}
    if manifest.params.get("mixture"):
        out["data_mean"] = _num(manifest.gaussian_mixture().log_prob(x.double()).mean())  # the true density's
    return out


# ---------------------------------------------------------------------------------------------
# The compute: in the stage's process, or one Ray task on the cluster


@dataclass(frozen=True)
class _Files:
    """What the compute reads: in-process the driver's own paths; in a Ray task its local copies of what
    the driver shipped through the object store (the task's node may not see the driver's disk)."""

    data: Path  # the prepared dataset's folder
    model: Path  # model.pt
    featurizer: Path | None  # image data: the featurizer stage's folder
    inception: Path | None  # the Inception weights file, where the standard FID is computed

    def ship(self, manifest: Manifest) -> dict[str, Shipment]:
        """Every file, into the running Ray's object store (driver)."""
        shipped = {"data": ship_files(self.data, ["manifest.json", *(s.file for s in manifest.shards)]),
                   "model": ship_files(self.model.parent, [self.model.name])}
        if self.featurizer is not None:
            shipped["featurizer"] = ship_files(self.featurizer, [CLASSIFIER_FILE, REF_TEST_FILE, REF_TRAIN_FILE])
        if self.inception is not None:
            shipped["inception"] = ship_files(self.inception.parent, [self.inception.name])
        return shipped

    @staticmethod
    def unpacked(shipped: dict[str, Shipment]) -> _Files:
        """This node's local copies of shipped files (task)."""

        def one_file(key: str) -> Path | None:
            return unpack(shipped[key]) / shipped[key].names[0] if key in shipped else None

        return _Files(data=unpack(shipped["data"]), model=one_file("model"),
                      featurizer=unpack(shipped["featurizer"]) if "featurizer" in shipped else None,
                      inception=one_file("inception"))


@dataclass(frozen=True)
class _Job:
    """Everything the compute needs besides files: plain values and arrays, a Ray task's argument as they are."""

    variant: str
    samples: dict[str, dict[int, np.ndarray]]  # setting -> seed -> samples as stored, checked by the driver
    n: int  # samples per seed
    seed: int  # params.seed: the baselines' draws, bits/dim's dequantisation and probes
    heldout_idx: dict[int, np.ndarray] | None  # the baseline's rows of the test split per seed (min(N, its size));
                                               # None: it has fewer than _MIN_SAMPLES
    bootstrap: int  # resamples of each seed's samples for the primary metric's interval; 0: none
    likelihood_n: int  # test images for bits/dim (2-D: test points for the log-likelihood); 0 skips
    probes: int
    rtol: float
    atol: float
    inception_ref: Stats | None  # the cached Inception statistics of the train split; None: compute them
    use_gpu: bool
    cpus: float  # a Ray task's CPUs (ray.cpus_per_worker): its torch threads
    progress: bool  # a Ray task's progress bar, shown by the driver (the driver's stderr is a terminal)


def _compute(job: _Job, files: _Files, device: torch.device, bar: Callable[..., Any],
             ray_node: str | None = None) -> dict[str, Any]:
    """The heavy work on `device`: every setting and seed, the baselines, the likelihood. Reads only `files`
    and the job. Returns per-seed metrics, the Inception train statistics when it computed them (for the
    driver to cache), the likelihood and computed_on."""
    manifest = load_manifest(files.data)
    modality = manifest.modality
    x_test, x_train = read_split(files.data, "test"), read_split(files.data, "train")
    domain_score = (_image_scorer(files.featurizer, manifest, x_train, device) if modality.is_image
                    else _point_scorer(manifest, x_train, device))
    fid: Callable[[torch.Tensor], float] | None = None
    fresh_ref: Stats | None = None
    if files.inception is not None:
        net = inception_network(files.inception, device)
        if job.inception_ref is None:
            fresh_ref = reference_stats(net, x_train)
        fid = fid_scorer(net, job.inception_ref if fresh_ref is None else fresh_ref)

    sets = sum(len(xs) for xs in job.samples.values()) + len(job.heldout_idx or {})
    progress = bar(total=sets * job.n, desc=f"evaluate {job.variant}", unit="sample")

    def score(x: torch.Tensor, seed: int, with_fid: bool = True) -> tuple[dict[str, float], np.ndarray | None]:
        """The domain (or point) metrics, the primary metric's bootstrap replicates (indices from
        (params.seed, seed) alone: every variant's seed resamples the same rows), and the standard FID."""
        boot = bootstrap_indices(len(x), job.bootstrap, [job.seed, seed]) if job.bootstrap else None
        out, reps = domain_score(x, boot)
        if fid is not None and with_fid:
            out["inception_fid"] = fid(x)
        progress.update(len(x))
        return out, reps

    settings = {key: {seed: score(_model_space(stored, modality), seed) for seed, stored in xs.items()}
                for key, xs in job.samples.items()}
    # held-out real data against the same reference: domain metrics only (Inception's baseline is apart)
    heldout = None if job.heldout_idx is None else {s: torch.from_numpy(i) for s, i in job.heldout_idx.items()}
    baseline = None if heldout is None else {s: score(x_test[i], s, with_fid=False) for s, i in heldout.items()}
    inception_baseline, how = None, None
    if fid is not None:  # N real images per seed against the train statistics, where there are N
        seed_ids = sorted({seed for xs in job.samples.values() for seed in xs})
        images, how = inception_baseline_images(x_test, seed_ids, job.n, job.seed)
        inception_baseline = None if images is None else {s: fid(x) for s, x in images.items()}
    progress.close()

    likelihood = None
    if job.likelihood_n:
        model, n_lik = load_trained(files.model, device=device).model, job.likelihood_n
        likelihood = (_bits_per_dim(model, x_test, n_lik, job.probes, job.seed, job.rtol, job.atol, device)
                      if modality.is_image else _test_loglik(model, manifest, x_test, n_lik, job.seed, device))
    gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    return {"settings": settings, "baseline": baseline, "inception_baseline": inception_baseline,
            "inception_baseline_how": how, "inception_ref": fresh_ref, "likelihood": likelihood,
            "computed_on": {"node": socket.gethostname(), "ray_node_id": ray_node, "device": f"{device}{gpu}"}}


def _remote_compute(job: _Job, shipped: dict[str, Shipment]) -> dict[str, Any]:
    """The Ray task: this node's copies of the shipped files, on the task's device (its GPU where it got one)."""
    import ray
    from ray.experimental.tqdm_ray import tqdm as ray_tqdm
    from tqdm.auto import tqdm

    device = task_device(job.use_gpu)
    torch.set_num_threads(max(1, int(job.cpus)))  # a reused worker may have run with other threads
    bar = ray_tqdm if job.progress else functools.partial(tqdm, disable=True)
    return _compute(job, _Files.unpacked(shipped), device, bar, ray_node=ray.get_runtime_context().get_node_id())


def _run_on_ray(job: _Job, files: _Files, manifest: Manifest, address: str, timeout_s: float) -> dict[str, Any]:
    """_compute as one Ray task on the cluster at `address` ("" = $RAY_ADDRESS); a failure of the task is an
    EvaluateError naming the variant and the cause."""
    import ray

    try:
        with ray_session(address, connect_timeout_s=timeout_s):
            if job.use_gpu and not ray.cluster_resources().get("GPU"):
                raise EvaluateError("ray.use_gpu is true but the Ray cluster has no GPU: set ray.use_gpu: false")
            task = ray.remote(_remote_compute).options(num_cpus=job.cpus, num_gpus=1 if job.use_gpu else 0)
            ref = task.remote(job, files.ship(manifest))
            try:
                return ray.get(ref)
            except ray.exceptions.RayError as e:
                cause = getattr(e, "cause", None) or e
                text = " ".join(str(cause).split())[:300]
                raise EvaluateError(f"variant {job.variant}: the evaluation task failed on the Ray cluster "
                                    f"({type(cause).__name__}: {text})") from None
            except BaseException:  # Ctrl-C, SIGTERM: the task must not go on computing for nobody
                ray.cancel(ref, force=True)
                raise
    except RuntimeSetupError as e:
        raise EvaluateError(str(e)) from None


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
        settings: {key: {method, steps, nfe, seeds, seed_ids, <metric>_mean, <metric>_std, <metric>_ci,
                  <primary>_replicates (with evaluate.bootstrap), per_seed}}
                  (a setting the sample stage marked diverged: method, steps, nfe, seeds, seed_ids, diverged: true,
                  diverged_seeds, max_abs (null: not finite) and diverged_above, and no metrics)
        diverged: the keys of those settings
        reference, intervals (level; how each interval is made), bootstrap ({replicates, seed, n, seed_ids}:
                  what the report checks before pairing two variants' replicates), precision_recall (k and the
                  set sizes), kid (scale 1000 and the subset size, or why it is left out)
        baseline: the same metrics for min(N, test split) random test points per seed against the same
                  reference, n and same_n saying how many (images
                  also domain_fd_test_full: the whole test split against the train statistics)
        bits_per_dim (images) or test_loglik (2-D): the model's likelihood of test data
        inception_fid: the lowest inception_fid_mean over the settings, inception_fid_setting, and
                  inception_fid_reason saying what it is; null, with the reason, when there are no local
                  Inception weights (or for 2-D data)
        inception (when computed): the weights file, its sha256, whether it is the standard file, the network
                  and the reference (the whole train split); every setting and the baseline then also hold
                  inception_fid_mean, inception_fid_std and per-seed values
        classifier (images): its test accuracy and seed
        computed_on: where the features, distances and likelihood were computed: {node (host name),
                  ray_node_id (the Ray task's node; null in the stage's own process), device}

    The compute runs as one Ray task on the cluster of ray.address (or $RAY_ADDRESS), with ray.cpus_per_worker
    CPUs and, with ray.use_gpu, one GPU; with no cluster named, in this process (on its GPU with
    ray.use_gpu, where there is one) and without starting Ray.

    Image metrics: domain_fd, kid, precision, recall; 2-D: sliced_w2, mmd (and data_loglik for mixture
    data). std is over seeds (ddof 1, null with one seed). EvaluateError for a missing input, samples
    that fail check_samples, an invalid Inception weights file, a missing evaluate.inception_weights file,
    or no weights at all with evaluate.require_inception, an unreachable cluster or a failed Ray task
    (naming the variant and the cause); DataError when the dataset is not prepared.
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
        if weights is not None:
            inception_network(weights)  # the file is checked here; the compute loads it again on its device
    except ValueError as e:
        raise EvaluateError(str(e)) from None
    trained = _load_model(model_path, params, variant, manifest)
    logger = _mlflow_logger(params, root, trained.run_id, model_path) if log_to_mlflow else None
    data_shape = tuple(manifest.shape)

    # Every sample first: a bad file fails the stage before anything expensive runs.
    settings = sampler_settings(vcfg)
    model_sha = storage.sha256_file(model_path)
    # Diverged settings (the sample stage's guard) are reported as such, never scored: their samples may not
    # even be finite, and a distance of 11,400 reads as a number.
    diverged = {s.key: d for s in settings if (d := _divergence(samples_dir, s)) is not None}
    loaded = {s.key: _load_setting(samples_dir, s, variant, modality, data_shape, model_sha) for s in settings
              if s.key not in diverged}
    counts = {len(x) for xs, _ in loaded.values() for x in xs.values()} | {d["count"] for d in diverged.values()}
    if len(counts) != 1:
        raise EvaluateError(f"{samples_dir}: settings and seeds hold different numbers of samples "
                            f"({sorted(counts)}); rerun the sample stage with one --n")
    n = counts.pop()
    if n < _MIN_SAMPLES:
        raise EvaluateError(f"{samples_dir}: {n} samples per seed; the metrics need at least {_MIN_SAMPLES} "
                            "(pipeline/sample.py --n)")
    info: dict[str, Any] = {}
    fd_test_full = None
    if modality.is_image:  # the featurizer's folder, checked here; its train statistics give the floor
        _, meta, ref_test, ref_train = _featurizer(featurizer_dir, manifest)
        info = {"classifier": {"test_accuracy": meta.get("test_accuracy"), "seed": meta.get("seed")}}
        fd_test_full = frechet_distance(*ref_train, *ref_test)

    seed_ids = sorted({seed for xs, _ in loaded.values() for seed in xs}
                      | {seed for d in diverged.values() for seed in d["seed_ids"]})
    n_train, n_test = manifest.counts["train"], manifest.counts["test"]
    n_heldout = min(n, n_test)  # the baseline's real samples: held out of the reference, N where the split allows
    heldout_idx = None
    if n_heldout >= _MIN_SAMPLES:  # the draw inception_baseline_images makes too
        heldout_idx = {seed: np.sort(np.random.default_rng([params.seed, seed]).choice(n_test, n_heldout, replace=False))
                       for seed in seed_ids}
    ref_file, weights_sha, ref_key, cached_ref = out_dir / INCEPTION_REF_FILE, "", "", None
    if weights is not None:  # the train split's Inception statistics, cached by the driver
        weights_sha = storage.sha256_file(weights)
        ref_key = reference_key(weights_sha, manifest)
        cached_ref = read_reference(ref_file, ref_key)
    job = _Job(variant=variant, samples={key: xs for key, (xs, _) in loaded.items()}, n=n, seed=params.seed,
               heldout_idx=heldout_idx, bootstrap=params.evaluate.bootstrap,
               likelihood_n=min(bpd_samples, n_test), probes=probes,
               rtol=params.evaluate.bpd_rtol, atol=params.evaluate.bpd_atol,
               inception_ref=cached_ref, use_gpu=params.ray.use_gpu,
               cpus=params.ray.cpus_per_worker, progress=sys.stderr.isatty())
    files = _Files(data=manifest.root, model=model_path.resolve(),
                   featurizer=featurizer_dir.resolve() if modality.is_image else None, inception=weights)
    if params.ray.address or os.environ.get("RAY_ADDRESS"):
        computed = _run_on_ray(job, files, manifest, params.ray.address, params.ray.connect_timeout_s)
    else:  # no cluster: here, with no Ray started
        from tqdm.auto import tqdm

        computed = _compute(job, files, task_device(params.ray.use_gpu), functools.partial(tqdm, disable=None))
    if computed["inception_ref"] is not None:
        write_reference(ref_file, ref_key, computed["inception_ref"])

    level, primary = params.evaluate.level, modality.primary_metric

    def summary(per_seed: dict[int, tuple[dict[str, float], np.ndarray | None]]) -> dict[str, Any]:
        reps = {seed: r for seed, (_, r) in per_seed.items()}
        return _summary({seed: m for seed, (m, _) in per_seed.items()}, level, primary,
                        None if any(r is None for r in reps.values()) else reps)

    results: dict[str, Any] = {}
    for s in settings:
        if s.key in diverged:
            results[s.key] = {k: v for k, v in diverged[s.key].items() if k != "count"}
            continue
        _, nfes = loaded[s.key]
        nfe = nfes[0] if len(set(nfes)) == 1 else round(float(np.mean(nfes)), 1)
        row = {"method": s.method, "steps": s.steps, "nfe": nfe}
        if len(set(nfes)) > 1:
            row["nfe_range"] = [min(nfes), max(nfes)]  # the adaptive ODE: its NFE differs per chunk
        results[s.key] = {**row, **summary(computed["settings"][s.key])}

    baseline: dict[str, Any] = {"description": f"{n_heldout} random test (held-out) points per seed (drawn from "
                                               "(params.seed, seed)) against the same train-split reference, with "
                                               "the same metrics", "n": n_heldout, "same_n": n_heldout == n}
    if n_heldout < n:
        baseline["description"] += (f"; the test split holds only {n_test} < N = {n}, so this floor is biased "
                                    "upwards against the samples: enlarge data.test_fraction or lower sample.n")
    if computed["baseline"] is not None:
        baseline.update(summary(computed["baseline"]))
    else:
        baseline["skipped"] = f"the test split has {n_test} points, fewer than {_MIN_SAMPLES}"
    if weights is not None:
        how = computed["inception_baseline_how"]
        if computed["inception_baseline"] is None:
            baseline["inception_fid_skipped"] = how
        else:
            summary = _summary({s: {"inception_fid": v} for s, v in computed["inception_baseline"].items()}, level,
                               primary, None)
            baseline["description"] = f"{baseline['description']}; inception_fid: {how}"
            baseline.update({k: summary[k] for k in ("inception_fid_mean", "inception_fid_std", "inception_fid_ci")})
            for s, values in summary["per_seed"].items():
                baseline.setdefault("per_seed", {}).setdefault(s, {}).update(values)
    if fd_test_full is not None:  # the whole test split against the train statistics
        baseline["domain_fd_test_full"] = _num(fd_test_full)

    example = next((r for r in results.values() if not r.get("diverged")), {})
    boot = params.evaluate.bootstrap
    metrics: dict[str, Any] = {
        "variant": variant, "sde": vcfg.sde.type, "data": manifest.source, "n_per_seed": n,
        "seeds": min(r["seeds"] for r in results.values()), "seed_ids": seed_ids, "primary_metric": primary,
        "metrics": {k: v for k, v in _DESCRIPTIONS.items() if f"{k}_mean" in example},
        "diverged": sorted(diverged),  # settings marked by the sample stage's guard: in settings, without metrics
        "std": "sample standard deviation over seeds (ddof 1); null with one seed",
        "reference": f"the whole train split ({n_train} points)",
        "intervals": {
            "level": level,
            primary: (f"bootstrap over samples: {boot} resamples (with replacement) of each seed's samples, the "
                      "indices drawn from (params.seed, seed) alone, so every variant and setting of the same N "
                      "resamples the same rows; the mean over seeds of each resample gives "
                      f"{primary}_replicates; the interval is their central quantiles about their mean, added to "
                      "the estimate" if boot else "Student t over seeds (evaluate.bootstrap is 0)"),
            "others": "Student t over seeds (null with one seed)",
        },
        "bootstrap": {"replicates": boot, "seed": params.seed, "n": n, "seed_ids": seed_ids} if boot else None,
        "precision_recall": {"k": _KNN_K, "n_samples": n, "n_reference": min(n_train, _ROWS)},
        "kid": ({"scale": _KID_SCALE, "subset_size": min(n, n_train, _ROWS), "subsets": _KID_SUBSETS}
                if n >= _KID_MIN_N else f"left out: N = {n} < {_KID_MIN_N}"),
        "baseline": baseline, "settings": results, **info,
    }
    metrics[modality.likelihood] = computed["likelihood"]
    if weights is not None:
        info_inc = inception_info(weights, weights_sha, manifest, ref_file, cached=cached_ref is not None)
        metrics.update(inception_summary(results, info_inc, n, metrics["seeds"]))
    else:
        metrics.update({"inception_fid": None, "inception_fid_reason": inception_reason})
    metrics["computed_on"] = computed["computed_on"]

    storage.write_text(out_dir / CURVE_FILE, _curve_csv(variant, results))
    storage.write_json(out_dir / METRICS_FILE, metrics, indent=2)
    if logger is not None:
        _log(logger, metrics, primary, samples_dir, out_dir)
    return metrics


def _curve_csv(variant: str, results: dict[str, Any]) -> str:
    """One row per setting: mean, std over seeds and interval of every metric, for `dvc plots` (x: nfe)."""
    example = next((r for r in results.values() if not r.get("diverged")), {})  # diverged rows: empty cells
    names = [k for k in example if k.endswith(("_mean", "_std"))]
    cis = [k for k in example if k.endswith("_ci")]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["variant", "setting", "method", "steps", "nfe", *names, *(f"{k}_{e}" for k in cis for e in ("low", "high"))])
    for key, r in results.items():
        w.writerow([variant, key, r["method"], "" if r["steps"] is None else r["steps"], r["nfe"],
                    *["" if r.get(k) is None else r[k] for k in names],
                    *["" if r.get(k) is None else r[k][i] for k in cis for i in (0, 1)]])
    return buf.getvalue()


def _log(logger, metrics: dict[str, Any], primary: str, samples_dir: Path, out_dir: Path) -> None:
    """Into the training run: eval_<primary>_<method> at step = NFE (the chart is distance against NFE,
    one line per sampler), eval_<primary>_best at step = NFE (the best setting at each NFE: one key in every
    variant's run, which MLflow's Compare overlays), the baseline, the likelihood, and metrics.json and the
    grids under eval/."""
    from . import tracking

    points = [(f"eval_{primary}_{r['method']}", r.get(f"{primary}_mean"), int(round(r["nfe"])))
              for r in metrics["settings"].values()]  # a diverged setting has no value: no point
    points.append((f"eval_{primary}_baseline", metrics["baseline"].get(f"{primary}_mean"), 0))
    if metrics.get("inception"):  # the standard FID against NFE too
        points += [(f"eval_inception_fid_{r['method']}", r.get("inception_fid_mean"), int(round(r["nfe"])))
                   for r in metrics["settings"].values()]
        points.append(("eval_inception_fid_baseline", metrics["baseline"].get("inception_fid_mean"), 0))
    for metric in [primary] + (["inception_fid"] if metrics.get("inception") else []):
        at_nfe = [(int(round(r["nfe"])), r.get(f"{metric}_mean")) for r in metrics["settings"].values()]
        points += [(f"eval_{metric}_best", value, nfe) for nfe, value in tracking.best_at_each_step(at_nfe)]
    if metrics.get("bits_per_dim"):
        points.append(("eval_bits_per_dim", metrics["bits_per_dim"]["mean"], 0))
    if metrics.get("test_loglik"):
        points.append(("eval_test_loglik", metrics["test_loglik"]["mean"], 0))
    _log_new_metrics(logger, points)
    # the divergence guard: which settings were not scored, as one tag ("none" when every setting was)
    logger.tags({"eval_diverged": ",".join(metrics["diverged"]) or "none"})
    logger.artifacts([out_dir / METRICS_FILE, out_dir / CURVE_FILE], "eval")
    for key in metrics["settings"]:
        grid = samples_dir / key / "grid.png"
        if grid.is_file():
            logger.artifact(grid, f"eval/{key}")


__all__ = ["CURVE_FILE", "DEQUANTIZATION", "EvaluateError", "INCEPTION_REF_FILE", "METRICS_FILE", "evaluate_variant"]
