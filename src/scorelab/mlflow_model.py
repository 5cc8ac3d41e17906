"""A trained variant as an MLflow model: its EMA weights (model.pt) behind `mlflow.pyfunc`, sampling with
scorelab's own samplers.

    uri = log_sampler_model(tracking_uri, run_id, model_path)        # "models:/m-..." in the run's experiment
    model = mlflow.pyfunc.load_model(uri)                            # or f"runs:/{run_id}/{MODEL_NAME}"
    x = model.predict({"n": 16, "sampler": "dpm_solver", "steps": 20})   # float32 (16, *data_shape)

A request is one mapping (a one-row DataFrame after MLflow's schema enforcement):
    n        samples to draw (>= 1)
    sampler  a method of scorelab.sampling defined for the variant's SDE (ancestral, ddim, dpm_solver, ode, ...)
    steps    the sampler's steps; omitted for ode (adaptive) and for ald on NCSN's own ladder
    seed     default 0: sample i of seed s draws the same noise in any n (scorelab.rng)
Other keys never reach predict: MLflow's schema enforcement drops them, with its warning naming them.
The sampler's options (eta, snr, grid, rtol, ...) are the variant's own for that method where its config has
one, else the sampler's defaults, as the sample stage would run them. Samples come back in model space, as
scorelab.sampling.sample returns them (images (N, C, H, W) around [-1, 1]; points (N, D)).

The model holds model.pt and a copy of the scorelab package (code_paths), so it loads where scorelab is
not installed; its requirements are the installed versions of what sampling imports, given explicitly so
that MLflow does not infer them by loading the model in a subprocess (seconds per variant).
"""

from __future__ import annotations

import importlib.metadata
import logging
import math
import os
import typing
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import mlflow.pyfunc
import numpy as np
import pandas as pd
from pydantic import Field, TypeAdapter, ValidationError

from . import storage
from .checkpoint import TrainedModel, load_trained
from .sampling import check_method, sample
from .schema import StrictModel, describe_error
from .variant_config import SamplerConfig

MODEL_NAME = "sampler"  # the logged model's name: runs:/<run id>/sampler
SHA_TAG = "scorelab.model_sha256"  # the logged model's tag: the sha256 of the model.pt it holds
WEIGHTS = "model.pt"  # the artifact key of the weights inside the MLflow model
# distributions the sampling path imports (scorelab itself travels as code_paths)
REQUIREMENTS = ("torch", "numpy", "pydantic", "pyarrow", "PyYAML", "tqdm")


class SampleRequestError(ValueError):
    """A predict() input that cannot be sampled: one line naming the key and what would be valid."""


class SampleRequest(StrictModel):
    n: int = Field(ge=1)
    sampler: str
    steps: int | None = Field(None, ge=1)
    seed: int = Field(0, ge=0)


_SAMPLER = TypeAdapter(SamplerConfig)


def _sampler_class(method: str) -> type:
    """The sampler config model of `method` (a member of variant_config's SamplerConfig union)."""
    union = typing.get_args(SamplerConfig)[0]
    return next(c for c in typing.get_args(union) if c.model_fields["method"].default == method)


def _plain(value: Any) -> Any:
    """A DataFrame cell as a plain Python value; NaN/None (a column missing from this row) as absent."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return value.item() if isinstance(value, np.generic) else value


def request_of(model_input: Any) -> SampleRequest:
    """The one request in `model_input` (a mapping, or a one-row DataFrame as MLflow passes it), validated."""
    if isinstance(model_input, pd.DataFrame):
        rows = model_input.to_dict(orient="records")
        if len(rows) != 1:
            raise SampleRequestError(f"predict input: one request at a time, got {len(rows)} rows")
        model_input = rows[0]
    if not isinstance(model_input, dict):
        raise SampleRequestError(f"predict input: must be a mapping like {{'n': 16, 'sampler': 'dpm_solver', "
                                 f"'steps': 20}}, got {type(model_input).__name__}")
    raw = {str(k): _plain(v) for k, v in model_input.items()}
    try:
        return SampleRequest.model_validate({k: v for k, v in raw.items() if v is not None})
    except ValidationError as e:
        problems = "; ".join(describe_error(err, SampleRequest) for err in e.errors(include_url=False))
        raise SampleRequestError(f"predict input: {problems}") from None


def sampler_call(trained: TrainedModel, request: SampleRequest) -> tuple[str, int | None, dict[str, Any]]:
    """(method, steps, options) for scorelab.sampling.sample: the variant's own options for the method, else
    the sampler's defaults, with the request's steps."""
    try:
        check_method(request.sampler, trained.variant.sde.family)
    except ValueError as e:
        raise SampleRequestError(f"predict input: sampler: {e}") from None
    configured = next((s for s in trained.variant.samplers if s.method == request.sampler), None)
    spec = (configured.model_dump(exclude={"steps"}) if configured is not None
            else {"method": request.sampler})
    if request.steps is not None:
        if "steps" not in _sampler_class(request.sampler).model_fields:
            raise SampleRequestError(f"predict input: steps: sampler {request.sampler!r} picks its own steps "
                                     "(adaptive): omit steps")
        spec["steps"] = [request.steps]
    try:
        cfg = _SAMPLER.validate_python(spec)
    except ValidationError:  # the request's steps are checked, the variant's options were: steps are missing
        raise SampleRequestError(f"predict input: steps: sampler {request.sampler!r} needs steps "
                                 "(a positive integer)") from None
    steps = cfg.step_list()[0]
    if steps is None and cfg.method == "ald" and trained.model.sde.discrete_times() is None:
        raise SampleRequestError(f"predict input: steps: sampler 'ald' needs steps (noise levels) on a "
                                 f"continuous {trained.variant.sde.type!r} SDE; only 'ncsn' has a ladder of its own")
    return cfg.method, steps, cfg.options()


class ScorelabSampler(mlflow.pyfunc.PythonModel):
    """A variant's EMA weights; predict draws samples with scorelab.sampling (see the module docstring)."""

    def load_context(self, context) -> None:
        self.trained = load_trained(context.artifacts[WEIGHTS])

    # pd.DataFrame: what MLflow passes after enforcing the signature; a hint it infers nothing from
    def predict(self, context, model_input: pd.DataFrame, params=None) -> np.ndarray:
        request = request_of(model_input)
        method, steps, options = sampler_call(self.trained, request)
        model = self.trained.model
        result = sample(model, model.sde, (request.n, *self.trained.data_shape), method=method, steps=steps,
                        seed=request.seed, **options)
        return result.x.cpu().numpy().astype(np.float32)


def signature(data_shape: tuple[int, ...]):
    """Input: the request's columns (steps and seed optional); output: float32 samples (-1, *data_shape)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    inputs = Schema([ColSpec("long", "n"), ColSpec("string", "sampler"), ColSpec("long", "steps", required=False),
                     ColSpec("long", "seed", required=False)])
    return ModelSignature(inputs=inputs, outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *data_shape))]))


def requirements() -> list[str]:
    """The installed versions of REQUIREMENTS (and mlflow), pinned."""
    names = [*REQUIREMENTS, "mlflow"]
    out = []
    for name in names:
        try:
            out.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            out.append(name)
    return out


@contextmanager
def _tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's model logging reads the process-wide tracking URI: point it at `uri` for the call only."""
    before = mlflow.get_tracking_uri() if mlflow.tracking.is_tracking_uri_set() else None
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)


_PROGRESS_BAR = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"


@contextmanager
def _quiet() -> Iterator[None]:
    """Without the advice MLflow prints for every custom model: the instance holds no state (the weights are
    an artifact) and pickles as a reference to this importable class; the signature stands in for an input
    example (which MLflow would run: one sampling per variant)."""
    loggers = [logging.getLogger(n) for n in ("mlflow.pyfunc", "mlflow.models.model")]
    levels = [q.level for q in loggers]
    for q in loggers:
        q.setLevel(logging.ERROR)
    bar = os.environ.get(_PROGRESS_BAR)
    os.environ[_PROGRESS_BAR] = "false"  # a bar for copying model.pt into the model, in every train stage's output
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*(input example|input_example)")
            yield
    finally:
        for q, level in zip(loggers, levels):
            q.setLevel(level)
        if bar is None:
            os.environ.pop(_PROGRESS_BAR, None)
        else:
            os.environ[_PROGRESS_BAR] = bar


def log_sampler_model(tracking_uri: str, run_id: str, model_path: Path, name: str = MODEL_NAME) -> str:
    """Log model.pt as an MLflow pyfunc model of the run `run_id`, in the run's experiment, leaving the run's
    status as it is; returns the model's URI (models:/<model id>)."""
    from mlflow import MlflowClient
    from mlflow.entities import LoggedModelStatus
    from mlflow.models import Model

    trained = load_trained(model_path)  # checks the file (digest) before it is logged
    sha = storage.sha256_file(model_path)
    client = MlflowClient(tracking_uri)
    exp_id = client.get_run(run_id).info.experiment_id
    # A rerun of the stage with the same weights (training is bit-reproducible) adds no second model.
    found = client.search_logged_models([exp_id], filter_string=(
        f"source_run_id = '{run_id}' AND name = '{name}' AND tags.`{SHA_TAG}` = '{sha}'"))
    ready = [m for m in found if m.status == LoggedModelStatus.READY]  # not one whose logging failed
    if ready:
        return f"models:/{ready[0].model_id}"
    # Created here, in the run's experiment: MLflow's own creation would pick the process's active
    # experiment (the Default one) unless a run is active, and activating one changes its status.
    created = client.create_logged_model(exp_id, name=name, source_run_id=run_id, tags={SHA_TAG: sha})
    with _tracking_uri(tracking_uri), _quiet():
        info = Model.log(
            name=name, flavor=mlflow.pyfunc, run_id=run_id, model_id=created.model_id, artifact_path=None,
            python_model=ScorelabSampler(), artifacts={WEIGHTS: str(Path(model_path).resolve())},
            code_paths=[str(Path(__file__).resolve().parent)], signature=signature(trained.data_shape),
            pip_requirements=requirements(),
            metadata={"variant": trained.variant.model_dump(mode="json"), "data_shape": list(trained.data_shape),
                      "step": trained.step},
        )
    return info.model_uri


def publish(tracking_uri: str, run_id: str, model_path: Path) -> str:
    """log_sampler_model for a stage: one line saying where the model is, or why it was not logged. The
    stage does not fail for it: its output is model.pt, and MLflow already said which run it belongs to."""
    try:
        uri = log_sampler_model(tracking_uri, run_id, model_path)
    except Exception as e:  # MLflow's errors come in many types; the weights are safe in model.pt
        text = " ".join(str(e).split())[:200]
        return f"not logged as an MLflow model ({type(e).__name__}: {text}); the weights are in {model_path}"
    return f"MLflow model {uri}"


__all__ = ["MODEL_NAME", "SampleRequest", "SampleRequestError", "ScorelabSampler", "log_sampler_model",
           "publish", "request_of", "sampler_call", "signature"]
