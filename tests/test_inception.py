"""The FID Inception network from a local file (scorelab.features.load_inception): pytorch-fid's own
architecture and input path, weights read with weights_only=True, nothing downloaded, bad files refused.

The weights here are a random initialisation of the same architecture (torchvision's Inception3 with
1008 classes and no aux head has exactly the FID network's keys and shapes; pytorch-fid patches only the
blocks' forward passes). A few small images keep each forward at about a second on one CPU thread.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import pytorch_fid.inception as fid
import torch
import torchvision
from torch import nn

from scorelab.features import (
    INCEPTION_FEATURE_DIM, INCEPTION_WEIGHTS_FILE, DigitClassifier, inception_features, inception_stats,
    load_inception,
)
from scorelab.metrics import gaussian_stats


def random_inception_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A random state dict of the FID Inception's architecture; He-initialised convolutions keep the
    activations near unit scale through the ~50 layers, so the features are neither 0 nor huge."""
    torch.manual_seed(seed)
    net = torchvision.models.inception_v3(num_classes=1008, aux_logits=False, weights=None, init_weights=False)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    return net.state_dict()


def save_random_inception(path: Path, seed: int = 0) -> Path:
    torch.save(random_inception_state(seed), path)
    return path


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return save_random_inception(tmp_path_factory.mktemp("inception") / "random_inception.pth")


@pytest.fixture(scope="module")
def net(weights) -> nn.Module:
    return load_inception(weights)


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    """Two 3-channel 20x20 uint8 images."""
    return torch.randint(0, 256, (2, 3, 20, 20), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


def test_loader_is_pytorch_fids_network_with_the_files_weights(net, weights, monkeypatch):
    assert isinstance(net, fid.InceptionV3) and not net.training
    assert net.resize_input and net.normalize_input and net.output_blocks == [3]
    assert type(net.blocks[2][0]) is fid.FIDInceptionA and type(net.blocks[3][2]) is fid.FIDInceptionE_2
    state = torch.load(weights, weights_only=True)
    assert torch.equal(net.blocks[0][0].conv.weight, state["Conv2d_1a_3x3.conv.weight"])
    assert torch.equal(net.blocks[3][2].branch_pool.conv.weight, state["Mixed_7c.branch_pool.conv.weight"])
    assert not any(p.requires_grad for p in net.parameters())

    # pytorch-fid's download hook is neither replaced nor called
    def no_download(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(fid, "load_state_dict_from_url", no_download)
    load_inception(weights)
    assert fid.load_state_dict_from_url is no_download


def test_features_equal_pytorch_fids_own_module(net, weights, pixels, monkeypatch):
    # pytorch-fid's InceptionV3 as its users build it, its weights answered from the same file
    state = torch.load(weights, weights_only=True)
    monkeypatch.setattr(fid, "load_state_dict_from_url", lambda url, **kwargs: state)
    reference = fid.InceptionV3([fid.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    with torch.no_grad():
        expected = reference(pixels.float() / 255)[0].squeeze(3).squeeze(2)  # as pytorch_fid.fid_score does

    f = inception_features(net, pixels, batch_size=1)  # uint8: /255, the range pytorch-fid takes
    assert f.shape == (2, INCEPTION_FEATURE_DIM) and f.dtype == torch.float32
    torch.testing.assert_close(f, expected, rtol=1e-5, atol=1e-6)
    assert f.std(0).mean() > 1e-3 * f.abs().mean() > 0  # two images, two different feature vectors

    model_space = pixels.float() / 127.5 - 1  # samples in [-1, 1] map to the same [0, 1] images
    torch.testing.assert_close(inception_features(net, model_space), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(inception_features(net, model_space.numpy()), expected, rtol=1e-4, atol=1e-5)


def test_grayscale_is_repeated_to_three_channels(net, pixels):
    grey = pixels[:, :1]
    torch.testing.assert_close(inception_features(net, grey), inception_features(net, grey.repeat(1, 3, 1, 1)))


def test_stats(net, pixels):
    x = torch.cat([pixels, pixels.flip(-1)])
    mu, sigma = inception_stats(net, x)
    assert mu.shape == (2048,) and sigma.shape == (2048, 2048) and mu.dtype == np.float64
    expected = gaussian_stats(inception_features(net, x))
    np.testing.assert_allclose(mu, expected[0], rtol=1e-6)
    np.testing.assert_allclose(sigma, expected[1], rtol=1e-6, atol=1e-9 * np.abs(sigma).max())


def test_stats_stream_over_batches(net, pixels):
    x = torch.cat([pixels, pixels.flip(-1), pixels.flip(-2)])
    expected = gaussian_stats(inception_features(net, x))
    mu, sigma = inception_stats(net, x, batch_size=2)  # three batches merged in float64
    np.testing.assert_allclose(mu, expected[0], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sigma, expected[1], rtol=0, atol=1e-12 * np.abs(sigma).max())


def test_bad_inputs_are_refused(net):
    with pytest.raises(ValueError, match=r"expected \(N, 1 or 3, H, W\) images with N >= 1, found shape "
                                         r"\(2, 2, 8, 8\)"):
        inception_features(net, torch.zeros(2, 2, 8, 8))
    with pytest.raises(ValueError, match=r"inception_features: expected values in \[-1, 1\], found min 0, max 255"):
        inception_features(net, torch.full((1, 1, 8, 8), 255.0).index_fill_(2, torch.tensor([0]), 0))


def test_bad_weight_files_are_refused_naming_the_file(weights, tmp_path):
    expected = f"expected the state dict of {INCEPTION_WEIGHTS_FILE}"
    with pytest.raises(ValueError, match=r"missing\.pth: Inception weights file not found"):
        load_inception(tmp_path / "missing.pth")

    (tmp_path / "garbage.pth").write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ValueError, match=r"garbage\.pth: not a readable PyTorch weights file") as e:
        load_inception(tmp_path / "garbage.pth")
    assert INCEPTION_WEIGHTS_FILE in str(e.value)

    data = weights.read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"truncated\.pth: not a readable PyTorch weights file"):
        load_inception(tmp_path / "truncated.pth")

    torch.save({"state_dict": {"w": torch.zeros(1)}, "step": 3}, tmp_path / "checkpoint.pth")
    with pytest.raises(ValueError, match=r"checkpoint\.pth: not a state dict of tensors "
                                         r"\(entry 'state_dict' holds a dict\)"):
        load_inception(tmp_path / "checkpoint.pth")

    torch.save(DigitClassifier().state_dict(), tmp_path / "other_net.pth")
    with pytest.raises(ValueError, match=r"other_net\.pth: not pytorch-fid's FID Inception weights: "
                                         r"\d+ missing key\(s\) \(Conv2d_1a_3x3\.conv\.weight, .*; "
                                         r"\d+ unexpected key\(s\) \(body\.0\.weight") as e:
        load_inception(tmp_path / "other_net.pth")
    assert expected in str(e.value)

    state = random_inception_state()
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 2048), torch.zeros(1000)  # torchvision's 1000 classes
    torch.save(state, tmp_path / "imagenet_head.pth")
    with pytest.raises(ValueError, match=r"imagenet_head\.pth: .*2 shape mismatch\(es\) "
                                         r"\(fc\.weight: file \[1000, 2048\], network \[1008, 2048\], \.\.\.\)"):
        load_inception(tmp_path / "imagenet_head.pth")
