"""The `report` stage: every variant's evaluation side by side, as Markdown, figures, DVC metrics and MLflow.

    result = build_report(params, root=Path("."))   # reads outputs/{train,eval,samples}/<variant>/
    result["files"]["comparison"]                    # <root>/reports/comparison.md

Inputs, for each variant in params.variants (made by the train, evaluate and sample stages):

    outputs/train/<variant>/metrics.json   {"steps", "seconds", "final_loss", "mlflow_run_id"; with EMA profiles
                                            "ema_scores", "ema_chosen"}
    outputs/eval/<variant>/metrics.json    {"variant", "sde", "n_per_seed", "seeds", "baseline", "settings",
                                            "bits_per_dim" | "test_loglik", "inception_fid", "inception_fid_reason"}
    outputs/samples/<variant>/<setting>/grid.png   the grid of the variant's best setting

With params.tune, the sweep's winner is one more variant, `tuned` (the same three files), and the tune stage's

    outputs/tune/trials.csv       one row per trial: configuration, objective ± se over seeds, steps, status,
                                  time, curve (report_data.read_trials)
    outputs/tune/metrics.json     {"best_trial", "objective_metric", "trials", "search", "objective_*",
                                   "objective_se_median", "rung_agreement", "seconds", "handset", "samplers_from", ...}

All are read and checked before anything is written: a missing one is a ReportError that names every
missing file and the stage that makes it, and leaves the output folder untouched. The primary metric
is `domain_fd` for images, `sliced_w2` for 2-D data (lower is better); a variant's best setting is
the one with the lowest mean of it.

Outputs, in out_dir (default <root>/reports), each written to a temporary name and then renamed:

    comparison.md     tables (every setting as mean [interval], the real-vs-real baseline, each variant's
                      lowest-mean setting, bits/dim or test log-likelihood, training time), the pairwise
                      comparisons (scorelab.report_compare: which differences are significant, the rest
                      ties), notes, the figures
    fid_vs_nfe.png    primary metric vs NFE, one line per variant x sampler, baseline dashed
    fid_vs_nfe.csv    the same points for `dvc plots show`: variant, method, setting, nfe, value, std
    loss_curves.png   training loss vs step from the MLflow runs; skipped (and said so) without MLflow
    loss_curves.csv   the same curves for `dvc plots`: variant, step, loss (the header alone without MLflow)
    samples.png       each variant's best-setting grid, side by side
    sweep.png         with params.tune: each trial's objective by SDE type and swept parameter, ± its standard
                      error over seeds (scorelab.visual.plot_objective); comparison.md then has "The sweep":
                      the search, its noise and early-rung agreement, every trial, and `tuned` against the
                      hand-set variant of its SDE type at each shared sampler setting (paired t over seeds)
    metrics.json      the headline, the one file dvc.yaml declares as metrics (`dvc metrics diff`, `dvc exp
                      show`): per variant its best value with interval, NFE and setting, the likelihood,
                      training time and final loss, and for `tuned` the one string vs_handset
                      ("no worse than vp at 4 of 4 settings") (metrics_summary)

With log_to_mlflow, one run named "comparison" in the training runs' experiment (found again by a run
key made from the variant names, so a re-run updates it) gets the files (and trials.csv) as artifacts and the best value
per variant as metrics, and each training run gets the tag `best_setting` and the metric
`best_<primary>`. MLflow problems never stop the report: they become notes in it.

This module is the stage and its MLflow side; the inputs are read in scorelab.report_data, comparison.md
is written by scorelab.report_markdown, the figures are drawn by scorelab.report_figures.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import storage, tracking
from .layout import TUNED_VARIANT, Layout
from .report_data import (Histories, ReportError, Sweep, VariantResult, baseline_value, load_inputs, load_sweep,
                          nfe_text, pairwise, vs_handset)
from .report_figures import plot_loss_curves, plot_samples, plot_vs_nfe, save_figure
from .report_markdown import comparison_markdown

if TYPE_CHECKING:
    from .config import Params

COMPARISON_RUN_NAME = "comparison"


# ---------------------------------------------------------------------------------------------
# fid_vs_nfe.csv and metrics.json


def _csv_text(variants: list[VariantResult], primary: str) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["variant", "method", "setting", "nfe", "value", "std"])
    for v in variants:
        for s in v.settings:
            mean, std = s.metrics.get(primary, (math.nan, math.nan))  # a diverged setting has none
            w.writerow([v.name, s.method, s.key, "" if s.nfe is None else nfe_text(s.nfe),
                        mean if math.isfinite(mean) else "", std if math.isfinite(std) else ""])
    return buf.getvalue()


def _nfe_value(nfe: float | None) -> int | float | None:
    return int(nfe) if nfe is not None and float(nfe).is_integer() else _json_number(nfe)


def _json_number(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def metrics_summary(variants: list[VariantResult], primary: str, vs_handset: str | None = None,
                    with_tuned: bool = False) -> dict[str, Any]:
    """What reports/metrics.json holds: the headline of each variant, the one file dvc.yaml declares as
    metrics (non-finite values as null). Short keys keep `dvc exp show` narrow, since it prints one column
    per key that differs: <variant>.<primary> is the best setting's value, low/high its interval, then its
    nfe and setting, the likelihood, training seconds and final loss, and with EMA profiles the chosen EMA. Per seed and per setting, KID and
    precision/recall stay in outputs/eval/<variant>/metrics.json. with_tuned (a sweep): `tuned` also gets
    vs_handset, the equal-NFE verdict against its hand-set variant in words (null when there is none)."""
    out: dict[str, Any] = {}
    for v in variants:
        best = v.best
        entry: dict[str, Any] = {primary: _json_number(best.metrics[primary][0]) if best else None}
        entry["low"], entry["high"] = (map(_json_number, best.ci[primary]) if best and primary in best.ci
                                       else (None, None))
        entry.update(nfe=_nfe_value(best.nfe) if best else None, setting=best.key if best else None)
        if v.likelihood:
            entry[v.likelihood.name] = _json_number(v.likelihood.mean)
        entry.update(train_s=_json_number(v.train_seconds), loss=_json_number(v.final_loss))
        if v.ema_chosen:  # with EMA profiles: which one the model is (the scores stay in the train metrics)
            entry["ema"] = v.ema_chosen
        if with_tuned and v.name == TUNED_VARIANT:
            entry["vs_handset"] = vs_handset
        out[v.name] = entry
    out[f"baseline_{primary}"] = _json_number(baseline_value(variants, primary))
    return out


def loss_csv(histories: Histories) -> str:
    """reports/loss_curves.csv, what `dvc plots` draws as the training loss curves: variant,step,loss (the
    header alone when no history was read)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["variant", "step", "loss"])
    for name, (steps, losses) in histories.items():
        w.writerows([name, step, loss] for step, loss in zip(steps, losses))
    return buf.getvalue()


def _plot_sweep(sweep: Sweep, path: Path) -> Path:
    """reports/sweep.png: the tune stage's own figure of the trials (scorelab.visual.plot_objective), drawn
    from trials.csv to a temporary name and renamed."""
    from .visual import plot_objective  # imported here: visual imports torch, which only this figure needs

    with storage.atomic_path(path) as tmp:
        plot_objective(sweep.trials, tmp, sweep.metrics["objective_metric"])
    return path


# ---------------------------------------------------------------------------------------------
# MLflow


def comparison_run_key(variant_names: list[str]) -> str:
    """The run key of the comparison run of this set of variants (order does not matter)."""
    digest = hashlib.sha256(",".join(sorted(variant_names)).encode()).hexdigest()[:10]
    return f"comparison-{digest}"


def loss_histories(uri: str, variants: list[VariantResult]) -> tuple[Histories, list[str]]:
    """Each variant's "loss" history from its training run (the last value logged at each step), and notes."""
    client = tracking.client(uri)
    out: Histories = {}
    notes: list[str] = []
    for v in variants:
        if not v.run_id:
            notes.append(f"{v.name}: no MLflow run id in outputs/train/{v.name}/metrics.json, so no loss curve")
            continue
        try:
            history = client.get_metric_history(v.run_id, "loss")
        except Exception as e:  # MlflowException, connection errors, ...
            notes.append(f"{v.name}: no loss history from MLflow run {v.run_id}: {tracking.error_line(e)}")
            continue
        by_step: dict[int, float] = {}
        for m in sorted(history, key=lambda m: (m.step, m.timestamp)):
            by_step[m.step] = m.value
        if not by_step:
            notes.append(f"{v.name}: MLflow run {v.run_id} has no 'loss' metric")
            continue
        steps = sorted(by_step)
        out[v.name] = (steps, [by_step[s] for s in steps])
    return out, notes


@dataclass
class _MLflowSession:
    uri: str
    experiment: str
    run_id: str
    logger: tracking.RunLogger


def _start_comparison(uri: str, params: Params, root: Path, variants: list[VariantResult],
                      primary: str) -> tuple[_MLflowSession | None, list[str]]:
    """Open the comparison run, log its metrics, tag the training runs. Returns the session and notes."""
    notes: list[str] = []
    experiment = tracking.experiment_name(params.mlflow.experiment, params.data.source)
    names = [v.name for v in variants]
    try:
        run_id = tracking.open_run(uri, experiment, root, comparison_run_key(names), COMPARISON_RUN_NAME, {
            "scorelab.stage": "report", "variants": ",".join(names), "primary_metric": primary,
            "git_commit": tracking.git_commit(root)})
    except Exception as e:
        return None, [f"MLflow: could not open the comparison run in experiment {experiment!r}: "
                      f"{tracking.error_line(e)}"]
    logger = tracking.RunLogger(uri, run_id, retries=3, backoff=0.5)
    values = {f"best_{primary}/{v.name}": v.best.metrics[primary][0]
              for v in variants if v.best is not None}
    baseline = baseline_value(variants, primary)
    if baseline is not None:
        values[f"baseline_{primary}"] = baseline
    logger.metrics({k: x for k, x in values.items() if math.isfinite(x)}, step=0)
    logger.tags({f"best_setting/{v.name}": v.best.key for v in variants if v.best is not None})

    client = tracking.client(uri)
    for v in variants:
        if v.best is None or not v.run_id:
            continue
        try:
            client.get_run(v.run_id)
        except Exception as e:
            notes.append(f"MLflow: training run {v.run_id} of {v.name} not found, so not tagged: "
                         f"{tracking.error_line(e)}")
            continue
        train_logger = tracking.RunLogger(uri, v.run_id, retries=3, backoff=0.5)
        train_logger.tags({"best_setting": v.best.key})
        value = v.best.metrics[primary][0]
        if math.isfinite(value):
            train_logger.metrics({f"best_{primary}": value}, step=0)
        if train_logger.dropped:
            notes.append(f"MLflow: {train_logger.dropped} call(s) to tag the training run of {v.name} failed")
    if logger.dropped:
        notes.append(f"MLflow: {logger.dropped} call(s) to log the comparison run's metrics failed")
    return _MLflowSession(uri, experiment, run_id, logger), notes


def _mlflow_summary(session: _MLflowSession | None, primary: str) -> str:
    """comparison.md's MLflow section."""
    if session is None:
        return "Nothing logged to MLflow (see the notes)."
    link = tracking.run_ui_url(session.uri, session.run_id)
    return (f"Comparison run `{session.run_id}` (name `{COMPARISON_RUN_NAME}`) in experiment "
            f"`{session.experiment}`; each training run is tagged `best_setting` with metric `best_{primary}`, "
            f"and holds `eval_{primary}_best` against NFE (the best setting at each NFE: *Compare* overlays the "
            "variants on it) and the model `sampler` (`mlflow.pyfunc`)."
            + (f" Open {link} (for a local store, after `mlflow ui` in the repository root)." if link else ""))


# ---------------------------------------------------------------------------------------------
# The stage


def build_report(
    params: Params,
    *,
    root: Path,  # repository root: inputs under root/outputs, the MLflow store that params names
    out_dir: Path | None = None,  # None: root/"reports"
    log_to_mlflow: bool = True,  # False: MLflow is not contacted at all (and there are no loss curves)
) -> dict[str, Any]:
    """Compare every variant of params (module docstring). Returns

        {"files": {"comparison": Path, "fid_vs_nfe": Path, "fid_vs_nfe_csv": Path, "samples": Path,
                   "metrics": Path, "loss_curves_csv": Path, "loss_curves": Path (only when drawn),
                   "sweep": Path (only with params.tune)},
         "primary_metric": str, "best": {variant: setting key or None}, "metrics": what metrics.json holds,
         "mlflow_run_id": the comparison run, or None, "notes": [str],
         "pairwise": report_compare.Comparison (which differences are significant),
         "vs_handset": report_data.HandsetComparison (`tuned` at equal NFE; None without params.tune)}

    Raises ReportError, before writing anything, when an input is missing or malformed. Without
    log_to_mlflow, MLflow is not contacted at all, and the loss-curve figure is skipped.
    """
    layout = Layout(root)
    root = layout.root
    out_dir = Path(out_dir).resolve() if out_dir is not None else layout.reports
    variants, primary = load_inputs(params, root)
    sweep = load_sweep(params, root)  # None without params.tune
    against = vs_handset(variants, sweep, primary, params.evaluate.level)
    notes = [f"{v.name}: no setting has a finite {primary}; no best setting" for v in variants if v.best is None]

    session: _MLflowSession | None = None
    histories: Histories = {}
    loss_reason: str | None = None
    if log_to_mlflow:
        uri = tracking.resolve_tracking_uri(params.mlflow.tracking_uri, root)
        problem = tracking.store_problem(uri)
        if problem:
            loss_reason = f"{problem}; nothing read from or logged to MLflow"
            notes.append(loss_reason)
        else:
            histories, more = loss_histories(uri, variants)
            notes += more
            if not histories:
                loss_reason = "no training run had a loss history in MLflow (see the notes)"
            session, more = _start_comparison(uri, params, root, variants, primary)
            notes += more
    else:
        loss_reason = "MLflow was not contacted (log_to_mlflow=False / --no-mlflow)"

    out_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    files["fid_vs_nfe"] = save_figure(plot_vs_nfe(variants, primary), out_dir / "fid_vs_nfe.png")
    files["fid_vs_nfe_csv"] = storage.write_text(out_dir / "fid_vs_nfe.csv", _csv_text(variants, primary))
    files["loss_curves_csv"] = storage.write_text(out_dir / "loss_curves.csv", loss_csv(histories))
    if histories:
        files["loss_curves"] = save_figure(plot_loss_curves(histories), out_dir / "loss_curves.png")
    else:
        (out_dir / "loss_curves.png").unlink(missing_ok=True)  # a stale one would pass for this run's
    files["samples"] = save_figure(plot_samples(variants), out_dir / "samples.png")
    if sweep is not None:
        files["sweep"] = _plot_sweep(sweep, out_dir / "sweep.png")
    else:
        (out_dir / "sweep.png").unlink(missing_ok=True)  # a stale one would pass for this run's
    summary = metrics_summary(variants, primary, against.summary() if against else None, with_tuned=sweep is not None)
    files["metrics"] = storage.write_text(out_dir / "metrics.json",
                                          json.dumps(summary, indent=2, allow_nan=False) + "\n")
    comparison = pairwise(variants, primary)
    markdown = comparison_markdown(variants, primary, out_dir=out_dir, loss_figure=bool(histories),
                                   loss_reason=loss_reason, mlflow_summary=_mlflow_summary(session, primary),
                                   notes=notes, source=params.data.source, comparison=comparison,
                                   sweep=sweep, against=against)
    files["comparison"] = storage.write_text(out_dir / "comparison.md", markdown)

    if session is not None:
        before = session.logger.dropped
        session.logger.artifacts([*(files[k] for k in ("comparison", "fid_vs_nfe", "fid_vs_nfe_csv", "loss_curves",
                                                       "loss_curves_csv", "samples", "sweep", "metrics") if k in files),
                                  *([sweep.trials_path] if sweep is not None else [])])
        session.logger.finish()
        if session.logger.dropped > before:
            notes.append(f"MLflow: {session.logger.dropped - before} artifact upload(s) of the comparison run failed")
    return {"files": files, "primary_metric": primary,
            "best": {v.name: v.best.key if v.best else None for v in variants}, "metrics": summary,
            "mlflow_run_id": session.run_id if session else None, "notes": notes, "pairwise": comparison,
            "vs_handset": against}


__all__ = ["COMPARISON_RUN_NAME", "ReportError", "build_report", "comparison_run_key", "loss_histories",
           "loss_csv", "metrics_summary"]
