"""Exponential moving average of a model's weights, the network that score models sample with.

Built on torch.optim.swa_utils.AveragedModel. Starting from the model's weights at construction,
update n (n = 0, 1, ... counts the updates made before it) does

    ema <- decay_n ema + (1 - decay_n) model,     decay_n = min(decay, (1 + n) / (10 + n))

The warm-up (decay_0 = 0.1, decay_1 = 0.18, ...) keeps the average from being dominated by the
random initial weights early in training, as in TensorFlow's ExponentialMovingAverage with
num_updates; warmup=False uses decay throughout.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel


class EMA(AveragedModel):
    """EMA of `model`'s parameters and floating-point buffers; `.module` is the averaged network.

    model: the network being trained (copied here; it is not modified).
    decay: the asymptotic decay, in [0, 1).
    warmup: use decay_n = min(decay, (1 + n) / (10 + n)) instead of the constant decay.

    state_dict / load_state_dict carry the averaged weights and the update count (AveragedModel's
    `n_averaged` buffer); decay and warmup are constructor arguments.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay, self.warmup = float(decay), bool(warmup)
        # use_buffers: BatchNorm-style running statistics follow the same average as the weights.
        super().__init__(model, multi_avg_fn=self._average, use_buffers=True)
        self.module.requires_grad_(False)
        # AveragedModel's first update copies the model; doing it here makes the construction-time
        # weights the start of the average, so n_averaged = 1 + the number of updates.
        self.update_parameters(model)

    @property
    def num_updates(self) -> int:
        return int(self.n_averaged) - 1

    def update(self, model: nn.Module) -> None:
        """Fold the model's current weights into the average."""
        self.update_parameters(model)

    def decay_at(self, n: Tensor | int) -> Tensor:
        """decay_n for the update made after n earlier updates."""
        n = torch.as_tensor(n, dtype=torch.float64)
        if not self.warmup:
            return torch.full_like(n, self.decay)
        return torch.clamp((1 + n) / (10 + n), max=self.decay)

    @torch.no_grad()
    def _average(self, ema: list[Tensor], current: list[Tensor], n_averaged: Tensor) -> None:
        # Tensor arithmetic keeps the count on its device: no host sync per training step.
        decay = self.decay_at(n_averaged - 1)
        if torch.is_floating_point(ema[0]) or torch.is_complex(ema[0]):
            weight = (1 - decay).to(ema[0].dtype)
            for e, c in zip(ema, current, strict=True):
                e.lerp_(c, weight)
        else:  # integer buffers (e.g. BatchNorm's num_batches_tracked) are counters: copy, don't average
            for e, c in zip(ema, current, strict=True):
                e.copy_(c)
