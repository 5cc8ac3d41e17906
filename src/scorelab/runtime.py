"""Running on Ray: one session (local or a cluster), one TorchTrainer factory, and preemption.

    with ray_session(params.ray.address, num_cpus=4):          # attach to a cluster, or start a local Ray
        trainer = torch_trainer(loop, job, name=..., storage_path=..., workers=2, cpus_per_worker=1.0)
        with checkpoint_on_sigterm(stop_path, "vp"):           # SIGTERM: workers checkpoint and stop
            result = trainer.fit()

Used by training (one Ray Train run per variant), the sweep (one Ray Train run per Tune trial),
sampling and evaluation (Ray tasks). Signals reach only the main thread: the SIGTERM helpers do nothing
elsewhere.

Nothing a worker or task reads is a path on the driver's disk: the cluster's workers may not see it
(a KubeRay head runs no work, and its disk is its own). Files go through Ray's object store instead:

    shipped = ship_files(data_dir, ["manifest.json", *shard_names])   # driver: one put
    local = unpack(shipped)                                            # worker: a local copy, once per node

and checkpoints, status files and stop requests through ray.storage_path, which check_storage_shared
proves every node sees before anything starts.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from . import storage


class RuntimeSetupError(RuntimeError):
    """Ray cannot be reached where params say it runs."""


def check_ray_address(address: str, where: str, timeout_s: float) -> None:
    """A TCP connect to a "host:port" or "ray://host:port" address ("auto" and the like are left to Ray)."""
    import socket

    target = address.removeprefix("ray://")
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        reason = " ".join(str(e.strerror or e).split()) if not isinstance(e, TimeoutError) else "timed out"
        raise RuntimeSetupError(f"{where} {address}: no Ray cluster answers there ({reason}) within {timeout_s:g}s "
                            "(ray.connect_timeout_s): start it (ray start --head) or fix the address") from None


# A local Ray that `python -m scorelab with-local-ray -- CMD` started for CMD's processes (its GCS address).
# Stages that would start a local Ray of their own attach to it instead: everything else about the local
# case stays as it is (evaluation in-process, one node), only the ~10 s of each stage's ray.init go.
SHARED_LOCAL_RAY_ENV = "SCORELAB_LOCAL_RAY"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def ray_session(address: str, num_cpus: float | None = None, connect_timeout_s: float = 10.0,
                dashboard: bool = False) -> Iterator[None]:
    """Attach to the cluster named by `address` (or RAY_ADDRESS), else to the shared local Ray of
    $SCORELAB_LOCAL_RAY (`with_local_ray`), else start a local Ray with explicit CPUs; never silently
    attach to a stale cluster of an earlier `ray start`. A host:port where nothing answers within
    connect_timeout_s is a RuntimeSetupError (ray.init would wait far longer). Inside a running Ray,
    does nothing.

    dashboard: a local Ray also starts its dashboard on a free port and tells its processes where it is.
    Ray Train's placement-group cleaner, which frees the resources of a trial that Tune's scheduler stops,
    asks the state API for "the" local Ray otherwise, and fails when the machine runs several (then the
    next trials wait for those resources forever)."""
    import ray

    if ray.is_initialized():
        yield
        return
    where = "ray.address" if address else "$RAY_ADDRESS"
    address = address or os.environ.get("RAY_ADDRESS", "")
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": True}
    shared = os.environ.get(SHARED_LOCAL_RAY_ENV, "")
    if address:
        check_ray_address(address, where, connect_timeout_s)
        ray.init(address=address, **kwargs)
    elif shared:
        check_ray_address(shared, f"${SHARED_LOCAL_RAY_ENV}", connect_timeout_s)
        ray.init(address=shared, **kwargs)
        if num_cpus is not None and ray.cluster_resources().get("CPU", 0) < num_cpus:
            have = ray.cluster_resources().get("CPU", 0)
            ray.shutdown()
            raise RuntimeSetupError(f"${SHARED_LOCAL_RAY_ENV} {shared}: the shared local Ray has {have:g} CPUs, "
                                    f"this stage needs {num_cpus:g}: start it with --num-cpus {math.ceil(num_cpus)}")
    elif dashboard:
        port = _free_port()  # for the dashboard, named before Ray starts
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                 dashboard_port=port, runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}},
                 **kwargs)
    else:
        ray.init(address="local", num_cpus=num_cpus, **kwargs)
    try:
        yield
    finally:
        ray.shutdown()


def with_local_ray(command: list[str], num_cpus: float) -> int:
    """Run `command` (e.g. dvc repro) with one local Ray for all its stages: started here with the
    dashboard (Ray Train's placement-group cleaner needs its API server, as in ray_session), named to
    the stages by $SCORELAB_LOCAL_RAY, and stopped when the command ends, whatever the way: only this
    Ray, never another on the machine. SIGTERM is passed on to the command (a stage checkpoints and
    exits as it would alone), then this Ray stops; Ctrl-C reaches the command from the terminal, as it
    reaches every process of the foreground group, and this waits for it. Returns the command's exit code."""
    import subprocess

    import ray

    port = _free_port()
    # In the environment of Ray's own processes (raylet, workers of every job), not just of this job.
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
             dashboard_port=port, logging_level=logging.WARNING)
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    forward = {signal.SIGTERM: lambda signum, _frame: child.send_signal(signum),
               signal.SIGINT: lambda signum, _frame: None}
    try:
        env = {**os.environ, SHARED_LOCAL_RAY_ENV: ray.get_runtime_context().gcs_address}
        say(f"with-local-ray: one local Ray ({num_cpus:g} CPUs) for the stages of `{' '.join(command)}`")
        child = subprocess.Popen(command, env=env)
        for sig, handler in forward.items():
            signal.signal(sig, handler)
        return child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        ray.shutdown()


def alive_nodes() -> int:
    import ray

    return len([n for n in ray.nodes() if n.get("Alive")])


def task_device(use_gpu: bool):
    """The torch device of this Ray task or worker: its GPU when it was given one, else the CPU."""
    import torch

    if use_gpu and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def bf16_problem(device) -> str | None:
    """Why bfloat16 autocast cannot run fast on `device`, or None. On a CPU, oneDNN's own test: without its
    bfloat16 kernels autocast would be emulated, slower than float32."""
    import torch

    if device.type == "cuda":
        return None if torch.cuda.is_bf16_supported() else f"GPU {torch.cuda.get_device_name(device)} has no bfloat16"
    if device.type == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "this CPU has no bfloat16 kernels (oneDNN needs AVX512 or AMX)"
    return None


def resolve_bf16(setting: bool | str, device) -> tuple[bool, str | None]:
    """A train.bf16 or sample.bf16 setting on `device`: (whether to autocast, why a `true` cannot run here).
    auto autocasts exactly where bf16_problem finds none, so the same params run on any machine."""
    if setting is False:
        return False, None
    problem = bf16_problem(device)
    return problem is None, problem if setting is True else None


def check_storage_shared(store: str, setting: str = "ray.storage_path", timeout_s: float = 60.0) -> None:
    """Prove that every alive node of the running Ray sees the folder `store` (a URI is reached through
    its own filesystem and passes): the driver writes a probe file into it, and a zero-CPU task pinned
    to each node looks for it. RuntimeSetupError names the setting and the first node that cannot."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from . import storage

    if storage.is_uri(store):
        return
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    here = ray.get_runtime_context().get_node_id()
    if all(n["NodeID"] == here for n in nodes):
        return  # one node, the driver's own: its disk is the workers' disk
    Path(store).mkdir(parents=True, exist_ok=True)
    probe = Path(store) / f".scorelab-probe-{uuid.uuid4().hex}"
    probe.write_text("scorelab: every node must see this folder\n")
    try:
        look = ray.remote(num_cpus=0)(os.path.exists)
        refs = {n["NodeManagerAddress"] + f" ({n['NodeID'][:8]})": look.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(str(probe))
            for n in nodes}
        try:
            seen = dict(zip(refs, ray.get(list(refs.values()), timeout=timeout_s)))
        except ray.exceptions.GetTimeoutError:
            raise RuntimeSetupError(f"{setting} {store!r}: the nodes did not answer within {timeout_s:g}s whether "
                                    "they see it") from None
    finally:
        probe.unlink(missing_ok=True)
    blind = [node for node, ok in seen.items() if not ok]
    if blind:
        raise RuntimeSetupError(
            f"{setting} {store!r} is a folder that node {blind[0]} of the Ray cluster cannot see "
            f"({len(blind)} of {len(seen)} nodes cannot): checkpoints must be where every node reaches them; "
            "mount a shared filesystem at that path on every node, or use an s3:// or gs:// URI")


# ---------------------------------------------------------------------------------------------
# Files through the object store


@dataclass(frozen=True)
class Shipment:
    """Files of a driver's folder, put in Ray's object store once; a worker or task on any node gets a
    local copy with unpack(). key names the content (sha256 over the names and bytes): the same content
    is unpacked once per node and reused by every later task there."""

    key: str
    names: tuple[str, ...]
    ref: Any  # ray.ObjectRef of {name: bytes}


def ship_files(folder: str | Path, names: Iterable[str]) -> Shipment:
    """Put folder/name for each name (relative, may hold "/") into the object store of the running Ray."""
    import ray

    folder = Path(folder)
    files, digest = {}, hashlib.sha256()
    for name in sorted(dict.fromkeys(names)):
        data = (folder / name).read_bytes()
        files[name] = data
        digest.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    return Shipment(digest.hexdigest(), tuple(files), ray.put(files))


def shipped_root() -> Path:
    """Where unpack() keeps this machine's local copies (one folder per content key)."""
    return Path(os.environ.get("SCORELAB_SHIPPED_DIR") or Path(tempfile.gettempdir()) / "scorelab-shipped")


def unpack(shipment: Shipment) -> Path:
    """A local folder holding the shipment's files: made once per machine and content (written into a
    private folder, then renamed into place, so concurrent workers never see half of it)."""
    import ray

    final = shipped_root() / shipment.key
    if all((final / n).is_file() for n in shipment.names):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{shipment.key[:16]}-", dir=final.parent))
    try:
        for name, data in ray.get(shipment.ref).items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes(data)
        try:
            os.rename(tmp, final)
        except OSError:  # another worker of this machine got there first, or an incomplete copy is in the way
            if not all((final / n).is_file() for n in shipment.names):
                shutil.rmtree(final, ignore_errors=True)
                os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


# Ray Train's controller polls its worker group every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (default 2 s): a run
# waits for polls to see its workers started and its training function done. A quarter second cost nothing
# measurable and cut a trivial fit from 14.0-14.7 s to 10.1-10.2 s on 2 cores (docs/BENCHMARKS.md); a value
# the user set wins.
TRAIN_POLL_ENV, TRAIN_POLL_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25"


def torch_trainer(loop: Callable[[dict[str, Any]], None], config: dict[str, Any], *, name: str, storage_path: str,
                  workers: int, cpus_per_worker: float, gpus_per_worker: float = 0.0, placement_strategy: str = "PACK",
                  max_failures: int = 0, callbacks: list | None = None):
    """The TorchTrainer of a training run or a Tune trial: `workers` workers running loop(config), checkpoints
    under storage_path/name (the last two kept; relaunching the same name resumes from the latest), and
    FailureConfig restarts after a worker or node dies."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    resources = {"CPU": cpus_per_worker, **({"GPU": gpus_per_worker} if gpus_per_worker else {})}
    os.environ.setdefault(TRAIN_POLL_ENV, TRAIN_POLL_S)  # read by fit(), which passes it on to the controller
    return TorchTrainer(
        loop,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpus_per_worker > 0, resources_per_worker=resources,
                                     placement_strategy=placement_strategy),
        run_config=RunConfig(name=name, storage_path=storage_path,
                             failure_config=FailureConfig(max_failures=max_failures, controller_failure_limit=3),
                             checkpoint_config=CheckpointConfig(num_to_keep=2), callbacks=callbacks,
                             logging_config=LoggingConfig(log_level="WARNING")),
    )


def worker_error(error: BaseException) -> BaseException:
    """The exception a Ray Train worker (lowest rank) or the controller raised, unwrapped from Ray's
    error and its traceback wrapper; `error` itself when it holds none."""
    failures = getattr(error, "worker_failures", None)
    inner = failures[min(failures)] if failures else getattr(error, "controller_failure", None)
    if inner is None:
        return error
    return getattr(inner, "_base_exc", inner)


def say(line: str) -> None:
    """One progress line to the driver. Not print(): Ray Train patches print in workers and, with the
    stream wrapped, emits each line twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


@contextmanager
def checkpoint_on_sigterm(stop_path: str, variant: str):
    """Preemption: the first SIGTERM writes stop_path (in the run's storage, which every node reaches), and
    the workers (rank 0 watches for it) checkpoint the step they are at and stop; the driver then raises
    the caller's "preempted" error. A second SIGTERM exits at once (status 143), keeping the last registered checkpoint.
    Signals reach only the main thread, so elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    requested, forced = threading.Event(), threading.Event()  # first SIGTERM seen; second one seen

    def request_stop() -> None:
        try:
            storage.write_json(stop_path, {"signal": "SIGTERM", "time": time.time()})
        except OSError as e:
            sys.stderr.write(f"train {variant}: could not write the stop request {stop_path} ({e}): "
                             "send SIGTERM again to exit without a new checkpoint\n")

    def handler(signum, frame):
        if requested.is_set():
            sys.stderr.write(f"train {variant}: second SIGTERM: exiting now; the last registered checkpoint is "
                             "kept, the steps since it are lost\n")
            forced.set()
            raise SystemExit(128 + signum)
        requested.set()
        # written from a thread: on an object store this is a request, not something to wait on in a handler
        threading.Thread(target=request_stop, name="scorelab-stop-request", daemon=True).start()
        sys.stderr.write(f"train {variant}: SIGTERM: asking the workers to checkpoint and stop\n")

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    except BaseException:
        if forced.is_set():  # Ray may have wrapped the handler's SystemExit in an error of its own
            raise SystemExit(128 + signal.SIGTERM) from None
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def graceful_sigterm(name: str = "tune"):
    """Preemption of the sweep's driver: the first SIGTERM becomes Ray Tune's own graceful stop (it
    listens for SIGUSR1 as for Ctrl-C: the trials are stopped and the experiment state is saved); a
    second SIGTERM, or one before Tune has installed its handler, exits at once (143). Yields an Event
    that is set once a SIGTERM arrived. Signals reach only the main thread; elsewhere this does nothing."""
    received = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = signal.getsignal(signal.SIGTERM)

    def handler(signum, frame):
        tune_listens = signal.getsignal(signal.SIGUSR1) not in (signal.SIG_DFL, signal.SIG_IGN, None)
        if received.is_set() or not tune_listens:
            sys.stderr.write(f"{name}: SIGTERM: exiting now; rerunning the stage resumes the sweep from its last "
                             "saved state\n")
            raise SystemExit(128 + signum)
        received.set()
        sys.stderr.write(f"{name}: SIGTERM: stopping the trials and saving the sweep's state\n")
        signal.raise_signal(signal.SIGUSR1)

    signal.signal(signal.SIGTERM, handler)
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous)


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
                filesystem = filesystem or storage.filesystem(self.path)
                if storage.exists_on(*filesystem):
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
