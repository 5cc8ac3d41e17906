"""Score networks: shapes, initialisation, conditioning, gradients, modes, configs, persistence.

Most tests use narrow U-Nets (channels 8-16, one res block per level) so the file runs in seconds;
the architecture is the same at any width.
"""

from __future__ import annotations

import io

import pytest
import torch
from pydantic import TypeAdapter
from torch import Tensor, nn

from scorelab.nets import (
    GaussianFourierEmbedding,
    MLPNetConfig,
    MLPScoreNet,
    NetConfig,
    SinusoidalEmbedding,
    UNet,
    UNetConfig,
    build_net,
    count_parameters,
)

EMBEDDINGS = ["sinusoidal", "fourier"]


def noise_cond(embedding: str, n: int, gen: torch.Generator | None = None) -> Tensor:
    """Conditioning values of the kind each embedding is meant for: 999 t (VP) or log sigma (VE)."""
    u = torch.rand(n, generator=gen)
    return 999.0 * u if embedding == "sinusoidal" else torch.log(0.01 + 50.0 * u)


def small_unet(size: int = 16, embedding: str = "sinusoidal", attn: tuple[int, ...] = (8,), **kw) -> UNet:
    kw = {"channels": 16, "channel_mult": (1, 2), "num_res_blocks": 1, "dropout": 0.0, **kw}
    return UNet(image_size=size, embedding=embedding, attn_resolutions=attn, **kw)


def adam_steps(net: nn.Module, x: Tensor, c: Tensor, target: Tensor, steps: int = 1, lr: float = 1e-3) -> float:
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss = (net(x, c) - target).pow(2).mean()
        loss.backward()
        opt.step()
    return loss.item()


# ---------------------------------------------------------------------------------------------
# Embeddings


def test_sinusoidal_embedding_values():
    emb = SinusoidalEmbedding(8)
    out = emb(torch.tensor([0.0, 3.0]))
    assert out.shape == (2, 8)
    assert torch.allclose(out[0], torch.tensor([1.0] * 4 + [0.0] * 4))  # cos 0 = 1, sin 0 = 0
    assert torch.isclose(out[1, 0], torch.cos(torch.tensor(3.0)))  # the first frequency is 1
    assert list(emb.state_dict()) == []  # a function of (dim, max_period): nothing to save


def test_fourier_buffer_is_saved_not_trained():
    emb = GaussianFourierEmbedding(16, scale=16)
    assert list(emb.parameters()) == []
    assert "weight" in emb.state_dict()
    net = small_unet(embedding="fourier")
    assert "embed.embed.weight" in net.state_dict()
    assert all("embed.embed" not in name for name, _ in net.named_parameters())


def test_embedding_dim_must_be_even():
    with pytest.raises(ValueError, match="even"):
        SinusoidalEmbedding(7)
    with pytest.raises(ValueError, match="even"):
        GaussianFourierEmbedding(7)


# ---------------------------------------------------------------------------------------------
# Shapes and initialisation


@pytest.mark.parametrize("embedding", EMBEDDINGS)
def test_mlp_shape_and_zero_init(embedding):
    net = MLPScoreNet(hidden=32, layers=3, emb_dim=16, embedding=embedding)
    x, c = torch.randn(5, 2), noise_cond(embedding, 5)
    out = net(x, c)
    assert out.shape == (5, 2)
    assert torch.equal(out, torch.zeros_like(out))
    adam_steps(net, x, c, torch.randn(5, 2))
    assert net(x, c).abs().max() > 0


# (image_size, channel_mult, attention at): three levels wherever the size halves twice; 28 -> 14 -> 7.
UNET_SHAPES = [
    (8, (1, 2, 2), (4,)),
    (16, (1, 2, 2), (8,)),
    (28, (1, 2, 2), (14,)),
    (32, (1, 2, 2), (16, 8)),
]


@pytest.mark.parametrize("embedding", EMBEDDINGS)
@pytest.mark.parametrize("with_attn", [True, False], ids=["attn", "no_attn"])
@pytest.mark.parametrize("size,mult,attn", UNET_SHAPES, ids=[str(s[0]) for s in UNET_SHAPES])
def test_unet_shapes_and_zero_init(size, mult, attn, with_attn, embedding):
    net = UNet(in_channels=3, channels=8, channel_mult=mult, num_res_blocks=1, dropout=0.0,
               attn_resolutions=attn if with_attn else (), image_size=size, embedding=embedding)
    assert any(name.endswith(".attn.qkv.weight") for name, _ in net.named_parameters()) == with_attn
    x, c = torch.randn(2, 3, size, size), noise_cond(embedding, 2)
    out = net(x, c)
    assert out.shape == x.shape
    assert torch.equal(out, torch.zeros_like(out))  # zero-initialised output conv
    adam_steps(net, x, c, torch.randn_like(x))
    assert net(x, c).abs().max() > 0


def test_unet_64_and_scalar_noise_cond():
    net = UNet(channels=8, channel_mult=(1, 2, 2, 2), num_res_blocks=1, attn_resolutions=(16,), image_size=64)
    x = torch.randn(1, 1, 64, 64)
    assert net(x, torch.tensor(5.0)).shape == x.shape  # a scalar noise level is broadcast to the batch
    with pytest.raises(ValueError, match="built for"):
        net(torch.randn(1, 1, 32, 32), torch.zeros(1))


# ---------------------------------------------------------------------------------------------
# The noise level is wired in


@pytest.mark.parametrize("embedding", EMBEDDINGS)
@pytest.mark.parametrize("kind", ["mlp", "unet"])
def test_output_depends_on_noise_cond(kind, embedding):
    torch.manual_seed(0)
    if kind == "mlp":
        net: nn.Module = MLPScoreNet(hidden=32, layers=2, emb_dim=16, embedding=embedding)
        x = torch.randn(8, 2)
    else:
        net = small_unet(size=8, embedding=embedding, attn=(4,))
        x = torch.randn(8, 1, 8, 8)
    c = noise_cond(embedding, 8)
    # Target depends on the noise level only; it can be fitted only through the embedding.
    target = torch.sin(c / c.abs().max() * 3).view(-1, *[1] * (x.ndim - 1)).expand_as(x)
    adam_steps(net, x, c, target, steps=5)
    same_x = x[:1].expand(2, *x.shape[1:])
    out = net(same_x, c[:2])
    assert (out[0] - out[1]).abs().max() > 1e-4


# ---------------------------------------------------------------------------------------------
# Gradients


@pytest.mark.parametrize("embedding", EMBEDDINGS)
@pytest.mark.parametrize("kind", ["mlp", "unet"])
def test_gradients_reach_every_parameter(kind, embedding):
    torch.manual_seed(0)
    if kind == "mlp":
        net: nn.Module = MLPScoreNet(hidden=32, layers=3, emb_dim=16, embedding=embedding)
        x = torch.randn(8, 2)
    else:
        net = small_unet(size=8, embedding=embedding, attn=(8, 4), num_heads=2)
        x = torch.randn(4, 1, 8, 8)
    c, target = noise_cond(embedding, x.shape[0]), torch.randn_like(x)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)

    (net(x, c) - target).pow(2).mean().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    opt.step()
    opt.zero_grad()
    # The zero output layer blocked every gradient but its own at first; after one step it lets them through.
    (net(x, c) - target).pow(2).mean().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, name


# ---------------------------------------------------------------------------------------------
# Train and eval modes


def test_dropout_train_stochastic_eval_deterministic():
    torch.manual_seed(0)
    net = small_unet(size=8, attn=(4,), dropout=0.5)
    x, c = torch.randn(2, 1, 8, 8), noise_cond("sinusoidal", 2)
    adam_steps(net, x, c, torch.randn_like(x))  # leave the zero start so the output can show the dropout
    net.train()
    assert not torch.equal(net(x, c), net(x, c))
    net.eval()
    with torch.no_grad():
        assert torch.equal(net(x, c), net(x, c))


# ---------------------------------------------------------------------------------------------
# Learning


def test_mlp_overfits_a_denoising_batch():
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(64, 2, generator=gen) * 0.5 + torch.tensor([1.0, -1.0])
    t = torch.rand(64, generator=gen)
    z = torch.randn(64, 2, generator=gen)
    std = (0.05 + 0.9 * t).unsqueeze(1)
    x_t = x0 + std * z
    torch.manual_seed(0)
    net = MLPScoreNet(hidden=128, layers=3, emb_dim=64)
    with torch.no_grad():
        first = (net(x_t, 999 * t) - z).pow(2).mean().item()
    last = adam_steps(net, x_t, 999 * t, z, steps=300, lr=2e-3)
    assert last < first / 10, (first, last)


# ---------------------------------------------------------------------------------------------
# Configs


def test_build_net_from_configs():
    mlp = build_net(MLPNetConfig(hidden=16, layers=2, emb_dim=8), (2,))
    assert isinstance(mlp, MLPScoreNet) and mlp(torch.randn(3, 2), torch.zeros(3)).shape == (3, 2)
    cfg = TypeAdapter(NetConfig).validate_python(
        {"type": "unet", "channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [14]}
    )
    unet = build_net(cfg, (3, 28, 28))
    assert isinstance(unet, UNet) and unet(torch.randn(1, 3, 28, 28), torch.zeros(1)).shape == (1, 3, 28, 28)


@pytest.mark.parametrize(
    "cfg,shape,words",
    [
        (UNetConfig(channel_mult=(1, 2, 2, 2), attn_resolutions=(7,)), (1, 28, 28), ["image_size", "channel_mult"]),
        (UNetConfig(channel_mult=(1, 2, 2)), (1, 28, 28), ["attn_resolutions", "28, 14, 7"]),
        (UNetConfig(attn_resolutions=(16, 3)), (1, 16, 16), ["attn_resolutions", "[3]"]),
        (MLPNetConfig(), (1, 16, 16), ["mlp", "data_shape"]),
        (UNetConfig(), (1, 16, 8), ["unet", "square", "data_shape"]),
        (UNetConfig(), (2,), ["unet", "data_shape"]),
    ],
    ids=["mult_vs_size", "attn_28", "attn_missing", "mlp_on_images", "unet_non_square", "unet_on_1d"],
)
def test_bad_configs_name_the_field(cfg, shape, words):
    with pytest.raises(ValueError) as info:
        build_net(cfg, shape)
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize(
    "data,field",
    [
        ({"type": "unet", "dropout": 1.0}, "dropout"),
        ({"type": "unet", "channel_mult": []}, "channel_mult"),
        ({"type": "unet", "channel_mult": [1, 0]}, "channel_mult"),
        ({"type": "mlp", "emb_dim": 7}, "emb_dim"),
        ({"type": "mlp", "hiden": 64}, "hiden"),
        ({"type": "resnet"}, "type"),
    ],
)
def test_pydantic_rejects_bad_fields(data, field):
    with pytest.raises(ValueError) as info:  # pydantic's ValidationError is a ValueError
        TypeAdapter(NetConfig).validate_python(data)
    assert field in str(info.value)


# ---------------------------------------------------------------------------------------------
# Persistence and size


@pytest.mark.parametrize("embedding", EMBEDDINGS)
def test_state_dict_round_trip(embedding):
    torch.manual_seed(0)
    net = small_unet(size=8, embedding=embedding, attn=(4,))
    x, c = torch.randn(2, 1, 8, 8), noise_cond(embedding, 2)
    adam_steps(net, x, c, torch.randn_like(x))
    buf = io.BytesIO()
    torch.save(net.state_dict(), buf)
    buf.seek(0)
    torch.manual_seed(1)  # a different Fourier draw: only loading the buffer can make outputs match
    fresh = small_unet(size=8, embedding=embedding, attn=(4,))
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    net.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(net(x, c), fresh(x, c))


def test_parameter_counts():
    digits = build_net(UNetConfig(), (1, 16, 16))  # channels 64, mult (1, 2, 2), attention at 8
    n = count_parameters(digits)
    print(f"\ndefault digits U-Net (1x16x16, channels 64, mult (1, 2, 2)): {n:,} parameters")
    assert 6.0e6 < n < 7.0e6
    # Ho et al.'s CIFAR-10 model (ch 128, mult (1, 2, 2, 2), 2 blocks, attention at 16) has 35.7M parameters.
    cifar = build_net(UNetConfig(channels=128, channel_mult=(1, 2, 2, 2), attn_resolutions=(16,)), (3, 32, 32))
    assert round(count_parameters(cifar) / 1e5) == 357
    assert count_parameters(build_net(MLPNetConfig(), (2,))) == 363_778
    # The Fourier frequencies are a buffer, not counted: both embeddings give the same count.
    assert count_parameters(build_net(UNetConfig(embedding="fourier"), (1, 16, 16))) == n
