"""Where runs keep their files: a local folder, a shared filesystem or an object store (s3://, gs://, ...),
reached through pyarrow's filesystems as Ray Train reaches its checkpoints.

Every node of a cluster must reach `ray.storage_path` (Ray Train writes checkpoints there from the workers),
so the few things the driver and the workers tell each other outside Ray go there too: the driver's stop
request (preemption) and rank 0's outcome of a run. A file on the driver's own disk would be invisible to a
worker on another machine.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any


def is_uri(path: str) -> bool:
    return "://" in str(path)


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


def _filesystem(path: str):
    import pyarrow.fs as pafs

    if is_uri(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), str(Path(path).resolve())


def write_json(path: str, obj: Any) -> None:
    """Write whole or not at all: a temporary file moved over the target (on object stores one upload)."""
    fs, p = _filesystem(path)
    fs.create_dir(p.rsplit("/", 1)[0], recursive=True)
    tmp = p + ".tmp"
    with fs.open_output_stream(tmp) as f:
        f.write(json.dumps(obj).encode())
    fs.move(tmp, p)


def read_json(path: str) -> dict[str, Any] | None:
    """The JSON object at path, or None where there is none."""
    fs, p = _filesystem(path)
    try:
        with fs.open_input_stream(p) as f:
            return json.loads(f.read().decode())
    except FileNotFoundError:
        return None


def _exists(fs, p: str) -> bool:
    import pyarrow.fs as pafs

    return fs.get_file_info(p).type != pafs.FileType.NotFound


def exists(path: str) -> bool:
    return _exists(*_filesystem(path))


def remove(path: str) -> None:
    fs, p = _filesystem(path)
    try:
        fs.delete_file(p)
    except FileNotFoundError:
        pass


class StopWatch:
    """Looks for a file every `interval_s` seconds in a background thread, so that the training step only
    reads a flag: on an object store each look is a request that takes tens of milliseconds."""

    def __init__(self, path: str, interval_s: float = 0.5):
        self.path, self.interval_s = path, interval_s
        self._seen = threading.Event()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="scorelab-stop-watch", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        filesystem = None  # made once: on an object store it resolves credentials
        while not self._closed.is_set():
            try:
                filesystem = filesystem or _filesystem(self.path)
                if _exists(*filesystem):
                    self._seen.set()
                    return
            except OSError:  # storage briefly unreachable: look again
                pass
            self._closed.wait(self.interval_s)

    @property
    def requested(self) -> bool:
        return self._seen.is_set()

    def close(self) -> None:
        self._closed.set()


def remove_unregistered_checkpoints(result: Any) -> list[str]:
    """Delete the checkpoint folders of a finished Ray Train run that Ray does not keep: those a killed
    launch wrote after its last registered one, which no later launch knows of. Only `checkpoint_*` folders
    directly in the run's folder are considered. Returns the paths removed."""
    import pyarrow.fs as pafs

    fs, run_dir = result.filesystem, result.path
    kept = {c.path.rstrip("/") for c, _ in (result.best_checkpoints or [])}
    if result.checkpoint is not None:
        kept.add(result.checkpoint.path.rstrip("/"))
    removed = []
    for info in fs.get_file_info(pafs.FileSelector(run_dir)):
        if info.type == pafs.FileType.Directory and info.base_name.startswith("checkpoint_") \
                and info.path.rstrip("/") not in kept:
            fs.delete_dir(info.path)
            removed.append(info.path)
    return removed
