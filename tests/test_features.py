"""The digits feature extractor (accuracy, determinism, domain Frechet distance, files) and the
offline lookup of Inception weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from scorelab.data import DataConfig, Manifest, prepare, read_split
from scorelab.features import (
    INCEPTION_WEIGHTS_ENV, INCEPTION_WEIGHTS_FILE, DigitClassifier, accuracy, domain_frechet, extract_features,
    feature_stats, find_inception_weights, load_classifier, save_classifier, stream_features, train_classifier,
)
from scorelab.metrics import gaussian_stats


def _labels(m: Manifest, split: str) -> np.ndarray:
    """The split's labels, in read_split's order (the same shards, row by row)."""
    return np.concatenate([pq.read_table(p, columns=["label"])["label"].to_numpy() for p in m.files(split)])


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> dict[str, torch.Tensor | np.ndarray]:
    m = prepare(DataConfig(source="digits", out_dir=str(tmp_path_factory.mktemp("data"))), seed=0)
    return {"x_train": read_split(m.root, "train"), "y_train": _labels(m, "train"),
            "x_test": read_split(m.root, "test"), "y_test": _labels(m, "test")}


@pytest.fixture(scope="module")
def model(digits) -> DigitClassifier:
    return train_classifier(digits["x_train"], digits["y_train"], seed=0)


def test_classifier_shapes():
    net = DigitClassifier(feature_dim=64)
    for size in (8, 16, 28):
        x = torch.zeros(3, 1, size, size)
        assert net.features(x).shape == (3, 64)
        assert net(x).shape == (3, 10)


def test_classifier_accuracy_on_digits_test_split(model, digits):
    assert len(digits["x_test"]) == 180  # 10% of load_digits' 1797 images
    assert accuracy(model, digits["x_test"], digits["y_test"]) >= 0.95
    assert not model.training


def test_training_is_deterministic_per_seed_and_leaves_global_rng_alone(digits):
    x, y = digits["x_train"][:400], digits["y_train"][:400]  # the mechanism, on a short run

    def weights(seed: int) -> list[torch.Tensor]:
        return list(train_classifier(x, y, epochs=1, seed=seed).state_dict().values())

    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = weights(0)
    assert torch.equal(torch.rand(3), expected_next)
    assert all(torch.equal(a, b) for a, b in zip(first, weights(0), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, weights(1), strict=True))


def test_training_rejects_bad_input(digits):
    x, y = digits["x_train"][:10], digits["y_train"][:10]
    with pytest.raises(ValueError, match="x_train: expected values in"):
        train_classifier(3 * x, y)
    with pytest.raises(ValueError, match=r"y_train: expected shape \(10,\)"):
        train_classifier(x, y[:9])
    with pytest.raises(ValueError, match=r"y_train: expected labels in 0\.\.1"):
        train_classifier(x, y, num_classes=2)


def test_domain_frechet_separates_real_from_noise(model, digits):
    x_train, x_test = digits["x_train"], digits["x_test"]
    mu, sigma = feature_stats(model, x_test)
    assert mu.shape == (64,) and sigma.shape == (64, 64) and mu.dtype == np.float64
    noise = torch.randn(x_test.shape, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    baseline = domain_frechet(model, x_train, mu, sigma)  # real vs real, as small N biases it
    fd_noise = domain_frechet(model, noise, mu, sigma)
    assert 0 < baseline < fd_noise / 5
    assert domain_frechet(model, x_test, mu, sigma) == pytest.approx(0, abs=1e-6 * fd_noise)


def test_feature_stats_do_not_depend_on_batch_size(model, digits):
    x = digits["x_test"]
    mu1, s1 = feature_stats(model, x, batch_size=512)
    mu2, s2 = feature_stats(model, x, batch_size=7)
    np.testing.assert_allclose(mu1, mu2, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s1, s2, rtol=1e-4, atol=1e-6)


def test_streamed_features_are_the_rows_statistics_and_keep_the_leading_rows(model, digits):
    x = digits["x_test"]
    # the same batches both ways: a float32 convolution's result may depend on the batch size (oneDNN picks
    # its algorithm by shape), which is not what this test is about
    rows = extract_features(model, x, batch_size=16)
    running = stream_features(model, x, batch_size=16, keep=40)  # 12 batches, the kept rows span three
    assert running.n == len(x) and torch.equal(running.rows, rows[:40].double())
    mu, sigma = running.stats()
    ref_mu, ref_sigma = gaussian_stats(rows)
    np.testing.assert_allclose(mu, ref_mu, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sigma, ref_sigma, rtol=0, atol=1e-12 * np.abs(ref_sigma).max())
    ref_mu, ref_sigma = gaussian_stats(extract_features(model, x, batch_size=len(x)))
    whole = stream_features(model, x, batch_size=len(x))  # one batch: gaussian_stats exactly
    assert all(np.array_equal(a, b) for a, b in zip(whole.stats(), (ref_mu, ref_sigma)))


def test_save_load_round_trip(model, digits, tmp_path):
    path = tmp_path / "sub" / "classifier.pt"
    meta = {"source": "digits", "seed": 0, "test_accuracy": 0.98, "shape": [1, 16, 16]}
    save_classifier(model, path, meta)
    loaded, loaded_meta = load_classifier(path)
    assert loaded_meta == meta and not loaded.training
    assert list(tmp_path.joinpath("sub").iterdir()) == [path]  # no temporary file left behind
    x = digits["x_test"][:50]
    assert torch.equal(extract_features(loaded, x), extract_features(model, x))


def test_load_classifier_names_a_bad_file(tmp_path):
    with pytest.raises(ValueError, match="missing.pt: classifier file not found"):
        load_classifier(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt: not a readable classifier file"):
        load_classifier(tmp_path / "junk.pt")
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt: not a scorelab classifier file"):
        load_classifier(tmp_path / "other.pt")


# ---------------------------------------------------------------------------------------------
# Inception weights lookup


@pytest.fixture
def weights_env(tmp_path, monkeypatch) -> dict[str, Path]:
    """Three candidate files, none existing yet, and an environment pointing at them."""
    hub = tmp_path / "torch_home" / "hub" / "checkpoints" / INCEPTION_WEIGHTS_FILE
    hub.parent.mkdir(parents=True)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv(INCEPTION_WEIGHTS_ENV, raising=False)
    return {"explicit": tmp_path / "explicit.pth", "env": tmp_path / "env.pth", "hub": hub}


def test_find_inception_weights_order(weights_env, monkeypatch):
    assert find_inception_weights(None) is None
    weights_env["hub"].touch()
    assert find_inception_weights(None) == weights_env["hub"]
    weights_env["env"].touch()
    monkeypatch.setenv(INCEPTION_WEIGHTS_ENV, str(weights_env["env"]))
    assert find_inception_weights(None) == weights_env["env"]
    weights_env["explicit"].touch()
    assert find_inception_weights(str(weights_env["explicit"])) == weights_env["explicit"]


def test_find_inception_weights_default_torch_home(tmp_path, monkeypatch):
    monkeypatch.delenv(INCEPTION_WEIGHTS_ENV, raising=False)
    monkeypatch.delenv("TORCH_HOME", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert find_inception_weights(None) is None
    hub = tmp_path / ".cache" / "torch" / "hub" / "checkpoints" / INCEPTION_WEIGHTS_FILE
    hub.parent.mkdir(parents=True)
    hub.touch()
    assert find_inception_weights(None) == hub


def test_find_inception_weights_missing_named_files_raise(weights_env, monkeypatch):
    weights_env["hub"].touch()  # present, but a named file that is missing must not fall through to it
    with pytest.raises(ValueError, match=r"explicit\.pth not found"):
        find_inception_weights(str(weights_env["explicit"]))
    monkeypatch.setenv(INCEPTION_WEIGHTS_ENV, str(weights_env["env"]))
    with pytest.raises(ValueError, match=rf"{INCEPTION_WEIGHTS_ENV}=.*env\.pth: file not found"):
        find_inception_weights(None)
