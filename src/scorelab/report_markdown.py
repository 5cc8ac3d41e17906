"""The text of the report's comparison.md: tables of every variant's results, notes, links to the figures.

    text = comparison_markdown(variants, primary, out_dir=out_dir, loss_figure=True, loss_reason=None,
                               mlflow_summary="Comparison run ...", notes=[], source="digits")
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from .report_compare import BASELINE, Comparison
from .report_data import VariantResult, baselines, best_title, fmt, nfe_text

METRIC_ORDER = ("domain_fd", "sliced_w2", "kid_x1e3", "precision", "recall", "mmd", "data_loglik")
HIGHER_IS_BETTER = {"precision", "recall", "data_loglik", "test_loglik"}
LOWER_IS_BETTER = {"domain_fd", "sliced_w2", "kid", "kid_x1e3", "mmd", "bits_per_dim"}
_LABELS = {"kid_x1e3": "KID ×10³"}


def _pm(pair: tuple[float, float] | None, ci: tuple[float, float] | None = None) -> str:
    """mean [low, high] where there is an interval, else mean ± std (older evaluations)."""
    if pair is None:
        return "—"
    mean, std = pair
    if ci is not None and all(map(math.isfinite, ci)):
        return f"{fmt(mean)} [{fmt(ci[0], 3)}, {fmt(ci[1], 3)}]"
    return fmt(mean) if std is None or math.isnan(std) else f"{fmt(mean)} ± {fmt(std, 2)}"


def _arrow(metric: str) -> str:
    return " ↓" if metric in LOWER_IS_BETTER else " ↑" if metric in HIGHER_IS_BETTER else ""


def _label(metric: str) -> str:
    return f"{_LABELS.get(metric, metric)}{_arrow(metric)}"


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
    levels = {v.level for v in variants}
    what = (f"the mean over seeds [{levels.pop():.0%} interval]" if len(levels) == 1 and None not in levels
            else "the mean over seeds [interval] (or ± std over seeds, for evaluations without intervals)")
    sizes = {(v.n_per_seed, v.seeds) for v in variants}
    if len(sizes) == 1:
        n, seeds = sizes.pop()
        return f"{what} of {seeds} seeds × N = {n} samples per seed"
    return f"{what}: " + ", ".join(f"{v.name} N = {v.n_per_seed} samples per seed × {v.seeds} seeds"
                                   for v in variants)


def _intervals_note(variants: list[VariantResult], primary: str) -> str:
    """How the intervals were made, and the units and sizes of KID and precision/recall."""
    boot = next((v.bootstrap for v in variants if v.bootstrap), None)
    how = (f"{primary}: bootstrap over samples ({boot.get('replicates')} resamples of each seed's N samples, "
           "shared by every variant); every other metric: Student t over seeds"
           if boot else "Student t over seeds, for every metric")
    n = variants[0].n_per_seed
    return (f"Intervals: {how}. KID ×10³: the unbiased kernel distance times 1000, subsets of N (left out "
            f"below N = 1000); precision/recall: k = 3 nearest neighbours, N = {n} samples per seed against the "
            "train split's features. Reference of every distance: the whole train split; baseline: held-out "
            "(test) real data at the same N against the same reference.")


def _likelihood_label(name: str) -> str:
    return "bits/dim" if name == "bits_per_dim" else "test log-likelihood"


def _comparison_lines(result: Comparison, primary: str, variants: list[VariantResult]) -> list[str]:
    """The "Pairwise comparisons" section."""
    lines = ["## Pairwise comparisons", ""]
    if result.skipped:
        return lines + [f"Not computed: {result.skipped}. Without them no difference between variants is claimed."]
    nfe = {v.name: nfe_text(v.best.nfe) for v in variants if v.best is not None}
    how = ("paired-bootstrap interval (the same resampled rows of each seed on both sides)"
           if result.method == "bootstrap" else
           f"paired Student-t interval over seeds {', '.join(result.seeds)} (sample i of a seed starts from the "
           "same noise in every variant)")
    lines += [f"Each variant at its lowest-mean setting; A − B is the difference of the mean {primary} over seeds, "
              f"with its {result.level:.0%} {how} and two-sided p-value. Significant: rejected by Holm's procedure "
              f"at α = "
              f"{result.alpha:.2g} over all {len(result.rows)} comparisons below; every other pair is a tie "
              "(the data cannot order them). The lowest-mean setting is chosen on the same samples, which "
              "favours each variant slightly.", ""]

    def who(e) -> str:
        return e.name if e.name == BASELINE else f"{e.name} ({e.setting}, NFE {nfe[e.name]})"

    lines += _table(["A", "B", "A − B", "interval", "p", "verdict"],
                    [[who(r.a), who(r.b), fmt(r.diff.estimate), f"[{fmt(r.diff.low, 3)}, {fmt(r.diff.high, 3)}]",
                      fmt(r.diff.p_value, 2), r.verdict()] for r in result.rows])
    sig = [f"{r.verdict().removesuffix(' lower')} below {r.b.name if r.diff.estimate < 0 else r.a.name}"
           for r in result.rows if r.significant and r.b.name != BASELINE]
    vs_base = [r for r in result.rows if r.b.name == BASELINE]
    above = [r.a.name for r in vs_base if r.significant and r.diff.estimate > 0]
    level_with = [r.a.name for r in vs_base if not r.significant]
    lines += ["", f"Significant differences between variants ({primary}): {'; '.join(sig) if sig else 'none'}. "
              "Every other pair of variants is a tie."]
    if vs_base:
        lines.append(f"Significantly above the real-vs-real baseline: {', '.join(above) or 'none'}; not "
                     f"distinguishable from it: {', '.join(level_with) or 'none'}.")
    return lines


def comparison_markdown(variants: list[VariantResult], primary: str, *, out_dir: Path, loss_figure: bool,
                        loss_reason: str | None, mlflow_summary: str, notes: list[str], source: str,
                        comparison: Comparison | None = None) -> str:
    """comparison.md. out_dir: where it goes (the sample grids are linked relative to it); loss_figure:
    whether loss_curves.png was drawn, else loss_reason says why not; mlflow_summary: the MLflow section;
    comparison: report_compare.compare's pairwise tests (None: the section is left out)."""
    metrics = _metric_names(variants, primary)
    lines = [
        "# Variant comparison",
        "",
        f"Data: `{source}`. Primary metric: **{primary}** (lower is better). Each metric is "
        f"{_sample_sizes(variants)}. ↓: lower is better, ↑: higher is better. {_intervals_note(variants, primary)} "
        "A lower mean alone ranks nothing: which differences are significant is under *Pairwise comparisons*.",
        "",
        "## Each variant at its lowest-mean setting",
        "",
    ]
    has_lik = {v.likelihood.name for v in variants if v.likelihood}
    lik_header = [f"{_likelihood_label(n)}{_arrow(n)}" for n in ("bits_per_dim", "test_loglik") if n in has_lik]
    rows = []
    for v in variants:
        b = v.best
        lik = [fmt(v.likelihood.mean) if v.likelihood and v.likelihood.name == n else "—"
               for n in ("bits_per_dim", "test_loglik") if n in has_lik]
        rows.append([v.name, v.sde, b.key if b else "— (no finite result)", b.method if b else "—",
                     nfe_text(b.nfe) if b else "—", _pm(b.metrics[primary], b.ci.get(primary)) if b else "—",
                     f"{v.n_per_seed} × {v.seeds}", *lik, v.train_steps, _duration(v.train_seconds)])
    lines += _table(["variant", "SDE", "lowest-mean setting", "sampler", "NFE", _label(primary),
                     "N per seed × seeds", *lik_header, "train steps", "train time"], rows)
    base_rows = baselines(variants)
    base_v = base_rows[0][1]
    if primary in base_v.baseline and len(base_rows) == 1:
        n_b = "" if base_v.baseline_n is None else f" (N = {base_v.baseline_n} held-out real samples per seed)"
        lines += ["", f"Real vs real (baseline){n_b} {primary}: "
                  f"{_pm(base_v.baseline[primary], base_v.baseline_ci.get(primary))}: what held-out real data "
                  "scores against the same reference, about the best a sampler can score at this N."]
    if comparison is not None:
        lines += ["", *_comparison_lines(comparison, primary, variants)]
    for _, v in base_rows:
        if v.baseline_notes:
            who = "" if len(base_rows) == 1 else f" ({v.name})"
            lines += ["", f"Baseline{who}: " + "; ".join(n.rstrip(".") for n in v.baseline_notes) + "."]

    lines += ["", "## Every setting", "",
              "Variant × sampler × NFE; (lowest mean) marks the setting shown above and in the sample grids. "
              f"Each cell is {_sample_sizes(variants)}.",
              ""]
    rows = []
    for label, v in base_rows:
        rows.append([label, "—", "—", "—", "—", f"{v.baseline_n or v.n_per_seed} × {v.seeds}",
                     *(_pm(v.baseline.get(m), v.baseline_ci.get(m)) for m in metrics)])
    for v in variants:
        for s in v.settings:
            best = v.best is not None and s.key == v.best.key
            cells = [_pm(s.metrics.get(m), s.ci.get(m)) for m in metrics]
            if s.diverged:  # the sample stage's guard: its samples exploded, a number here would mislead
                cells[0] = "**diverged** (not scored)"
            rows.append([v.name, s.method, "—" if s.steps is None else s.steps, nfe_text(s.nfe),
                         f"{s.key} (lowest mean)" if best else s.key, f"{v.n_per_seed} × {v.seeds}", *cells])
    lines += _table(["variant", "sampler", "steps", "NFE", "setting", "N per seed × seeds",
                     *(_label(m) for m in metrics)], rows)

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
    lines += ["", "### Samples from each variant's lowest-mean setting", "", "![samples](samples.png)", ""]
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
