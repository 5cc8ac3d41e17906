"""The one adaptor from a network's raw output to a score: ScoreModel(x, t) -> grad_x log p_t(x).

A network is called as `net(x_in, noise_cond)` with noise_cond of shape (B,). What it is trained to
output depends on `kind`; with x_t = alpha x_0 + std z:

- "eps":   the noise, E[z | x_t].  Input (x_t, sde.conditioning(t)).  score = -out / std.
- "score": the score itself.  Input (x_t, sde.conditioning(t)).  score = out, or out / std with
           scale_by_sigma (NCSN's trick: the network outputs std * score, which is O(1) at every level).
- "edm":   Karras et al. 2022's preconditioned denoiser, written in the scaled coordinates
           x_hat = x_t / alpha = x_0 + sigma_hat z with sigma_hat = std / alpha, where every SDE of the
           family looks like VE (Table 1, "EDM" column; sd = sigma_data):
               c_skip = sd^2 / (sigma_hat^2 + sd^2)      c_out   = sigma_hat sd / sqrt(sigma_hat^2 + sd^2)
               c_in   = 1 / sqrt(sigma_hat^2 + sd^2)     c_noise = ln(sigma_hat) / 4
               D(x_hat) = c_skip x_hat + c_out net(c_in x_hat, c_noise)  ~  E[x_0 | x_t]
           and the score follows from Tweedie's formula E[x_0 | x_t] = (x_t + std^2 score) / alpha:
               score = (alpha D - x_t) / std^2.

Everything downstream (losses, samplers, likelihood) sees only `score(x, t)`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .sde import SDE, batch_times, bcast

KINDS = ("eps", "score", "edm")


class ScoreModel(nn.Module):
    """A network wrapped as the score of the perturbed data under `sde`.

    net: the network, called as net(x_in, noise_cond) with noise_cond of shape (B,).
    sde: the forward SDE whose marginals the network models.
    kind: what the network outputs: "eps" | "score" | "edm" (see the module docstring).
    scale_by_sigma: only for kind "score": divide the output by std(t).
    sigma_data: only for kind "edm": the data's standard deviation in EDM's preconditioning.
    """

    def __init__(
        self,
        net: nn.Module,
        sde: SDE,
        kind: str = "eps",
        *,
        scale_by_sigma: bool = False,
        sigma_data: float = 0.5,
    ):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown parameterization kind {kind!r}; valid: {', '.join(KINDS)}")
        # Options that would be ignored are refused, so that a config mistake does not pass silently.
        if scale_by_sigma and kind != "score":
            raise ValueError(f"scale_by_sigma applies only to kind 'score', not {kind!r}")
        if not sigma_data > 0:
            raise ValueError(f"sigma_data must be positive, got {sigma_data}")
        self.net, self.sde, self.kind = net, sde, kind
        self.scale_by_sigma = bool(scale_by_sigma)
        self.sigma_data = float(sigma_data)

    def _score_and_denoised(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor | None]:
        """(score, D) where D is the network's own E[x_0 | x_t] when it has one (kind "edm")."""
        t = batch_times(t, x)
        alpha, std = self.sde.alpha_std(t)
        if self.kind == "edm":
            sigma = std / alpha  # sigma_hat: the noise level in x_hat = x / alpha coordinates
            sd2 = self.sigma_data**2
            norm = torch.sqrt(sigma**2 + sd2)
            c_skip, c_out, c_in = sd2 / norm**2, sigma * self.sigma_data / norm, 1.0 / norm
            c_noise = torch.log(sigma) / 4
            x_hat = x / bcast(alpha, x)
            denoised = bcast(c_skip, x) * x_hat + bcast(c_out, x) * self.net(bcast(c_in, x) * x_hat, c_noise)
            return (bcast(alpha, x) * denoised - x) / bcast(std**2, x), denoised
        out = self.net(x, self.sde.conditioning(t))
        if self.kind == "eps":
            return -out / bcast(std, x), None
        return (out / bcast(std, x) if self.scale_by_sigma else out), None

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """The score grad_x log p_t(x); x (B, ...), t (B,) or a scalar."""
        return self._score_and_denoised(x, t)[0]

    def denoise(self, x: Tensor, t: Tensor) -> Tensor:
        """Tweedie's estimate E[x_0 | x_t] = (x + std^2 score) / alpha."""
        score, denoised = self._score_and_denoised(x, t)
        if denoised is not None:  # EDM's D is this estimate already; skip the round trip through the score
            return denoised
        alpha, std = self.sde.alpha_std(batch_times(t, x))
        return (x + bcast(std**2, x) * score) / bcast(alpha, x)
