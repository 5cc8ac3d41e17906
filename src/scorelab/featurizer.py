"""The featurizer stage: the feature extractor of the image distances, trained once per dataset, and the
format of its folder (read back by the evaluate stage and the sweep's objective).

    build_featurizer(params, root=root, out_dir=Layout(root).featurizer)
    clf, meta, ref_test, ref_train = load_featurizer(featurizer_dir, manifest)   # ref_*: (mu, sigma)

The folder holds, for image data,

    classifier.pt    a DigitClassifier trained on the train split (features.save_classifier)
    ref_test.npz     mu, sigma of the test split's classifier features (the sweep's objective)
    ref_train.npz    mu, sigma of the whole train split's features: the evaluation's reference, keyed by the
                     dataset's checksum and the classifier file's sha256 (load_featurizer refuses a mismatch)
    metrics.json     {"test_accuracy", "train_seconds", ...}

and for 2-D data only metrics.json with {"skipped": ...}: distances are computed on the points.
"""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import storage
from .config import Params
from .data import Manifest, load_manifest, read_split
from .features import (DigitClassifier, accuracy, feature_stats, load_classifier, save_classifier,
                       train_classifier)
from .layout import CLASSIFIER_FILE, METRICS_FILE, REF_TEST_FILE, REF_TRAIN_FILE, Layout


_RUN_STAGE = "run the featurizer stage (python pipeline/featurizer.py)"

Stats = tuple[np.ndarray, np.ndarray]  # (mu, sigma) of features


class FeaturizerError(RuntimeError):
    """The dataset cannot be featurized, or a featurizer folder is missing or does not fit (the message
    names the file and says to run the featurizer stage)."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def read_labels(manifest: Manifest, split: str) -> np.ndarray:
    """A split's `label` column, in read_split's row order (the same shards, row by row)."""
    import pyarrow.parquet as pq

    return np.concatenate([pq.read_table(p, columns=["label"])["label"].to_numpy() for p in manifest.files(split)])


def write_stats(path: Path, mu: np.ndarray, sigma: np.ndarray, key: dict[str, str] | None = None) -> None:
    """mu, sigma and (optionally) the key strings that say what they were computed from."""
    buf = io.BytesIO()
    np.savez(buf, mu=mu, sigma=sigma, **{f"key_{k}": np.array(v) for k, v in (key or {}).items()})
    storage.write_bytes(path, buf.getvalue())


def read_stats(path: Path, key: dict[str, str] | None = None) -> Stats:
    """(mu, sigma) of a write_stats file; FeaturizerError naming the file when it is absent, unreadable or
    (given `key`) computed from something else."""
    try:
        with np.load(path) as z:
            found = {k: str(z[f"key_{k}"]) if f"key_{k}" in z.files else None for k in (key or {})}
            stats = z["mu"], z["sigma"]
    except FileNotFoundError:
        raise FeaturizerError(f"{path}: not found; {_RUN_STAGE}") from None
    except Exception as e:  # truncated or foreign files fail in many ways
        raise FeaturizerError(f"{path}: unreadable statistics file ({type(e).__name__}); rerun the featurizer "
                              "stage") from None
    stale = [k for k, v in (key or {}).items() if found[k] != v]
    if stale:
        raise FeaturizerError(f"{path}: computed from another {' and '.join(stale)} than the featurizer folder's; "
                              "rerun the featurizer stage")
    return stats


def build_featurizer(params: Params, *, root: Path, out_dir: Path, epochs: int = 12) -> dict[str, Any]:
    """Train the DigitClassifier on the prepared train split and write the featurizer folder (module
    docstring); return its metrics. Deterministic: seed params.seed, one CPU thread while training
    (the same weights on any machine). 2-D data: only metrics.json, saying it was skipped."""
    manifest = load_manifest(Layout(root).dataset(params.data.dataset_dir))
    out_dir = Path(out_dir)
    (out_dir / METRICS_FILE).unlink(missing_ok=True)
    if not manifest.modality.is_image:
        for name in (CLASSIFIER_FILE, REF_TEST_FILE, REF_TRAIN_FILE):  # nothing else: stale files would mislead
            (out_dir / name).unlink(missing_ok=True)
        metrics: dict[str, Any] = {"skipped": "2-D data: distances are computed on the points themselves"}
        storage.write_json(out_dir / METRICS_FILE, metrics, indent=2)
        return metrics
    if manifest.classes is None or len(manifest.classes) < 2:
        raise FeaturizerError(f"{manifest.root / 'manifest.json'}: the featurizer is a classifier and needs at least "
                              "two classes of labelled images (a folder source with class subfolders)")

    x_train, y_train = read_split(manifest.root, "train"), read_labels(manifest, "train")
    x_test, y_test = read_split(manifest.root, "test"), read_labels(manifest, "test")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tick = time.perf_counter()
        model = train_classifier(x_train, y_train, epochs=epochs, seed=params.seed, num_classes=len(manifest.classes))
        seconds = time.perf_counter() - tick
    finally:
        torch.set_num_threads(threads)
    test_accuracy = accuracy(model, x_test, y_test)
    metrics = {"test_accuracy": test_accuracy, "train_seconds": round(seconds, 3), "epochs": epochs,
               "seed": params.seed, "n_train": len(x_train), "n_test": len(x_test),
               "dataset_checksum": manifest.checksum}
    save_classifier(model, out_dir / CLASSIFIER_FILE, {"source": manifest.source, **metrics})
    write_stats(out_dir / REF_TEST_FILE, *feature_stats(model, x_test))
    write_stats(out_dir / REF_TRAIN_FILE, *feature_stats(model, x_train), key=_reference_key(out_dir, manifest))
    storage.write_json(out_dir / METRICS_FILE, metrics, indent=2)
    return metrics


def _reference_key(folder: Path, manifest: Manifest) -> dict[str, str]:
    """What the train statistics were computed from: the data and the classifier (its file's sha256)."""
    return {"dataset_checksum": manifest.checksum, "classifier_sha256": storage.sha256_file(folder / CLASSIFIER_FILE)}


def load_featurizer(featurizer_dir: Path, manifest: Manifest) -> tuple[DigitClassifier, dict[str, Any], Stats, Stats]:
    """(classifier, its meta, ref_test stats, ref_train stats) of a featurizer folder built on `manifest`'s
    dataset; FeaturizerError, naming the file, when one is missing, unreadable or made for another dataset."""
    path = Path(featurizer_dir) / CLASSIFIER_FILE
    if not path.is_file():
        raise FeaturizerError(f"{path}: not found; {_RUN_STAGE}")
    try:
        clf, meta = load_classifier(path)
    except ValueError as e:
        raise FeaturizerError(f"{e}; rerun the featurizer stage") from None
    if meta.get("dataset_checksum") != manifest.checksum:
        raise FeaturizerError(f"{path} was trained on another dataset than {manifest.root}: rerun the featurizer "
                              "stage")
    return (clf, meta, read_stats(path.parent / REF_TEST_FILE),
            read_stats(path.parent / REF_TRAIN_FILE, _reference_key(path.parent, manifest)))


__all__ = ["CLASSIFIER_FILE", "REF_TEST_FILE", "REF_TRAIN_FILE", "FeaturizerError", "build_featurizer",
           "load_featurizer", "read_labels", "read_stats", "write_stats"]
