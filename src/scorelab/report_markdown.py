"""The text of the report's comparison.md: tables of every variant's results, notes, links to the figures.

    text = comparison_markdown(variants, primary, out_dir=out_dir, loss_figure=True, loss_reason=None,
                               mlflow_summary="Comparison run ...", notes=[], source="digits")
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from .report_data import VariantResult, baselines, best_title, fmt, nfe_text

METRIC_ORDER = ("domain_fd", "sliced_w2", "kid", "precision", "recall", "mmd", "data_loglik")
HIGHER_IS_BETTER = {"precision", "recall", "data_loglik", "test_loglik"}
LOWER_IS_BETTER = {"domain_fd", "sliced_w2", "kid", "mmd", "bits_per_dim"}


def _pm(pair: tuple[float, float] | None) -> str:
    if pair is None:
        return "—"
    mean, std = pair
    return fmt(mean) if std is None or math.isnan(std) else f"{fmt(mean)} ± {fmt(std, 2)}"


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
        return fmt(seconds)
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds:.0f} s ({seconds / 60:.1f} min)"


def _metric_names(variants: list[VariantResult], primary: str) -> list[str]:
    names = {m for v in variants for s in v.settings for m in s.metrics} | {m for v in variants for m in v.baseline}
    known = [m for m in METRIC_ORDER if m in names and m != primary]
    return [primary, *known, *sorted(names - set(known) - {primary})]


def _sample_sizes(variants: list[VariantResult]) -> str:
    sizes = {(v.n_per_seed, v.seeds) for v in variants}
    if len(sizes) == 1:
        n, seeds = sizes.pop()
        return f"the mean ± std over {seeds} seeds of N = {n} samples per seed"
    return "the mean ± std over seeds: " + ", ".join(f"{v.name} N = {v.n_per_seed} samples per seed × {v.seeds} seeds"
                                                     for v in variants)


def _likelihood_label(name: str) -> str:
    return "bits/dim" if name == "bits_per_dim" else "test log-likelihood"


def comparison_markdown(variants: list[VariantResult], primary: str, *, out_dir: Path, loss_figure: bool,
                        loss_reason: str | None, mlflow_summary: str, notes: list[str], source: str) -> str:
    """comparison.md. out_dir: where it goes (the sample grids are linked relative to it); loss_figure:
    whether loss_curves.png was drawn, else loss_reason says why not; mlflow_summary: the MLflow section."""
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
        lik = [fmt(v.likelihood.mean) if v.likelihood and v.likelihood.name == n else "—"
               for n in ("bits_per_dim", "test_loglik") if n in has_lik]
        rows.append([v.name, v.sde, f"**{b.key}**" if b else "— (no finite result)", b.method if b else "—",
                     nfe_text(b.nfe) if b else "—", f"**{_pm(b.metrics[primary])}**" if b else "—",
                     f"{v.n_per_seed} × {v.seeds}", *lik, v.train_steps, _duration(v.train_seconds)])
    lines += _table(["variant", "SDE", "best setting", "sampler", "NFE", f"{primary}{_arrow(primary)}",
                     "N per seed × seeds", *lik_header, "train steps", "train time"], rows)
    base_rows = baselines(variants)
    base_v = base_rows[0][1]
    if primary in base_v.baseline and len(base_rows) == 1:
        lines += ["", f"Real vs real (baseline) {primary}: {_pm(base_v.baseline[primary])}: what two independent "
                  "samples of the data score, about the best a sampler can score at this N."]
    for _, v in base_rows:
        if v.baseline_notes:
            who = "" if len(base_rows) == 1 else f" ({v.name})"
            lines += ["", f"Baseline{who}: " + "; ".join(n.rstrip(".") for n in v.baseline_notes) + "."]

    lines += ["", "## Every setting", "",
              "Variant × sampler × NFE; the best setting of each variant in bold. "
              f"Each cell is {_sample_sizes(variants)}.",
              ""]
    rows = []
    for label, v in base_rows:
        rows.append([label, "—", "—", "—", "—", f"{v.n_per_seed} × {v.seeds}",
                     *(_pm(v.baseline.get(m)) for m in metrics)])
    for v in variants:
        for s in v.settings:
            best = v.best is not None and s.key == v.best.key
            cells = [_pm(s.metrics.get(m)) for m in metrics]
            if s.diverged:  # the sample stage's guard: its samples exploded, a number here would mislead
                cells[0] = "**diverged** (not scored)"
            if best:
                cells[0] = f"**{cells[0]}**"
            rows.append([v.name, s.method, "—" if s.steps is None else s.steps, nfe_text(s.nfe),
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
                         *([fmt(lk.reference)] if with_ref else [])])
    lines += _table(["variant", "quantity", "mean ± stderr", "n", "dequantization",
                     *(["true density on the same points"] if with_ref else [])], rows)

    lines += ["", "## Training", ""]
    lines += _table(["variant", "steps", "time", "final loss", "MLflow run"],
                    [[v.name, v.train_steps, _duration(v.train_seconds), fmt(v.final_loss),
                      f"`{v.run_id}`" if v.run_id else "—"] for v in variants])

    lines += ["", "## Inception FID", ""]
    rows = []
    for v in variants:
        if v.inception_fid is not None:
            rows.append([v.name, fmt(v.inception_fid), v.inception_fid_reason or ""])
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
            lines.append(f"- {best_title(v)}: [{v.best.key}/grid.png]({rel})")
        else:
            lines.append(f"- {v.name}: no setting with a finite {primary}, so no samples shown")

    lines += ["", "## MLflow", "", mlflow_summary]
    if notes:
        lines += ["", "## Notes", "", *(f"- {n}" for n in notes)]
    return "\n".join(lines) + "\n"


__all__ = ["HIGHER_IS_BETTER", "LOWER_IS_BETTER", "METRIC_ORDER", "comparison_markdown"]
