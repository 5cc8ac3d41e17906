"""scorelab.data with real files and real torchvision: prepare, verify, read back."""

import hashlib
import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image

from scorelab.config import ConfigError
from scorelab.data import (
    MANIFEST_DIGEST_KEY, DataConfig, DataError, load_manifest, manifest_sha256, parse_data_config, prepare, read_rows,
    read_split, verify,
)
from scorelab.toy import GaussianMixture

REPO = Path(__file__).resolve().parents[1]
N_DIGITS = 1797


def digits_cfg(out: Path, **kw) -> DataConfig:
    return DataConfig(source="digits", out_dir=str(out), **kw)


def column(dir: Path, split: str, name: str) -> np.ndarray:
    m = load_manifest(dir)
    return np.concatenate([pq.read_table(p, columns=[name]).column(name).to_numpy() for p in m.files(split)])


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def reference_digits(size: int) -> np.ndarray:
    """load_digits processed independently of scorelab.data: 0..16 -> 0..255, then PIL bilinear."""
    from sklearn.datasets import load_digits

    imgs = np.round(load_digits().images * 255 / 16).astype(np.uint8)
    if size == 8:
        return imgs
    return np.stack([np.asarray(Image.fromarray(a).resize((size, size), Image.Resampling.BILINEAR)) for a in imgs])


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    """Digits at the default 16x16, several shards per split; tests that modify it work on a copy."""
    return prepare(digits_cfg(tmp_path_factory.mktemp("digits"), shard_size=500), seed=0).root


# ---------------------------------------------------------------------------------------------
# Digits


def test_digits_counts_shape_and_range(digits):
    m = verify(digits)
    assert m.shape == (1, 16, 16) and m.dtype == "uint8" and m.value_range == (0.0, 255.0)
    assert m.counts["train"] + m.counts["test"] == N_DIGITS and m.counts["test"] == 180
    assert [s.file for s in m.shards] == ["train-00000.parquet", "train-00001.parquet", "train-00002.parquet",
                                          "train-00003.parquet", "test-00000.parquet"]
    assert m.classes == tuple("0123456789")
    train, test = set(column(digits, "train", "index")), set(column(digits, "test", "index"))
    assert not train & test and train | test == set(range(N_DIGITS))
    assert set(column(digits, "test", "split")) == {"test"}
    for split in ("train", "test"):
        x = read_split(digits, split)
        assert x.shape == (m.counts[split], 1, 16, 16) and x.dtype == torch.float32
        assert x.min() == -1 and x.max() == 1


def test_digits_native_size_8(tmp_path):
    m = prepare(digits_cfg(tmp_path, image_size=8), seed=0)
    assert m.shape == (1, 8, 8) and m.params["image_size"] == 8
    x = read_split(m.root, "train")
    index = column(m.root, "train", "index")
    assert torch.equal(x[:, 0], torch.from_numpy(2 * (reference_digits(8)[index] / 255) - 1).float())


def test_round_trip_gives_exactly_the_pixels_written(digits):
    reference = reference_digits(16)
    for split in ("train", "test"):
        index = column(digits, split, "index")
        pixels = np.frombuffer(b"".join(column(digits, split, "pixels")), np.uint8).reshape(-1, 16, 16)
        assert np.array_equal(pixels, reference[index])
        # the model-space tensor is the documented affine map of those bytes, nothing else
        assert torch.equal(read_split(digits, split)[:, 0], torch.from_numpy(2 * (reference[index] / 255) - 1).float())


def test_same_seed_is_byte_identical_and_another_seed_splits_differently(tmp_path, digits):
    again = prepare(digits_cfg(tmp_path / "a", shard_size=500), seed=0).root
    for f in sorted(p.name for p in digits.iterdir()):
        assert sha(again / f) == sha(digits / f), f
    other = prepare(digits_cfg(tmp_path / "b", shard_size=500), seed=1)
    assert other.checksum != load_manifest(digits).checksum
    assert set(column(other.root, "test", "index")) != set(column(digits, "test", "index"))


def test_prepare_replaces_an_old_dataset_and_a_failure_keeps_it(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(4):
        Image.new("RGB", (10, 10), (60 * i, 0, 0)).save(folder / f"{i}.png")
    cfg = DataConfig(source="folder", folder=str(folder), image_size=8, out_dir=str(tmp_path / "out"))
    first = prepare(cfg, seed=0)
    Image.new("RGB", (10, 10)).save(folder / "4.png")
    second = prepare(cfg, seed=0)  # replaces the first
    assert second.counts["train"] + second.counts["test"] == 5 and verify(second.root).checksum != first.checksum
    (folder / "5.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="5.png"):
        prepare(cfg, seed=0)
    assert verify(second.root).checksum == second.checksum  # the last good dataset is untouched
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["folder"]  # no temporary folder left


# ---------------------------------------------------------------------------------------------
# Toy 2-D data


@pytest.mark.parametrize("kind", ["gaussian_mixture", "swiss_roll", "moons", "eight_gaussians", "checkerboard"])
def test_toy2d(tmp_path, kind):
    cfg = DataConfig(source="toy2d", out_dir=str(tmp_path), shard_size=3000,
                     toy={"kind": kind, "n_train": 8000, "n_test": 2000})
    m = prepare(cfg, seed=5)
    assert verify(m.root) == m
    assert m.shape == (2,) and m.dtype == "float32" and m.counts == {"train": 8000, "test": 2000}
    assert len(m.shards) == 3 + 1
    train, test = read_split(m.root, "train"), read_split(m.root, "test")
    assert train.shape == (8000, 2) and test.shape == (2000, 2) and torch.isfinite(train).all()
    lo, hi = m.value_range
    assert lo == min(train.min(), test.min()) and hi == max(train.max(), test.max())

    if kind in ("gaussian_mixture", "eight_gaussians"):
        mix = json.loads((m.root / "manifest.json").read_text())["params"]["mixture"]
        gm = GaussianMixture(mix["weights"], mix["means"], stds=mix["stds"])  # as evaluation would rebuild it
        assert torch.isfinite(gm.log_prob(test.double())).all()
        # the data mean agrees with the density's mean within 4 standard errors
        se = (torch.diag(gm.covariance) / len(train)).sqrt()
        assert ((train.double().mean(0) - gm.mean).abs() < 4 * se).all()
        labels = column(m.root, "train", "label")
        assert set(labels) == set(range(len(mix["weights"])))
        assert torch.equal(m.gaussian_mixture().means, gm.means)
    elif kind == "checkerboard":
        cells = torch.floor(train).long()
        assert ((cells[:, 0] + cells[:, 1]) % 2 == 0).all() and train.abs().max() <= 2
    else:  # standardised to about unit variance
        assert ((train.std(0) > 0.8) & (train.std(0) < 1.25)).all()
        with pytest.raises(DataError, match="not a Gaussian mixture"):
            m.gaussian_mixture()


# ---------------------------------------------------------------------------------------------
# verify


@pytest.fixture
def copy(digits, tmp_path) -> Path:
    return Path(shutil.copytree(digits, tmp_path / "digits"))


def test_verify_changed_byte(copy):
    shard = copy / "train-00001.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"train-00001\.parquet: checksum mismatch"):
        verify(copy)


def test_verify_truncated_shard(copy):
    shard = copy / "test-00000.parquet"
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(DataError, match=r"test-00000\.parquet: checksum"):
        verify(copy)


def test_verify_corrupt_shard_whose_checksum_was_updated(copy):
    shard = copy / "train-00002.parquet"
    shard.write_bytes(shard.read_bytes()[:-20])  # the footer is gone: not Parquet any more
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["shards"][2]["sha256"] = sha(shard)
    manifest[MANIFEST_DIGEST_KEY] = manifest_sha256(manifest)  # as a careful forger would
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"train-00002\.parquet: unreadable Parquet"):
        verify(copy)
    with pytest.raises(DataError, match=r"train-00002\.parquet: unreadable Parquet"):
        read_split(copy, "train")


def test_verify_deleted_shard(copy):
    (copy / "train-00003.parquet").unlink()
    with pytest.raises(DataError, match=r"train-00003\.parquet: shard listed in manifest.json is missing"):
        verify(copy)


def test_verify_row_count_disagrees(copy):
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["shards"][0]["rows"] += 1
    manifest[MANIFEST_DIGEST_KEY] = manifest_sha256(manifest)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"train-00000\.parquet: row count mismatch \(500 rows, manifest says 501\)"):
        verify(copy)


def test_verify_missing_or_broken_manifest(tmp_path, copy):
    with pytest.raises(DataError, match="manifest.json: not found"):
        verify(tmp_path / "nothing")
    (copy / "manifest.json").write_text("{")
    with pytest.raises(DataError, match="not a valid scorelab manifest"):
        verify(copy)


# ---------------------------------------------------------------------------------------------
# Image folders


def make_folder(root: Path) -> None:
    """Two classes, mixed sizes and modes; each image one flat colour except the striped one."""
    (root / "cats").mkdir(parents=True)
    (root / "dogs" / "deeper").mkdir(parents=True)
    Image.new("RGB", (40, 20), (255, 0, 0)).save(root / "cats" / "a.png")
    Image.new("L", (9, 15), 128).save(root / "cats" / "b.png")
    Image.new("RGBA", (12, 12), (0, 255, 0, 255)).save(root / "cats" / "c.PNG")
    Image.new("RGB", (33, 21), (0, 0, 255)).save(root / "dogs" / "d.jpg", quality=100)
    striped = np.zeros((16, 48, 3), np.uint8)
    striped[:, 12:36] = 200  # a little wider than the middle third, which is all the centre crop keeps
    Image.fromarray(striped).save(root / "dogs" / "deeper" / "e.png")
    (root / "dogs" / "notes.txt").write_text("not an image, and not a PNG by name: skipped")


def test_folder(tmp_path):
    make_folder(tmp_path / "imgs")
    cfg = DataConfig(source="folder", folder=str(tmp_path / "imgs"), image_size=8, test_fraction=0.2,
                     out_dir=str(tmp_path / "out"), hflip=True)
    m = prepare(cfg, seed=0)
    assert m.shape == (3, 8, 8) and m.counts == {"train": 4, "test": 1} and m.classes == ("cats", "dogs")
    index = np.concatenate([column(m.root, s, "index") for s in ("train", "test")])
    labels = np.concatenate([column(m.root, s, "label") for s in ("train", "test")])
    pixels = np.frombuffer(b"".join(np.concatenate([column(m.root, s, "pixels") for s in ("train", "test")])),
                           np.uint8).reshape(-1, 8, 8, 3)
    by_index = {int(i): (int(label), p) for i, label, p in zip(index, labels, pixels)}
    # files sorted by relative path: cats/a.png, cats/b.png, cats/c.PNG, dogs/d.jpg, dogs/deeper/e.png
    assert [by_index[i][0] for i in range(5)] == [0, 0, 0, 1, 1]
    assert (by_index[0][1] == [255, 0, 0]).all()
    assert (by_index[1][1] == 128).all()  # grey becomes RGB
    assert (by_index[2][1] == [0, 255, 0]).all()  # alpha dropped
    assert (np.abs(by_index[3][1].astype(int) - [0, 0, 255]) <= 3).all()  # JPEG, nearly exact
    assert (by_index[4][1] == 200).all()  # the centre square of the striped image


def test_flat_folder_has_label_zero(tmp_path):
    (tmp_path / "imgs").mkdir()  # apart from out_dir: an output inside the input folder is refused
    for i in range(3):
        Image.new("RGB", (5 + i, 7), (i, i, i)).save(tmp_path / "imgs" / f"{i}.png")
    m = prepare(DataConfig(source="folder", folder=str(tmp_path / "imgs"), image_size=4,
                           out_dir=str(tmp_path / "out")), 0)
    assert m.classes is None and set(column(m.root, "train", "label")) == {0}


def test_folder_errors(tmp_path):
    out = tmp_path / "out"

    def cfg(folder: Path) -> DataConfig:
        return DataConfig(source="folder", folder=str(folder), image_size=8, out_dir=str(out))

    with pytest.raises(DataError, match=r"data.folder: .*missing does not exist"):
        prepare(cfg(tmp_path / "missing"), 0)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("hi")
    with pytest.raises(DataError, match=r"data.folder: no PNG or JPEG files under .*empty"):
        prepare(cfg(tmp_path / "empty"), 0)
    make_folder(tmp_path / "bad")
    (tmp_path / "bad" / "dogs" / "fake.png").write_text("plain text with a .png name")
    with pytest.raises(DataError, match=r"dogs/fake\.png: not a readable PNG/JPEG image"):
        prepare(cfg(tmp_path / "bad"), 0)
    assert not out.exists() or list(out.iterdir()) == []  # nothing that looks like a dataset


# ---------------------------------------------------------------------------------------------
# torchvision sources offline


def network_reachable() -> bool:
    try:
        socket.create_connection(("ossci-datasets.s3.amazonaws.com", 443), timeout=3).close()
        return True
    except OSError:
        return False


@pytest.mark.parametrize("source", ["mnist", "cifar10"])
def test_torchvision_source_offline_fails_fast(tmp_path, source):
    if network_reachable():
        pytest.skip("network reachable: the offline error cannot be observed without downloading")
    empty = tmp_path / "tv"
    empty.mkdir()
    start = time.monotonic()
    with pytest.raises(DataError) as e:
        prepare(DataConfig(source=source, local_path=str(empty), out_dir=str(tmp_path / "out")), seed=0)
    assert time.monotonic() - start < 30
    msg = str(e.value)
    assert f"source {source}" in msg and "data.local_path" in msg and "\n" not in msg
    assert ("ossci-datasets.s3.amazonaws.com" if source == "mnist" else "www.cs.toronto.edu") in msg
    assert not (tmp_path / "out").exists()


def test_torchvision_local_path_must_be_a_folder(tmp_path):
    with pytest.raises(DataError, match=r"data.local_path: .*nowhere is not a folder"):
        prepare(DataConfig(source="fashion_mnist", local_path=str(tmp_path / "nowhere")), seed=0)


# ---------------------------------------------------------------------------------------------
# Configuration


def test_config_defaults_per_source():
    assert DataConfig().shape == (1, 16, 16)
    assert DataConfig(source="mnist").shape == (1, 28, 28)
    assert DataConfig(source="fashion_mnist").shape == (1, 28, 28)
    assert DataConfig(source="cifar10", hflip=True).shape == (3, 32, 32)
    assert DataConfig(source="toy2d").shape == (2,)
    assert DataConfig(source="folder", folder="x", image_size=64).shape == (3, 64, 64)
    assert DataConfig(out_dir="d", source="mnist").dataset_dir == Path("d/mnist")


@pytest.mark.parametrize("data, problems", [
    ({"hflip": True}, ["data.hflip: only for natural images (source cifar10 or folder)"]),
    ({"source": "folder"}, ["data.folder: required when source is 'folder'", "data.image_size: required"]),
    ({"folder": "imgs"}, ["data.folder: only used with source 'folder', but source is 'digits'"]),
    ({"shard_sise": 10}, ["data.shard_sise: unknown key 'shard_sise'; did you mean 'shard_size'?"]),
    ({"toy": {"kind": "spiral"}}, ["data.toy.kind: must be 'gaussian_mixture', "]),
    ({"toy": {"nosie": 0.1}}, ["data.toy.nosie: unknown key 'nosie'; did you mean 'noise'?"]),
    ({"test_fraction": 0.6}, ["data.test_fraction: must be less than or equal to 0.5"]),
    ({"source": "imagenet"}, ["data.source: must be 'digits', 'toy2d', "]),
    ([1, 2], ["data: must be a mapping"]),
])
def test_config_errors_name_the_field(data, problems):
    with pytest.raises(ConfigError) as e:
        parse_data_config(data)
    assert len(e.value.problems) == len(problems)
    for got, want in zip(e.value.problems, problems):
        assert got.startswith(want), got


# ---------------------------------------------------------------------------------------------
# Reading a slice


def test_read_rows_is_the_slice_of_the_split(digits):
    m = load_manifest(digits)
    assert m.modality.name == "images" and m.is_image
    whole = read_split(digits, "train")  # shards of 500 rows: a slice inside one, across two, to the end, empty
    for lo, hi in [(0, 10), (490, 1010), (1500, len(whole)), (7, 7)]:
        assert torch.equal(read_rows(digits, "train", lo, hi), whole[lo:hi]), (lo, hi)


# ---------------------------------------------------------------------------------------------
# The stage script


def run_stage(params: dict, tmp_path: Path) -> subprocess.CompletedProcess:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return subprocess.run([sys.executable, str(REPO / "pipeline" / "prepare.py"), "--params", str(path)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)


def test_stage_script(tmp_path):
    out = tmp_path / "prepared"
    ok = run_stage({"seed": 2, "variants": {"ignored": {}}, "data": {"source": "toy2d", "out_dir": str(out),
                    "toy": {"kind": "moons", "n_train": 100, "n_test": 10}}}, tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("prepared toy2d (seed 2)") and "100 train / 10 test" in ok.stdout
    assert verify(out / "toy2d").seed == 2

    bad_out = tmp_path / "never"
    bad = run_stage({"seed": 0, "data": {"source": "digits", "hflip": True, "out_dir": str(bad_out)}}, tmp_path)
    assert bad.returncode == 2
    assert "data.hflip: only for natural images" in bad.stderr
    assert not bad_out.exists()
