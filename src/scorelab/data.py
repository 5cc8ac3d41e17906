"""Datasets as checksummed Parquet shards: prepared once (a DVC stage), then streamed to training.

    cfg = DataConfig(source="digits")                 # params.yaml's `data` section
    manifest = prepare(cfg, seed=0)                   # -> data/prepared/digits/{train,test}-NNNNN.parquet
    verify(manifest.root)                             # re-hash every shard; DataError names a bad one
    x = read_split(manifest.root, "test")             # (N, C, H, W) float32 in [-1, 1]
    x = read_rows(manifest.root, "train", lo, hi)     # rows [lo, hi) only: a training worker's slice

A prepared dataset is a folder `<out_dir>/<source>/` holding

    train-00000.parquet ...  test-00000.parquet ...   at most shard_size rows each
    manifest.json                                     what the shards hold, their sha256, and its own
                                                      (manifest_sha256: every other key, canonical JSON)

prepare() never destroys what it did not write: it replaces `<out_dir>/<source>` only when that folder
holds nothing but a manifest.json and the shards it lists, never lets the output overlap the input folder,
and (the stage passes its working directory as `root`) keeps out_dir inside the project unless
`data.allow_external_out_dir` is true. Folder images are decoded at their real bit depth (16-bit PNGs
scaled by 255/65535); symbolic links inside data.folder are refused, not followed, so the dataset is
exactly the files under it; an image over Pillow's decompression-bomb limit (Image.MAX_IMAGE_PIXELS),
before decoding or once resized, is refused.

Images are stored as uint8 pixels, HWC, in one fixed-size binary column `pixels` (H*W*C bytes a row);
2-D toy points as float32 columns `x0`, `x1`. Every shard also has `label` (int64), `index` (int64: the
row's position in its source, unique within a split, so per-sample seeds survive any sharding) and
`split`. Model space is what the networks see: images x = 2 * (v / 255) - 1 in [-1, 1], toy points as
stored. The same seed gives byte-identical shards (for one pyarrow version): no Parquet statistics,
fixed row groups, no timestamps anywhere, and manifest.json written with sorted keys.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import shutil
import socket
import sys
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from pydantic import Field, ValidationError, model_validator
from pydantic_core import InitErrorDetails

from .modality import Modality, modality_of
from .schema import ConfigError, StrictModel as _Model, describe_error, line_error, pydantic_message
from .storage import sha256_file
from .toy import GaussianMixture, three_blobs

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
MANIFEST_DIGEST_KEY = "manifest_sha256"  # in manifest.json: the sha256 of its other keys (manifest_sha256())
SPLITS = ("train", "test")
Source = Literal["digits", "toy2d", "mnist", "fashion_mnist", "cifar10", "folder"]
ToyKind = Literal["gaussian_mixture", "swiss_roll", "moons", "eight_gaussians", "checkerboard"]

# Native size and channels of each image source; folder images are RGB of any size.
_NATIVE: dict[str, tuple[int | None, int]] = {
    "digits": (8, 1), "mnist": (28, 1), "fashion_mnist": (28, 1), "cifar10": (32, 3), "folder": (None, 3),
}
# Default stored size. Digits are upsampled 8 -> 16 because the U-Net halves the resolution twice:
# 16 -> 8 -> 4 keeps a usable bottleneck, 8 -> 4 -> 2 does not. image_size: 8 keeps the native size.
_DEFAULT_SIZE = {"digits": 16, "mnist": 28, "fashion_mnist": 28, "cifar10": 32}
_TORCHVISION = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST", "cifar10": "CIFAR10"}
_NATURAL = ("cifar10", "folder")  # where a mirrored image is as likely as the original
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_ROW_GROUP = 1024  # rows per Parquet row group: fixed, so the bytes do not depend on anything else
_DOWNLOAD_TIMEOUT_S = 10.0
_PIXEL_SCALE = 127.5  # x = (v - 127.5) / 127.5 == 2 * (v / 255) - 1, and exactly +-1 at 0 and 255

# Independent random streams from one seed: np.random.default_rng([seed, purpose]).
_SPLIT_STREAM, _TOY_STREAM = 0, 1


class DataError(Exception):
    """A dataset cannot be prepared or read; the one-line message names the field or file at fault."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).splitlines()))


# ---------------------------------------------------------------------------------------------
# Configuration: params.yaml's `data` section.


class ToyConfig(_Model):
    """2-D toy data (source toy2d), generated from the seed.

    gaussian_mixture: scorelab.toy.three_blobs(); eight_gaussians: 8 equal components on a circle of
    radius 2, std 0.1. Both are Gaussian mixtures whose exact parameters go into the manifest.
    swiss_roll, moons: scikit-learn's curves, standardised to about unit variance per axis, plus
    isotropic Gaussian noise of std `noise` (in those standardised units).
    checkerboard: uniform on the 8 dark cells of a 4x4 board over [-2, 2]^2.
    """

    kind: ToyKind = "gaussian_mixture"
    n_train: int = Field(20000, ge=1)
    n_test: int = Field(5000, ge=1)
    noise: float = Field(0.05, ge=0)  # only swiss_roll and moons: the others have exact densities


class DataConfig(_Model):
    """Which dataset to prepare, and how. Options of other sources are ignored (so `-S data.source=...`
    can switch sources), except `folder`, which names the data itself and so must match the source."""

    source: Source = "digits"
    out_dir: str = "data/prepared"  # shards go to out_dir/<source>
    image_size: int | None = Field(None, ge=1)  # None: digits 16, mnist/fashion_mnist 28, cifar10 32
    test_fraction: float = Field(0.1, gt=0, le=0.5)  # digits and folder; mnist and cifar10 have their own
    shard_size: int = Field(4096, ge=1)  # rows per Parquet file
    hflip: bool = False  # training-time random horizontal flips; natural images only
    local_path: str | None = None  # mnist/fashion_mnist/cifar10: a folder with torchvision's files
    folder: str | None = None  # source folder: PNG/JPEG files, one subfolder per class (or flat)
    # out_dir outside the project (the stage's working directory) only when this says so: prepare
    # replaces out_dir/<source>, and a typo like ../data must not reach a folder of someone else's
    allow_external_out_dir: bool = False
    toy: ToyConfig = Field(default_factory=ToyConfig)

    @model_validator(mode="after")
    def _coupled(self) -> DataConfig:
        errors: list[InitErrorDetails] = []

        def problem(name: str, message: str) -> None:
            errors.append(line_error((name,), message, getattr(self, name), kind="data_config"))

        if self.source == "folder":
            if self.folder is None:
                problem("folder", "required when source is 'folder': the folder holding the images")
            if self.image_size is None:
                problem("image_size", "required when source is 'folder': images are resized and centre-cropped to it")
        elif self.folder is not None:
            problem("folder", f"only used with source 'folder', but source is {self.source!r}; "
                              "set source: folder or remove data.folder")
        for name in ("out_dir", "folder", "local_path"):  # the OS refuses such a path with a ValueError
            if "\x00" in (getattr(self, name) or ""):
                problem(name, "must not contain a NUL byte")
        if self.hflip and self.source not in _NATURAL:
            problem("hflip", f"only for natural images (source {' or '.join(_NATURAL)}); "
                             f"a mirrored {self.source} sample is not a sample of the data")
        if errors:  # a ValidationError keeps each problem at its own field
            raise ValidationError.from_exception_data(type(self).__name__, errors)
        return self

    @property
    def dataset_dir(self) -> Path:
        return Path(self.out_dir) / self.source

    @property
    def size(self) -> int | None:
        """Stored image side (None for toy2d)."""
        if self.source == "toy2d":
            return None
        return self.image_size if self.image_size is not None else _DEFAULT_SIZE[self.source]

    @property
    def shape(self) -> tuple[int, ...]:
        """One sample's shape in model space: (C, H, W), or (2,) for toy2d."""
        if self.source == "toy2d":
            return (2,)
        return (_NATIVE[self.source][1], self.size, self.size)


def parse_data_config(data: Any) -> DataConfig:
    """Validate a `data` section (None = all defaults); ConfigError lists each problem as "data.key: ..."."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError([f"data: must be a mapping (got {type(data).__name__})"], "data")
    try:
        return DataConfig.model_validate(dict(data))
    except ValidationError as e:
        raise ConfigError([_describe(err) for err in e.errors(include_url=False)], "data") from None


def _describe(err: Any) -> str:
    """An unknown key as params.yaml's are described; any other problem in pydantic's own words, with the
    whole value (the prepare stage's messages: "must be less than or equal to 0.5 (got 0.6)")."""
    if err["type"] == "extra_forbidden":
        return f"data.{describe_error(err, DataConfig)}"
    where = ".".join(["data", *map(str, err["loc"])])
    return f"{where}: {pydantic_message(err)} (got {err.get('input')!r})"


# ---------------------------------------------------------------------------------------------
# The manifest.


@dataclass(frozen=True)
class Shard:
    file: str  # a plain file name inside the dataset folder (checked: never a path that leads out of it)
    split: str
    rows: int
    sha256: str

    def __post_init__(self) -> None:
        f = self.file
        if (not isinstance(f, str) or f in ("", ".", "..") or "/" in f or "\\" in f or "\x00" in f
                or not f.endswith(".parquet")):
            raise ValueError(f"shard file {f!r} is not a plain .parquet file name inside the dataset folder "
                             "(no '/', '\\', '..' or absolute path)")


@dataclass(frozen=True)
class Manifest:
    """manifest.json of a prepared dataset. `root` is the folder it was read from (not stored)."""

    source: str
    seed: int
    shape: tuple[int, ...]  # one sample in model space: (C, H, W) or (2,)
    dtype: str  # of the stored values: "uint8" pixels or "float32" coordinates
    value_range: tuple[float, float]  # of the stored values: [0, 255], or the observed min/max for toy2d
    transform: dict[str, Any]  # stored v -> model x = (v - offset) / scale
    counts: dict[str, int]  # rows per split
    shards: tuple[Shard, ...]
    checksum: str  # sha256 of the sorted shard sha256 hex digests joined by "\n"
    params: dict[str, Any]  # how the data was made: sizes, resampling, toy generator parameters
    classes: tuple[str, ...] | None = None  # label i is classes[i]; None where labels are not classes
    format: int = FORMAT_VERSION
    root: Path | None = field(default=None, compare=False)

    @property
    def modality(self) -> Modality:
        return modality_of(self.shape)

    @property
    def is_image(self) -> bool:
        return self.modality.is_image

    def files(self, split: str) -> list[Path]:
        """Absolute paths of a split's shards, in order (Ray workers change directory: never relative)."""
        _check_split(split)
        if self.root is None:
            raise DataError("manifest has no root folder: read it with load_manifest(dir)")
        return [(self.root / s.file).resolve() for s in self.shards if s.split == split]

    def gaussian_mixture(self) -> GaussianMixture:
        """The exact data density of a gaussian_mixture or eight_gaussians toy dataset."""
        mix = self.params.get("mixture")
        if mix is None:
            raise DataError(f"{self.source} dataset ({self.params.get('kind', 'images')}) is not a Gaussian mixture; "
                            "only toy kinds gaussian_mixture and eight_gaussians are")
        return GaussianMixture(mix["weights"], mix["means"], stds=mix["stds"])

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        del d["root"]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], root: Path | None = None) -> Manifest:
        d = dict(d)
        d.pop(MANIFEST_DIGEST_KEY, None)
        if d.get("format") != FORMAT_VERSION:
            raise ValueError(f"format {d.get('format')!r} is not {FORMAT_VERSION}")
        d["shape"] = tuple(d["shape"])
        d["value_range"] = tuple(d["value_range"])
        d["shards"] = tuple(Shard(**s) for s in d["shards"])
        if d.get("classes") is not None:
            d["classes"] = tuple(d["classes"])
        return cls(**d, root=root)


def manifest_sha256(d: Mapping[str, Any]) -> str:
    """The digest manifest.json carries of itself: sha256 of every key but manifest_sha256, as canonical
    JSON (sorted keys, no spaces). It makes an edited transform, shape or shard list fail to load."""
    rest = {k: v for k, v in d.items() if k != MANIFEST_DIGEST_KEY}
    return hashlib.sha256(json.dumps(rest, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _read_manifest_json(root: Path) -> dict[str, Any]:
    """manifest.json's JSON object, unchecked; DataError names the file when it is absent or unreadable."""
    path = root / MANIFEST_FILE
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: not found; {root} is not a prepared dataset (run pipeline/prepare.py)") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not a valid scorelab manifest: not UTF-8 text ({e.reason} at byte {e.start})"
                        ) from None
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
    except ValueError as e:  # JSONDecodeError
        raise DataError(f"{path}: not a valid scorelab manifest: {e}") from None
    if not isinstance(d, dict):
        raise DataError(f"{path}: not a valid scorelab manifest: holds a JSON {type(d).__name__}, not an object")
    return d


def load_manifest(dir: str | Path) -> Manifest:
    """Read `dir`/manifest.json and check its own digest (the shards are hashed by verify)."""
    root = Path(dir)
    path = root / MANIFEST_FILE
    d = _read_manifest_json(root)
    recorded = d.get(MANIFEST_DIGEST_KEY)
    if recorded is None:
        raise DataError(f"{path}: has no {MANIFEST_DIGEST_KEY} (written by an older scorelab, or edited): "
                        "re-run prepare")
    if recorded != manifest_sha256(d):
        raise DataError(f"{path}: its contents do not match its {MANIFEST_DIGEST_KEY} (edited after prepare wrote "
                        "it): re-run prepare")
    try:
        return Manifest.from_dict(d, root=root.resolve())
    except (ValueError, TypeError, KeyError) as e:
        raise DataError(f"{path}: not a valid scorelab manifest: {e}") from None


def verify(dir: str | Path) -> Manifest:
    """Re-hash every shard and check its row count; DataError names the first shard that disagrees."""
    m = load_manifest(dir)
    for s in m.shards:
        path = m.root / s.file
        if not path.is_file():
            raise DataError(f"{path}: shard listed in manifest.json is missing; re-run prepare")
        digest = sha256_file(path)
        if digest != s.sha256:
            raise DataError(f"{path}: checksum mismatch (sha256 {digest[:16]}..., manifest says {s.sha256[:16]}...); "
                            "the shard changed after it was written: re-run prepare")
        try:
            rows = pq.ParquetFile(path).metadata.num_rows
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{path}: unreadable Parquet shard ({e}); re-run prepare") from None
        if rows != s.rows:
            raise DataError(f"{path}: row count mismatch ({rows} rows, manifest says {s.rows})")
    for split in SPLITS:
        rows = sum(s.rows for s in m.shards if s.split == split)
        if rows != m.counts.get(split):
            raise DataError(f"{m.root / 'manifest.json'}: counts.{split} is {m.counts.get(split)} "
                            f"but its shards hold {rows} rows")
    if overall_checksum(s.sha256 for s in m.shards) != m.checksum:
        raise DataError(f"{m.root / 'manifest.json'}: overall checksum does not match the shard checksums")
    return m


def overall_checksum(digests: Iterable[str]) -> str:
    """The manifest's checksum of its shards' sha256 hex digests: sha256 of them sorted, joined by newlines."""
    return hashlib.sha256("\n".join(sorted(digests)).encode()).hexdigest()


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"split {split!r} is not one of {', '.join(SPLITS)}")


# ---------------------------------------------------------------------------------------------
# Preparing: sources -> shards.


@dataclass
class _Images:
    """An image source: labels of all N rows up front, pixels decoded on demand (folders can be large)."""

    labels: np.ndarray  # (N,) int64
    load: Callable[[np.ndarray], np.ndarray]  # row indices -> (k, H, W, C) uint8 at the stored size


_SourceSplits = dict[str, tuple[_Images, np.ndarray]]  # split -> (images, its rows in the order stored)


def prepare(cfg: DataConfig, seed: int, root: str | Path | None = None) -> Manifest:
    """Write cfg's dataset to cfg.dataset_dir and return its manifest.

    Everything is written into a hidden sibling folder which replaces the old dataset only at the end,
    so a failure never leaves a half-written folder under the real name. `seed` is params' seed, validated
    there (config.load_data_params): an integer >= 0. `root`: the project folder out_dir must lie in
    (unless cfg.allow_external_out_dir); None: anywhere. Before anything is read or written, DataError
    refuses an out_dir outside root, an output that overlaps the input, and an existing
    cfg.dataset_dir that is not a dataset prepare wrote (see check_output).
    """
    final = cfg.dataset_dir
    check_output(cfg, root)
    write: Callable[[Path], dict[str, Any]]
    if cfg.source == "toy2d":
        write = functools.partial(_write_toy, cfg=cfg, seed=seed)
    else:
        splits, params, classes = _image_source(cfg, seed)  # find the source before touching out_dir
        write = functools.partial(_write_images, cfg=cfg, splits=splits, params=params, classes=classes)

    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    # the folders mkdir creates, deepest first: removed again (when still empty) if prepare fails
    made = [d for d in (final.parent, *final.parent.parents) if not os.path.lexists(d)]
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as e:
        _remove_empty(made)
        raise DataError(f"data.out_dir: cannot create a folder in {final.parent}: {e.strerror or e}") from None
    try:
        fields = write(tmp)
        digests = [s.sha256 for s in fields["shards"]]
        manifest = Manifest(source=cfg.source, seed=seed, checksum=overall_checksum(digests), **fields)
        d = json.loads(json.dumps(manifest.to_dict()))  # tuples as the lists they are read back as
        d[MANIFEST_DIGEST_KEY] = manifest_sha256(d)
        (tmp / MANIFEST_FILE).write_text(json.dumps(d, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        check_output(cfg, root)  # again: the folder may have appeared, or changed, while the shards were written
        _replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(made)
        raise
    return dataclasses.replace(manifest, root=final.resolve())


def _remove_empty(folders: list[Path]) -> None:
    """rmdir each folder, deepest first, stopping at the first that is absent or not empty."""
    for d in folders:
        try:
            d.rmdir()
        except OSError:  # not empty: something else writes there now
            break


def check_output(cfg: DataConfig, root: str | Path | None = None) -> None:
    """DataError, naming the setting and the path, unless prepare may write cfg.dataset_dir: inside `root`
    (by name, as written: a data/prepared that links elsewhere is fine) unless cfg.allow_external_out_dir,
    not overlapping the folder the images are read from, and either absent or a dataset prepare wrote."""
    final = cfg.dataset_dir
    if root is not None and not cfg.allow_external_out_dir:
        project = os.path.abspath(root)
        where = os.path.abspath(os.path.join(project, cfg.out_dir))
        if os.path.commonpath([project, where]) != project:
            raise DataError(f"data.out_dir: {cfg.out_dir} is {where}, outside the project {project}; use a folder "
                            "inside it, or set data.allow_external_out_dir: true to write there on purpose")
    source = {"folder": cfg.folder, **dict.fromkeys(_TORCHVISION, cfg.local_path)}.get(cfg.source)
    if source is not None:
        key = "folder" if cfg.source == "folder" else "local_path"
        a, b = Path(source).resolve(), final.resolve()
        if a == b or a in b.parents or b in a.parents:
            raise DataError(f"data.{key}: {source} overlaps the output folder {final} (data.out_dir/<source>); "
                            "prepare would replace the files it reads: choose an out_dir apart from it")
    _check_replaceable(final)


def _check_replaceable(final: Path) -> None:
    """A folder prepare may replace: absent, or holding exactly a manifest.json and the shards it lists."""
    if not os.path.lexists(final):
        return
    hint = "prepare only replaces a dataset it wrote; move it away, or choose another data.out_dir"
    if final.is_symlink() or not final.is_dir():
        what = "a symbolic link" if final.is_symlink() else "a file"
        raise DataError(f"{final}: exists and is not a folder prepare wrote ({what}); {hint}")
    try:
        names = {s.file for s in Manifest.from_dict(_read_manifest_json(final)).shards}
    except DataError:
        raise DataError(f"{final}: exists and holds no readable scorelab {MANIFEST_FILE}; {hint}") from None
    except (ValueError, TypeError, KeyError) as e:
        raise DataError(f"{final}: exists and its {MANIFEST_FILE} is not a scorelab manifest ({e}); {hint}") from None
    # a listed name may be a link (DVC's symlink cache): replacing unlinks it, the target stays
    foreign = sorted(p.name for p in final.iterdir()
                     if p.name not in names | {MANIFEST_FILE} or (p.is_dir() and not p.is_symlink()))
    if foreign:
        raise DataError(f"{final}: holds {foreign[0]!r}, which is not a file its {MANIFEST_FILE} lists "
                        f"({len(foreign)} such); {hint}")


def _replace_dir(new: Path, final: Path) -> None:
    """Rename `new` to `final`; an existing `final` is moved aside first and deleted afterwards."""
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        final.rename(old)
    new.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _split_indices(n: int, test_fraction: float, seed: int) -> dict[str, np.ndarray]:
    if n < 2:
        raise DataError(f"{n} image(s): at least 2 are needed to make a train and a test split")
    n_test = min(max(1, round(test_fraction * n)), n - 1)
    perm = np.random.default_rng([seed, _SPLIT_STREAM]).permutation(n)
    return {"train": perm[n_test:], "test": perm[:n_test]}


def _write_images(tmp: Path, cfg: DataConfig, splits: _SourceSplits,
                  params: dict[str, Any], classes: tuple[str, ...] | None) -> dict[str, Any]:
    c, h, w = cfg.shape
    width = h * w * c
    shards: list[Shard] = []
    for split in SPLITS:
        images, rows = splits[split]
        for k, start in enumerate(range(0, len(rows), cfg.shard_size)):
            idx = rows[start:start + cfg.shard_size]
            pixels = images.load(idx)
            assert pixels.shape == (len(idx), h, w, c) and pixels.dtype == np.uint8, pixels.shape
            column = pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), len(idx),
                                                          [None, pa.py_buffer(np.ascontiguousarray(pixels).tobytes())])
            table = pa.table({"pixels": column, **_common_columns(images.labels[idx], idx, split)})
            shards.append(_write_shard(tmp, split, k, table))
    return dict(
        shape=(c, h, w), dtype="uint8", value_range=(0.0, 255.0),
        transform={"formula": "x = 2 * (v / 255) - 1", "offset": _PIXEL_SCALE, "scale": _PIXEL_SCALE,
                   "model_range": [-1.0, 1.0], "layout": "pixels: H*W*C bytes, HWC order; model x is (C, H, W)"},
        counts={s: len(splits[s][1]) for s in SPLITS}, shards=tuple(shards),
        params={**params, "image_size": h, "channels": c, "resample": "bilinear"}, classes=classes,
    )


def _common_columns(labels: np.ndarray, index: np.ndarray, split: str) -> dict[str, pa.Array]:
    return {
        "label": pa.array(np.asarray(labels, dtype=np.int64)),
        "index": pa.array(np.asarray(index, dtype=np.int64)),
        "split": pa.array([split] * len(index), pa.string()),
    }


def _write_shard(tmp: Path, split: str, k: int, table: pa.Table) -> Shard:
    name = f"{split}-{k:05d}.parquet"
    # No statistics (min/max would be fine, but nothing reads them) and fixed row groups and codec:
    # the bytes then depend only on the rows and the pyarrow version.
    pq.write_table(table, tmp / name, row_group_size=_ROW_GROUP, compression="zstd", compression_level=3,
                   use_dictionary=["split"], write_statistics=False)
    return Shard(file=name, split=split, rows=table.num_rows, sha256=sha256_file(tmp / name))


def _max_pixels() -> float:
    """Pillow's decompression-bomb limit (Image.MAX_IMAGE_PIXELS, read each time; None: none)."""
    from PIL import Image

    return Image.MAX_IMAGE_PIXELS or float("inf")


def _read_image(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 of a PNG/JPEG at its real bit depth: 16-bit greyscale (mode I;16) scaled by 255/65535,
    not clipped to 255; DataError names the file when it is unreadable, of a kind it cannot scale, or over
    the pixel limit."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below, in one line
            im = Image.open(path)
        with im:
            return _decode(im, path)
    except Image.DecompressionBombError as e:
        raise DataError(f"{path}: refused as a decompression bomb ({e})") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable PNG/JPEG image ({e})") from None


def _decode(im: Any, path: Path) -> np.ndarray:
    w, h = im.size
    if w * h > _max_pixels():  # Pillow only warns between the limit and twice it
        raise DataError(f"{path}: {w}x{h} = {w * h} pixels, more than the limit of {_max_pixels():.0f} "
                        "(PIL.Image.MAX_IMAGE_PIXELS); a decompression bomb, or too large to prepare")
    if im.mode.startswith("I;16") or im.mode == "I":  # PNG's 16-bit greyscale
        v = np.asarray(im).astype(np.int64)
        if v.min() < 0 or v.max() > 65535:
            raise DataError(f"{path}: mode {im.mode} values span [{v.min()}, {v.max()}], not 16-bit [0, 65535]; "
                            "save it as an 8- or 16-bit PNG")
        return np.repeat(np.round(v / 257.0).astype(np.uint8)[..., None], 3, axis=2)  # 255/65535 == 1/257
    if im.mode == "F":
        raise DataError(f"{path}: floating-point pixels (mode F) have no fixed range to scale; "
                        "save it as an 8- or 16-bit PNG")
    return np.asarray(im.convert("RGB"))  # 8-bit modes; Pillow reduces 16-bit RGB(A) to 8 bits itself


def _resize(img: np.ndarray, size: int, path: Path | None = None) -> np.ndarray:
    """(H, W, C) uint8 -> (size, size, C): shorter side to `size` (bilinear), then the centre square.
    DataError when the resized image would exceed the pixel limit (a 5,000,000x1 image is 15 KB as a PNG)."""
    from PIL import Image

    h, w, c = img.shape
    if (h, w) == (size, size):
        return img
    scale = size / min(h, w)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if nw * nh > _max_pixels():
        raise DataError(f"{path or 'image'}: {w}x{h} resized to a shorter side of {size} is {nw}x{nh} = {nw * nh} "
                        f"pixels, more than the limit of {_max_pixels():.0f} (PIL.Image.MAX_IMAGE_PIXELS); "
                        "crop its extreme aspect ratio first")
    pil = Image.fromarray(img[..., 0] if c == 1 else img)
    pil = pil.resize((nw, nh), Image.Resampling.BILINEAR)
    left, top = (nw - size) // 2, (nh - size) // 2
    out = np.asarray(pil.crop((left, top, left + size, top + size)))
    return out.reshape(size, size, c)


def _array_images(pixels: np.ndarray, labels: np.ndarray, size: int) -> _Images:
    """In-memory (N, H, W, C) uint8 images, resized when loaded."""

    def load(idx: np.ndarray) -> np.ndarray:
        out = np.empty((len(idx), size, size, pixels.shape[-1]), np.uint8)
        for j, i in enumerate(idx):
            out[j] = _resize(pixels[i], size)
        return out

    return _Images(labels=np.asarray(labels, np.int64), load=load)



def _image_source(cfg: DataConfig, seed: int) -> tuple[_SourceSplits, dict[str, Any], tuple[str, ...] | None]:
    """The splits, the parameters worth recording, and the class names of an image source."""
    size = cfg.size
    if cfg.source == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        pixels = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]  # 0..16 -> 0..255
        images = _array_images(pixels, d.target, size)
        order = _split_indices(len(pixels), cfg.test_fraction, seed)
        params = {"native_size": 8, "test_fraction": cfg.test_fraction, "scaling": "round(v * 255 / 16)"}
        return {s: (images, order[s]) for s in SPLITS}, params, tuple(str(i) for i in range(10))
    if cfg.source in _TORCHVISION:
        splits, classes = {}, None
        rng = np.random.default_rng([seed, _SPLIT_STREAM])
        for split in SPLITS:
            pixels, labels, classes = _torchvision(cfg, train=split == "train")
            # Official splits; each is stored in a seeded random order so that every shard mixes classes.
            splits[split] = (_array_images(pixels, labels, size), rng.permutation(len(pixels)))
        params = {"native_size": _NATIVE[cfg.source][0], "split": "official"}
        return splits, params, classes
    return _folder_source(cfg, seed)


def _torchvision(cfg: DataConfig, train: bool) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """(N, H, W, C) uint8, labels, class names of one official split; DataError when offline."""
    import urllib.parse

    import torchvision.datasets as tvd

    name = _TORCHVISION[cfg.source]
    if cfg.local_path is not None:
        root = Path(cfg.local_path)
        if not root.is_dir():
            raise DataError(f"data.local_path: {root} is not a folder (it should hold torchvision's {name} files)")
    else:
        root = Path(cfg.out_dir) / "downloads"
    cls = getattr(tvd, name)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(_DOWNLOAD_TIMEOUT_S)  # fail at once offline instead of hanging on a connect
    try:
        ds = cls(str(root), train=train, download=True)
    except Exception as e:  # torchvision raises RuntimeError, URLError, OSError, ... for a failed download
        urls = getattr(cls, "mirrors", None) or [getattr(cls, "url", "")]
        hosts = ", ".join(urllib.parse.urlparse(u).netloc for u in urls)
        reason = " ".join(str(getattr(e, "reason", e)).split())[:160]
        raise DataError(f"source {cfg.source}: no {name} files under {root} and the download from {hosts} failed "
                        f"({reason}); set data.local_path to a folder that holds torchvision's {name} files") from None
    finally:
        socket.setdefaulttimeout(previous)
    data = ds.data.numpy() if isinstance(ds.data, torch.Tensor) else np.asarray(ds.data)
    if data.ndim == 3:
        data = data[..., None]
    return data.astype(np.uint8, copy=False), np.asarray(ds.targets, np.int64), tuple(ds.classes)


def _folder_source(cfg: DataConfig, seed: int) -> tuple[_SourceSplits, dict[str, Any], tuple[str, ...] | None]:
    root = Path(cfg.folder)
    if not root.is_dir():
        raise DataError(f"data.folder: {root} does not exist or is not a folder")
    entries = list(root.rglob("*"))  # does not descend into linked folders: those are refused below
    # Links are refused rather than followed: the dataset is then exactly the files under data.folder,
    # with no way out of it and no cycles.
    link = next((p for p in entries if p.is_symlink() and (p.is_dir() or p.suffix.lower() in _IMAGE_SUFFIXES)), None)
    if link is not None:
        raise DataError(f"data.folder: {link} is a symbolic link; links inside data.folder are not followed: "
                        "copy the images there, or point data.folder at the real folder")
    files = sorted((p for p in entries if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES),
                   key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise DataError(f"data.folder: no PNG or JPEG files under {root}")
    parts = [p.relative_to(root).parts for p in files]
    nested = [len(q) > 1 for q in parts]
    if any(nested) and not all(nested):
        flat = next(files[i] for i, n in enumerate(nested) if not n)
        raise DataError(f"data.folder: {root} mixes images at its top level ({flat.name}) with class subfolders; "
                        "put every image in a subfolder, or none")
    if all(nested):
        classes = tuple(sorted({q[0] for q in parts}))
        labels = np.array([classes.index(q[0]) for q in parts], np.int64)
    else:
        classes, labels = None, np.zeros(len(files), np.int64)
    size = cfg.size

    def load(idx: np.ndarray) -> np.ndarray:
        out = np.empty((len(idx), size, size, 3), np.uint8)
        for j, i in enumerate(idx):
            out[j] = _resize(_read_image(files[i]), size, files[i])
        return out

    order = _split_indices(len(files), cfg.test_fraction, seed)
    params = {"folder": cfg.folder, "files": len(files), "test_fraction": cfg.test_fraction,
              "crop": "shorter side resized, centre square"}
    return {s: (_Images(labels, load), order[s]) for s in SPLITS}, params, classes


# -- toy2d -----------------------------------------------------------------------------------------

_EIGHT_RADIUS, _EIGHT_STD = 2.0, 0.1
# Fixed standardisation of scikit-learn's noise-free curves (their mean and std per axis, measured on
# 2e6 points): constants, so that the distribution does not depend on the sample drawn.
_SWISS_SHIFT, _SWISS_SCALE = (2.0, 0.2), (6.62, 6.95)  # make_swiss_roll's (x, z) columns
_MOONS_SHIFT, _MOONS_SCALE = (0.5, 0.25), (0.866, 0.494)


def _eight_gaussians() -> GaussianMixture:
    angles = np.arange(8) * (np.pi / 4)
    means = _EIGHT_RADIUS * np.stack([np.cos(angles), np.sin(angles)], 1)
    return GaussianMixture(np.full(8, 1 / 8), means, stds=np.full(8, _EIGHT_STD))


def _toy_points(toy: ToyConfig, seed: int) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(n, 2) float32 points, (n,) labels (mixture component, moon, or -1), generator parameters."""
    n = toy.n_train + toy.n_test
    rng = np.random.default_rng([seed, _TOY_STREAM])
    params: dict[str, Any] = {"kind": toy.kind, "n_train": toy.n_train, "n_test": toy.n_test}
    if toy.kind in ("gaussian_mixture", "eight_gaussians"):
        gm = three_blobs() if toy.kind == "gaussian_mixture" else _eight_gaussians()
        g = torch.Generator().manual_seed(int(rng.integers(2**62)))
        x, comp = gm.sample(n, generator=g, return_labels=True)
        params["mixture"] = {"weights": gm.weights.tolist(), "means": gm.means.tolist(), "stds": gm.stds.tolist()}
        return x.numpy(), comp.numpy(), params
    if toy.kind in ("swiss_roll", "moons"):
        from sklearn.datasets import make_moons, make_swiss_roll

        state = int(rng.integers(2**31))
        if toy.kind == "swiss_roll":
            x = make_swiss_roll(n, noise=0.0, random_state=state)[0][:, [0, 2]]
            labels, shift, scale = np.full(n, -1), _SWISS_SHIFT, _SWISS_SCALE
        else:
            x, labels = make_moons(n, noise=0.0, random_state=state)
            shift, scale = _MOONS_SHIFT, _MOONS_SCALE
        x = (x - shift) / scale + toy.noise * rng.standard_normal((n, 2))
        params.update(noise=toy.noise, shift=list(shift), scale=list(scale),
                      rule="x = (curve - shift) / scale + noise * N(0, I)")
        return x.astype(np.float32), labels, params
    # checkerboard: column c uniform, then one of the two rows r with c + r even
    x0 = rng.uniform(-2.0, 2.0, n)
    col = np.clip(np.floor(x0), -2, 1) + 2
    row = (col % 2) + 2 * rng.integers(0, 2, n)
    x1 = -2.0 + row + rng.uniform(0.0, 1.0, n)
    params.update(low=-2.0, high=2.0, cells=4, rule="uniform where floor(x0) + floor(x1) is even")
    return np.stack([x0, x1], 1).astype(np.float32), np.full(n, -1), params


def _write_toy(tmp: Path, cfg: DataConfig, seed: int) -> dict[str, Any]:
    x, labels, params = _toy_points(cfg.toy, seed)
    n_train = cfg.toy.n_train
    index = np.arange(len(x))
    shards = []
    for split, rows in (("train", index[:n_train]), ("test", index[n_train:])):
        for k, start in enumerate(range(0, len(rows), cfg.shard_size)):
            idx = rows[start:start + cfg.shard_size]
            table = pa.table({"x0": pa.array(x[idx, 0]), "x1": pa.array(x[idx, 1]),
                              **_common_columns(labels[idx], idx, split)})
            shards.append(_write_shard(tmp, split, k, table))
    return dict(
        shape=(2,), dtype="float32", value_range=(float(x.min()), float(x.max())),
        transform={"formula": "x = v", "offset": 0.0, "scale": 1.0, "model_range": None,
                   "layout": "columns x0, x1"},
        counts={"train": n_train, "test": cfg.toy.n_test}, shards=tuple(shards), params=params, classes=None,
    )


# ---------------------------------------------------------------------------------------------
# Reading.


def decode_batch(batch: Mapping[str, np.ndarray], manifest: Manifest) -> dict[str, np.ndarray]:
    """Stored columns (numpy) -> {"x": (B, C, H, W) or (B, 2) float32 in model space, "label", "index"}."""
    if manifest.is_image:
        c, h, w = manifest.shape
        pixels = batch["pixels"]
        if isinstance(pixels, np.ndarray) and pixels.dtype == np.uint8:  # already (B, H*W*C) bytes
            raw = pixels.reshape(-1)
        else:  # an object array of bytes, as pyarrow and Ray give a fixed-size binary column
            raw = np.frombuffer(b"".join(pixels), np.uint8)
        # A 256-entry table computed in float64: every pixel maps to the correctly rounded float32 of
        # 2 * (v / 255) - 1, whatever order float32 arithmetic would have taken.
        t = manifest.transform
        table = ((np.arange(256) - t["offset"]) / t["scale"]).astype(np.float32)
        x = table[raw.reshape(-1, h, w, c).transpose(0, 3, 1, 2)]
    else:
        x = np.stack([np.asarray(batch["x0"], np.float32), np.asarray(batch["x1"], np.float32)], 1)
    out = {"x": np.ascontiguousarray(x), "label": np.asarray(batch["label"], np.int64)}
    if "index" in batch:
        out["index"] = np.asarray(batch["index"], np.int64)
    return out


def columns(manifest: Manifest) -> list[str]:
    """The stored columns that decode_batch reads."""
    return ["pixels", "label", "index"] if manifest.is_image else ["x0", "x1", "label", "index"]


def read_split(dir: str | Path, split: str) -> torch.Tensor:
    """A whole split as one float32 tensor in model space (small data, evaluation)."""
    return read_rows(dir, split, 0, sys.maxsize)


def read_rows(data_dir: str | Path, split: str, lo: int, hi: int) -> torch.Tensor:
    """Rows [lo, hi) of a split in model space, reading only the Parquet shards that hold them."""
    manifest = load_manifest(data_dir)
    shards = [s for s in manifest.shards if s.split == split]
    parts, offset = [], 0
    for shard, path in zip(shards, manifest.files(split)):
        a, b = max(lo, offset), min(hi, offset + shard.rows)
        if a < b:
            try:
                table = pq.read_table(path, columns=columns(manifest)).slice(a - offset, b - a)
            except (pa.ArrowException, OSError) as e:
                raise DataError(f"{path}: unreadable Parquet shard ({e}); run verify, then re-run prepare") from None
            parts.append(decode_batch({c: table.column(c).to_numpy() for c in table.column_names}, manifest)["x"])
        offset += shard.rows
    return torch.from_numpy(np.concatenate(parts)) if parts else torch.empty((0, *manifest.shape))


__all__ = [
    "DataConfig", "DataError", "MANIFEST_DIGEST_KEY", "MANIFEST_FILE", "Manifest", "SPLITS", "Shard", "ToyConfig",
    "check_output", "columns", "decode_batch", "load_manifest", "manifest_sha256", "overall_checksum",
    "parse_data_config", "prepare", "read_rows", "read_split", "verify",
]
