"""The text of the report's comparison.md: tables of every variant's results, notes, links to the figures.

    text = comparison_markdown(variants, primary, out_dir=out_dir, loss_figure=True, loss_reason=None,
                               mlflow_summary="Comparison run ...", notes=[], source="digits",
                               sweep=sweep, against=against)   # with params.tune: "## The sweep"
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from .layout import TUNED_VARIANT
from .report_compare import BASELINE, Comparison
from .report_data import (HandsetComparison, Sweep, VariantResult, baselines, best_title, fmt, nfe_text,
                          tuned_verdict)

METRIC_ORDER = ("domain_fd", "sliced_w2", "kid_x1e3", "precision", "recall", "mmd", "data_loglik")
HIGHER_IS_BETTER = {"precision", "recall", "data_loglik", "test_loglik"}
LOWER_IS_BETTER = {"domain_fd", "sliced_w2", "kid", "kid_x1e3", "mmd", "bits_per_dim"}
_LABELS = {"kid_x1e3": "KID ×10³"}


def _ema_scores_text(v: VariantResult) -> str:
    """Each candidate's objective, the chosen one in bold: "**power-0.10 1.23 ± 0.04**, ema-0.995 1.4 ± 0.05"."""
    if not v.ema_scores:
        return "—"
    parts = []
    for name, (mean, se) in v.ema_scores.items():
        text = f"{name} {fmt(mean)}" + (f" ± {fmt(se, 2)}" if se is not None else "")
        parts.append(f"**{text}**" if name == v.ema_chosen else text)
    return ", ".join(parts)


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


def _rung_text(rungs: Any) -> str:
    """The early rungs' agreement with the final order, one clause per checkpoint step."""
    if not isinstance(rungs, list) or not rungs:
        return "no early checkpoint to compare with the final order"
    parts = []
    for r in rungs:
        if not r.get("pairs"):
            parts.append(f"at step {r.get('step')}, no pair (fewer than two trials ran to the end)")
        else:
            parts.append(f"at step {r['step']}, {r['agree']} of {r['pairs']} pairs of trials that ran to the end "
                         f"were already in their final order ({r['agree'] / r['pairs']:.0%})")
    return "; ".join(parts)


def _sweep_lines(sweep: Sweep, against: HandsetComparison | None, primary: str,
                 variants: list[VariantResult]) -> list[str]:
    """The "The sweep" section: what was searched and how, every trial, the figure, and the winner `tuned`
    against the hand-set variant of its SDE type at equal NFE."""
    m, rows = sweep.metrics, sweep.trials
    metric = m.get("objective_metric", primary)
    tuned = next((v for v in variants if v.name == TUNED_VARIANT), None)
    counts = ", ".join(f"{m[k]} {what}" for k, what in (("finished", "ran to the end"),
                       ("stopped_early", "stopped early by ASHA"), ("failed", "failed")) if k in m)
    se = m.get("objective_se_median")
    noise = (f"The measured noise: the median over trials of the objective's standard error over seeds is "
             f"{fmt(se)}: two trials closer than about 2.8 times that (the 95% margin of a difference of two such "
             "means) are not ordered by the sweep."
             if isinstance(se, (int, float)) else "The objective's noise was not measured (one seed per trial).")
    samplers_from = m.get("samplers_from")
    sampled = ("`tune.samplers`" if samplers_from == "tune.samplers" else
               f"{samplers_from} (the hand-set variant of its SDE type)" if samplers_from else "its configured samplers")
    budget = f" ({tuned.train_steps} steps)" if tuned else ""
    seconds = float(m["seconds"]) if isinstance(m.get("seconds"), (int, float)) else math.nan
    lines = ["## The sweep", "",
             f"{m.get('trials', len(rows))} trials ({m.get('search', 'grid')} search{', ' + counts if counts else ''}), "
             f"ranked by the objective: {metric} (lower is better) of {m.get('objective_n_samples', '?')} samples per "
             f"seed × {m.get('objective_seeds', '?')} seeds drawn with {m.get('objective_sampler', '?')} at NFE "
             f"{nfe_text(m.get('objective_nfe'))}, the mean over seeds. {noise} Early rungs: "
             f"{_rung_text(m.get('rung_agreement'))}. The sweep took {_duration(seconds)}. "
             f"Winner: trial {m['best_trial']} ({m.get('best_label', '?')}, {m.get('best_sde', '?')}), objective "
             f"{fmt(m.get('best_objective'))}; it was retrained at the full `train:` budget{budget} as `{TUNED_VARIANT}` "
             f"and sampled with the samplers of {sampled}.", ""]
    table = []
    for r in rows:
        winner = r["trial"] == m["best_trial"]
        objective = "—" if r["objective"] is None else _pm((r["objective"], r.get("objective_se")))
        table.append([r["trial"], f"{r['label']} (winner)" if winner else r["label"], fmt(r["lr"]), fmt(r["ema_decay"]),
                      objective, f"{r['steps']} / {r['max_steps']}", r["status"],
                      "—" if r["seconds"] is None else f"{r['seconds']:.1f}"])
    lines += _table(["trial", "configuration", "lr", "ema_decay", f"{metric} ± se", "steps / max", "status",
                     "time (s)"], table)
    failed = [f"trial {r['trial']}: {r['error']}" for r in rows if r.get("error")]
    if failed:
        lines += ["", "Failed: " + "; ".join(failed) + "."]
    lines += ["", "![the sweep's objective](sweep.png)", "",
              f"Each trial's last {metric} by SDE type, then against each parameter that varies within a type "
              "(filled: ran to the end; hollow: stopped early; bars: ± 1 standard error over seeds). Trials: "
              f"`{sweep.trials_path.name}` of the tune stage (also an artifact of the MLflow comparison run).", ""]
    return lines + _handset_lines(against, primary, variants)


def _handset_lines(against: HandsetComparison | None, primary: str, variants: list[VariantResult]) -> list[str]:
    if against is None:
        return []
    if against.handset is None:
        return [f"### {TUNED_VARIANT} against a hand-set variant", "",
                f"None: {against.reason}, so there is no equal-NFE comparison."]
    lines = [f"### {TUNED_VARIANT} against {against.handset} at equal NFE", ""]
    cmp = against.comparison
    if cmp is None:
        return lines + [f"Not computed: {against.reason}."]
    lines += [f"At every sampler setting both evaluated (the same sampler and steps, so the same NFE; the adaptive "
              f"ODE's is each variant's own, {TUNED_VARIANT}'s shown): {TUNED_VARIANT} − "
              f"{against.handset} of the mean {primary} over seeds, with its {cmp.level:.0%} paired Student-t interval "
              f"over seeds {', '.join(cmp.seeds)} and two-sided p-value; significant: rejected by Holm's procedure at "
              f"α = {cmp.alpha:.2g} over these {len(cmp.rows)} settings, else a tie.", ""]
    nfe = {s.key: s.nfe for v in variants if v.name == TUNED_VARIANT for s in v.settings}
    lines += _table(["setting", "NFE", TUNED_VARIANT, against.handset, f"{TUNED_VARIANT} − {against.handset}",
                     "interval", "p", "verdict"],
                    [[r.a.setting, nfe_text(nfe.get(r.a.setting)), fmt(r.a.estimate), fmt(r.b.estimate),
                      fmt(r.diff.estimate), f"[{fmt(r.diff.low, 3)}, {fmt(r.diff.high, 3)}]", fmt(r.diff.p_value, 2),
                      tuned_verdict(r)] for r in cmp.rows])
    higher = against.higher()
    lines += ["", (f"{TUNED_VARIANT} is no worse than {against.handset} within the noise at every shared setting "
                   f"({against.summary()})." if not higher else
                   f"{TUNED_VARIANT} is worse than {against.handset} beyond the noise: significantly higher at "
                   f"{', '.join(higher)} ({against.summary()}).")]
    if against.untested:
        lines.append(f"Not tested (fewer than two paired seeds, or diverged): {', '.join(against.untested)}.")
    return lines


def comparison_markdown(variants: list[VariantResult], primary: str, *, out_dir: Path, loss_figure: bool,
                        loss_reason: str | None, mlflow_summary: str, notes: list[str], source: str,
                        comparison: Comparison | None = None, sweep: Sweep | None = None,
                        against: HandsetComparison | None = None) -> str:
    """comparison.md. out_dir: where it goes (the sample grids are linked relative to it); loss_figure:
    whether loss_curves.png was drawn, else loss_reason says why not; mlflow_summary: the MLflow section;
    comparison: report_compare.compare's pairwise tests (None: the section is left out); sweep: the tune
    stage's results, with against (report_data.vs_handset): the section "The sweep" (None: left out),
    whose figure is sweep.png beside comparison.md."""
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
    with_ema = any(v.ema_chosen for v in variants)  # EMA profiles: which EMA each model is, and why
    lines += _table(["variant", "steps", "time", "final loss", *(["EMA", "EMA objective ± se"] if with_ema else []),
                     "MLflow run"],
                    [[v.name, v.train_steps, _duration(v.train_seconds), fmt(v.final_loss),
                      *([v.ema_chosen or "—", _ema_scores_text(v)] if with_ema else []),
                      f"`{v.run_id}`" if v.run_id else "—"] for v in variants])
    if with_ema:
        lines += ["", "EMA: the candidate EMA the model is, the one of least objective (the sweep's distance of "
                  "samples to the test split, mean ± standard error over seeds) among the classic EMA (ema-<decay>) "
                  "and the power-function profiles (power-<sigma_rel>, Karras et al. 2024) scored at the last step."]

    if sweep is not None:
        lines += ["", *_sweep_lines(sweep, against, primary, variants)]

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
