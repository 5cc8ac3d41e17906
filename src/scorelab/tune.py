"""Ray Tune sweeps over SDEs and their noise schedules: which SDE suits this data, answered by training.

    plan = plan_trials(params, sigma_max_auto=suggest_sigma_max(read_split(data_dir, "train")))
    result = run_sweep(params, root=root, data_dir=data_dir, featurizer_dir=..., out_dir=root / "outputs/tune")

params.tune (scorelab.config.TuneConfig) names a search space of SDEs, each with its own parameters
(beta_min/beta_max, the cosine offset, sigma_min/sigma_max, the parameterisation), and learning-rate
and EMA-decay choices. Every trial is one variant, trained by the loop of scorelab.training through
Ray Train inside a Ray Tune trial, on tune.workers_per_trial workers, with its own checkpoints.

The objective must rank an eps-predicting VP model against a score-predicting VE model, whose denoising
losses have different scales; so it is a distance of samples to data: n samples of the EMA model,
drawn with one sampler at one NFE valid for every SDE family, against the test split (domain Frechet
distance on the featurizer stage's classifier features for images, sliced Wasserstein-2 for 2-D
points), averaged over tune.objective.seeds draws whose standard error is the trial's measured noise.
The training loop's rank 0 computes it at every checkpoint, and ASHA stops the trials whose objective
falls behind at its rungs; rung_agreement measures how often an early checkpoint already had the final
order of the trials that ran to the end.

The winner is not the trial's short-budget checkpoint: best_variant.yaml holds its configuration, which
the train_tuned, sample_tuned and evaluate_tuned stages train at params.yaml's train: budget and sample
with the samplers of the hand-set variant of its SDE type (scorelab.config.with_tuned_variant), so that
`tuned` compares with that variant at equal NFE.

A sweep is named by a hash of everything that decides its trials: rerunning it restores the Tune
experiment (finished trials are kept, unfinished and errored ones resume from their last Ray Train
checkpoint), and continues the same MLflow runs: one parent run per sweep, one nested run per trial.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from pydantic import ValidationError

from . import storage, tracking
from .config import ConfigError, Params, TuneConfig, VariantConfig, auto_factor, handset_variant_for, parse_params
from .schema import describe_error
from .featurizer import CLASSIFIER_FILE, REF_TEST_FILE, FeaturizerError, load_featurizer
from .layout import TRIALS_FILE, TUNED_VARIANT, TUNED_VARIANT_FILE as VARIANT_FILE, shared_root
from .modality import modality_of
from .objective import OBJECTIVE, Objective
from .runtime import alive_nodes, check_storage_shared, graceful_sigterm, ray_session, ship_files, torch_trainer
from .training import STATUS_FILE, TrainJob, config_hash, resolve_train, ship_dataset, train_loop
from .visual import plot_objective

BEST_TAG = "scorelab.best"
VARIANT = TUNED_VARIANT  # the winner's name, as best_variant.yaml is read (scorelab.config.with_tuned_variant)
METRICS_FILE, PLOT_FILE = "metrics.json", "objective_vs_params.png"


class TuneError(RuntimeError):
    """The sweep cannot start (missing featurizer, data) or produced no usable trial."""


class SweepInterrupted(TuneError):
    """SIGTERM (or Ray Tune's own SIGINT/SIGUSR1) stopped the sweep before every trial ended; Tune saved
    its state, and rerunning the stage resumes it. exit_code: 143 for SIGTERM, 130 otherwise."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


# ---------------------------------------------------------------------------------------------
# A starting value for sigma_max from the data


def suggest_sigma_max(x: torch.Tensor, max_points: int = 4096, seed: int = 0) -> tuple[float, int]:
    """(largest Euclidean distance between two of the points, how many points were compared).

    Song & Ermon 2020 (technique 1): sigma_max as large as the largest pairwise distance lets the
    prior's noise move any training point to any other. Exact for up to max_points points; above that, a
    seeded random subset of max_points (a lower bound, close for data with many near-extreme points)."""
    x = x.reshape(len(x), -1).double()
    if len(x) > max_points:
        g = torch.Generator().manual_seed(seed)
        x = x[torch.randperm(len(x), generator=g)[:max_points]]
    best = 0.0
    for a in range(0, len(x), 1024):  # blocks of rows: memory O(1024 N), not O(N^2)
        best = max(best, float(torch.cdist(x[a:a + 1024], x).max()))
    return best, len(x)


# ---------------------------------------------------------------------------------------------
# The trials


@dataclass(frozen=True)
class Trial:
    index: int
    candidate: int  # which entry of tune.space
    sde: dict[str, Any]  # the SDE setting, "auto" resolved
    lr: float
    ema_decay: float
    variant: dict[str, Any]  # the complete variant, as params.yaml spells it (samplers: the objective's)

    @property
    def label(self) -> str:
        knobs = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                          for k, v in self.sde.items() if k != "type")
        return f"{self.sde['type']}/{self.variant['parameterization']['type']}" + (f" ({knobs})" if knobs else "")


def plan_trials(params: Params, sigma_max_auto: float | None) -> list[Trial]:
    """The sweep's trials, in the order they start. tune.search "grid": every SDE setting of tune.space
    with the first (lr, ema_decay) pair, then every setting with the second pair, and so on (lr-major, as
    listed), cut at tune.num_trials; so a sweep shorter than the space still covers every SDE type, with
    the choices listed first. "random": num_trials distinct configurations of that list, drawn without
    replacement with params.seed, in the list's order. Raises ConfigError, naming the field, when an SDE setting is invalid once "auto" is
    resolved: before any trial starts."""
    tune = _tune(params)
    errors = [e for i, c in enumerate(tune.space) for e in tune.candidate_errors(i, c, sigma_max_auto)]
    if errors:
        found = ValidationError.from_exception_data("TuneConfig", errors).errors(include_url=False)
        auto = f" (sigma_max auto = {sigma_max_auto:g})" if sigma_max_auto is not None else ""
        raise ConfigError([describe_error({**e, "loc": ("tune", *e["loc"])}, Params) + auto for e in found])
    arms = [(i, sde) for i, c in enumerate(tune.space) for sde in c.settings(sigma_max_auto)]
    default_ema = VariantConfig.model_fields["ema"].default_factory().decay
    pairs = [(lr, ema) for lr in (tune.lr or [params.train.lr]) for ema in (tune.ema_decay or [default_ema])]
    configurations = [(pair, arm) for pair in pairs for arm in arms]
    if tune.search == "random":  # num_trials distinct configurations, the same ones for the same seed
        picked = sorted(random.Random(params.seed).sample(range(len(configurations)), tune.num_trials))
        configurations = [configurations[i] for i in picked]
    trials = []
    for n, ((lr, ema), (cand, sde)) in enumerate(configurations[:tune.num_trials]):
        variant = tune.space[cand].variant(sde, [tune.objective.sampler], lr=lr, ema_decay=ema)
        variant["train"]["steps"] = tune.steps
        if tune.batch_size is not None:
            variant["train"]["batch_size"] = tune.batch_size
        variant = VariantConfig.model_validate(variant).model_dump(mode="json")  # complete, with defaults
        trials.append(Trial(n, cand, sde, lr, ema, variant))
    return trials


def trial_params(params: Params, trial: Trial) -> Params:
    """A complete params file whose only variant, `tuned`, is this trial (no tune section)."""
    data = params.model_dump(mode="json", exclude={"tune"})
    data["variants"] = {VARIANT: trial.variant}
    return parse_params(data)


def _tune(params: Params) -> TuneConfig:
    if params.tune is None:
        raise ConfigError(["tune: missing section; the sweep needs tune.space and its budget"])
    return params.tune


# ---------------------------------------------------------------------------------------------
# One Tune trial: a Ray Train run of the training loop


@dataclass(frozen=True)
class _Plan:
    """What every trial function needs, shipped once through the object store."""

    jobs: list[dict[str, Any]]  # TrainJob fields per trial
    names: list[str]  # the Ray Train run name per trial: the same trial resumes its own checkpoints
    train_storage: str
    workers: int
    cpus_per_worker: float
    gpus_per_worker: float
    max_failures: int


def _run_trial(config: dict[str, Any], plan: _Plan) -> None:
    """Tune calls this; it fits a TorchTrainer whose reports (rank 0's, with the objective) reach Tune."""
    from ray.tune.integration.ray_train import TuneReportCallback

    index = config["trial"]["index"]
    job = plan.jobs[index]
    logger = tracking.RunLogger(job["tracking_uri"], job["run_id"])
    run = tracking.client(job["tracking_uri"]).get_run(job["run_id"])
    logger.tags({"scorelab.launches": int(run.data.tags.get("scorelab.launches", 0)) + 1})  # >1: resumed
    torch_trainer(train_loop, job, name=plan.names[index], storage_path=plan.train_storage, workers=plan.workers,
                  cpus_per_worker=plan.cpus_per_worker, gpus_per_worker=plan.gpus_per_worker,
                  max_failures=plan.max_failures, callbacks=[TuneReportCallback()]).fit()


# ---------------------------------------------------------------------------------------------
# The sweep


@dataclass
class SweepResult:
    best: dict[str, Any]  # the winning row of trials.csv
    rows: list[dict[str, Any]]
    metrics: dict[str, Any]
    out_dir: Path


def sweep_key(params: Params, trials: list[Trial], checksum: str) -> str:
    """What decides the sweep's outcome: its trials, their training, the objective, the data, the seed.
    Not where things are stored or logged, nor the workers (the batch is global) or the concurrency."""
    tune = _tune(params)
    train = params.train.model_dump()
    for cadence in ("checkpoint_every", "log_every", "sample_every"):
        train.pop(cadence)
    blob = json.dumps({"trials": [t.variant for t in trials], "train": train, "data": checksum, "seed": params.seed,
                       "tune": tune.model_dump(mode="json", include={"steps", "eval_every", "grace_period",
                                                                    "reduction_factor", "objective"})},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def run_sweep(params: Params, *, root: Path, data_dir: Path, featurizer_dir: Path, out_dir: Path) -> SweepResult:
    """Run (or resume) the sweep of params.tune and write out_dir: best_variant.yaml, trials.csv,
    metrics.json, objective_vs_params.png (see pipeline/tune.py)."""
    from ray import tune as rtune
    from ray.tune.schedulers import ASHAScheduler

    from .data import read_split, verify

    start = time.perf_counter()
    tune = _tune(params)
    root, data_dir, out_dir = root.resolve(), data_dir.resolve(), out_dir.resolve()
    manifest = verify(data_dir)
    uses_auto = any(auto_factor(s.get("sigma_max")) is not None for c in tune.space for s in c.settings())
    sigma_auto, sigma_points = suggest_sigma_max(read_split(data_dir, "train"), seed=params.seed) if uses_auto \
        else (None, 0)
    trials = plan_trials(params, sigma_auto)
    modality = modality_of(manifest.shape)
    metric = modality.primary_metric
    if modality.is_image:  # fail before any trial when the objective's classifier is missing or for other data
        try:
            load_featurizer(featurizer_dir.resolve(), manifest)
        except FeaturizerError as e:
            raise TuneError(str(e)) from None
    key = sweep_key(params, trials, manifest.checksum)
    name = f"tune-{key[:12]}"
    store = storage.resolve(params.ray.storage_path, shared_root(root))  # absolute: Tune and the workers run elsewhere
    uri = tracking.resolve_tracking_uri(params.mlflow.tracking_uri, root)
    tracking.check_server(uri, params.mlflow.connect_timeout_s)  # before Ray starts: seconds, not minutes

    sampler = tune.objective.sampler
    with ray_session(params.ray.address, num_cpus=max(os.cpu_count() or 1, math.ceil(tune.cpus_needed())),
                     connect_timeout_s=params.ray.connect_timeout_s, dashboard=True):
        tracking.check_reachable_from(uri, alive_nodes())
        check_storage_shared(store)
        data = ship_dataset(manifest)  # trials and their objective run where the driver's disk may not be
        featurizer = ship_files(featurizer_dir, [CLASSIFIER_FILE, REF_TEST_FILE]) if modality.is_image else None
        objective = Objective(metric, data, featurizer, sampler.method, sampler.step_list()[0], sampler.options(),
                              tune.objective.n_samples, tune.objective.seeds, params.seed, tuple(manifest.shape))
        exp = tracking.experiment_id(uri, tracking.experiment_name(params.mlflow.experiment, manifest.source), root)
        commit = tracking.git_commit(root)
        parent = tracking.start_or_resume_run(uri, exp, name, "tune", {
            "scorelab.kind": "sweep", "git_commit": commit, "dataset_checksum": manifest.checksum,
            "scorelab.sweep": name})
        parent_log = tracking.RunLogger(uri, parent)
        parent_log.params(tracking.flatten({"tune": tune.model_dump(mode="json"), "train": params.train.model_dump(),
                                            "seed": params.seed, "data": params.data.model_dump(mode="json"),
                                            "sigma_max_auto": sigma_auto, "objective_metric": metric}))
        jobs, names, run_ids = [], [], []
        for t in trials:
            tp = trial_params(params, t)
            train = resolve_train(tp, VARIANT).model_copy(update={"checkpoint_every": tune.eval_every,
                                                                  "sample_every": 0})
            h = config_hash(tp, VARIANT, manifest.checksum)
            run_id = tracking.start_or_resume_run(uri, exp, f"{name}-trial{t.index:03d}", f"tune-trial{t.index:03d}", {
                "mlflow.parentRunId": parent, "variant": VARIANT, "sde": t.sde["type"],
                "parameterization": t.variant["parameterization"]["type"], "scorelab.trial": str(t.index),
                "scorelab.sweep": name, "git_commit": commit, "dataset_checksum": manifest.checksum,
                "scorelab.config_hash": h})
            tracking.RunLogger(uri, run_id).params(tracking.flatten({
                "variant": t.variant, "train": train.model_dump(), "seed": params.seed, "trial": t.index,
                "candidate": t.candidate}))
            names.append(f"{name}-trial{t.index:03d}-{h[:8]}")
            status = storage.join(store, f"{name}-trials", names[-1], STATUS_FILE)  # where every node reaches
            job = TrainJob(
                variant=f"trial{t.index}", variant_config=t.variant, train=train.model_dump(), data=data,
                data_shape=list(manifest.shape), seed=params.seed, config_hash=h, tracking_uri=uri, run_id=run_id,
                status_path=status, threads_per_worker=max(1, int(tune.cpus_per_worker)),
                hflip=params.data.hflip, evaluate=objective)
            jobs.append(job.as_config())
            run_ids.append(run_id)
        plan = _Plan(jobs, names, storage.join(store, f"{name}-trials"), tune.workers_per_trial, tune.cpus_per_worker,
                     tune.gpus_per_worker, params.ray.max_failures)
        trainable = rtune.with_resources(rtune.with_parameters(_run_trial, plan=plan), {"cpu": 0.01})
        path = storage.join(store, name)
        resumed = rtune.Tuner.can_restore(path)
        if resumed:
            tuner = rtune.Tuner.restore(path, trainable=trainable, resume_errored=True)
        else:
            scheduler = ASHAScheduler(time_attr="step", max_t=tune.steps, grace_period=tune.grace_period,
                                      reduction_factor=tune.reduction_factor, stop_last_trials=False)
            tuner = rtune.Tuner(
                trainable,
                param_space={"trial": rtune.grid_search([{"index": t.index, "label": t.label} for t in trials])},
                tune_config=rtune.TuneConfig(metric=OBJECTIVE, mode="min", scheduler=scheduler,
                                             max_concurrent_trials=tune.max_concurrent),
                run_config=rtune.RunConfig(name=name, storage_path=store, verbose=1),
            )
        with graceful_sigterm("tune") as sigterm:
            grid = tuner.fit()

    ended = grid.num_terminated + grid.num_errors
    if sigterm.is_set() or ended < len(trials):  # interrupted: never take the trials so far for the result
        raise SweepInterrupted(
            f"sweep {name} stopped by {'SIGTERM' if sigterm.is_set() else 'an interrupt'} with {ended} of "
            f"{len(trials)} trials ended; Ray Tune saved its state under {path}: rerun the stage to resume it "
            "(the trials that were running continue from their last checkpoint)",
            143 if sigterm.is_set() else 130)

    rows = _rows(grid, trials, jobs, run_ids, tune.steps)
    done = [r for r in rows if r["status"] == "finished" and r["objective"] is not None]
    if not done:
        for run_id in [parent, *run_ids]:
            tracking.RunLogger(uri, run_id).finish("FAILED")
        errors = "; ".join(f"trial {r['trial']}: {r['error']}" for r in rows if r["error"])
        raise TuneError(f"no trial reached tune.steps={tune.steps} with a finite objective" +
                        (f" ({errors})" if errors else ""))
    best = min(done, key=lambda r: r["objective"])
    winner = trials[best["trial"]]

    out_dir.mkdir(parents=True, exist_ok=True)
    samplers_from = "tune.samplers" if tune.samplers is not None else handset_variant_for(params, winner.sde["type"])
    header = (f"# The winner of sweep {name}: trial {winner.index}, {winner.label}, lr {winner.lr:g}, objective "
              f"{metric} = {best['objective']:.4g}\n# (written by pipeline/tune.py). The stages train it at params.yaml's "
              f"train: budget, and sample it with the samplers of {samplers_from}, as variant `{VARIANT}`.\n")
    storage.write_text(out_dir / VARIANT_FILE, header + yaml.safe_dump(winning_variant(winner), sort_keys=False))
    _write_csv(out_dir / TRIALS_FILE, rows)
    plot_objective(rows, out_dir / PLOT_FILE, metric)
    ses = [r["objective_se"] for r in rows if r["objective_se"] is not None]
    seconds = time.perf_counter() - start
    metrics = {
        "best_objective": best["objective"], "best_objective_se": best["objective_se"], "objective_metric": metric,
        "best_trial": winner.index, "best_label": winner.label, "best_sde": winner.sde["type"], "best_lr": winner.lr,
        "trials": len(rows), "search": tune.search,
        "finished": len(done), "stopped_early": sum(r["status"] == "stopped_early" for r in rows),
        "failed": sum(r["status"] in ("error", "nonfinite") for r in rows),
        "objective_sampler": sampler.method, "objective_nfe": best["objective_nfe"],
        "objective_n_samples": tune.objective.n_samples, "objective_seeds": tune.objective.seeds,
        "objective_se_median": float(np.median(ses)) if ses else None,
        "rung_agreement": rung_agreement(rows, tune.steps),
        "sigma_max_auto": sigma_auto, "sigma_max_auto_points": sigma_points or None,
        "seconds": round(seconds, 2), "resumed": resumed, "sweep": name, "mlflow_run_id": parent,
        "best_run_id": best["mlflow_run_id"], "samplers_from": samplers_from,
        "handset": handset_variant_for(params, winner.sde["type"]),
    }
    storage.write_json(out_dir / METRICS_FILE, metrics, indent=2)

    for r, run_id in zip(rows, run_ids):
        log = tracking.RunLogger(uri, run_id)
        log.tags({"scorelab.status": r["status"], "scorelab.steps": r["steps"], BEST_TAG: str(r is best).lower()})
        log.finish("FAILED" if r["status"] in ("error", "nonfinite") else "FINISHED")
    parent_log.tags({"scorelab.best_trial": winner.index, "scorelab.best_run_id": best["mlflow_run_id"],
                     "scorelab.best_sde": winner.sde["type"]})
    parent_log.metrics({k: v for k, v in metrics.items() if k in ("best_objective", "trials", "finished",
                                                                   "stopped_early", "failed", "seconds")}, step=0)
    parent_log.artifacts([out_dir / VARIANT_FILE, out_dir / TRIALS_FILE, out_dir / METRICS_FILE, out_dir / PLOT_FILE])
    parent_log.finish()
    return SweepResult(best, rows, metrics, out_dir)


def _rows(grid: Any, trials: list[Trial], jobs: list[dict], run_ids: list[str], steps: int) -> list[dict[str, Any]]:
    """One row per trial: its configuration, last and best objective, steps reached and how it ended."""
    by_index: dict[int, Any] = {}
    for result in grid:
        by_index[int(result.config["trial"]["index"])] = result
    rows = []
    for t in trials:
        result = by_index.get(t.index)
        m = dict(result.metrics or {}) if result is not None else {}
        history = result.metrics_dataframe if result is not None else None
        curve = []
        if history is not None and OBJECTIVE in history:
            curve = [(int(s), float(v)) for s, v in zip(history["step"], history[OBJECTIVE]) if not math.isnan(v)]
        reached = int(m.get("step", 0) or 0)
        nonfinite = (storage.read_json(jobs[t.index]["status_path"]) or {}).get("status") == "nonfinite"
        error = None if result is None or result.error is None else " ".join(str(result.error).split())[:300]
        status = ("error" if error or result is None else "nonfinite" if nonfinite
                  else "finished" if reached >= steps else "stopped_early")
        rows.append({
            "trial": t.index, "label": t.label, "sde": t.sde["type"],
            "parameterization": t.variant["parameterization"]["type"],
            "sde_params": json.dumps({k: v for k, v in t.sde.items() if k != "type"}, sort_keys=True),
            "lr": t.lr, "ema_decay": t.ema_decay,
            "objective": m.get(OBJECTIVE), "objective_se": m.get("objective_se"), "best_objective": min((v for _, v in curve), default=None),
            "objective_nfe": m.get("objective_nfe"), "steps": reached, "max_steps": steps,
            "stopped_early": status == "stopped_early", "status": status,
            "seconds": round(float(m.get("time_total_s", 0.0)), 2), "mlflow_run_id": run_ids[t.index],
            "checkpoint_path": m.get("checkpoint_path"), "curve": json.dumps(curve), "error": error,
        })
    return rows


def rung_agreement(rows: list[dict[str, Any]], steps: int) -> list[dict[str, Any]]:
    """For each checkpoint step before the end: over the pairs of trials that ran to `steps`, how many are
    ordered at that step as they are at the end. What says whether ASHA may stop trials there: a rate
    well below 1 means the early order is not the final one (a slow starter would be cut)."""
    curves = {r["trial"]: dict(json.loads(r["curve"])) for r in rows if r["status"] == "finished"}
    final = {t: c[steps] for t, c in curves.items() if steps in c}
    early = sorted({s for c in curves.values() for s in c if s < steps})
    out = []
    for step in early:
        have = [t for t in final if step in curves[t]]
        pairs = [(a, b) for i, a in enumerate(have) for b in have[i + 1:]]
        agree = sum((curves[a][step] - curves[b][step]) * (final[a] - final[b]) > 0 for a, b in pairs)
        out.append({"step": step, "agree": agree, "pairs": len(pairs), "rate": agree / len(pairs) if pairs else None})
    return out


def winning_variant(trial: Trial) -> dict[str, Any]:
    """The winner as best_variant.yaml spells it: the trial's variant without its samplers and without the
    sweep's budget (steps, batch), which params.yaml's train: section sets for the retraining; only the
    choices the sweep made or the candidate set (e.g. lr) are kept."""
    variant = {k: v for k, v in trial.variant.items() if k != "samplers"}
    train = {k: v for k, v in (variant.get("train") or {}).items()
             if v is not None and k not in ("steps", "batch_size")}
    variant["train"] = train
    return variant


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    columns = [c for c in rows[0] if c != "checkpoint_path"]
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    storage.write_text(path, buf.getvalue())


__all__ = ["Objective", "SweepResult", "Trial", "TuneError", "plan_trials", "run_sweep", "suggest_sigma_max", "sweep_key",
           "trial_params"]
