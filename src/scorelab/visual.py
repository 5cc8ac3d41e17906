"""Pictures people would rather look at than read: sample grids for images, scatter plots for 2-D data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .config import VariantConfig
from .modality import Modality, modality_of
from .sampling import sample


def cheapest_sampler(variant: VariantConfig) -> tuple[str, int | None, dict]:
    """The configured sampler setting with the fewest steps (the adaptive ODE last): for quick looks."""
    settings = [(s.method, n, s.options()) for s in variant.samplers for n in s.step_list()]
    return min(settings, key=lambda m: (m[1] is None, m[1] or 0))


@torch.no_grad()
def save_samples(model, variant: VariantConfig, data_shape: tuple[int, ...], path: Path, *, seed: int = 0,
                 n: int | None = None) -> Path:
    """Sample with the cheapest configured sampler and save a PNG: an image grid, or a 2-D scatter."""
    method, steps, options = cheapest_sampler(variant)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    modality = modality_of(data_shape)
    n = n or modality.preview_count
    x = sample(model, model.sde, (n, *data_shape), method=method, steps=steps, seed=seed, device=device,
               **options).x.cpu()
    model.train(was_training)
    title = f"{method} ({steps if steps is not None else 'adaptive'} steps)"
    return save_preview(modality, x, path, title)


def save_preview(modality: Modality, x: torch.Tensor, path: Path, title: str = "") -> Path:
    """Model-space samples as the modality's picture: an image grid, or a scatter of 2-D points."""
    draw = {"grid": save_image_grid, "scatter": save_scatter}[modality.preview]
    return draw(x, path, title)


GRID_MIN_SIDE = 32  # pixels per image in a saved grid: smaller images (8x8 digits) are enlarged


GRID_PADDING = 2  # white pixels around and between the images of a grid


def save_image_grid(x: torch.Tensor, path: Path, title: str = "", nrow: int = 8) -> Path:
    """x in model space [-1, 1], (N, C, H, W). Images under GRID_MIN_SIDE pixels are enlarged by an
    integer factor with nearest-neighbour (every pixel stays a visible square, nothing is invented).

    The PNG is pixel for pixel torchvision's save_image(x, nrow=nrow, padding=2, pad_value=1) for N > 1 (a
    test compares them), written here with PIL: importing torchvision pulls in torch._dynamo, 2 s in each of
    the 13 stages of the default run that save a grid."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    factor = -(-GRID_MIN_SIDE // x.shape[-1])
    if factor > 1:
        x = torch.nn.functional.interpolate(x.float(), scale_factor=factor, mode="nearest")
    x = (x.detach().cpu().float().clamp(-1, 1) + 1) / 2
    n, c, h, w = x.shape
    x = x.expand(n, 3, h, w) if c == 1 else x  # grey as RGB, as make_grid does
    cols, pad = min(nrow, n), GRID_PADDING
    rows = -(-n // cols)
    grid = torch.ones(3, rows * (h + pad) + pad, cols * (w + pad) + pad)
    for k in range(n):
        r, q = divmod(k, cols)
        grid[:, r * (h + pad) + pad:(r + 1) * (h + pad), q * (w + pad) + pad:(q + 1) * (w + pad)] = x[k]
    pixels = grid.mul(255).add_(0.5).clamp_(0, 255).permute(1, 2, 0).to(torch.uint8).numpy()  # save_image's rounding
    Image.fromarray(pixels).save(path)
    return path


def save_scatter(x: torch.Tensor, path: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.scatter(x[:, 0], x[:, 1], s=1.5, alpha=0.5)
    lim = float(x.abs().quantile(0.995).clamp(min=1.0)) * 1.1
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# The sweep: objective against each swept parameter, per SDE type (scorelab.tune)


def plot_objective(rows: list[dict[str, Any]], path: Path, metric: str) -> Path:
    """The objective of every trial by SDE type, then against each parameter that varies within a type
    (its SDE parameters, parameterisation, lr, ema_decay), all on one y axis. Filled: ran to the end;
    hollow: stopped early by ASHA (its last objective, at fewer steps). Vertical bars: +-1 standard error
    over the objective's seeds, where a row has objective_se. Failed trials are only in trials.csv.
    Written as PNG whatever the name's suffix (the report writes to a temporary name)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    def knobs(r: dict[str, Any]) -> dict[str, Any]:
        return {**json.loads(r["sde_params"]), "parameterization": r["parameterization"], "lr": r["lr"],
                "ema_decay": r["ema_decay"]}

    rows = [r for r in rows if r["objective"] is not None]
    types = list(dict.fromkeys(r["sde"] for r in rows))
    panels: list[tuple[str, str | None]] = [("", None)]  # first: all trials by SDE type
    for ty in types:
        mine = [knobs(r) for r in rows if r["sde"] == ty]
        keys = dict.fromkeys(k for m in mine for k in m)
        panels += [(ty, k) for k in keys if len({json.dumps(m.get(k)) for m in mine}) > 1]
    ncols = min(3, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 3.0 * nrows), squeeze=False, sharey=True)
    for ax, (ty, key) in zip(axes.flat, panels):
        mine = rows if key is None else [r for r in rows if r["sde"] == ty]
        for r in mine:
            x = types.index(r["sde"]) if key is None else knobs(r).get(key)
            x = x if isinstance(x, (int, float)) else str(x)
            se = r.get("objective_se")
            if se is not None and se > 0:  # the measured noise: trials closer than it are not ordered
                ax.errorbar([x], [r["objective"]], yerr=[se], fmt="none", ecolor="tab:blue", elinewidth=1,
                            capsize=2, alpha=0.6)
            ax.scatter([x], [r["objective"]], s=40,
                       facecolors="tab:blue" if r["status"] == "finished" else "none", edgecolors="tab:blue")
        if key is None:
            ax.set_xticks(range(len(types)), types)
            ax.set_xlim(-0.5, len(types) - 0.5)
            ax.set_title("all trials, by SDE", fontsize=9)
            ax.legend(handles=[Line2D([], [], marker="o", ls="", color="tab:blue", label="ran to the end"),
                               Line2D([], [], marker="o", ls="", mfc="none", color="tab:blue",
                                      label="stopped early (ASHA)")], fontsize=7)
        else:
            values = [knobs(r).get(key) for r in mine]
            if key in ("lr", "sigma_min", "sigma_max", "beta_min", "beta_max") and \
                    all(isinstance(v, (int, float)) and v > 0 for v in values):
                ax.set_xscale("log")
            ax.set_title(ty, fontsize=9)
            ax.set_xlabel(key)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for row in axes:
        row[0].set_ylabel(f"{metric} (lower is better)")
    objectives = [r["objective"] for r in rows]
    if objectives and min(objectives) > 0 and max(objectives) > 20 * min(objectives):
        axes[0][0].set_yscale("log")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)
    return path
