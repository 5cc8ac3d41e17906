"""MLflow: where runs go, one run per (variant, configuration), and logging that never duplicates runs.

The default store is MLflow's embedded one in the repository root (sqlite `mlflow.db`, artifacts
under `mlruns/`), resolved to absolute paths because Ray workers change directory; a plain
`mlflow ui` in the repository root shows it. On a multi-node cluster only an `http(s)://` tracking
server works: other nodes cannot write to this machine's files, so a local store is refused there.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

from .layout import shared_root

RUN_KEY_TAG = "scorelab.run_key"
DVC_EXP_TAG = "dvc.exp_name"  # the DVC experiment (`dvc exp show`'s name) whose stage made or last resumed the run
# MLflow 3's experiment kind: "custom_model_development" is its model-training kind (as opposed to
# "genai_development"). The 3.17 UI decides its view from the browser's workflowType instead (the
# localStorage default is GenAI), so links carry ?workflowType=machine_learning as well (ui_url).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"
UI_VIEW = "workflowType=machine_learning"  # the "Model training" runs table, whatever the browser last used
LOCAL_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves a local store by default


class TrackingError(RuntimeError):
    pass


# run id -> tracking URI of each run this process opened (or resumed, which marks it RUNNING again) and has not
# ended: a stage that fails in between ends them FAILED (end_unfinished_runs), so none is left RUNNING.
_UNFINISHED: dict[str, str] = {}


def resolve_tracking_uri(uri: str, root: Path) -> str:
    """"" -> sqlite:///<root>/mlflow.db; relative sqlite/file paths made absolute against root. Inside a DVC
    experiment's temporary copy, root is the real repository (layout.shared_root): the copy is deleted."""
    root = shared_root(root)
    if not uri:
        return f"sqlite:///{root / 'mlflow.db'}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{(root / uri[len('sqlite:///'):]).resolve()}"
    if uri.startswith("file:") or "://" not in uri:
        path = Path(uri[len("file:"):] if uri.startswith("file:") else uri)
        return (path if path.is_absolute() else root / path).resolve().as_uri()
    return uri


def is_local_store(uri: str) -> bool:
    return uri.startswith(("sqlite:", "file:")) or "://" not in uri


def check_reachable_from(uri: str, num_nodes: int) -> None:
    """Refuse a store on this machine's disk when training runs on several nodes."""
    if num_nodes > 1 and is_local_store(uri):
        raise TrackingError(
            f"mlflow.tracking_uri {uri!r} is a local store, but the Ray cluster has {num_nodes} nodes, "
            "whose workers cannot write to this machine's files: start an MLflow tracking server and "
            "set mlflow.tracking_uri to its http:// address"
        )


def _unanswered(uri: str, timeout_s: float) -> Exception | None:
    """The network error when no server at the http(s) `uri` answers GET /health within timeout_s, else None.
    Any HTTP answer counts (auth, a proxy, no /health): only the network failing is an error."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s):
            return None
    except urllib.error.HTTPError:  # it answered: reachable
        return None
    except (urllib.error.URLError, OSError, ValueError) as e:
        return e


def check_server(uri: str, timeout_s: float = 10.0) -> None:
    """Refuse an http(s) tracking URI where no server answers within timeout_s (MLflow's own client
    retries a dead server for minutes). Any HTTP answer counts: only the network failing is an error."""
    if not uri.startswith(("http://", "https://")):
        return
    e = _unanswered(uri, timeout_s)
    if e is not None:
        reason = " ".join(str(getattr(e, "reason", None) or e).split())[:160]
        raise TrackingError(f"mlflow.tracking_uri {uri}: no server answers ({reason}) within {timeout_s:g}s "
                            "(mlflow.connect_timeout_s): start the MLflow server or fix mlflow.tracking_uri") from None


def store_problem(uri: str, timeout_s: float = 5.0) -> str | None:
    """Why the MLflow store at `uri` (resolved) cannot be used, or None: a local store that does not exist (it
    would hold no runs, and reading it must not create it), or a tracking server that does not answer."""
    import urllib.parse

    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):])
        return None if path.is_file() else f"MLflow store {path} does not exist"
    if uri.startswith("file:") or "://" not in uri:
        path = Path(urllib.parse.urlsplit(uri).path if uri.startswith("file:") else uri)
        return None if path.is_dir() else f"MLflow store {path} does not exist"
    if uri.startswith(("http://", "https://")):
        e = _unanswered(uri, timeout_s)
        if e is not None:
            return f"MLflow tracking server {display_uri(uri)} unreachable: {error_line(getattr(e, 'reason', e))}"
    return None


def display_uri(uri: str) -> str:
    """`uri` without the credentials it may hold, for messages."""
    import urllib.parse

    parts = urllib.parse.urlsplit(uri)
    if parts.username or parts.password:  # never print credentials
        parts = parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else ""))
    return urllib.parse.urlunsplit(parts)


def error_line(e: BaseException | str) -> str:
    """An error's first line, at most 200 characters: how notes quote MLflow's (often long) errors."""
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return text if len(text) <= 200 else text[:197] + "..."


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def experiment_id(uri: str, name: str, root: Path) -> str:
    """Get or create the experiment, once, on the driver. A local store keeps artifacts under <root>/mlruns.
    The experiment is of MLflow's model-training kind (EXPERIMENT_KIND_TAG); one made before that tag existed
    gets it, one whose kind someone chose keeps it."""
    c = client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if EXPERIMENT_KIND_TAG not in exp.tags:
            c.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
        return exp.experiment_id
    location = (shared_root(root) / "mlruns" / name).as_uri() if is_local_store(uri) else None
    return c.create_experiment(name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND})


def ui_url(uri: str, exp_id: str) -> str:
    """The link that opens experiment exp_id in the MLflow UI's model-training runs table: on the tracking
    server of an http(s) `uri`, else where `mlflow ui` serves the local store (LOCAL_UI)."""
    base = display_uri(uri).rstrip("/") if uri.startswith(("http://", "https://")) else LOCAL_UI
    return f"{base}/#/experiments/{exp_id}?{UI_VIEW}"


def run_ui_url(uri: str, run_id: str) -> str | None:
    """ui_url of the experiment that holds run_id; None when the store cannot say."""
    try:
        return ui_url(uri, client(uri).get_run(run_id).info.experiment_id)
    except Exception:  # MlflowException, connection errors: a link is not worth failing for
        return None


def best_at_each_step(points: Iterable[tuple[int, float | None]]) -> list[tuple[int, float]]:
    """The lowest value at each step, steps ascending, of (step, value) points (None and NaN left out): a
    variant's best sampler setting at each NFE, one curve that overlays across variants whatever their
    samplers are called."""
    best: dict[int, float] = {}
    for step, value in points:
        if value is not None and not math.isnan(value) and (step not in best or value < best[step]):
            best[step] = float(value)
    return sorted(best.items())


def dvc_experiment_tags() -> dict[str, str]:
    """The DVC experiment this process runs in, as MLflow tags: `dvc exp run` (queued or not) sets
    DVC_EXP_NAME and DVC_EXP_BASELINE_REV for its stages (dvc/repo/experiments/queue/base.py). Empty
    under a plain `dvc repro` or outside DVC."""
    tags = {DVC_EXP_TAG: os.environ.get("DVC_EXP_NAME", ""),
            "dvc.exp_baseline_rev": os.environ.get("DVC_EXP_BASELINE_REV", "")}
    return {k: v for k, v in tags.items() if v} if tags[DVC_EXP_TAG] else {}


def start_or_resume_run(uri: str, exp_id: str, run_key: str, run_name: str, tags: Mapping[str, str]) -> str:
    """The run tagged with run_key if there is one (a resumed or re-run configuration), else a new run.
    Either way it carries the DVC experiment that (re)ran it (dvc_experiment_tags)."""
    c = client(uri)
    found = c.search_runs([exp_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{run_key}'", max_results=1)
    if found:
        run_id = found[0].info.run_id
        if found[0].info.status != "RUNNING":
            c.update_run(run_id, status="RUNNING")
        for key, value in dvc_experiment_tags().items():
            c.set_tag(run_id, key, value)
        _UNFINISHED[run_id] = uri
        return run_id
    run = c.create_run(exp_id, run_name=run_name, tags={RUN_KEY_TAG: run_key, **tags, **dvc_experiment_tags()})
    _UNFINISHED[run.info.run_id] = uri
    return run.info.run_id


def end_unfinished_runs(status: str = "FAILED") -> list[str]:
    """End with `status` every run this process opened and did not end; the ids of those it could end (a
    store that does not answer leaves its runs as they are: this runs on the way out of a failure)."""
    ended = []
    for run_id, uri in list(_UNFINISHED.items()):
        del _UNFINISHED[run_id]
        try:
            client(uri).set_terminated(run_id, status)
            ended.append(run_id)
        except Exception as e:  # the store's errors come in many types
            sys.stderr.write(f"mlflow: could not mark run {run_id} {status}: {error_line(e)}\n")
    return ended


def open_run(uri: str, experiment: str, root: Path, run_key: str, run_name: str, tags: Mapping[str, str]) -> str:
    """The id of the run of `experiment` (created once, on the driver) tagged with run_key: the one an
    earlier launch of the same configuration opened (resumed, status RUNNING again), else a new one."""
    return start_or_resume_run(uri, experiment_id(uri, experiment, root), run_key, run_name, tags)


def experiment_name(configured: str | None, source: str) -> str:
    """params.mlflow.experiment, else one experiment per data source: scorelab-<source>."""
    return configured or f"scorelab-{source}"


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """{"a": {"b": 1}} -> {"a.b": "1"}: nested config as MLflow params."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        else:
            out[name] = str(value)[:6000]
    return out


def git_commit(root: Path) -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class RunLogger:
    """Logs to one MLflow run. Calls are retried for a while, so a tracking server that restarts
    costs a pause, not the training run; what still fails is reported and dropped.

    metrics(..., background=True) hands the batch to MLflow's asynchronous logging queue instead, so a
    training loop does not wait while the server is away (MLflow's HTTP layer retries each request for
    about 4 minutes); flush() waits for those batches, sends the ones that failed again in the
    foreground, and reports what still could not land. finish() flushes first.
    """

    def __init__(self, uri: str, run_id: str, retries: int = 5, backoff: float = 1.0):
        self.uri, self.run_id = uri, run_id
        self.retries, self.backoff = retries, backoff
        self._client = client(uri)
        self.dropped = 0
        self._pending: list[tuple[int, list, Any]] = []  # (step, metrics, MLflow's RunOperations)

    def _call(self, fn, *args, **kwargs) -> bool:
        for attempt in range(self.retries):
            try:
                fn(*args, **kwargs)
                return True
            except Exception as e:  # the server's errors come in many types; all mean "try later"
                if attempt == self.retries - 1:
                    self.dropped += 1
                    sys.stderr.write(f"mlflow: giving up on {getattr(fn, '__name__', fn)} after "
                                     f"{self.retries} tries: {e}\n")
                    return False
                time.sleep(self.backoff * 2**attempt)
        return False

    def logged_steps(self, key: str) -> set[int]:
        """The steps at which `key` already has a value in this run; empty (and said) when the server
        cannot tell."""
        try:
            return {m.step for m in self._client.get_metric_history(self.run_id, key)}
        except Exception as e:  # the server's errors come in many types
            sys.stderr.write(f"mlflow: could not read which steps of {key!r} are logged ({' '.join(str(e).split())[:200]}"
                             "): points of redone steps may appear twice\n")
            return set()

    def flush(self) -> None:
        """Wait for the metrics logged in the background; resend in the foreground the batches that failed."""
        pending, self._pending = self._pending, []
        failed = []
        for step, batch, operations in pending:
            try:
                operations.wait()
            except Exception as e:
                failed.append((step, batch, e))
        if failed:
            steps = ", ".join(str(step) for step, _, _ in failed)
            sys.stderr.write(f"mlflow: {len(failed)} metric batch(es) logged in the background failed (steps "
                             f"{steps}; {' '.join(str(failed[0][2]).split())[:200]}); sending them again\n")
        for _, batch, _ in failed:
            self._call(self._client.log_batch, self.run_id, metrics=batch)

    def params(self, params: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            self._call(self._client.log_batch, self.run_id, params=items[i:i + 100])

    def metrics(self, values: Mapping[str, float], step: int, background: bool = False) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in values.items()]
        if background:
            try:
                self._pending.append((step, batch, self._client.log_batch(self.run_id, metrics=batch,
                                                                          synchronous=False)))
                return
            except Exception:  # the queue itself refused: log in the foreground instead
                pass
        self._call(self._client.log_batch, self.run_id, metrics=batch)

    def tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        self._call(self._client.log_batch, self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self._call(self._client.log_artifact, self.run_id, str(path), artifact_path)

    def artifacts(self, paths: Iterable[Path], artifact_path: str | None = None) -> None:
        for p in paths:
            self.artifact(p, artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        self.flush()
        self._call(self._client.set_terminated, self.run_id, status)
        _UNFINISHED.pop(self.run_id, None)
