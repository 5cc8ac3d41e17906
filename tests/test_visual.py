"""Sample grids (scorelab.visual): the PNG is torchvision's save_image pixel for pixel, without its import."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from scorelab.visual import save_image_grid


@pytest.mark.parametrize("shape, nrow", [((10, 1, 8, 8), 8), ((6, 3, 32, 32), 4), ((2, 1, 40, 40), 8)])
def test_grid_equals_torchvision_save_image(tmp_path, shape, nrow):
    from torchvision.utils import save_image

    x = torch.rand(shape, generator=torch.Generator().manual_seed(0)) * 2.4 - 1.2  # beyond [-1, 1]: clamped
    ours = save_image_grid(x, tmp_path / "ours.png", nrow=nrow)
    big = torch.nn.functional.interpolate(x, scale_factor=-(-32 // shape[-1]), mode="nearest") if shape[-1] < 32 else x
    save_image((big.clamp(-1, 1) + 1) / 2, tmp_path / "ref.png", nrow=nrow, padding=2, pad_value=1.0)
    np.testing.assert_array_equal(np.asarray(Image.open(ours)), np.asarray(Image.open(tmp_path / "ref.png")))


def test_saving_a_grid_does_not_import_torchvision(tmp_path):
    code = ("import sys, torch; from pathlib import Path; from scorelab.visual import save_image_grid; "
            f"save_image_grid(torch.zeros(4, 1, 8, 8), Path({str(tmp_path / 'g.png')!r})); "
            "print('torchvision' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
