"""Exponential moving average of a model's weights, the network that score models sample with.

Built on torch.optim.swa_utils.AveragedModel. Starting from the model's weights at construction,
update n (n = 0, 1, ... counts the updates made before it) does

    ema <- decay_n ema + (1 - decay_n) model,     decay_n = min(decay, (1 + n) / (10 + n))

The warm-up (decay_0 = 0.1, decay_1 = 0.18, ...) keeps the average from being dominated by the
random initial weights early in training, as in TensorFlow's ExponentialMovingAverage with
num_updates; warmup=False uses decay throughout.
"""

from __future__ import annotations

import itertools
import math

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

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the model's current weights into the average.

        The same update as AveragedModel.update_parameters, without its per-step walk over the modules
        and per-tensor detach/regrouping (0.4 ms a step on the CPU for the digits U-Net, 1% of a
        training step: bench/overheads.py). The tensor lists are built once per model; they hold the
        Parameter objects themselves, which optimizers, load_state_dict and .to() update in place.
        """
        if getattr(self, "_lists", (None,))[0] is not model:
            ours = list(itertools.chain(self.module.parameters(), self.module.buffers()))
            theirs = list(itertools.chain(model.parameters(), model.buffers()))
            if len(ours) != len(theirs):
                raise ValueError(f"EMA of a network with {len(ours)} tensors cannot follow one with {len(theirs)}")
            floating = [torch.is_floating_point(e) or torch.is_complex(e) for e in ours]
            self._lists = (model, [e for e, f in zip(ours, floating) if f], [c for c, f in zip(theirs, floating) if f],
                           [e for e, f in zip(ours, floating) if not f], [c for c, f in zip(theirs, floating) if not f])
        _, ema_float, model_float, ema_counters, model_counters = self._lists
        # the count as a Python int, read from the buffer once after construction or a load: the decay is
        # then computed on the host, and a GPU step does not wait for its queue to read the buffer back
        if getattr(self, "_count", None) is None:
            self._count = int(self.n_averaged)
        self._average(ema_float, model_float, self._count)
        for e, c in zip(ema_counters, model_counters):
            e.copy_(c)
        self.n_averaged += 1
        self._count += 1

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        self._count = None  # n_averaged comes from the state: read it again at the next update
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def decay_at(self, n: Tensor | int) -> Tensor:
        """decay_n for the update made after n earlier updates."""
        n = torch.as_tensor(n, dtype=torch.float64)
        if not self.warmup:
            return torch.full_like(n, self.decay)
        return torch.clamp((1 + n) / (10 + n), max=self.decay)

    @torch.no_grad()
    def _average(self, ema: list[Tensor], current: list[Tensor], n_averaged: Tensor | int) -> None:
        decay = self.decay_at(n_averaged - 1)
        if not ema:
            return
        if torch.is_floating_point(ema[0]) or torch.is_complex(ema[0]):
            # One foreach call over all tensors, as torch's own get_ema_multi_avg_fn does: a Python loop of
            # per-tensor lerp_ cost 0.6 ms a step on the CPU against 0.1 ms (bench/overheads.py). The
            # weight must be a Python number: update() passes the count as an int, so that costs no host sync.
            torch._foreach_lerp_(ema, current, float(1 - decay))
        else:  # integer buffers (e.g. BatchNorm's num_batches_tracked) are counters: copy, don't average
            for e, c in zip(ema, current, strict=True):
                e.copy_(c)


# ---------------------------------------------------------------------------------------------
# Power-function EMA profiles (Karras et al. 2024)

MAX_SIGMA_REL = math.sqrt(1 / 12)  # the profile's relative std at gamma = 0 (a uniform average): the largest


def sigma_rel_of(gamma: float) -> float:
    """The relative standard deviation of the power profile p(t) ~ t^gamma on [0, 1]:
    sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3)) (Karras et al. 2024, eq. 3)."""
    if gamma <= 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def gamma_of(sigma_rel: float) -> float:
    """The exponent gamma > 0 whose power profile has relative standard deviation sigma_rel, in
    (0, sqrt(1/12)). sigma_rel_of decreases from sqrt(1/12) at gamma = 0 towards 0, so bisection on a
    bracket grown until it holds the root finds it to float64's resolution."""
    if not 0.0 < sigma_rel < MAX_SIGMA_REL:
        raise ValueError(f"sigma_rel must be in (0, sqrt(1/12) = {MAX_SIGMA_REL:.4f}), got {sigma_rel}")
    lo, hi = 0.0, 1.0
    while sigma_rel_of(hi) > sigma_rel:
        lo, hi = hi, 2 * hi
    for _ in range(200):  # halves the bracket to adjacent floats long before 200
        mid = (lo + hi) / 2
        if mid in (lo, hi):
            break
        if sigma_rel_of(mid) > sigma_rel:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


class PowerEMA(EMA):
    """The power-function EMA of Karras et al. 2024, "Analyzing and Improving the Training Dynamics of
    Diffusion Models" (arXiv 2312.02696, sec. 3.1): after t updates with weights theta_1..theta_t the
    average is

        sum_tau tau^gamma theta_tau / sum_tau tau^gamma,

    whose width grows with training: a fixed fraction of it (sigma_rel, its relative std) instead of the fixed
    number of steps (1 / (1 - decay)) of a classic EMA. The construction-time weights get no weight.

    Incrementally ema_t = beta_t ema_{t-1} + (1 - beta_t) theta_t with beta_t = S_{t-1} / S_t,
    S_t = sum_{tau <= t} tau^gamma. The paper's beta_t = (1 - 1/t)^(gamma + 1) approximates this ratio (it
    weighs update tau by tau^(gamma+1) - (tau-1)^(gamma+1), proportional to tau^gamma only for large tau); the
    exact ratio costs one multiply-add a step: with r_t = S_t / t^gamma, r_t = r_{t-1} ((t-1)/t)^gamma + 1 and
    beta_t = 1 - 1/r_t, numbers of order t / (gamma + 1) that never overflow.

    sigma_rel: in (0, sqrt(1/12)); gamma = gamma_of(sigma_rel). The update, state_dict and load_state_dict are
    EMA's: the state is the averaged weights and the update count, from which r_t is recomputed, by the same
    operations in the same order, so a resumed average continues exactly.
    """

    def __init__(self, model: nn.Module, sigma_rel: float):
        self.sigma_rel, self.gamma = float(sigma_rel), gamma_of(sigma_rel)
        self._ratio = (0, 0.0)  # (t, r_t): r_0 = 0 (S_0 = 0)
        super().__init__(model, decay=0.0, warmup=False)

    def _ratio_at(self, t: int) -> float:
        """r_t = S_t / t^gamma, advanced from the cached one (or from r_0 = 0 after a load or a jump back)."""
        done, r = self._ratio if self._ratio[0] <= t else (0, 0.0)
        for tau in range(done + 1, t + 1):
            r = r * ((tau - 1) / tau) ** self.gamma + 1.0
        self._ratio = (t, r)
        return r

    def decay_at(self, n: Tensor | int) -> Tensor:
        """beta for the update made after n earlier updates: that is update t = n + 1."""
        return torch.as_tensor(1.0 - 1.0 / self._ratio_at(int(n) + 1), dtype=torch.float64)

