"""The report's inputs: each variant's training and evaluation results, read and checked, and its best setting.

    variants, primary = load_inputs(params, root)   # ReportError names every missing or malformed file
    variants[0].best.key                            # the setting with the lowest mean of `primary`
    sweep = load_sweep(params, root)                # with params.tune: outputs/tune/{trials.csv,metrics.json}
    against = vs_handset(variants, sweep, primary, params.evaluate.level)  # `tuned` vs its hand-set variant

What each file holds is described in scorelab.report. Also here: the few ways of spelling a result
(fmt, nfe_text, best_title) and of comparing the variants' baselines (baselines, baseline_value) that the
Markdown, the figures and the DVC metrics share.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from .layout import TUNED_VARIANT, Layout, stage_command
from .modality import PRIMARY_METRICS
from .report_compare import BASELINE, Comparison, Entry, Pair, compare, compare_pairs

if TYPE_CHECKING:
    import numpy as np

    from .config import Params


class ReportError(RuntimeError):
    """An input of the report is missing or malformed; the message is one line naming the file."""

    def __init__(self, message: str, missing: list[Path] | None = None):
        super().__init__(message)
        self.missing = list(missing or [])


@dataclass(frozen=True)
class Setting:
    key: str  # "ddim-20", "ode-adaptive", ...
    method: str
    steps: int | None
    nfe: float | None  # the adaptive ODE reports a mean over chunks
    metrics: dict[str, tuple[float, float]]  # name -> (mean, std over seeds)
    diverged: bool = False  # the sample stage's guard marked it: no metrics, shown as diverged
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)  # name -> (low, high) at the evaluation's level
    replicates: list[float] | None = None  # the primary metric's bootstrap replicates (mean over seeds), if any
    per_seed: dict[str, float] = field(default_factory=dict)  # the primary metric per seed, for paired tests


@dataclass(frozen=True)
class Likelihood:
    name: str  # "bits_per_dim" or "test_loglik"
    mean: float
    stderr: float
    n: int | None
    dequantization: str | None
    reference: float | None = None  # 2-D mixture data: the true density's mean log-likelihood of the same points


@dataclass
class VariantResult:
    name: str
    sde: str
    n_per_seed: int
    seeds: int
    baseline: dict[str, tuple[float, float]]
    baseline_notes: list[str]  # the evaluation's description of its baseline, extra values, why it was skipped
    settings: list[Setting]  # by sampler (first appearance), then NFE
    likelihood: Likelihood | None
    inception_fid: float | None
    inception_fid_reason: str | None
    declared_primary: str | None  # the evaluation's own "primary_metric", when it names one
    train_steps: int
    train_seconds: float
    final_loss: float | None
    run_id: str | None
    # with EMA profiles: the candidate EMA that model.pt holds, and each candidate's objective (mean, se or None)
    ema_chosen: str | None = None
    ema_scores: dict[str, tuple[float, float | None]] = field(default_factory=dict)
    baseline_ci: dict[str, tuple[float, float]] = field(default_factory=dict)
    baseline_replicates: list[float] | None = None
    baseline_per_seed: dict[str, float] = field(default_factory=dict)
    baseline_n: int | None = None  # held-out real samples per seed behind the baseline
    bootstrap: dict[str, Any] | None = None  # the evaluation's resampling: two variants pair only if it is equal
    level: float | None = None  # the evaluation's interval level
    best: Setting | None = None  # the lowest-mean setting; None when no setting has a finite primary value
    grid_path: Path | None = None
    grid: "np.ndarray | None" = None


Histories = dict[str, tuple[list[int], list[float]]]  # variant -> (training steps, loss values)


# ---------------------------------------------------------------------------------------------
# Reading


def _stage_hint(stage: str, variant: str | None = None) -> str:
    return f"made by the {stage} stage: {stage_command(stage, variant)}"


def _read_json(path: Path, layout: Layout) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise ReportError(f"{layout.shown(path)}: cannot read: {getattr(e, 'strerror', None) or e}") from None
    except json.JSONDecodeError as e:
        raise ReportError(f"{layout.shown(path)}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    if not isinstance(data, dict):
        raise ReportError(f"{layout.shown(path)}: expected a JSON object, got {type(data).__name__}")
    return data


def _number(value: Any, where: str, *, optional: bool = False) -> float | None:
    """A JSON number (null -> NaN, or None when optional)."""
    if value is None:
        return None if optional else math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ReportError(f"{where}: must be a number, got {value!r}")
    return float(value)


def _integer(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ReportError(f"{where}: must be an integer, got {value!r}")
    return value


def _metric_pairs(block: Mapping[str, Any], where: str) -> dict[str, tuple[float, float]]:
    """{"kid_mean": m, "kid_std": s, ...} -> {"kid": (m, s)}; a mean without a std gets std NaN."""
    out: dict[str, tuple[float, float]] = {}
    for k, v in block.items():
        if k.endswith("_mean"):
            name = k[: -len("_mean")]
            mean = _number(v, f"{where}.{k}")
            std = _number(block.get(f"{name}_std"), f"{where}.{name}_std")
            out[name] = (mean, std)
    return out


def _intervals(block: Mapping[str, Any], where: str) -> dict[str, tuple[float, float]]:
    """{"kid_x1e3_ci": [low, high], ...} -> {"kid_x1e3": (low, high)}; null intervals are left out."""
    out: dict[str, tuple[float, float]] = {}
    for k, v in block.items():
        if k.endswith("_ci") and v is not None:
            if not isinstance(v, list) or len(v) != 2:
                raise ReportError(f"{where}.{k}: must be [low, high], got {v!r}")
            out[k[: -len("_ci")]] = (_number(v[0], f"{where}.{k}[0]"), _number(v[1], f"{where}.{k}[1]"))
    return out


def _replicates(block: Mapping[str, Any], primary: str | None, where: str) -> list[float] | None:
    v = block.get(f"{primary}_replicates") if primary else None
    if v is None:
        return None
    if not isinstance(v, list) or not v:
        raise ReportError(f"{where}.{primary}_replicates: must be a non-empty list of numbers")
    return [_number(x, f"{where}.{primary}_replicates") for x in v]


def _per_seed(block: Mapping[str, Any], primary: str | None) -> dict[str, float]:
    """{seed: primary value} of a setting's or baseline's per_seed block (finite numbers only)."""
    seeds = block.get("per_seed")
    if not primary or not isinstance(seeds, dict):
        return {}
    out = {}
    for seed, values in seeds.items():
        v = values.get(primary) if isinstance(values, dict) else None
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[str(seed)] = float(v)
    return out


def _load_train(path: Path, layout: Layout) -> dict[str, Any]:
    data = _read_json(path, layout)
    where = layout.shown(path)
    for key in ("steps", "seconds"):
        if key not in data:
            raise ReportError(f"{where}: missing key {key!r}")
    run_id = data.get("best_run_id", data.get("mlflow_run_id"))  # a sweep: the winning trial's run
    if run_id is not None and not isinstance(run_id, str):
        raise ReportError(f"{where}.mlflow_run_id: must be a string, got {run_id!r}")
    return {"steps": _integer(data["steps"], f"{where}.steps"), "seconds": _number(data["seconds"], f"{where}.seconds"),
            "final_loss": _number(data.get("final_loss"), f"{where}.final_loss", optional=True),
            "run_id": run_id or None, **_ema_selection(data, where)}


def _ema_selection(data: Mapping[str, Any], where: str) -> dict[str, Any]:
    """ema_chosen and ema_scores ({name: [mean, se or null]}) of a run with EMA profiles; none without."""
    chosen, scores = data.get("ema_chosen"), data.get("ema_scores")
    if chosen is None and scores is None:
        return {}
    if not isinstance(scores, dict) or not scores:
        raise ReportError(f"{where}.ema_scores: must be a non-empty object of candidate EMAs, got {scores!r}")
    pairs = {}
    for name, pair in scores.items():
        if not isinstance(pair, list) or len(pair) != 2:
            raise ReportError(f"{where}.ema_scores.{name}: must be [mean, standard error], got {pair!r}")
        pairs[name] = (_number(pair[0], f"{where}.ema_scores.{name}"),
                       _number(pair[1], f"{where}.ema_scores.{name}", optional=True))
    if chosen not in pairs:
        raise ReportError(f"{where}.ema_chosen: must name one of ema_scores ({', '.join(pairs)}), got {chosen!r}")
    return {"ema_chosen": chosen, "ema_scores": pairs}


def _load_eval(path: Path, layout: Layout, variant: str, train: dict[str, Any]) -> VariantResult:
    data = _read_json(path, layout)
    where = layout.shown(path)
    for key in ("n_per_seed", "seeds", "baseline", "settings"):
        if key not in data:
            raise ReportError(f"{where}: missing key {key!r}")
    if data.get("variant") not in (None, variant):
        raise ReportError(f"{where}: is for variant {data['variant']!r}, not {variant!r}")
    if not isinstance(data["baseline"], dict):
        raise ReportError(f"{where}.baseline: must be an object")
    if not isinstance(data["settings"], dict) or not data["settings"]:
        raise ReportError(f"{where}.settings: must be a non-empty object of sampler settings")

    settings: list[Setting] = []
    for key, s in data["settings"].items():
        w = f"{where}.settings.{key}"
        if not isinstance(s, dict):
            raise ReportError(f"{w}: must be an object")
        if not isinstance(s.get("method"), str):
            raise ReportError(f"{w}.method: missing or not a string")
        steps = s.get("steps")
        settings.append(Setting(key=key, method=s["method"],
                                steps=None if steps is None else _integer(steps, f"{w}.steps"),
                                nfe=_number(s.get("nfe"), f"{w}.nfe", optional=True),
                                metrics=_metric_pairs(s, w), diverged=s.get("diverged") is True,
                                ci=_intervals(s, w), replicates=_replicates(s, data.get("primary_metric"), w),
                                per_seed=_per_seed(s, data.get("primary_metric"))))
    methods = list(dict.fromkeys(s.method for s in settings))
    settings.sort(key=lambda s: (methods.index(s.method), s.nfe is None, s.nfe or 0.0, s.key))

    likelihood = None
    for name in ("bits_per_dim", "test_loglik"):
        block = data.get(name)
        if isinstance(block, dict):
            w = f"{where}.{name}"
            n = block.get("n")
            likelihood = Likelihood(name, _number(block.get("mean"), f"{w}.mean"),
                                    _number(block.get("stderr"), f"{w}.stderr"),
                                    None if n is None else _integer(n, f"{w}.n"),
                                    block.get("dequantization"),
                                    _number(block.get("data_mean"), f"{w}.data_mean", optional=True))
            break

    base = data["baseline"]
    baseline_notes = [str(base[k]) for k in ("description", "skipped") if isinstance(base.get(k), str)]
    baseline_notes += [f"{k} = {fmt(x)}" for k, x in base.items() if not k.endswith(("_mean", "_std"))
                       and k not in ("n", "seeds") and isinstance(x, (int, float)) and not isinstance(x, bool)]
    declared = data.get("primary_metric")

    reason = data.get("inception_fid_reason")
    return VariantResult(
        name=variant, sde=str(data.get("sde", "?")),
        n_per_seed=_integer(data["n_per_seed"], f"{where}.n_per_seed"), seeds=_integer(data["seeds"], f"{where}.seeds"),
        baseline=_metric_pairs(base, f"{where}.baseline"), baseline_notes=baseline_notes, settings=settings,
        likelihood=likelihood,
        inception_fid=_number(data.get("inception_fid"), f"{where}.inception_fid", optional=True),
        inception_fid_reason=None if reason is None else str(reason),
        declared_primary=declared if isinstance(declared, str) else None,
        baseline_ci=_intervals(base, f"{where}.baseline"),
        baseline_replicates=_replicates(base, declared if isinstance(declared, str) else None, f"{where}.baseline"),
        baseline_per_seed=_per_seed(base, declared if isinstance(declared, str) else None),
        baseline_n=base.get("n") if isinstance(base.get("n"), int) else None,
        bootstrap=data.get("bootstrap") if isinstance(data.get("bootstrap"), dict) else None,
        level=_number((data.get("intervals") or {}).get("level"), f"{where}.intervals.level", optional=True),
        train_steps=train["steps"], train_seconds=train["seconds"], final_loss=train["final_loss"],
        run_id=train["run_id"], ema_chosen=train.get("ema_chosen"), ema_scores=train.get("ema_scores", {}))


def primary_metric(variants: list[VariantResult]) -> str:
    """The one primary metric every setting of every variant reports: the one the evaluations name as
    "primary_metric" if they do (all the same one), else domain_fd or sliced_w2, whichever is present."""
    declared = {v.declared_primary for v in variants if v.declared_primary}
    if len(declared) > 1:
        raise ReportError(f"the evaluations name different primary metrics ({', '.join(sorted(declared))}): were "
                          "the variants evaluated on different data? Re-run the evaluate stage")
    for name in [*declared, *PRIMARY_METRICS]:
        if any(name in s.metrics for v in variants for s in v.settings) or name in declared:  # declared: even
            # when every setting diverged (none has a value to show)
            lacking = [f"{v.name}/{s.key}" for v in variants for s in v.settings
                       if name not in s.metrics and not s.diverged]
            if lacking:
                raise ReportError(f"the primary metric {name!r} is missing from setting(s) {', '.join(lacking)} "
                                  "in outputs/eval/<variant>/metrics.json: evaluate them again")
            return name
    raise ReportError(f"no primary metric ({' or '.join(PRIMARY_METRICS)}) in the settings of "
                      "outputs/eval/<variant>/metrics.json: re-run the evaluate stage")


def best_setting(variant: VariantResult, primary: str) -> Setting | None:
    """The setting with the lowest finite mean of the primary metric (the first one on a tie)."""
    finite = [s for s in variant.settings if not s.diverged and math.isfinite(s.metrics[primary][0])]
    return min(finite, key=lambda s: s.metrics[primary][0]) if finite else None


def load_inputs(params: Params, root: Path) -> tuple[list[VariantResult], str]:
    """Read and check every input, grids included; ReportError lists every missing file at once."""
    import matplotlib.image as mpimg

    layout = Layout(root)
    missing: list[tuple[Path, str]] = []
    variants: list[VariantResult] = []
    # the tune stage's winner joins as variant `tuned`, retrained, sampled and evaluated like the others; the
    # sweep's own files are checked here too, so that one error names everything missing
    if params.tune is not None:
        missing += [(p, _stage_hint("tune")) for p in (layout.tune_trials, layout.tune_metrics) if not p.is_file()]
    for name in [*params.variants, *([TUNED_VARIANT] if params.tune is not None else [])]:
        train_path = layout.train_metrics(name)
        eval_path = layout.eval_metrics(name)
        if not train_path.is_file():
            missing.append((train_path, _stage_hint("train", name)))
        if not eval_path.is_file():
            missing.append((eval_path, _stage_hint("evaluate", name)))
        if train_path.is_file() and eval_path.is_file():
            variants.append(_load_eval(eval_path, layout, name, _load_train(train_path, layout)))
    if missing:
        raise _missing_error(missing, layout)

    primary = primary_metric(variants)
    for v in variants:
        v.best = best_setting(v, primary)
        if v.best is not None:
            v.grid_path = layout.grid(v.name, v.best.key)
            if not v.grid_path.is_file():
                missing.append((v.grid_path, _stage_hint("sample", v.name)))
    if missing:
        raise _missing_error(missing, layout)
    for v in variants:
        if v.grid_path is not None:
            try:
                v.grid = mpimg.imread(v.grid_path)
            except Exception as e:  # PIL and matplotlib raise several types for a damaged PNG
                raise ReportError(f"{layout.shown(v.grid_path)}: cannot read the image: {e}") from None
    return variants, primary


def _missing_error(missing: list[tuple[Path, str]], layout: Layout) -> ReportError:
    parts = "; ".join(f"{layout.shown(p)} ({hint})" for p, hint in missing)
    return ReportError(f"missing input(s): {parts}; or run `dvc repro`", [p for p, _ in missing])


# ---------------------------------------------------------------------------------------------
# The sweep (params.tune): its trials, and the winner `tuned` against the hand-set variant of its SDE type

_TRIAL_INTS = ("trial", "steps", "max_steps")
_TRIAL_FLOATS = ("lr", "ema_decay", "objective", "objective_se", "best_objective", "objective_nfe", "seconds")
_TRIAL_BOOLS = ("stopped_early",)
_TRIAL_JSON = ("sde_params", "curve")  # kept as JSON text, as the tune stage's rows hold them; checked here
_TRIAL_REQUIRED = ("trial", "label", "sde", "parameterization", "sde_params", "lr", "ema_decay", "objective",
                   "steps", "max_steps", "status", "seconds")


def read_trials(path: Path, *, name: str | None = None) -> list[dict[str, Any]]:
    """outputs/tune/trials.csv as the tune stage's rows: ints, floats and booleans converted, an empty cell
    None, sde_params and curve left as JSON text (what scorelab.visual.plot_objective and
    scorelab.tune.rung_agreement read). ReportError names the file (as `name`, default the path), line and
    column of a bad cell."""
    path = Path(path)
    shown = name or str(path)
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            lacking = [c for c in _TRIAL_REQUIRED if c not in (reader.fieldnames or [])]
            if lacking:
                raise ReportError(f"{shown}: missing column(s) {', '.join(lacking)}: re-run the tune stage")
            raw = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ReportError(f"{shown}: cannot read: {getattr(e, 'strerror', None) or e}") from None
    rows = []
    for line, cells in enumerate(raw, start=2):  # line 1 is the header
        row: dict[str, Any] = {}
        for column, text in cells.items():
            try:
                row[column] = _trial_cell(column, text)
            except ValueError as e:
                raise ReportError(f"{shown}: line {line}, column {column}: {e}") from None
        rows.append(row)
    return rows


def _trial_cell(column: str | None, text: str | None) -> Any:
    if text is None or text == "":
        return None
    if column in _TRIAL_INTS:
        return int(text)
    if column in _TRIAL_FLOATS:
        return float(text)
    if column in _TRIAL_BOOLS:
        if text not in ("True", "False"):
            raise ValueError(f"must be True or False, got {text!r}")
        return text == "True"
    if column in _TRIAL_JSON:
        json.loads(text)  # raises a ValueError (JSONDecodeError) for malformed JSON
    return text


@dataclass
class Sweep:
    trials: list[dict[str, Any]]  # read_trials of trials.csv
    metrics: dict[str, Any]  # outputs/tune/metrics.json
    trials_path: Path


def load_sweep(params: Params, root: Path) -> Sweep | None:
    """The tune stage's trials.csv and metrics.json (None without params.tune); ReportError for a missing or
    malformed one (load_inputs has already named every missing file at once)."""
    if params.tune is None:
        return None
    layout = Layout(root)
    missing = [(p, _stage_hint("tune")) for p in (layout.tune_trials, layout.tune_metrics) if not p.is_file()]
    if missing:
        raise _missing_error(missing, layout)
    metrics = _read_json(layout.tune_metrics, layout)
    lacking = [k for k in ("best_trial", "objective_metric", "trials") if k not in metrics]
    if lacking:
        raise ReportError(f"{layout.shown(layout.tune_metrics)}: missing key(s) {', '.join(lacking)}: re-run the "
                          "tune stage")
    trials = read_trials(layout.tune_trials, name=layout.shown(layout.tune_trials))
    if not trials:
        raise ReportError(f"{layout.shown(layout.tune_trials)}: no trial rows: re-run the tune stage")
    return Sweep(trials, metrics, layout.tune_trials)


@dataclass
class HandsetComparison:
    """`tuned` against the hand-set variant of its SDE type at each sampler setting both have (equal NFE)."""

    handset: str | None  # the hand-set variant, None when there is none to compare with
    reason: str | None  # why there are no rows, else None
    comparison: Comparison | None  # Pair a = tuned, b = the hand-set variant, one per tested setting
    untested: list[str] = field(default_factory=list)  # shared settings without two paired seeds

    def higher(self) -> list[str]:
        """The settings where `tuned` is significantly higher (worse) than the hand-set variant."""
        rows = self.comparison.rows if self.comparison else []
        return [r.a.setting for r in rows if r.significant and r.diff.estimate > 0]

    def summary(self) -> str | None:
        """"no worse than <handset> at k of n settings" (k: the settings where tuned is not significantly
        higher), None without a comparison."""
        if not self.comparison or not self.comparison.rows:
            return None
        n = len(self.comparison.rows)
        return f"no worse than {self.handset} at {n - len(self.higher())} of {n} settings"


def tuned_verdict(pair: Pair) -> str:
    """A report_compare.Pair of tuned (a) against the hand-set variant (b) in words."""
    if not pair.significant:
        return "tie"
    return "tuned lower" if pair.diff.estimate < 0 else "tuned higher"


def vs_handset(variants: list[VariantResult], sweep: Sweep | None, primary: str,
               level: float) -> HandsetComparison | None:
    """Paired Student-t differences over seeds (tuned - hand-set) of the primary metric at every setting key
    both variants evaluated, Holm-corrected over those settings at alpha = 1 - level (report_compare). None
    without a sweep."""
    if sweep is None:
        return None
    by_name = {v.name: v for v in variants}
    handset = sweep.metrics.get("handset")
    tuned = by_name.get(TUNED_VARIANT)
    if not isinstance(handset, str) or handset not in by_name or tuned is None:
        sde = sweep.metrics.get("best_sde", "?")
        return HandsetComparison(None, f"no hand-set variant of the winner's SDE type ({sde}) among the variants", None)
    theirs = {s.key: s for s in by_name[handset].settings}
    shared = [(s, theirs[s.key]) for s in tuned.settings if s.key in theirs]
    if not shared:
        return HandsetComparison(handset, f"{TUNED_VARIANT} and {handset} share no sampler setting", None)
    pairs, untested = [], []
    for mine, other in shared:
        seeds = set(mine.per_seed) & set(other.per_seed)
        if len(seeds) < 2 or mine.diverged or other.diverged:
            untested.append(mine.key)
            continue
        pairs.append((Entry(TUNED_VARIANT, mine.key, mine.metrics[primary][0], None, mine.per_seed),
                      Entry(handset, other.key, other.metrics[primary][0], None, other.per_seed)))
    if not pairs:
        return HandsetComparison(handset, f"no shared setting has a finite {primary} for two or more seeds of both "
                                          "(re-run sample and evaluate with sample.seeds)", None, untested)
    return HandsetComparison(handset, None, compare_pairs(pairs, level), untested)


# ---------------------------------------------------------------------------------------------
# Shared by the outputs


def baseline_value(variants: list[VariantResult], primary: str) -> float | None:
    """The real-vs-real primary value: the one every variant measured, or their mean if they differ."""
    values = [v.baseline[primary][0] for v in variants if primary in v.baseline]
    if not values:
        return None
    return values[0] if all(x == values[0] for x in values) else sum(values) / len(values)


def baselines(variants: list[VariantResult]) -> list[tuple[str, VariantResult]]:
    """One baseline row when every variant's evaluation measured the same real-vs-real values, else one each."""
    first = variants[0].baseline
    same = all(_same_metrics(v.baseline, first) for v in variants)
    return [("real vs real (baseline)", variants[0])] if same else [(f"real vs real ({v.name})", v) for v in variants]


def _same_metrics(a: dict[str, tuple[float, float]], b: dict[str, tuple[float, float]]) -> bool:
    if a.keys() != b.keys():
        return False
    return all(math.isclose(x, y, rel_tol=1e-9) or (math.isnan(x) and math.isnan(y))
               for k in a for x, y in zip(a[k], b[k]))


def pairwise(variants: list[VariantResult], primary: str) -> Comparison:
    """report_compare.compare of each variant's lowest-mean setting and the baseline, or why it cannot be
    made. With bootstrap replicates in every evaluation (resampled alike), paired bootstrap differences;
    else paired t-tests over the seeds they share. The lowest-mean setting is chosen on the samples it is
    then tested on, which favours each variant a little."""
    entered = [v for v in variants if v.best is not None]
    if not entered:
        return Comparison(None, [], "no variant has a finite result")
    first = entered[0]
    level = first.level if first.level is not None else 0.95
    if len({v.level for v in entered}) > 1:
        return Comparison(None, [], "the evaluations' intervals are at different levels: re-run the evaluate stage")
    by_bootstrap = (all(v.best.replicates is not None for v in entered)
                    and len({repr(sorted((v.bootstrap or {}).items())) for v in entered}) == 1)
    if not by_bootstrap:
        seeds = set.intersection(*(set(v.best.per_seed) for v in entered))
        if len(seeds) < 2:
            return Comparison(None, [], f"fewer than two seeds with a finite {primary} shared by every variant (and "
                                        "no common bootstrap replicates): re-run sample and evaluate with sample.seeds")
    entries = [Entry(v.name, v.best.key, v.best.metrics[primary][0], v.best.replicates, v.best.per_seed)
               for v in entered]
    has_base = primary in first.baseline and (first.baseline_replicates is not None if by_bootstrap
                                              else len(first.baseline_per_seed) >= 2)
    baseline = (Entry(BASELINE, "—", first.baseline[primary][0], first.baseline_replicates, first.baseline_per_seed)
                if has_base else None)
    return compare(entries, baseline, level, "bootstrap" if by_bootstrap else "seeds")


def fmt(x: float | None, digits: int = 4) -> str:
    """A value as the report prints it: 4 significant digits, "—" for none, nan/inf/-inf spelled out."""
    if x is None:
        return "—"
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.{digits}g}"


def nfe_text(nfe: float | None) -> str:
    """An NFE as the report prints it: an integer as one, the adaptive ODE's mean to one decimal."""
    if nfe is None:
        return "—"
    return str(int(nfe)) if float(nfe).is_integer() else f"{nfe:.1f}"


def best_title(v: VariantResult) -> str:
    """"<variant>: <sampler> NFE <n>" of the best setting: the caption of the variant's samples."""
    return f"{v.name}: {v.best.method} NFE {nfe_text(v.best.nfe)}" if v.best else f"{v.name}: no finite result"


__all__ = [
    "HandsetComparison", "Histories", "Likelihood", "ReportError", "Setting", "Sweep", "VariantResult",
    "baseline_value", "baselines", "best_setting", "best_title", "fmt", "load_inputs", "load_sweep", "nfe_text",
    "pairwise", "primary_metric", "read_trials", "tuned_verdict", "vs_handset",
]
