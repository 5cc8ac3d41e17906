"""The `report` stage: every variant's evaluation side by side, as Markdown, figures, DVC metrics and MLflow.

    result = build_report(params, root=Path("."))   # reads outputs/{train,eval,samples}/<variant>/
    result["files"]["comparison"]                    # <root>/reports/comparison.md

Inputs, for each variant in params.variants (made by the train, evaluate and sample stages):

    outputs/train/<variant>/metrics.json   {"steps", "seconds", "final_loss", "mlflow_run_id"}
    outputs/eval/<variant>/metrics.json    {"variant", "sde", "n_per_seed", "seeds", "baseline", "settings",
                                            "bits_per_dim" | "test_loglik", "inception_fid", "inception_fid_reason"}
    outputs/samples/<variant>/<setting>/grid.png   the grid of the variant's best setting

All are read and checked before anything is written: a missing one is a ReportError that names every
missing file and the stage that makes it, and leaves the output folder untouched. The primary metric
is `domain_fd` for images, `sliced_w2` for 2-D data (lower is better); a variant's best setting is
the one with the lowest mean of it.

Outputs, in out_dir (default <root>/reports), each written to a temporary name and then renamed:

    comparison.md     tables (every setting as mean ± std, the real-vs-real baseline, the best setting
                      per variant, bits/dim or test log-likelihood, training time), notes, the figures
    fid_vs_nfe.png    primary metric vs NFE, one line per variant x sampler, baseline dashed
    fid_vs_nfe.csv    the same points for `dvc plots show`: variant, method, setting, nfe, value, std
    loss_curves.png   training loss vs step from the MLflow runs; skipped (and said so) without MLflow
    samples.png       each variant's best-setting grid, side by side
    metrics.json      for `dvc metrics show`: per variant its best setting and value, bits/dim, training time

With log_to_mlflow, one run named "comparison" in the training runs' experiment (found again by a run
key made from the variant names, so a re-run updates it) gets the files as artifacts and the best value
per variant as metrics, and each training run gets the tag `best_setting` and the metric
`best_<primary>`. MLflow problems never stop the report: they become notes in it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from . import tracking
from .config import TUNED_VARIANT as TUNED

if TYPE_CHECKING:
    import numpy as np

    from .config import Params

PRIMARY_METRICS = ("domain_fd", "sliced_w2")  # images, 2-D data: the first one present in the settings
METRIC_ORDER = ("domain_fd", "sliced_w2", "kid", "precision", "recall", "mmd", "exact_loglik", "data_loglik")
HIGHER_IS_BETTER = {"precision", "recall", "exact_loglik", "data_loglik", "test_loglik", "density", "coverage"}
LOWER_IS_BETTER = {"domain_fd", "sliced_w2", "kid", "mmd", "fid", "bits_per_dim"}
COMPARISON_RUN_NAME = "comparison"


class ReportError(RuntimeError):
    """An input of the report is missing or malformed; the message is one line naming the file."""

    def __init__(self, message: str, missing: list[Path] | None = None):
        super().__init__(message)
        self.missing = list(missing or [])


# ---------------------------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True)
class Setting:
    key: str  # "ddim-20", "ode-adaptive", ...
    method: str
    steps: int | None
    nfe: float | None  # the adaptive ODE reports a mean over chunks
    metrics: dict[str, tuple[float, float]]  # name -> (mean, std over seeds)


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
    best: Setting | None = None  # None when no setting has a finite primary value
    grid_path: Path | None = None
    grid: "np.ndarray | None" = None


Histories = dict[str, tuple[list[int], list[float]]]  # variant -> (training steps, loss values)


def _shown(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def _stage_hint(stage: str, variant: str) -> str:
    script = {"train": "train", "evaluate": "evaluate", "sample": "sample"}[stage]
    return f"made by the {stage} stage: python pipeline/{script}.py --params params.yaml --variant {variant}"


def _read_json(path: Path, root: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise ReportError(f"{_shown(path, root)}: cannot read: {getattr(e, 'strerror', None) or e}") from None
    except json.JSONDecodeError as e:
        raise ReportError(f"{_shown(path, root)}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    if not isinstance(data, dict):
        raise ReportError(f"{_shown(path, root)}: expected a JSON object, got {type(data).__name__}")
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


def _load_train(path: Path, root: Path) -> dict[str, Any]:
    data = _read_json(path, root)
    where = _shown(path, root)
    for key in ("steps", "seconds"):
        if key not in data:
            raise ReportError(f"{where}: missing key {key!r}")
    run_id = data.get("best_run_id", data.get("mlflow_run_id"))  # a sweep: the winning trial's run
    if run_id is not None and not isinstance(run_id, str):
        raise ReportError(f"{where}.mlflow_run_id: must be a string, got {run_id!r}")
    return {"steps": _integer(data["steps"], f"{where}.steps"), "seconds": _number(data["seconds"], f"{where}.seconds"),
            "final_loss": _number(data.get("final_loss"), f"{where}.final_loss", optional=True),
            "run_id": run_id or None}


def _load_eval(path: Path, root: Path, variant: str, train: dict[str, Any]) -> VariantResult:
    data = _read_json(path, root)
    where = _shown(path, root)
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
                                metrics=_metric_pairs(s, w)))
    methods = list(dict.fromkeys(s.method for s in settings))
    settings.sort(key=lambda s: (methods.index(s.method), s.nfe is None, s.nfe or 0.0, s.key))

    likelihood = None
    for name in ("bits_per_dim", "test_loglik"):
        block = data.get(name)
        if isinstance(block, dict):
            w = f"{where}.{name}"
            n_key = next((k for k in ("n", "n_images", "n_points") if block.get(k) is not None), None)
            likelihood = Likelihood(name, _number(block.get("mean"), f"{w}.mean"),
                                    _number(block.get("stderr"), f"{w}.stderr"),
                                    None if n_key is None else _integer(block[n_key], f"{w}.{n_key}"),
                                    block.get("dequantization"),
                                    _number(block.get("data_mean"), f"{w}.data_mean", optional=True))
            break

    base = data["baseline"]
    baseline_notes = [str(base[k]) for k in ("description", "skipped") if isinstance(base.get(k), str)]
    baseline_notes += [f"{k} = {_fmt(x)}" for k, x in base.items() if not k.endswith(("_mean", "_std"))
                       and isinstance(x, (int, float)) and not isinstance(x, bool)]
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
        train_steps=train["steps"], train_seconds=train["seconds"], final_loss=train["final_loss"],
        run_id=train["run_id"])


def primary_metric(variants: list[VariantResult]) -> str:
    """The one primary metric every setting of every variant reports: the one the evaluations name as
    "primary_metric" if they do (all the same one), else domain_fd or sliced_w2, whichever is present."""
    declared = {v.declared_primary for v in variants if v.declared_primary}
    if len(declared) > 1:
        raise ReportError(f"the evaluations name different primary metrics ({', '.join(sorted(declared))}): were "
                          "the variants evaluated on different data? Re-run the evaluate stage")
    for name in [*declared, *PRIMARY_METRICS]:
        if any(name in s.metrics for v in variants for s in v.settings):
            lacking = [f"{v.name}/{s.key}" for v in variants for s in v.settings if name not in s.metrics]
            if lacking:
                raise ReportError(f"the primary metric {name!r} is missing from setting(s) {', '.join(lacking)} "
                                  "in outputs/eval/<variant>/metrics.json: evaluate them again")
            return name
    raise ReportError(f"no primary metric ({' or '.join(PRIMARY_METRICS)}) in the settings of "
                      "outputs/eval/<variant>/metrics.json: re-run the evaluate stage")


def best_setting(variant: VariantResult, primary: str) -> Setting | None:
    """The setting with the lowest finite mean of the primary metric (the first one on a tie)."""
    finite = [s for s in variant.settings if math.isfinite(s.metrics[primary][0])]
    return min(finite, key=lambda s: s.metrics[primary][0]) if finite else None


def load_inputs(params: Params, root: Path) -> tuple[list[VariantResult], str]:
    """Read and check every input, grids included; ReportError lists every missing file at once."""
    import matplotlib.image as mpimg

    root = root.resolve()
    missing: list[tuple[Path, str]] = []
    variants: list[VariantResult] = []
    # the tune stage's winner joins as variant `tuned`: its "training" is the sweep (outputs/tune/metrics.json
    # holds its steps and the winning trial's MLflow run, as a train stage's metrics.json does)
    for name in [*params.variants, *([TUNED] if params.tune is not None else [])]:
        train_path = root / "outputs" / ("tune" if name == TUNED else f"train/{name}") / "metrics.json"
        eval_path = root / "outputs" / "eval" / name / "metrics.json"
        if not train_path.is_file():
            missing.append((train_path, _stage_hint("train", name)))
        if not eval_path.is_file():
            missing.append((eval_path, _stage_hint("evaluate", name)))
        if train_path.is_file() and eval_path.is_file():
            variants.append(_load_eval(eval_path, root, name, _load_train(train_path, root)))
    if missing:
        raise _missing_error(missing, root)

    primary = primary_metric(variants)
    for v in variants:
        v.best = best_setting(v, primary)
        if v.best is not None:
            v.grid_path = root / "outputs" / "samples" / v.name / v.best.key / "grid.png"
            if not v.grid_path.is_file():
                missing.append((v.grid_path, _stage_hint("sample", v.name)))
    if missing:
        raise _missing_error(missing, root)
    for v in variants:
        if v.grid_path is not None:
            try:
                v.grid = mpimg.imread(v.grid_path)
            except Exception as e:  # PIL and matplotlib raise several types for a damaged PNG
                raise ReportError(f"{_shown(v.grid_path, root)}: cannot read the image: {e}") from None
    return variants, primary


def _missing_error(missing: list[tuple[Path, str]], root: Path) -> ReportError:
    parts = "; ".join(f"{_shown(p, root)} ({hint})" for p, hint in missing)
    return ReportError(f"missing input(s): {parts}; or run `dvc repro`", [p for p, _ in missing])


# ---------------------------------------------------------------------------------------------
# Formatting


def _fmt(x: float | None, digits: int = 4) -> str:
    if x is None:
        return "—"
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.{digits}g}"


def _pm(pair: tuple[float, float] | None) -> str:
    if pair is None:
        return "—"
    mean, std = pair
    return _fmt(mean) if std is None or math.isnan(std) else f"{_fmt(mean)} ± {_fmt(std, 2)}"


def _nfe_text(nfe: float | None) -> str:
    if nfe is None:
        return "—"
    return str(int(nfe)) if float(nfe).is_integer() else f"{nfe:.1f}"


def _arrow(metric: str) -> str:
    return " ↓" if metric in LOWER_IS_BETTER else " ↑" if metric in HIGHER_IS_BETTER else ""


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _row(cells: list[Any]) -> str:
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    return [_row(header), "|" + "|".join("---" for _ in header) + "|", *(_row(r) for r in rows)]


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return _fmt(seconds)
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds:.0f} s ({seconds / 60:.1f} min)"


def _metric_names(variants: list[VariantResult], primary: str) -> list[str]:
    names = {m for v in variants for s in v.settings for m in s.metrics} | {m for v in variants for m in v.baseline}
    known = [m for m in METRIC_ORDER if m in names and m != primary]
    return [primary, *known, *sorted(names - set(known) - {primary})]


def _baselines(variants: list[VariantResult]) -> list[tuple[str, VariantResult]]:
    """One baseline row when every variant's evaluation measured the same real-vs-real values, else one each."""
    first = variants[0].baseline
    same = all(_same_metrics(v.baseline, first) for v in variants)
    return [("real vs real (baseline)", variants[0])] if same else [(f"real vs real ({v.name})", v) for v in variants]


def _same_metrics(a: dict[str, tuple[float, float]], b: dict[str, tuple[float, float]]) -> bool:
    if a.keys() != b.keys():
        return False
    return all(math.isclose(x, y, rel_tol=1e-9) or (math.isnan(x) and math.isnan(y))
               for k in a for x, y in zip(a[k], b[k]))


def _sample_sizes(variants: list[VariantResult]) -> str:
    sizes = {(v.n_per_seed, v.seeds) for v in variants}
    if len(sizes) == 1:
        n, seeds = sizes.pop()
        return f"the mean ± std over {seeds} seeds of N = {n} samples per seed"
    return "the mean ± std over seeds: " + ", ".join(f"{v.name} N = {v.n_per_seed} samples per seed × {v.seeds} seeds"
                                                     for v in variants)


def _likelihood_label(name: str) -> str:
    return "bits/dim" if name == "bits_per_dim" else "test log-likelihood"


def _best_title(v: VariantResult) -> str:
    return f"{v.name}: {v.best.method} NFE {_nfe_text(v.best.nfe)}" if v.best else f"{v.name}: no finite result"


# ---------------------------------------------------------------------------------------------
# Outputs


def _atomic(path: Path, write: Callable[[Path], None]) -> Path:
    """write(tmp) then rename over path, so a reader sees the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _write_text(path: Path, text: str) -> Path:
    return _atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _save_figure(fig, path: Path) -> Path:
    return _atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))


def _csv_text(variants: list[VariantResult], primary: str) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["variant", "method", "setting", "nfe", "value", "std"])
    for v in variants:
        for s in v.settings:
            mean, std = s.metrics[primary]
            w.writerow([v.name, s.method, s.key, "" if s.nfe is None else _nfe_text(s.nfe),
                        mean if math.isfinite(mean) else "", std if math.isfinite(std) else ""])
    return buf.getvalue()


def _nfe_value(nfe: float | None) -> int | float | None:
    return int(nfe) if nfe is not None and float(nfe).is_integer() else _json_number(nfe)


def _json_number(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def metrics_summary(variants: list[VariantResult], primary: str) -> dict[str, Any]:
    """What reports/metrics.json holds (non-finite values as null)."""
    out: dict[str, Any] = {}
    for v in variants:
        entry: dict[str, Any] = {
            "best_setting": v.best.key if v.best else None,
            "best_method": v.best.method if v.best else None,
            "best_nfe": _nfe_value(v.best.nfe) if v.best else None,
            f"best_{primary}": _json_number(v.best.metrics[primary][0]) if v.best else None,
            f"best_{primary}_std": _json_number(v.best.metrics[primary][1]) if v.best else None,
        }
        if v.likelihood:
            entry[v.likelihood.name] = _json_number(v.likelihood.mean)
        entry.update(train_seconds=_json_number(v.train_seconds), train_steps=v.train_steps,
                     final_loss=_json_number(v.final_loss))
        out[v.name] = entry
    out[f"baseline_{primary}"] = _json_number(baseline_value(variants, primary))
    return out


def baseline_value(variants: list[VariantResult], primary: str) -> float | None:
    """The real-vs-real primary value: the one every variant measured, or their mean if they differ."""
    values = [v.baseline[primary][0] for v in variants if primary in v.baseline]
    if not values:
        return None
    return values[0] if all(x == values[0] for x in values) else sum(values) / len(values)


def _figure(**kwargs):
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend

    return Figure(**kwargs)


def plot_vs_nfe(variants: list[VariantResult], primary: str):
    fig = _figure(figsize=(7.5, 4.5))
    ax = fig.add_subplot()
    colors = [f"C{i % 10}" for i in range(len(variants))]
    markers = "osD^vPX*<>"
    methods = list(dict.fromkeys(s.method for v in variants for s in v.settings))  # one marker per sampler
    plotted = False
    for v, color in zip(variants, colors):
        for method in dict.fromkeys(s.method for s in v.settings):
            j = methods.index(method)
            pts = [(s.nfe, *s.metrics[primary]) for s in v.settings if s.method == method and s.nfe is not None
                   and s.nfe > 0 and math.isfinite(s.metrics[primary][0])]
            if not pts:
                continue
            x, y, std = zip(*pts)
            ax.errorbar(x, y, yerr=[0.0 if math.isnan(e) else e for e in std], color=color,
                        marker=markers[j % len(markers)], linestyle="-", capsize=3, markersize=5,
                        label=f"{v.name} {method}")
            plotted = True
    for label, v in _baselines(variants):
        if primary in v.baseline and math.isfinite(v.baseline[primary][0]):
            color = "0.4" if label.endswith("(baseline)") else colors[variants.index(v)]
            ax.axhline(v.baseline[primary][0], color=color, linestyle="--", linewidth=1, label=label)
    if plotted:
        ax.set_xscale("log")
    ax.set_xlabel("NFE (score evaluations per sample)")
    ax.set_ylabel(f"{primary} (lower is better)")
    ax.set_title(f"{primary} vs NFE (error bars: std over seeds)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False)
    return fig


def plot_loss_curves(histories: Histories):
    fig = _figure(figsize=(7, 4))
    ax = fig.add_subplot()
    for name, (steps, values) in histories.items():
        ax.plot(steps, values, label=name, linewidth=1.2)
    if all(v > 0 for _, values in histories.values() for v in values):
        ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("loss (mean over each logging window)")
    ax.set_title("training loss (from MLflow)", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def plot_samples(variants: list[VariantResult]):
    shown = [v for v in variants if v.grid is not None]
    n = max(len(shown), 1)
    fig = _figure(figsize=(3.2 * n, 3.6))
    if not shown:
        ax = fig.add_subplot()
        ax.text(0.5, 0.5, "no variant has a finite result", ha="center", va="center")
        ax.axis("off")
        return fig
    for i, v in enumerate(shown):
        ax = fig.add_subplot(1, n, i + 1)
        img = v.grid
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None, interpolation="nearest")
        ax.set_title(_best_title(v), fontsize=9)
        ax.axis("off")
    return fig


# ---------------------------------------------------------------------------------------------
# MLflow


def comparison_run_key(variant_names: list[str]) -> str:
    """The run key of the comparison run of this set of variants (order does not matter)."""
    digest = hashlib.sha256(",".join(sorted(variant_names)).encode()).hexdigest()[:10]
    return f"comparison-{digest}"


def _display_uri(uri: str) -> str:
    parts = urllib.parse.urlsplit(uri)
    if parts.username or parts.password:  # never print credentials
        parts = parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else ""))
    return urllib.parse.urlunsplit(parts)


def _short(e: BaseException) -> str:
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return text if len(text) <= 200 else text[:197] + "..."


def store_problem(uri: str, timeout: float = 5.0) -> str | None:
    """Why the MLflow store cannot be used, or None: a local store that does not exist (it would hold no
    training runs, and reading it must not create it), or a tracking server that does not answer."""
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):])
        return None if path.is_file() else f"MLflow store {path} does not exist"
    if uri.startswith("file:") or "://" not in uri:
        path = Path(urllib.parse.urlsplit(uri).path if uri.startswith("file:") else uri)
        return None if path.is_dir() else f"MLflow store {path} does not exist"
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
                return None
        except urllib.error.HTTPError:
            return None  # it answered
        except (urllib.error.URLError, OSError, ValueError) as e:
            return f"MLflow tracking server {_display_uri(uri)} unreachable: {_short(getattr(e, 'reason', e))}"
    return None


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
            notes.append(f"{v.name}: no loss history from MLflow run {v.run_id}: {_short(e)}")
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
    experiment = params.mlflow.experiment or f"scorelab-{params.data.source}"
    names = [v.name for v in variants]
    try:
        exp_id = tracking.experiment_id(uri, experiment, root)
        run_id = tracking.start_or_resume_run(uri, exp_id, comparison_run_key(names), COMPARISON_RUN_NAME, {
            "scorelab.stage": "report", "variants": ",".join(names), "primary_metric": primary,
            "git_commit": tracking.git_commit(root)})
    except Exception as e:
        return None, [f"MLflow: could not open the comparison run in experiment {experiment!r}: {_short(e)}"]
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
            notes.append(f"MLflow: training run {v.run_id} of {v.name} not found, so not tagged: {_short(e)}")
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


# ---------------------------------------------------------------------------------------------
# comparison.md


def _markdown(variants: list[VariantResult], primary: str, *, out_dir: Path, loss_figure: bool,
              loss_reason: str | None, session: _MLflowSession | None, notes: list[str], source: str) -> str:
    metrics = _metric_names(variants, primary)
    lines = [
        "# Variant comparison",
        "",
        f"Data: `{source}`. Primary metric: **{primary}** (lower is better); a variant's best setting is the one "
        f"with the lowest mean {primary}. Each metric is {_sample_sizes(variants)}. ↓: lower is better, "
        "↑: higher is better.",
        "",
        "## Best setting per variant",
        "",
    ]
    has_lik = {v.likelihood.name for v in variants if v.likelihood}
    lik_header = [f"{_likelihood_label(n)}{_arrow(n)}" for n in ("bits_per_dim", "test_loglik") if n in has_lik]
    rows = []
    for v in variants:
        b = v.best
        lik = [_fmt(v.likelihood.mean) if v.likelihood and v.likelihood.name == n else "—"
               for n in ("bits_per_dim", "test_loglik") if n in has_lik]
        rows.append([v.name, v.sde, f"**{b.key}**" if b else "— (no finite result)", b.method if b else "—",
                     _nfe_text(b.nfe) if b else "—", f"**{_pm(b.metrics[primary])}**" if b else "—",
                     f"{v.n_per_seed} × {v.seeds}", *lik, v.train_steps, _duration(v.train_seconds)])
    lines += _table(["variant", "SDE", "best setting", "sampler", "NFE", f"{primary}{_arrow(primary)}",
                     "N per seed × seeds", *lik_header, "train steps", "train time"], rows)
    baselines = _baselines(variants)
    base_v = baselines[0][1]
    if primary in base_v.baseline and len(baselines) == 1:
        lines += ["", f"Real vs real (baseline) {primary}: {_pm(base_v.baseline[primary])}: what two independent "
                  "samples of the data score, about the best a sampler can score at this N."]
    for _, v in baselines:
        if v.baseline_notes:
            who = "" if len(baselines) == 1 else f" ({v.name})"
            lines += ["", f"Baseline{who}: " + "; ".join(n.rstrip(".") for n in v.baseline_notes) + "."]

    lines += ["", "## Every setting", "",
              "Variant × sampler × NFE; the best setting of each variant in bold. "
              f"Each cell is {_sample_sizes(variants)}.",
              ""]
    rows = []
    for label, v in baselines:
        rows.append([label, "—", "—", "—", "—", f"{v.n_per_seed} × {v.seeds}",
                     *(_pm(v.baseline.get(m)) for m in metrics)])
    for v in variants:
        for s in v.settings:
            best = v.best is not None and s.key == v.best.key
            cells = [_pm(s.metrics.get(m)) for m in metrics]
            if best:
                cells[0] = f"**{cells[0]}**"
            rows.append([v.name, s.method, "—" if s.steps is None else s.steps, _nfe_text(s.nfe),
                         f"**{s.key}** (best)" if best else s.key, f"{v.n_per_seed} × {v.seeds}", *cells])
    lines += _table(["variant", "sampler", "steps", "NFE", "setting", "N per seed × seeds",
                     *(f"{m}{_arrow(m)}" for m in metrics)], rows)

    lines += ["", "## Likelihood", ""]
    with_ref = any(v.likelihood and v.likelihood.reference is not None for v in variants)
    rows = []
    for v in variants:
        lk = v.likelihood
        if lk is None:
            rows.append([v.name, "not reported", "—", "—", "—", *(["—"] if with_ref else [])])
        else:
            rows.append([v.name, f"{_likelihood_label(lk.name)}{_arrow(lk.name)}", _pm((lk.mean, lk.stderr)),
                         "—" if lk.n is None else lk.n, lk.dequantization or "—",
                         *([_fmt(lk.reference)] if with_ref else [])])
    lines += _table(["variant", "quantity", "mean ± stderr", "n", "dequantization",
                     *(["true density on the same points"] if with_ref else [])], rows)

    lines += ["", "## Training", ""]
    lines += _table(["variant", "steps", "time", "final loss", "MLflow run"],
                    [[v.name, v.train_steps, _duration(v.train_seconds), _fmt(v.final_loss),
                      f"`{v.run_id}`" if v.run_id else "—"] for v in variants])

    lines += ["", "## Inception FID", ""]
    rows = []
    for v in variants:
        if v.inception_fid is not None:
            rows.append([v.name, _fmt(v.inception_fid), v.inception_fid_reason or ""])
        else:
            rows.append([v.name, "not computed", v.inception_fid_reason or "no reason given"])
    lines += _table(["variant", "Inception FID", "note"], rows)

    lines += ["", "## Figures", "",
              f"### {primary} vs NFE", "", f"![{primary} vs NFE](fid_vs_nfe.png)", "",
              "Points: [fid_vs_nfe.csv](fid_vs_nfe.csv). Dashed: the real-vs-real baseline.", "",
              "### Training loss", ""]
    lines += ["![training loss](loss_curves.png)"] if loss_figure else [f"Skipped: {loss_reason}."]
    lines += ["", "### Samples from each variant's best setting", "", "![samples](samples.png)", ""]
    for v in variants:
        if v.grid_path is not None:
            rel = Path(os.path.relpath(v.grid_path, out_dir)).as_posix()
            lines.append(f"- {_best_title(v)}: [{v.best.key}/grid.png]({rel})")
        else:
            lines.append(f"- {v.name}: no setting with a finite {primary}, so no samples shown")

    lines += ["", "## MLflow", ""]
    if session is not None:
        lines.append(f"Comparison run `{session.run_id}` (name `{COMPARISON_RUN_NAME}`) in experiment "
                     f"`{session.experiment}`; each training run is tagged `best_setting` with metric "
                     f"`best_{primary}`.")
    else:
        lines.append("Nothing logged to MLflow (see the notes).")
    if notes:
        lines += ["", "## Notes", "", *(f"- {n}" for n in notes)]
    return "\n".join(lines) + "\n"


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
                   "metrics": Path, "loss_curves": Path (only when drawn)},
         "primary_metric": str, "best": {variant: setting key or None}, "metrics": what metrics.json holds,
         "mlflow_run_id": the comparison run, or None, "notes": [str]}

    Raises ReportError, before writing anything, when an input is missing or malformed. Without
    log_to_mlflow, MLflow is not contacted at all, and the loss-curve figure is skipped.
    """
    root = Path(root).resolve()
    out_dir = Path(out_dir).resolve() if out_dir is not None else root / "reports"
    variants, primary = load_inputs(params, root)
    notes = [f"{v.name}: no setting has a finite {primary}; no best setting" for v in variants if v.best is None]

    session: _MLflowSession | None = None
    histories: Histories = {}
    loss_reason: str | None = None
    if log_to_mlflow:
        uri = tracking.resolve_tracking_uri(params.mlflow.tracking_uri, root)
        problem = store_problem(uri)
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
    files["fid_vs_nfe"] = _save_figure(plot_vs_nfe(variants, primary), out_dir / "fid_vs_nfe.png")
    files["fid_vs_nfe_csv"] = _write_text(out_dir / "fid_vs_nfe.csv", _csv_text(variants, primary))
    if histories:
        files["loss_curves"] = _save_figure(plot_loss_curves(histories), out_dir / "loss_curves.png")
    else:
        (out_dir / "loss_curves.png").unlink(missing_ok=True)  # a stale one would pass for this run's
    files["samples"] = _save_figure(plot_samples(variants), out_dir / "samples.png")
    summary = metrics_summary(variants, primary)
    files["metrics"] = _write_text(out_dir / "metrics.json", json.dumps(summary, indent=2, allow_nan=False) + "\n")
    markdown = _markdown(variants, primary, out_dir=out_dir, loss_figure=bool(histories),
                         loss_reason=loss_reason, session=session, notes=notes, source=params.data.source)
    files["comparison"] = _write_text(out_dir / "comparison.md", markdown)

    if session is not None:
        before = session.logger.dropped
        session.logger.artifacts([files[k] for k in ("comparison", "fid_vs_nfe", "fid_vs_nfe_csv", "loss_curves",
                                                     "samples", "metrics") if k in files])
        session.logger.finish()
        if session.logger.dropped > before:
            notes.append(f"MLflow: {session.logger.dropped - before} artifact upload(s) of the comparison run failed")
    return {"files": files, "primary_metric": primary,
            "best": {v.name: v.best.key if v.best else None for v in variants}, "metrics": summary,
            "mlflow_run_id": session.run_id if session else None, "notes": notes}


__all__ = [
    "Histories", "Likelihood", "ReportError", "Setting", "VariantResult", "baseline_value", "best_setting",
    "build_report", "comparison_run_key", "load_inputs", "loss_histories", "metrics_summary", "plot_loss_curves",
    "plot_samples", "plot_vs_nfe", "primary_metric", "store_problem",
]
