"""The report's figures: the primary metric vs NFE, the training loss curves, each variant's best samples.

    save_figure(plot_vs_nfe(variants, primary), out_dir / "fid_vs_nfe.png")

Figures are matplotlib `Figure`s made without pyplot (no global state, no GUI backend), saved as PNG
whole or not at all.
"""

from __future__ import annotations

import math
from pathlib import Path

from . import storage
from .report_data import Histories, VariantResult, baselines, best_title


def figure(**kwargs):
    """A new matplotlib Figure (kwargs as Figure's), outside pyplot."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend

    return Figure(**kwargs)


def save_figure(fig, path: Path) -> Path:
    """fig as a PNG at path, written to a temporary name and renamed over it."""
    with storage.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    return path


def _bar(pair: tuple[float, float], ci: tuple[float, float] | None) -> tuple[float, float]:
    """(below, above) the mean: the interval where there is one, else the std over seeds, else nothing."""
    mean, std = pair
    if ci is not None and all(map(math.isfinite, ci)):
        return max(mean - ci[0], 0.0), max(ci[1] - mean, 0.0)
    return (0.0, 0.0) if math.isnan(std) else (std, std)


def plot_vs_nfe(variants: list[VariantResult], primary: str):
    fig = figure(figsize=(7.5, 4.5))
    ax = fig.add_subplot()
    colors = [f"C{i % 10}" for i in range(len(variants))]
    markers = "osD^vPX*<>"
    methods = list(dict.fromkeys(s.method for v in variants for s in v.settings))  # one marker per sampler
    plotted = False
    for v, color in zip(variants, colors):
        for method in dict.fromkeys(s.method for s in v.settings):
            j = methods.index(method)
            pts = [(s.nfe, s.metrics[primary][0], *_bar(s.metrics[primary], s.ci.get(primary))) for s in v.settings
                   if s.method == method and s.nfe is not None and s.nfe > 0 and not s.diverged
                   and math.isfinite(s.metrics[primary][0])]
            if not pts:
                continue
            x, y, below, above = zip(*pts)
            ax.errorbar(x, y, yerr=[below, above], color=color,
                        marker=markers[j % len(markers)], linestyle="-", capsize=3, markersize=5,
                        label=f"{v.name} {method}")
            plotted = True
    for label, v in baselines(variants):
        if primary in v.baseline and math.isfinite(v.baseline[primary][0]):
            color = "0.4" if label.endswith("(baseline)") else colors[variants.index(v)]
            ax.axhline(v.baseline[primary][0], color=color, linestyle="--", linewidth=1, label=label)
    if plotted:
        ax.set_xscale("log")
    ax.set_xlabel("NFE (score evaluations per sample)")
    ax.set_ylabel(f"{primary} (lower is better)")
    with_ci = any(primary in s.ci for v in variants for s in v.settings)
    ax.set_title(f"{primary} vs NFE (error bars: {'intervals, see comparison.md' if with_ci else 'std over seeds'})",
                 fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False)
    return fig


def plot_loss_curves(histories: Histories):
    fig = figure(figsize=(7, 4))
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
    fig = figure(figsize=(3.2 * n, 3.6))
    if not shown:
        ax = fig.add_subplot()
        ax.text(0.5, 0.5, "no variant has a finite result", ha="center", va="center")
        ax.axis("off")
        return fig
    for i, v in enumerate(shown):
        ax = fig.add_subplot(1, n, i + 1)
        img = v.grid
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None, interpolation="nearest")
        ax.set_title(best_title(v), fontsize=9)
        ax.axis("off")
    return fig


__all__ = ["figure", "plot_loss_curves", "plot_samples", "plot_vs_nfe", "save_figure"]
