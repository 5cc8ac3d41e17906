"""The standard FID of an evaluation, from local Inception weights only (nothing is ever downloaded): which
weights file params and the machine offer, pytorch-fid's network on it (features.load_inception), the
statistics of the whole train split it is measured against, and the real-vs-real baseline's images.

    path, reason = inception_weights(params, root, is_image)     # (None, why) where there are none
    net = inception_network(path, device)                        # the evaluation's device
    key = reference_key(storage.sha256_file(path), manifest)
    ref = read_reference(ref_file, key)                          # None: not cached (yet)
    ref = reference_stats(net, x_train) if ref is None else ref  # then write_reference(ref_file, key, ref)
    fid = fid_scorer(net, ref)
    fid(x)                                                       # FID of images x against the train split

The train split's statistics are cached in ref_file under the weights file's sha256 and the dataset's
checksum: the evaluate stage's driver reads and writes that file; its compute (perhaps a Ray task on
another node) only gets and returns the arrays. ValueError, with the message the evaluate stage shows,
for a named weights file that is missing or invalid, and for no weights at all when
evaluate.require_inception is set.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from . import storage
from .config import Params
from .data import Manifest
from .features import (INCEPTION_WEIGHTS_ENV, INCEPTION_WEIGHTS_FILE, INCEPTION_WEIGHTS_SHA256_PREFIX,
                       find_inception_weights, inception_stats, load_inception)
from .metrics import frechet_distance

BATCH = 50  # images per Inception forward (299x299): pytorch-fid's default

Stats = tuple[np.ndarray, np.ndarray]  # (mu, sigma) of pool3 features


def inception_weights(params: Params, root: Path, is_image: bool) -> tuple[Path | None, str | None]:
    """(the weights file, None), or (None, why there is none). ValueError when evaluate.inception_weights
    names a missing file, or when evaluate.require_inception is set and there are no weights."""
    if not is_image:
        return None, "2-D data: there are no images"
    cfg = params.evaluate
    explicit = None if cfg.inception_weights is None else root / Path(cfg.inception_weights).expanduser()
    try:
        path = find_inception_weights(None if explicit is None else str(explicit))
    except ValueError as e:
        if explicit is not None:  # named in params: a typo must fail, not quietly drop the FID
            raise ValueError(f"evaluate.inception_weights: {e}") from None
        path, reason = None, str(e)
    else:
        reason = None if path is not None else (
            f"no local Inception weights ({INCEPTION_WEIGHTS_FILE}) at evaluate.inception_weights, "
            f"${INCEPTION_WEIGHTS_ENV} or in the torch hub cache; nothing is downloaded")
    if path is None and cfg.require_inception:
        raise ValueError(f"evaluate.require_inception is true, but {reason}: set evaluate.inception_weights to "
                         f"a local copy of {INCEPTION_WEIGHTS_FILE}")
    return path, reason


def inception_network(path: Path, device: torch.device | str = "cpu") -> torch.nn.Module:
    """features.load_inception on `device` (the evaluation's: a GPU where it has one); ValueError saying what
    to do."""
    try:
        return load_inception(path, device)
    except ValueError as e:
        raise ValueError(f"{e}; replace the file, or set evaluate.inception_weights to another one") from None


def reference_key(weights_sha256: str, manifest: Manifest) -> str:
    """What the cached train statistics were computed from: the weights, the dataset, pytorch-fid."""
    import pytorch_fid

    return json.dumps({"weights_sha256": weights_sha256, "dataset_checksum": manifest.checksum, "split": "train",
                       "n": manifest.counts["train"], "pytorch_fid": pytorch_fid.__version__}, sort_keys=True)


def read_reference(ref_file: Path, key: str) -> Stats | None:
    """The (mu, sigma) cached in ref_file under `key`; None when the file is absent, unreadable or for
    another key (the statistics are then computed again)."""
    try:
        with np.load(ref_file) as z:
            return (z["mu"], z["sigma"]) if str(z["key"]) == key else None
    except Exception:  # absent, truncated or foreign
        return None


def write_reference(ref_file: Path, key: str, stats: Stats) -> None:
    buf = io.BytesIO()
    np.savez(buf, mu=stats[0], sigma=stats[1], key=np.array(key))
    storage.write_bytes(ref_file, buf.getvalue())


def reference_stats(net: torch.nn.Module, x_train: torch.Tensor) -> Stats:
    """The Inception statistics of the whole train split (accumulated batch by batch)."""
    return inception_stats(net, x_train, BATCH)


def fid_scorer(net: torch.nn.Module, reference: Stats) -> Callable[[torch.Tensor], float]:
    """FID of a set of images against the reference statistics; the features stream into float64 sums."""
    ref_mu, ref_sigma = reference

    def fid(x: torch.Tensor) -> float:
        return frechet_distance(*inception_stats(net, x, BATCH), ref_mu, ref_sigma)

    return fid


def inception_info(path: Path, weights_sha256: str, manifest: Manifest, ref_file: Path,
                   cached: bool) -> dict[str, Any]:
    """What the standard FID was computed with, for metrics.json."""
    import pytorch_fid

    n = manifest.counts["train"]
    return {"weights": str(path), "weights_sha256": weights_sha256,
            "standard_weights": weights_sha256.startswith(INCEPTION_WEIGHTS_SHA256_PREFIX),
            "network": f"pytorch-fid {pytorch_fid.__version__} InceptionV3 (FID variant), pool3 features (2048-d); "
                       "images mapped to [0, 1], resized bilinearly to 299x299, grayscale repeated to 3 channels",
            "reference": f"all {n} images of the train split", "reference_n": n,
            "reference_file": str(ref_file), "reference_cached": cached}


def inception_baseline_images(x_test: torch.Tensor, seed_ids: list[int], n: int,
                              seed: int) -> tuple[dict[int, torch.Tensor] | None, str]:
    """The real-vs-real Inception FID's images, per seed, and how they were chosen: N held-out test images
    per seed (the draw of the domain baseline), against the train statistics; with fewer than N test
    images, all of them (a floor biased upwards against samples of N). (None, why) with fewer than 2."""
    n_b = min(n, len(x_test))
    if n_b < 2:
        return None, f"the test split holds {len(x_test)} image(s): too few for a baseline"
    images = {s: x_test[torch.from_numpy(np.sort(np.random.default_rng([seed, s]).choice(len(x_test), n_b,
                                                                                          replace=False)))]
              for s in seed_ids}
    how = f"{n_b} random test images per seed (drawn from (params.seed, seed)) against the train statistics"
    return images, how if n_b == n else f"{how}: the whole test split, fewer than N = {n}, so biased upwards"


def inception_summary(results: dict[str, Any], info: dict[str, Any], n: int, seeds: int) -> dict[str, Any]:
    """The top-level inception_fid: the best setting's mean over seeds (the report shows one number per
    variant), which setting that is, and what produced it."""
    scored = {k: r["inception_fid_mean"] for k, r in results.items() if r.get("inception_fid_mean") is not None}
    if not scored:
        return {"inception_fid": None, "inception_fid_reason": "not finite for any setting", "inception": info}
    best = min(scored, key=scored.__getitem__)
    r = results[best]
    std = "" if r["inception_fid_std"] is None else f" ± {r['inception_fid_std']:.3g}"
    reason = (f"best setting {best}: {r['inception_fid_mean']:.4g}{std} (mean ± std over {seeds} seed(s), N = {n} "
              f"per seed, against {info['reference']})")
    if not info["standard_weights"]:
        reason += (f"; the weights (sha256 {info['weights_sha256'][:12]}...) are not the standard file: not "
                   "comparable with published FIDs")
    return {"inception_fid": r["inception_fid_mean"], "inception_fid_setting": best, "inception_fid_reason": reason,
            "inception": info}


__all__ = ["BATCH", "Stats", "fid_scorer", "inception_baseline_images", "inception_info", "inception_network",
           "inception_summary", "inception_weights", "read_reference", "reference_key", "reference_stats",
           "write_reference"]
