"""Score networks: an MLP for 2-D toy data and a DDPM++/NCSN++-style U-Net for images.

Every network is called as `net(x, noise_cond)` with x (B, ...) and noise_cond (B,), and returns a
tensor shaped like x. What noise_cond holds is the SDE's business (`sde.conditioning(t)`, or EDM's
c_noise); the net only embeds it:

- "sinusoidal" (Ho et al. 2020; transformer positions): made for VP-style inputs, 999 t or the DDPM
  step index 0..N-1, whose useful resolution is about one unit over a range of a thousand.
- "fourier" (random Fourier features, Song et al. 2021's NCSN++): made for log sigma (VE) and
  EDM's ln(sigma_hat) / 4, small real numbers where scale 16 frequencies resolve fine differences.

Either works for any input; the two differ in which scales of noise_cond they resolve.

    net = build_net(UNetConfig(channels=64), data_shape=(1, 16, 16))
    out = net(x, sde.conditioning(t))          # same shape as x

The last layer of every net is initialised to zero, so a fresh net outputs 0: the eps and EDM
parameterisations then start from "no noise predicted" / "D(x) = c_skip x", a stable first step.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Literal, Sequence, Union

import torch
import torch.nn.functional as F
from pydantic import Field, TypeAdapter
from torch import Tensor, nn

from .schema import StrictModel as _Model  # not via .config, which imports this module

EMBEDDINGS = ("sinusoidal", "fourier")


# ---------------------------------------------------------------------------------------------
# Noise-level embeddings


class SinusoidalEmbedding(nn.Module):
    """(B,) -> (B, dim): [cos(c f_k), sin(c f_k)] with f_k = max_period^(-k / (dim/2)), k < dim/2."""

    def __init__(self, dim: int, max_period: float = 10000.0):
        super().__init__()
        if dim < 2 or dim % 2:
            raise ValueError(f"embedding dim must be even and >= 2, got {dim}")
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
        # A buffer so that .to(device/dtype) moves it; not persistent: it is a function of (dim, max_period).
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, noise_cond: Tensor) -> Tensor:
        args = noise_cond.to(self.freqs.dtype)[:, None] * self.freqs[None, :]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class GaussianFourierEmbedding(nn.Module):
    """(B,) -> (B, dim): [sin(2 pi c w_k), cos(2 pi c w_k)] with fixed w_k ~ N(0, scale^2)."""

    def __init__(self, dim: int, scale: float = 16.0):
        super().__init__()
        if dim < 2 or dim % 2:
            raise ValueError(f"embedding dim must be even and >= 2, got {dim}")
        # Random but fixed: a buffer, not a parameter, and persistent, because a trained net depends on
        # exactly these frequencies and a fresh draw on load would silently break it.
        self.register_buffer("weight", torch.randn(dim // 2) * scale)

    def forward(self, noise_cond: Tensor) -> Tensor:
        args = 2 * math.pi * noise_cond.to(self.weight.dtype)[:, None] * self.weight[None, :]
        return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


class NoiseEmbedding(nn.Module):
    """The fixed embedding of noise_cond followed by a 2-layer SiLU MLP: (B,) -> (B, out_dim)."""

    def __init__(self, embedding: str, base_dim: int, out_dim: int):
        super().__init__()
        if embedding == "sinusoidal":
            self.embed: nn.Module = SinusoidalEmbedding(base_dim)
        elif embedding == "fourier":
            self.embed = GaussianFourierEmbedding(base_dim)
        else:
            raise ValueError(f"embedding must be one of {EMBEDDINGS}, got {embedding!r}")
        self.mlp = nn.Sequential(nn.Linear(base_dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))

    def forward(self, noise_cond: Tensor) -> Tensor:
        return self.mlp(self.embed(noise_cond))


def _noise_cond(noise_cond: Tensor, x: Tensor) -> Tensor:
    """noise_cond as (B,) on x's device; a scalar is broadcast to the batch."""
    noise_cond = torch.as_tensor(noise_cond, device=x.device)
    if noise_cond.ndim == 0:
        noise_cond = noise_cond.expand(x.shape[0])
    if noise_cond.shape != (x.shape[0],):
        raise ValueError(f"noise_cond must have shape ({x.shape[0]},), got {tuple(noise_cond.shape)}")
    return noise_cond


# ---------------------------------------------------------------------------------------------
# MLP for 2-D data


class MLPScoreNet(nn.Module):
    """x (B, dim), noise_cond (B,) -> (B, dim).

    `layers` hidden SiLU layers of width `hidden`; each adds its own projection of the noise
    embedding before the activation, so every layer can change its behaviour with the noise level.
    """

    def __init__(
        self,
        dim: int = 2,  # data dimension
        hidden: int = 256,  # width of each hidden layer
        layers: int = 4,  # number of hidden layers
        emb_dim: int = 128,  # width of the noise embedding (fixed features and the MLP after them)
        embedding: str = "sinusoidal",  # "sinusoidal" | "fourier"
    ):
        super().__init__()
        for name, value in (("dim", dim), ("hidden", hidden), ("layers", layers)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.embed = NoiseEmbedding(embedding, emb_dim, emb_dim)
        widths = [dim] + [hidden] * layers
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.cond = nn.ModuleList(nn.Linear(emb_dim, hidden) for _ in range(layers))
        self.out = nn.Linear(hidden, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor, noise_cond: Tensor) -> Tensor:
        emb = F.silu(self.embed(_noise_cond(noise_cond, x)))
        h = x
        for linear, cond in zip(self.linears, self.cond):
            h = F.silu(linear(h) + cond(emb))
        return self.out(h)


# ---------------------------------------------------------------------------------------------
# U-Net blocks


def _groups(channels: int) -> int:
    """GroupNorm groups: min(32, channels // 4), lowered until it divides channels."""
    g = max(1, min(32, channels // 4))
    while channels % g:
        g -= 1
    return g


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(_groups(channels), channels, eps=1e-6)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, + embedding per channel, GroupNorm-SiLU-dropout-conv, plus a skip."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float, skip_rescale: bool):
        super().__init__()
        self.norm1 = _norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, out_ch)
        self.norm2 = _norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        # 1/sqrt(2) keeps the variance of skip + residual from doubling at every block (DDPM++).
        self.out_scale = 1 / math.sqrt(2) if skip_rescale else 1.0

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb_proj(emb)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (self.skip(x) + h) * self.out_scale


class AttnBlock(nn.Module):
    """Multi-head self-attention over the H*W positions, as a residual block."""

    def __init__(self, channels: int, num_heads: int, skip_rescale: bool):
        super().__init__()
        if num_heads < 1 or channels % num_heads:
            raise ValueError(f"num_heads ({num_heads}) must divide the attention block's channels ({channels})")
        self.num_heads = num_heads
        self.norm = _norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        self.out_scale = 1 / math.sqrt(2) if skip_rescale else 1.0

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        b, c, hgt, wid = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, hgt * wid)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # each (B, heads, HW, C / heads)
        h = F.scaled_dot_product_attention(q, k, v)
        h = h.transpose(-1, -2).reshape(b, c, hgt, wid)
        return (x + self.proj(h)) * self.out_scale


class Downsample(nn.Module):
    """Stride-2 3x3 conv: halves H and W (both even by construction)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv (no checkerboard artefacts of transposed convs)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Stage(nn.Module):
    """A residual block, followed by self-attention at the resolutions that have it."""

    def __init__(self, res: ResBlock, attn: AttnBlock | None):
        super().__init__()
        self.res = res
        self.attn = attn if attn is not None else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        return self.attn(self.res(x, emb))


def unet_resolutions(image_size: int, channel_mult: Sequence[int]) -> list[int]:
    """The feature-map sizes of the U-Net's levels; ValueError if image_size does not halve evenly."""
    levels = len(channel_mult)
    if levels < 1:
        raise ValueError("channel_mult must have at least one entry")
    factor = 2 ** (levels - 1)
    if image_size < 1 or image_size % factor:
        raise ValueError(
            f"image_size {image_size} is not divisible by 2^(len(channel_mult) - 1) = {factor} "
            f"(channel_mult {tuple(channel_mult)} has {levels} levels, each but the last halving the size); "
            f"use fewer channel_mult entries or another image size"
        )
    return [image_size // 2**i for i in range(levels)]


class UNet(nn.Module):
    """x (B, C, H, W), noise_cond (B,) -> (B, C, H, W); H = W = image_size.

    DDPM++ layout: conv in; per level num_res_blocks residual blocks (with attention at
    attn_resolutions), then a stride-2 downsample except at the last level; a middle res-attn-res;
    the mirror image upwards with one extra block per level, each block taking the matching encoder
    activation concatenated on its input; GroupNorm-SiLU-conv out, zero-initialised.
    """

    def __init__(
        self,
        in_channels: int = 1,  # image channels; the output has as many
        channels: int = 64,  # base width; level i has channels * channel_mult[i]
        channel_mult: Sequence[int] = (1, 2, 2),  # one entry per resolution level
        num_res_blocks: int = 2,  # residual blocks per level in the encoder (decoder: one more)
        attn_resolutions: Sequence[int] = (8,),  # feature-map sizes that get self-attention
        dropout: float = 0.1,  # in every residual block, before its second conv
        image_size: int = 16,  # H = W of the input
        embedding: str = "sinusoidal",  # "sinusoidal" | "fourier": how noise_cond is embedded
        emb_dim: int | None = None,  # width of the noise embedding; default 4 * channels
        resblock_skip_rescale: bool = True,  # scale skip + residual sums by 1/sqrt(2)
        num_heads: int = 1,  # attention heads; must divide the channels where attention sits
    ):
        super().__init__()
        for name, value in (("in_channels", in_channels), ("channels", channels), ("num_res_blocks", num_res_blocks)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if any(m < 1 for m in channel_mult):
            raise ValueError(f"channel_mult entries must be >= 1, got {tuple(channel_mult)}")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        resolutions = unet_resolutions(image_size, channel_mult)
        missing = sorted(set(attn_resolutions) - set(resolutions), reverse=True)
        if missing:
            raise ValueError(
                f"attn_resolutions {missing} do not occur: with image_size {image_size} and channel_mult "
                f"{tuple(channel_mult)} the feature maps are {resolutions}"
            )
        emb_dim = 4 * channels if emb_dim is None else emb_dim
        self.image_size, self.in_channels = image_size, in_channels
        self.embed = NoiseEmbedding(embedding, channels if channels % 2 == 0 else channels + 1, emb_dim)

        def res(a: int, b: int) -> ResBlock:
            return ResBlock(a, b, emb_dim, dropout, resblock_skip_rescale)

        def stage(a: int, b: int, size: int) -> _Stage:
            attn = AttnBlock(b, num_heads, resblock_skip_rescale) if size in attn_resolutions else None
            return _Stage(res(a, b), attn)

        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)
        # Encoder: every module's output is kept as a skip for the decoder.
        self.down = nn.ModuleList()
        skips, cur = [channels], channels
        for level, (mult, size) in enumerate(zip(channel_mult, resolutions)):
            for _ in range(num_res_blocks):
                self.down.append(stage(cur, channels * mult, size))
                cur = channels * mult
                skips.append(cur)
            if level < len(channel_mult) - 1:
                self.down.append(Downsample(cur))
                skips.append(cur)

        self.mid = nn.ModuleList([res(cur, cur), AttnBlock(cur, num_heads, resblock_skip_rescale), res(cur, cur)])

        # Decoder: every stage consumes one skip, so each level has num_res_blocks + 1 stages.
        self.up = nn.ModuleList()
        for level in reversed(range(len(channel_mult))):
            for _ in range(num_res_blocks + 1):
                self.up.append(stage(cur + skips.pop(), channels * channel_mult[level], resolutions[level]))
                cur = channels * channel_mult[level]
            if level > 0:
                self.up.append(Upsample(cur))
        assert not skips  # every encoder activation is used exactly once

        self.norm_out = _norm(cur)
        self.conv_out = nn.Conv2d(cur, in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: Tensor, noise_cond: Tensor) -> Tensor:
        if x.shape[1:] != (self.in_channels, self.image_size, self.image_size):
            raise ValueError(
                f"UNet built for ({self.in_channels}, {self.image_size}, {self.image_size}) inputs, "
                f"got {tuple(x.shape[1:])}"
            )
        emb = F.silu(self.embed(_noise_cond(noise_cond, x)))  # SiLU once here, not in every block
        h = self.conv_in(x)
        hs = [h]
        for module in self.down:
            h = module(h, emb)
            hs.append(h)
        h = self.mid[0](h, emb)
        h = self.mid[1](h)
        h = self.mid[2](h, emb)
        for module in self.up:
            if isinstance(module, Upsample):
                h = module(h)
            else:
                h = module(torch.cat([h, hs.pop()], dim=1), emb)
        return self.conv_out(F.silu(self.norm_out(h)))


def count_parameters(net: nn.Module) -> int:
    """Number of trainable scalars (buffers such as the Fourier frequencies are not counted)."""
    return sum(p.numel() for p in net.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------------------------
# Config


Embedding = Literal["sinusoidal", "fourier"]
_EvenDim = Annotated[int, Field(ge=2, multiple_of=2)]


class MLPNetConfig(_Model):
    type: Literal["mlp"] = "mlp"
    hidden: int = Field(256, ge=1)
    layers: int = Field(4, ge=1)
    emb_dim: _EvenDim = 128
    embedding: Embedding = "sinusoidal"


class UNetConfig(_Model):
    type: Literal["unet"] = "unet"
    channels: int = Field(64, ge=1)
    channel_mult: Annotated[tuple[Annotated[int, Field(ge=1)], ...], Field(min_length=1)] = (1, 2, 2)
    num_res_blocks: int = Field(2, ge=1)
    attn_resolutions: tuple[Annotated[int, Field(ge=1)], ...] = (8,)  # checked against the data in build_net
    dropout: float = Field(0.1, ge=0, lt=1)
    embedding: Embedding = "sinusoidal"
    emb_dim: Annotated[int, Field(ge=1)] | None = None  # None: 4 * channels
    resblock_skip_rescale: bool = True
    num_heads: int = Field(1, ge=1)


NetConfig = Annotated[Union[MLPNetConfig, UNetConfig], Field(discriminator="type")]


def net_config(data: dict) -> NetConfig:
    """A validated NetConfig from params-style data, e.g. {"type": "unet"} for the U-Net's defaults."""
    return TypeAdapter(NetConfig).validate_python(data)


def build_net(cfg: NetConfig, data_shape: tuple[int, ...]) -> nn.Module:
    """The network `cfg` describes, for data of shape data_shape: (dim,) or (C, H, W) with H == W."""
    shape = tuple(int(s) for s in data_shape)
    options = cfg.model_dump(exclude={"type"})
    if isinstance(cfg, MLPNetConfig):
        if len(shape) != 1:
            raise ValueError(f"net.type 'mlp' needs 1-D data (dim,), got data_shape {shape}; use 'unet' for images")
        return MLPScoreNet(dim=shape[0], **options)
    if isinstance(cfg, UNetConfig):
        if len(shape) != 3:
            raise ValueError(f"net.type 'unet' needs image data (C, H, W), got data_shape {shape}; use 'mlp'")
        c, h, w = shape
        if h != w:
            raise ValueError(f"net.type 'unet' needs square images (H == W), got data_shape {shape}")
        return UNet(in_channels=c, image_size=h, **options)
    raise TypeError(f"build_net needs an MLPNetConfig or UNetConfig, got {type(cfg).__name__}")


def state_dict_mismatch(error: BaseException) -> str:
    """load_state_dict's long message in one line, for errors about weights that do not fit a network: counts
    and the first few names."""
    if not isinstance(error, RuntimeError):
        return f"{type(error).__name__}: {error}"
    text = str(error)
    parts = []
    for label, pattern in (("missing", r"Missing key\(s\) in state_dict: (.*)"),
                           ("unexpected", r"Unexpected key\(s\) in state_dict: (.*)")):
        if m := re.search(pattern, text):
            keys = re.findall(r'"([^"]+)"', m[1])
            parts.append(f"{len(keys)} {label} key(s) ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})")
    sizes = re.findall(r"size mismatch for ([^:]+): copying a param with shape torch\.Size\((\[[^\]]*\])\) from "
                       r"checkpoint, the shape in current model is torch\.Size\((\[[^\]]*\])\)", text)
    if sizes:
        name, found, want = sizes[0]
        parts.append(f"{len(sizes)} shape mismatch(es) ({name}: file {found}, network {want}"
                     f"{', ...' if len(sizes) > 1 else ''})")
    return "; ".join(parts) or " ".join(text.split())[:200]
