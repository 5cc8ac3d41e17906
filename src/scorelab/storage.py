"""Files written whole or not at all, and where runs keep them: a local folder, a shared filesystem or an
object store (s3://, gs://, ...), reached through pyarrow's filesystems as Ray Train reaches its checkpoints.

    with atomic_path(out / "model.pt") as tmp:   # write tmp however you like (torch.save, np.savez, ...)
        torch.save(obj, tmp)                     # renamed over the target only if the block succeeds
    write_text(path, text); write_bytes(path, data); write_json(path_or_uri, obj); sha256_file(path)

Every node of a cluster must reach `ray.storage_path` (Ray Train writes checkpoints there from the workers),
so the few things the driver and the workers tell each other outside Ray go there too: the driver's stop
request (preemption) and rank 0's outcome of a run. A file on the driver's own disk would be invisible to a
worker on another machine.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


# The URI schemes of pyarrow.fs.FileSystem.from_uri, which Ray's checkpoints and this module go through.
URI_SCHEMES = ("file", "s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss")


def is_uri(path: str) -> bool:
    return "://" in str(path)


def uri_problem(path: str) -> str | None:
    """Why `path` (a local path or a URI) cannot be a storage location, or None."""
    if not is_uri(path):
        return None
    scheme = str(path).split("://", 1)[0].lower()
    if scheme not in URI_SCHEMES:
        return (f"URI scheme {scheme[:20]!r} is not a file system pyarrow can open; valid: a local or shared "
                f"folder, or {', '.join(s + '://' for s in URI_SCHEMES)}")
    return None


def resolve(storage_path: str, root: Path) -> str:
    """ray.storage_path made absolute against the project root (Ray's workers run in other folders);
    URIs as they are."""
    if is_uri(storage_path):
        return storage_path
    path = Path(storage_path)
    return str(path if path.is_absolute() else (Path(root) / path).resolve())


def join(storage: str, *parts: str) -> str:
    if is_uri(storage):
        return "/".join([storage.rstrip("/"), *parts])
    return str(Path(storage, *parts))


def filesystem(path: str):
    """(pyarrow filesystem, path on it) for a local path or a URI."""
    import pyarrow.fs as pafs

    if is_uri(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), str(Path(path).resolve())


@contextmanager
def atomic_path(path: str | Path, *, fsync: bool = False) -> Iterator[Path]:
    """A temporary name beside `path` (<name>.tmp) to write to; renamed over `path` when the block
    succeeds, removed when it fails: a crash mid-write leaves the previous file, never a truncated one.
    fsync: flush the bytes to disk before the rename (files that a resume depends on)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # <name>.tmp, no process id: torch.save names the archive inside the file after it, and a model file
    # must be the same bytes every time it is written from the same weights
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def sha256_file(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_json(path: str | Path, obj: Any, indent: int | None = None) -> None:
    """Write whole or not at all, on a local path or a URI (there: a temporary object moved over the target,
    on object stores one upload)."""
    text = json.dumps(obj, indent=indent)
    if not is_uri(str(path)):
        write_text(path, text)
        return
    fs, p = filesystem(str(path))
    fs.create_dir(p.rsplit("/", 1)[0], recursive=True)
    tmp = p + ".tmp"
    with fs.open_output_stream(tmp) as f:
        f.write(text.encode())
    fs.move(tmp, p)


def read_json(path: str) -> dict[str, Any] | None:
    """The JSON object at path, or None where there is none."""
    fs, p = filesystem(path)
    try:
        with fs.open_input_stream(p) as f:
            return json.loads(f.read().decode())
    except FileNotFoundError:
        return None


def exists_on(fs, p: str) -> bool:
    """Whether `p` exists on the pyarrow filesystem `fs` (made once by the caller: on an object store that
    resolves credentials)."""
    import pyarrow.fs as pafs

    return fs.get_file_info(p).type != pafs.FileType.NotFound


def exists(path: str) -> bool:
    return exists_on(*filesystem(path))


def remove(path: str) -> None:
    fs, p = filesystem(path)
    try:
        fs.delete_file(p)
    except FileNotFoundError:
        pass
