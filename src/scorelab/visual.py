"""Pictures people would rather look at than read: sample grids for images, scatter plots for 2-D data."""

from __future__ import annotations

from pathlib import Path

import torch

from .config import VariantConfig
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
    n = n or (64 if len(data_shape) == 3 else 2000)
    x = sample(model, model.sde, (n, *data_shape), method=method, steps=steps, seed=seed, device=device,
               **options).x.cpu()
    model.train(was_training)
    title = f"{method} ({steps if steps is not None else 'adaptive'} steps)"
    return save_image_grid(x, path, title) if len(data_shape) == 3 else save_scatter(x, path, title)


GRID_MIN_SIDE = 32  # pixels per image in a saved grid: smaller images (8x8 digits) are enlarged


def save_image_grid(x: torch.Tensor, path: Path, title: str = "", nrow: int = 8) -> Path:
    """x in model space [-1, 1], (N, C, H, W). Images under GRID_MIN_SIDE pixels are enlarged by an
    integer factor with nearest-neighbour (every pixel stays a visible square, nothing is invented)."""
    from torchvision.utils import save_image

    path.parent.mkdir(parents=True, exist_ok=True)
    factor = -(-GRID_MIN_SIDE // x.shape[-1])
    if factor > 1:
        x = torch.nn.functional.interpolate(x.float(), scale_factor=factor, mode="nearest")
    save_image(((x.clamp(-1, 1) + 1) / 2), path, nrow=nrow, padding=2, pad_value=1.0)
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
