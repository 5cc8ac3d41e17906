"""The run-storage helpers, on a local folder and on the same folder given as a file:// URI (the path
s3:// and gs:// take through pyarrow)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from scorelab import runtime, storage


@pytest.fixture(params=["path", "uri"])
def store(request, tmp_path) -> str:
    return str(tmp_path) if request.param == "path" else tmp_path.as_uri()


def test_json_round_trip_leaves_no_temporary_file(store, tmp_path):
    path = storage.join(store, "run-1", "status.json")
    assert storage.read_json(path) is None and not storage.exists(path)
    storage.write_json(path, {"status": "preempted", "step": 40})
    storage.write_json(path, {"status": "finished", "step": 80})  # replaces
    assert storage.read_json(path) == {"status": "finished", "step": 80} and storage.exists(path)
    assert sorted(p.name for p in (tmp_path / "run-1").iterdir()) == ["status.json"]
    storage.remove(path)
    storage.remove(path)  # absent: nothing to do
    assert not storage.exists(path)


def test_stop_watch_sees_a_file_written_after_it_started(store):
    path = storage.join(store, "run-2", "stop.json")
    watch = runtime.StopWatch(path, interval_s=0.02)
    try:
        time.sleep(0.1)
        assert not watch.requested
        storage.write_json(path, {"signal": "SIGTERM"})
        deadline = time.time() + 5
        while not watch.requested and time.time() < deadline:
            time.sleep(0.01)
        assert watch.requested
    finally:
        watch.close()


def test_relative_storage_is_resolved_against_the_root_and_uris_are_kept(tmp_path):
    assert storage.resolve("outputs/ray", tmp_path) == str((tmp_path / "outputs" / "ray").resolve())
    assert storage.resolve("/abs/ray", tmp_path) == "/abs/ray"
    assert storage.resolve("s3://bucket/ray", tmp_path) == "s3://bucket/ray"
    assert storage.join("s3://bucket/ray/", "run", "f.json") == "s3://bucket/ray/run/f.json"
    assert storage.join("/abs/ray", "run") == str(Path("/abs/ray/run"))


def test_storage_locations_are_folders_or_uris_pyarrow_opens():
    import pyarrow.fs

    from scorelab.storage import URI_SCHEMES, uri_problem

    assert uri_problem("outputs/ray") is None and uri_problem("/mnt/shared/ray") is None
    assert uri_problem("s3://bucket/ray") is None and uri_problem("GS://bucket/ray") is None
    assert "'ftp'" in uri_problem("ftp://host/ray") and "s3://" in uri_problem("ftp://host/ray")
    for scheme in ("ftp", "http", "sftp"):  # refused here because pyarrow refuses them too
        assert uri_problem(f"{scheme}://host/ray")
        try:
            pyarrow.fs.FileSystem.from_uri(f"{scheme}://host/ray")
        except Exception:
            continue
        raise AssertionError(f"pyarrow opened {scheme}://")
    assert "file" in URI_SCHEMES and pyarrow.fs.FileSystem.from_uri("file:///tmp")[0].type_name == "local"
