"""Feature extractors for sample-quality metrics where Inception does not fit.

Inception-v3 features (FID, KID) describe natural 299x299 RGB images; on 16x16 grey digits they
measure mostly the upsampling. For such data a small classifier trained on the data itself gives the
features instead (a "domain FID"):

    model = train_classifier(x_train, y_train, seed=0)          # x in model space [-1, 1]
    save_classifier(model, "models/digits_classifier.pt", {"test_accuracy": 0.98})
    model, meta = load_classifier("models/digits_classifier.pt")
    ref_mu, ref_sigma = feature_stats(model, x_test)            # the reference statistics, once
    fd = domain_frechet(model, x_fake, ref_mu, ref_sigma)
    running = stream_features(model, x_fake, keep=10_000)       # float64 running sums, the first rows kept
    fd = frechet_distance(*running.stats(), ref_mu, ref_sigma)  # = domain_frechet; running.rows for KID

Statistics accumulate batch by batch (metrics.RunningStats): 50k samples never become 50k feature rows.
Numbers from different classifiers are not comparable: keep the classifier file with the results.

For natural images, the standard FID uses pytorch-fid's Inception network, built from a local weights
file (nothing is ever downloaded; see STACK_NOTES.md, "FID offline"):

    path = find_inception_weights(params.evaluate.inception_weights)   # None when there is none
    net = load_inception(path)                                          # pytorch-fid's InceptionV3, pool3
    ref_mu, ref_sigma = inception_stats(net, x_train)                   # uint8 pixels or [-1, 1] floats
    fid = frechet_distance(*inception_stats(net, x_fake), ref_mu, ref_sigma)
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from . import storage
from .metrics import ArrayLike, RunningStats, check_samples, frechet_distance
from .nets import state_dict_mismatch

# pytorch-fid's weights (FID_WEIGHTS_URL), also accepted by torch-fidelity and torchmetrics.
INCEPTION_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_ENV = "SCORELAB_INCEPTION_WEIGHTS"
INCEPTION_WEIGHTS_SHA256_PREFIX = "6726825d"  # torch.hub names files by their sha256's first 8 hex digits
INCEPTION_FEATURE_DIM = 2048  # pool3: the final average pooling, the layer FID is defined on
_FILE_FORMAT = 1  # of save_classifier's files


# ---------------------------------------------------------------------------------------------
# The classifier


class DigitClassifier(nn.Module):
    """A small CNN for (C, H, W) images in [-1, 1]: two conv blocks, then a hidden layer whose
    activations are the features (as Inception's pool3 layer is for FID), then the class logits.

    The adaptive pooling fixes the hidden layer's input at (2 width, 4, 4) whatever H and W are, so
    the same architecture serves 8x8, 16x16 and 28x28 images. Kept small on purpose: it trains in
    seconds on a CPU, and a 64-d feature covariance is estimable from the few hundred test digits.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32, feature_dim: int = 64):
        super().__init__()
        # Everything needed to rebuild the net from a state dict (save_classifier stores it).
        self.arch = {"in_channels": in_channels, "num_classes": num_classes, "width": width,
                     "feature_dim": feature_dim}
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Linear(2 * width * 16, feature_dim), nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """(N, C, H, W) -> (N, feature_dim): the penultimate layer's activations."""
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        """(N, C, H, W) -> (N, num_classes) logits."""
        return self.head(self.body(x))


class _Deterministic:
    """torch.use_deterministic_algorithms for a block, then the caller's setting back. warn_only: on
    a device where an op has no deterministic kernel, training still runs (it warns instead)."""

    def __enter__(self) -> None:
        self._previous = (torch.are_deterministic_algorithms_enabled(),
                          torch.is_deterministic_algorithms_warn_only_enabled())
        torch.use_deterministic_algorithms(True, warn_only=True)

    def __exit__(self, *exc: object) -> None:
        torch.use_deterministic_algorithms(self._previous[0], warn_only=self._previous[1])


def train_classifier(
    x_train: ArrayLike,             # (N, C, H, W) images in [-1, 1]
    y_train: ArrayLike,             # (N,) integer class labels 0..num_classes-1
    *,
    epochs: int = 12,               # digits 16x16: ~98-99% test accuracy in ~3 s on one CPU thread
    seed: int = 0,                  # initial weights and batch order
    batch_size: int = 32,
    lr: float = 3e-3,               # Adam, cosine-decayed to 0 over the run
    num_classes: int | None = None, # None: max label + 1
) -> DigitClassifier:
    """Train a DigitClassifier with cross-entropy on x_train's device; deterministic for a given seed
    (on the CPU bit-for-bit for a fixed number of threads). The caller's global RNG state is left as
    it was: the seed goes into a forked RNG and a dedicated shuffling generator."""
    x, y = torch.as_tensor(x_train), torch.as_tensor(y_train).long()
    check_samples(x, shape=tuple(x.shape[1:]), name="x_train")
    if y.shape != (x.shape[0],):
        raise ValueError(f"y_train: expected shape ({x.shape[0]},) to match x_train, found {tuple(y.shape)}")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"train_classifier needs epochs >= 1 and batch_size >= 1, got {epochs} and {batch_size}")
    n_classes = int(y.max()) + 1 if num_classes is None else num_classes
    if int(y.min()) < 0 or int(y.max()) >= n_classes:
        raise ValueError(f"y_train: expected labels in 0..{n_classes - 1}, found {int(y.min())}..{int(y.max())}")

    device = x.device
    x, y = x.float(), y.to(device)
    n = x.shape[0]
    steps = epochs * -(-n // batch_size)
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), _Deterministic():
        torch.manual_seed(seed)  # the default initialisers draw from the global generator
        model = DigitClassifier(x.shape[1], n_classes).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        order_gen = torch.Generator().manual_seed(seed)  # on the CPU: the same order on every device
        model.train()
        for _ in range(epochs):
            for idx in torch.randperm(n, generator=order_gen).to(device).split(batch_size):
                loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    return model.eval()


@torch.no_grad()
def _batches(fn: Any, model: nn.Module, x: ArrayLike, batch_size: int) -> Iterator[Tensor]:
    """fn(batch) over x, one batch at a time on the model's device, in eval mode; the model's mode is
    restored once the batches are done."""
    x = torch.as_tensor(x)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for b in x.split(batch_size):
            yield fn(b.to(device, torch.float32))
    finally:
        model.train(was_training)


def _batched(fn: Any, model: nn.Module, x: ArrayLike, batch_size: int) -> Tensor:
    out = list(_batches(fn, model, x, batch_size))
    return torch.cat(out) if out else torch.empty(0)


def _accumulate(batches: Iterator[Tensor], keep: int) -> RunningStats:
    stats = RunningStats(keep)
    for f in batches:
        stats.update(f)
    return stats


def extract_features(model: DigitClassifier, x: ArrayLike, batch_size: int = 512) -> Tensor:
    """(N, C, H, W) images -> (N, feature_dim) float32 features, on the model's device."""
    return _batched(model.features, model, x, batch_size)


def stream_features(model: DigitClassifier, x: ArrayLike, batch_size: int = 512, keep: int = 0) -> RunningStats:
    """The running statistics of the features of x, fed batch by batch (metrics.RunningStats: float64 sums
    on the model's device), keeping the first `keep` feature rows: memory O(keep + D^2), not O(N)."""
    return _accumulate(_batches(model.features, model, x, batch_size), keep)


def accuracy(model: DigitClassifier, x: ArrayLike, y: ArrayLike, batch_size: int = 512) -> float:
    """Fraction of x classified as y."""
    pred = _batched(model, model, x, batch_size).argmax(1).cpu()
    return float((pred == torch.as_tensor(np.asarray(y))).double().mean())


def feature_stats(model: DigitClassifier, x: ArrayLike, batch_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance) of the features of x in float64, as metrics.gaussian_stats computes them,
    accumulated batch by batch (stream_features)."""
    return stream_features(model, x, batch_size).stats()


def domain_frechet(model: DigitClassifier, x_fake: ArrayLike, ref_mu: ArrayLike, ref_sigma: ArrayLike,
                   batch_size: int = 512) -> float:
    """Frechet distance between the classifier features of x_fake and reference statistics (the
    domain analogue of FID; biased upwards at small N, so compare with a real-vs-real baseline)."""
    return frechet_distance(*feature_stats(model, x_fake, batch_size), ref_mu, ref_sigma)


# ---------------------------------------------------------------------------------------------
# Saving and loading


def save_classifier(model: DigitClassifier, path: str | Path, meta: Mapping[str, Any]) -> None:
    """Write the weights, the architecture and `meta` (plain Python values: what the classifier was
    trained on, its accuracy) to `path`, readable by load_classifier with weights_only=True."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload = {"format": _FILE_FORMAT, "arch": dict(model.arch), "state_dict": state, "meta": dict(meta)}
    buf = io.BytesIO()  # a file object: the bytes do not depend on a temporary file's name
    torch.save(payload, buf)
    storage.write_bytes(path, buf.getvalue())  # never a half-written file under the real name


def load_classifier(path: str | Path) -> tuple[DigitClassifier, dict[str, Any]]:
    """(model in eval mode on the CPU, meta) from a save_classifier file; ValueError names a bad file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: classifier file not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)  # no pickled code runs
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for a bad file
        raise ValueError(f"{path}: not a readable classifier file ({' '.join(str(e).split())[:200]})") from None
    if not isinstance(payload, dict) or payload.get("format") != _FILE_FORMAT:
        raise ValueError(f"{path}: not a scorelab classifier file (format {_FILE_FORMAT} expected)")
    model = DigitClassifier(**payload["arch"])
    model.load_state_dict(payload["state_dict"])
    return model.eval(), payload["meta"]


# ---------------------------------------------------------------------------------------------
# Inception weights, found locally


def _torch_home() -> Path:
    """torch.hub's cache root: $TORCH_HOME, else $XDG_CACHE_HOME/torch, else ~/.cache/torch."""
    default = os.path.join(os.getenv("XDG_CACHE_HOME", "~/.cache"), "torch")
    return Path(os.path.expanduser(os.getenv("TORCH_HOME", default)))


def find_inception_weights(explicit_path: str | None = None) -> Path | None:
    """The local Inception weights file to use, or None when there is none. Looked for, in order:

    1. explicit_path (e.g. a params.yaml entry): ValueError when given but not a file;
    2. $SCORELAB_INCEPTION_WEIGHTS: ValueError when set but not a file (a typo must not silently
       fall through to another file, or to no FID at all);
    3. $TORCH_HOME/hub/checkpoints/pt_inception-2015-12-05-6726825d.pth, where pytorch-fid looks.
    """
    if explicit_path is not None:
        p = Path(explicit_path).expanduser()
        if not p.is_file():
            raise ValueError(f"inception weights: {p} not found (expected the {INCEPTION_WEIGHTS_FILE} file)")
        return p
    env = os.getenv(INCEPTION_WEIGHTS_ENV)
    if env:
        p = Path(env).expanduser()
        if not p.is_file():
            raise ValueError(f"{INCEPTION_WEIGHTS_ENV}={env}: file not found "
                             f"(expected the {INCEPTION_WEIGHTS_FILE} file)")
        return p
    hub = _torch_home() / "hub" / "checkpoints" / INCEPTION_WEIGHTS_FILE
    return hub if hub.is_file() else None


# ---------------------------------------------------------------------------------------------
# The FID Inception network, from a local file


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    """The tensors of a weights file, loaded with weights_only=True; ValueError naming the file."""
    expected = f"expected pytorch-fid's FID Inception state dict ({INCEPTION_WEIGHTS_FILE})"
    if not path.is_file():
        raise ValueError(f"{path}: Inception weights file not found ({expected})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # no pickled code runs
    except Exception as e:  # UnpicklingError, RuntimeError, EOFError, ... for truncated or foreign bytes
        raise ValueError(f"{path}: not a readable PyTorch weights file ({' '.join(str(e).split())[:160]}); "
                         f"{expected}") from None
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}: holds a {type(state).__name__}, not a state dict; {expected}")
    bad = [k for k, v in state.items() if not (isinstance(k, str) and isinstance(v, Tensor))]
    if bad:  # e.g. a training checkpoint {"state_dict": ..., "optimizer": ...}
        raise ValueError(f"{path}: not a state dict of tensors (entry {bad[0]!r} holds a "
                         f"{type(state[bad[0]]).__name__}); {expected}")
    return dict(state)


def load_inception(path: str | Path, device: torch.device | str = "cpu") -> nn.Module:
    """pytorch-fid's InceptionV3 for FID (its TF-ported blocks, pool3 output, resize_input and
    normalize_input on: bilinear resize to 299, then [0, 1] -> [-1, 1]) with the weights of `path`, in
    eval mode on `device`. Nothing is downloaded: the network is assembled as pytorch-fid's
    fid_inception_v3 and InceptionV3 assemble it (torchvision's Inception3 with 1008 classes and no aux
    head, its Mixed blocks replaced by pytorch-fid's FID blocks, then pool3's four blocks), and loaded
    strictly from the file, read with weights_only=True. ValueError, naming the file and what was
    expected, for a missing or unreadable file or a state dict whose keys or shapes are not the FID
    Inception's."""
    try:
        import torchvision
        from pytorch_fid import inception as fid
    except ImportError:
        raise ValueError("Inception FID needs the pytorch-fid package (pip install pytorch-fid==0.3.0)") from None
    path = Path(path)
    state = _read_state_dict(path)

    net = torchvision.models.inception_v3(num_classes=1008, aux_logits=False, weights=None, init_weights=False)
    net.Mixed_5b = fid.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = fid.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = fid.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = fid.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = fid.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = fid.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = fid.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = fid.FIDInceptionE_1(1280)
    net.Mixed_7c = fid.FIDInceptionE_2(2048)
    try:
        net.load_state_dict(state)  # strict: wrong keys or shapes raise
    except RuntimeError as e:
        raise ValueError(f"{path}: not pytorch-fid's FID Inception weights: {state_dict_mismatch(e)}; expected the "
                         f"state dict of {INCEPTION_WEIGHTS_FILE}") from None

    # InceptionV3.__init__ would build (and download) its own network: its attributes are set here instead,
    # up to pool3 (block 3), exactly as its constructor sets them
    wrapper = fid.InceptionV3.__new__(fid.InceptionV3)
    nn.Module.__init__(wrapper)
    wrapper.resize_input, wrapper.normalize_input = True, True
    wrapper.output_blocks = [fid.InceptionV3.BLOCK_INDEX_BY_DIM[INCEPTION_FEATURE_DIM]]
    wrapper.last_needed_block = max(wrapper.output_blocks)
    wrapper.blocks = nn.ModuleList([
        nn.Sequential(net.Conv2d_1a_3x3, net.Conv2d_2a_3x3, net.Conv2d_2b_3x3, nn.MaxPool2d(kernel_size=3, stride=2)),
        nn.Sequential(net.Conv2d_3b_1x1, net.Conv2d_4a_3x3, nn.MaxPool2d(kernel_size=3, stride=2)),
        nn.Sequential(net.Mixed_5b, net.Mixed_5c, net.Mixed_5d, net.Mixed_6a, net.Mixed_6b, net.Mixed_6c,
                      net.Mixed_6d, net.Mixed_6e),
        nn.Sequential(net.Mixed_7a, net.Mixed_7b, net.Mixed_7c, nn.AdaptiveAvgPool2d(output_size=(1, 1))),
    ])
    wrapper.requires_grad_(False)
    return wrapper.to(device).eval()


def _pool3_batches(model: nn.Module, x: ArrayLike, batch_size: int) -> Iterator[Tensor]:
    """inception_features, one batch at a time (x is checked before the first batch)."""
    x = torch.as_tensor(x)
    if x.ndim != 4 or x.shape[1] not in (1, 3) or x.shape[0] == 0:
        raise ValueError(f"inception_features: expected (N, 1 or 3, H, W) images with N >= 1, found shape "
                         f"{tuple(x.shape)}")
    pixels = x.dtype == torch.uint8
    if not pixels:
        check_samples(x, shape=tuple(x.shape[1:]), value_range=(-1, 1), name="inception_features")

    def pool3(b: Tensor) -> Tensor:  # b: float32 on the model's device, still in x's units
        b = b / 255 if pixels else (b + 1) / 2
        b = b.clamp(0, 1).expand(-1, 3, -1, -1)  # clamp: check_samples leaves 1e-3 of rounding slack
        return model(b)[0].flatten(1)

    return _batches(pool3, model, x, batch_size)


def inception_features(model: nn.Module, x: ArrayLike, batch_size: int = 50) -> Tensor:
    """(N, C, H, W) images -> (N, 2048) float32 pool3 features, on the model's device. uint8 pixels
    (0..255) or floats in [-1, 1] (model space) are mapped to [0, 1], the range pytorch-fid's network
    takes (it resizes to 299 and rescales itself); one-channel images are repeated to three."""
    return torch.cat(list(_pool3_batches(model, x, batch_size)))


def inception_stats(model: nn.Module, x: ArrayLike, batch_size: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance) of the Inception pool3 features of x in float64 (metrics.gaussian_stats), the
    statistics pytorch-fid's FID compares with metrics.frechet_distance. Accumulated batch by batch
    (metrics.RunningStats): the (N, 2048) features are never held at once."""
    return _accumulate(_pool3_batches(model, x, batch_size), 0).stats()


__all__ = [
    "DigitClassifier", "INCEPTION_FEATURE_DIM", "INCEPTION_WEIGHTS_ENV", "INCEPTION_WEIGHTS_FILE",
    "INCEPTION_WEIGHTS_SHA256_PREFIX", "accuracy", "domain_frechet", "extract_features", "feature_stats",
    "find_inception_weights", "inception_features", "inception_stats", "load_classifier", "load_inception",
    "save_classifier", "stream_features", "train_classifier",
]
