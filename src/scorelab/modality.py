"""What kind of data a dataset holds, decided once: images (C, H, W) or points (D,).

    modality = modality_of(manifest.shape)    # or manifest.modality
    modality.primary_metric                   # "domain_fd" | "sliced_w2"
    modality.to_stored(x) / from_stored(v)    # model space <-> what sample chunks hold
    modality.preview                          # the picture of a few samples: "grid" | "scatter" (scorelab.visual)

Everything that differs between the two (the metric a variant is ranked by, the default network, how
samples are stored, the likelihood's units, the picture) is answered here, so that the stages ask
instead of testing shapes themselves.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PRIMARY_METRICS = ("domain_fd", "sliced_w2")  # every modality's primary metric: lower is better for each


@dataclass(frozen=True)
class Modality:
    name: str  # "images" | "points"
    primary_metric: str  # what variants and sweep trials are ranked by (lower is better)
    likelihood: str  # the evaluation's likelihood entry: "bits_per_dim" | "test_loglik"
    layout: str  # how sample chunks store x: "NHWC" uint8 pixels | "ND" float32 coordinates
    value_range: tuple[float, float] | None  # of model-space samples, when bounded
    preview: str  # the picture of samples that scorelab.visual.save_preview draws: "grid" | "scatter"
    preview_count: int  # samples in a quick preview: a grid of 64 images, or a scatter of 2000 points
    default_net: str  # the `net.type` a variant gets when params name none: "unet" | "mlp" (scorelab.nets)

    @property
    def is_image(self) -> bool:
        return self.name == "images"

    def stored_layout(self, data_shape: tuple[int, ...]) -> tuple[tuple[int, ...], np.dtype]:
        """(per-sample stored shape, dtype) of a sample chunk's x for data of `data_shape`."""
        if self.is_image:
            c, h, w = data_shape
            return (h, w, c), np.dtype(np.uint8)
        return tuple(data_shape), np.dtype(np.float32)

    def to_stored(self, x: np.ndarray) -> np.ndarray:
        """Model-space samples -> what a chunk stores: images (N, C, H, W) in [-1, 1] -> uint8 (N, H, W, C),
        v = round((x + 1) / 2 * 255) clipped to 0..255; points unchanged, as float32."""
        if not self.is_image:
            return x.astype(np.float32)
        v = np.clip(np.rint((x.astype(np.float64) + 1) / 2 * 255), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(v.transpose(0, 2, 3, 1))

    def from_stored(self, v: np.ndarray) -> np.ndarray:
        """A chunk's x -> float32 model space: uint8 (N, H, W, C) -> (N, C, H, W) in [-1, 1]."""
        if not self.is_image:
            return v
        return v.transpose(0, 3, 1, 2).astype(np.float32) / 255 * 2 - 1


IMAGES = Modality("images", primary_metric="domain_fd", likelihood="bits_per_dim", layout="NHWC",
                  value_range=(-1, 1), preview="grid", preview_count=64, default_net="unet")
POINTS = Modality("points", primary_metric="sliced_w2", likelihood="test_loglik", layout="ND", value_range=None,
                  preview="scatter", preview_count=2000, default_net="mlp")


def modality_of(data_shape: tuple[int, ...] | list[int]) -> Modality:
    """Images are (C, H, W); everything else is a vector of coordinates."""
    return IMAGES if len(data_shape) == 3 else POINTS


def quantize(x: np.ndarray) -> np.ndarray:
    """Model-space images (N, C, H, W) in [-1, 1] -> uint8 (N, H, W, C), as sample chunks store them."""
    return IMAGES.to_stored(x)


def dequantize(v: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, C) -> float32 (N, C, H, W) in [-1, 1]."""
    return IMAGES.from_stored(v)
