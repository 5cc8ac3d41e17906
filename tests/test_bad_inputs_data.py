"""Careless and hostile data and model files, one table: each row gives a real stage script (its main(argv),
as tests/test_bad_inputs.py runs it) an input that once passed unnoticed or destroyed files, and states the
exit code, the exception class the library raises and what the first line of stderr must name.

Every row runs in a sandbox: `project/` is the working directory (the repository root, where dvc runs) and
`outside/` sits beside it. Every file, folder and link of the sandbox is hashed before and after the stage:
nothing outside the stage's own outputs may change, and several rows put a user's file exactly where the
old prepare deleted it. Pillow's pixel limit is lowered for the image-size rows, so that a bomb is a few
kilobytes and the old behaviour stays cheap to reproduce.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from test_bad_inputs import TOY, TRAIN, VARIANT, edit_manifest, make_params, run_stage, write_yaml  # noqa: E402
from test_data import make_folder  # noqa: E402
from test_generate import make_model  # noqa: E402

from scorelab import checkpoint  # noqa: E402
from scorelab.checkpoint import CheckpointCorruptError, load_trained  # noqa: E402
from scorelab.config import ConfigError, VariantConfig  # noqa: E402
from scorelab.data import MANIFEST_DIGEST_KEY, DataConfig, DataError, prepare, read_split  # noqa: E402


# ---------------------------------------------------------------------------------------------
# The sandbox


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under root: a file's sha256, "dir", or a link's target (links are not followed)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            if p.is_symlink():
                out[rel] = "link -> " + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def changed(before: dict[str, str], after: dict[str, str], allowed: tuple[str, ...]) -> list[str]:
    """Entries added, removed or altered, except under the allowed prefixes (the stage's outputs)."""
    keys = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    return sorted(k for k in keys if not any(k == a or k.startswith(a + "/") for a in allowed))


def user_file(path: Path, text: str = "the user's own notes, written by no stage") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


# ---------------------------------------------------------------------------------------------
# Inputs: each builder writes under the sandbox and returns the stage's argv (working directory: project/)


def prepare_params(data: dict | None) -> list[str]:
    """params.yaml in project/ with this data section (None: an empty file, all defaults)."""
    if data is None:
        Path("params.yaml").write_text("")
    else:
        write_yaml(Path("params.yaml").resolve(), {"seed": 0, "data": data})
    return ["--params", "params.yaml"]


def toy(**data: Any) -> dict:
    return {"source": "toy2d", "toy": TOY, **data}


def out_dir_outside(sb: Path) -> list[str]:
    user_file(sb / "outside" / "toy2d" / "notes.txt")
    return prepare_params(toy(out_dir="../outside"))


def external_folder_not_ours(sb: Path) -> list[str]:
    user_file(sb / "outside" / "toy2d" / "notes.txt")
    return prepare_params(toy(out_dir="../outside", allow_external_out_dir=True))


def empty_params_over_user_folder(sb: Path) -> list[str]:
    user_file(sb / "project" / "data" / "prepared" / "digits" / "mine.txt")
    return prepare_params(None)


def foreign_file_beside_shards(sb: Path) -> list[str]:
    prepare(DataConfig(**toy(out_dir="data/prepared")), seed=0)
    user_file(sb / "project" / "data" / "prepared" / "toy2d" / "notes.txt")
    return prepare_params(toy(out_dir="data/prepared"))


def output_is_a_file(sb: Path) -> list[str]:
    user_file(sb / "project" / "data" / "prepared" / "toy2d")
    return prepare_params(toy(out_dir="data/prepared"))


def folder_inside_output(sb: Path) -> list[str]:
    make_folder(sb / "project" / "data" / "prepared" / "folder" / "imgs")
    return prepare_params({"source": "folder", "folder": "data/prepared/folder/imgs", "image_size": 8,
                           "out_dir": "data/prepared"})


def output_inside_folder(sb: Path) -> list[str]:
    make_folder(sb / "project" / "imgs")
    return prepare_params({"source": "folder", "folder": "imgs", "image_size": 8, "out_dir": "imgs/out"})


def folder_params(**data: Any) -> list[str]:
    return prepare_params({"source": "folder", "folder": "imgs", "image_size": 8, "out_dir": "data/prepared",
                           **data})


def sixteen_bit_pngs(sb: Path) -> list[str]:
    imgs = sb / "project" / "imgs"
    imgs.mkdir()
    for name, value in (("mid", 128 * 257), ("top", 65535)):  # 16-bit values that are exactly 8-bit 128, 255
        Image.fromarray(np.full((8, 8), value, np.uint16)).save(imgs / f"{name}.png")
    assert Image.open(imgs / "mid.png").mode == "I;16"
    return folder_params()


def stored_values_are_128_and_255(sb: Path) -> None:
    root = sb / "project" / "data" / "prepared" / "folder"
    x = torch.cat([read_split(root, s) for s in ("train", "test")])
    v = sorted(set(np.round((x.numpy() + 1) * 127.5).astype(int).ravel().tolist()))
    assert v == [128, 255], v  # clipped, both were 255


def symlinked_class_folder(sb: Path) -> list[str]:
    make_folder(sb / "elsewhere")
    (sb / "project" / "imgs").mkdir()
    shutil.copytree(sb / "elsewhere" / "cats", sb / "project" / "imgs" / "cats")
    (sb / "project" / "imgs" / "dogs").symlink_to(sb / "elsewhere" / "dogs", target_is_directory=True)
    return folder_params()


def images(sb: Path, *sizes: tuple[str, int, int]) -> None:
    imgs = sb / "project" / "imgs"
    imgs.mkdir(exist_ok=True)
    Image.new("RGB", (8, 8), (10, 20, 30)).save(imgs / "ok.png")
    for name, w, h in sizes:
        Image.new("L", (w, h), 99).save(imgs / f"{name}.png")


def bomb_over_twice_the_limit(sb: Path) -> list[str]:
    images(sb, ("bomb", 100, 100))  # 10,000 pixels: Pillow's own DecompressionBombError at a limit of 1,000
    return folder_params()


def over_the_limit(sb: Path) -> list[str]:
    images(sb, ("big", 80, 80))  # 6,400 pixels at a limit of 5,000: Pillow only warns
    return folder_params()


def over_the_limit_once_resized(sb: Path) -> list[str]:
    images(sb, ("wide", 200_000, 1))  # 200,000 pixels stored, 12,800,000 at a shorter side of 8
    return folder_params()


def nul_in_out_dir(sb: Path) -> list[str]:
    return prepare_params(toy(out_dir="data/pre\x00pared"))


def train_on(damage: Callable[[Path], None]) -> Callable[[Path], list[str]]:
    """The train stage on a toy dataset in project/data/toy2d that `damage` changed."""
    def build(sb: Path) -> list[str]:
        project = sb / "project"
        prepare(DataConfig(**toy(out_dir="data")), seed=0)
        damage(project / "data" / "toy2d")
        p = make_params(project, "toy2d", {"v": VARIANT}, TRAIN, ray={"num_workers": 1, "max_failures": 0})
        p["data"] = toy(out_dir="data")
        write_yaml(project / "params.yaml", p)
        return ["--params", "params.yaml", "--variant", "v", "--root", str(project), "--out", str(project / "out")]
    return build


def edit_unsigned(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    """An edit of manifest.json that leaves its own digest as it was (a careless hand edit)."""
    def damage(dataset: Path) -> None:
        path = dataset / "manifest.json"
        m = json.loads(path.read_text())
        edit(m)
        path.write_text(json.dumps(m))
    return damage


def shard_named(name: Callable[[Path], str]) -> Callable[[Path], None]:
    """A re-signed manifest whose first shard is named `name(dataset)`, with a copy of that shard there."""
    def damage(dataset: Path) -> None:
        m = json.loads((dataset / "manifest.json").read_text())
        target = (dataset / name(dataset)).resolve()
        shutil.copy(dataset / m["shards"][0]["file"], target)  # the old code read it, and its sha256 matched
        edit_manifest(dataset, lambda m: m["shards"][0].update(file=name(dataset)))
    return damage


def not_utf8(dataset: Path) -> None:
    (dataset / "manifest.json").write_bytes(b"\xff\xfe" + (dataset / "manifest.json").read_bytes())


def model_without_digest(sb: Path) -> list[str]:
    project = sb / "project"
    strip_digest(make_model(project / "model.pt", VariantConfig.model_validate(VARIANT), (2,)))
    p = make_params(project, "toy2d", {"v": VARIANT}, TRAIN)
    p["data"] = toy(out_dir="data")
    write_yaml(project / "params.yaml", p)
    return ["--params", "params.yaml", "--variant", "v", "--model", str(project / "model.pt"),
            "--out", str(project / "out"), "--n", "4", "--seeds", "0", "--no-progress"]


def strip_digest(path: Path) -> Path:
    """model.pt as a file without its sha256 is: loadable, every weight intact, the digest key gone."""
    blob = torch.load(path, weights_only=True)
    del blob[checkpoint.DIGEST_KEY]
    torch.save(blob, path)
    return path


# ---------------------------------------------------------------------------------------------
# The table


@dataclass(frozen=True)
class Row:
    id: str
    stage: str  # pipeline/<stage>.py
    build: Callable[[Path], list[str]]  # writes the inputs under the sandbox, returns the argv
    code: int
    error: type[BaseException] | None  # the class that escapes the library call the script makes
    names: tuple[str, ...]  # in the first line of stderr (of stdout when code is 0); {p}: project/
    outputs: tuple[str, ...] = ()  # sandbox paths the stage may write: its own outputs
    check: Callable[[Path], None] | None = None  # what the outputs must hold (code 0)
    max_pixels: int | None = None  # PIL.Image.MAX_IMAGE_PIXELS for the row


KEEP = "prepare only replaces a dataset it wrote"
TOY_MANIFEST = "{p}/data/toy2d/manifest.json: "

ROWS = [
    # -- never destroy what the stage did not write ----------------------------------------------------------
    Row("out-dir-outside-the-project", "prepare", out_dir_outside, 1, DataError,
        ("data.out_dir: ../outside is ", "outside the project {p}", "data.allow_external_out_dir: true")),
    Row("external-out-dir-holding-a-user-folder", "prepare", external_folder_not_ours, 1, DataError,
        ("../outside/toy2d: exists and holds no readable scorelab manifest.json", KEEP)),
    Row("empty-params-over-a-user-folder", "prepare", empty_params_over_user_folder, 1, DataError,
        ("data/prepared/digits: exists and holds no readable scorelab manifest.json", KEEP)),
    Row("user-file-beside-the-shards", "prepare", foreign_file_beside_shards, 1, DataError,
        ("data/prepared/toy2d: holds 'notes.txt', which is not a file its manifest.json lists", KEEP)),
    Row("output-is-a-user-file", "prepare", output_is_a_file, 1, DataError,
        ("data/prepared/toy2d: exists and is not a folder prepare wrote (a file)", KEEP)),
    Row("input-folder-inside-the-output", "prepare", folder_inside_output, 1, DataError,
        ("data.folder: data/prepared/folder/imgs overlaps the output folder data/prepared/folder",)),
    Row("output-inside-the-input-folder", "prepare", output_inside_folder, 1, DataError,
        ("data.folder: imgs overlaps the output folder imgs/out/folder",)),
    # -- images: bit depth, links, size ---------------------------------------------------------------------
    Row("sixteen-bit-png-scaled-not-clipped", "prepare", sixteen_bit_pngs, 0, None,
        ("prepared folder (seed 0) in data/prepared/folder: 1 train / 1 test rows",),
        outputs=("project/data",), check=stored_values_are_128_and_255),
    Row("symlinked-class-folder", "prepare", symlinked_class_folder, 1, DataError,
        ("data.folder: imgs/dogs is a symbolic link; links inside data.folder are not followed",)),
    Row("decompression-bomb", "prepare", bomb_over_twice_the_limit, 1, DataError,
        ("imgs/bomb.png: refused as a decompression bomb",), max_pixels=1000),
    Row("over-the-pixel-limit", "prepare", over_the_limit, 1, DataError,
        ("imgs/big.png: 80x80 = 6400 pixels, more than the limit of 5000",), max_pixels=5000),
    Row("over-the-pixel-limit-once-resized", "prepare", over_the_limit_once_resized, 1, DataError,
        ("imgs/wide.png: 200000x1 resized to a shorter side of 8 is 1600000x8 = 12800000 pixels",
         "more than the limit of 1000000"), max_pixels=1_000_000),
    Row("nul-byte-in-out-dir", "prepare", nul_in_out_dir, 2, ConfigError,
        ("params.yaml: 1 problem(s); first: data.out_dir: must not contain a NUL byte",)),
    # -- the manifest: covered by its own digest, shards confined to the dataset ----------------------------
    Row("manifest-transform-edited", "train", train_on(edit_unsigned(lambda m: m["transform"].update(scale=2.0))),
        1, DataError, (TOY_MANIFEST + "its contents do not match its manifest_sha256", "re-run prepare")),
    Row("manifest-shape-edited", "train", train_on(edit_unsigned(lambda m: m.update(shape=[1, 1, 2]))),
        1, DataError, (TOY_MANIFEST + "its contents do not match its manifest_sha256",)),
    Row("manifest-without-its-digest", "train", train_on(edit_unsigned(lambda m: m.pop(MANIFEST_DIGEST_KEY))),
        1, DataError, (TOY_MANIFEST + "has no manifest_sha256",)),
    Row("shard-name-leads-out-of-the-dataset", "train", train_on(shard_named(lambda d: "../../x.parquet")),
        1, DataError, (TOY_MANIFEST + "not a valid scorelab manifest: shard file '../../x.parquet' is not a plain",)),
    Row("shard-name-absolute", "train", train_on(shard_named(lambda d: str(d.parents[2] / "y.parquet"))),
        1, DataError, (TOY_MANIFEST + "not a valid scorelab manifest: shard file '/",)),
    Row("manifest-not-utf8", "train", train_on(not_utf8), 1, DataError,
        (TOY_MANIFEST + "not a valid scorelab manifest: not UTF-8 text",)),
    # -- model files ----------------------------------------------------------------------------------------
    Row("model-file-without-its-digest", "sample", model_without_digest, 1, CheckpointCorruptError,
        ("sample v: model file {p}/model.pt has no sha256 of its contents", checkpoint.LEGACY_ENV + "=1")),
]


def test_the_table_has_a_row_per_class():
    assert len(ROWS) >= 15 and len({r.id for r in ROWS}) == len(ROWS)


@pytest.fixture
def sandbox(tmp_path, monkeypatch) -> Path:
    (tmp_path / "project").mkdir()
    (tmp_path / "outside").mkdir()
    monkeypatch.chdir(tmp_path / "project")
    for var in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", checkpoint.LEGACY_ENV):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input(row: Row, sandbox: Path, monkeypatch, capsys):
    argv = row.build(sandbox)
    if row.max_pixels is not None:
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", row.max_pixels)
    before = snapshot(sandbox)
    capsys.readouterr()

    code, raised = run_stage(row.stage, argv)
    out, err = capsys.readouterr()

    assert code == row.code, err
    assert type(raised) is row.error if row.error else raised is None, repr(raised)
    assert "Traceback" not in err, err
    if raised is not None and not isinstance(raised, ConfigError):
        assert len(str(raised).splitlines()) == 1, str(raised)
    first = (err if row.code else out).strip().splitlines()[0]
    for name in row.names:
        assert name.format(p=sandbox / "project") in first, first
    assert changed(before, snapshot(sandbox), row.outputs) == []
    if row.check is not None:
        row.check(sandbox)


# ---------------------------------------------------------------------------------------------
# What still works


def test_prepare_replaces_its_own_dataset_in_the_project(sandbox):
    argv = prepare_params(toy(out_dir="data/prepared"))
    assert run_stage("prepare", argv) == (0, None)
    old = snapshot(sandbox / "project" / "data" / "prepared" / "toy2d")
    argv = prepare_params(toy(out_dir="data/prepared", shard_size=100))  # other shards: the old ones go
    assert run_stage("prepare", argv) == (0, None)
    new = snapshot(sandbox / "project" / "data" / "prepared" / "toy2d")
    assert new.keys() != old.keys() and "train-00002.parquet" in new and "manifest.json" in new


def test_external_out_dir_when_named_so(sandbox):
    argv = prepare_params(toy(out_dir="../outside", allow_external_out_dir=True))
    assert run_stage("prepare", argv) == (0, None)
    assert (sandbox / "outside" / "toy2d" / "manifest.json").is_file()


def test_legacy_model_file_loads_only_when_accepted(sandbox, monkeypatch):
    path = strip_digest(make_model(sandbox / "model.pt", VariantConfig.model_validate(VARIANT), (2,)))
    with pytest.raises(CheckpointCorruptError, match=f"has no sha256 .*{checkpoint.LEGACY_ENV}=1"):
        load_trained(path)
    monkeypatch.setenv(checkpoint.LEGACY_ENV, "1")
    assert load_trained(path).variant == VariantConfig.model_validate(VARIANT)
