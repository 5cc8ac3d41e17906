"""Typed, validated params.yaml: the one place where configuration is read and checked.

    params = load_params("params.yaml")          # raises ConfigError listing every problem
    sde = params.variants["vp"].sde.build()      # -> scorelab.sde.get_sde("vp", ...)
    for s in params.variants["vp"].samplers:
        for steps in s.step_list():
            sample(score_fn, sde, shape, method=s.method, steps=steps, seed=params.seed, **s.options())

Every model forbids unknown keys, so a typo (`sigma_mn`, `continuouse`) is an error that names the key
and suggests the nearest valid one, instead of a setting silently ignored. Validation errors are
turned into one line each, "dotted.location: message", with pydantic's union tags dropped.
"""

from __future__ import annotations

import difflib
import inspect
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from .data import DataConfig
from .nets import NetConfig
from .sampling import CORRECTORS, PREDICTORS, check_method
from .sde import SDE, SDE_FAMILY, VPSDE, get_sde


from .schema import ConfigError, StrictModel as _Model  # noqa: E402,F401  (re-exported)


def _above(name: str, value: float, info: ValidationInfo) -> float:
    """Coupled check: `value` must exceed the already-validated field `name` (skipped if that one failed)."""
    if name in info.data and value <= info.data[name]:
        raise ValueError(f"must be > {name} ({info.data[name]})")
    return value


# ---------------------------------------------------------------------------------------------
# SDEs: exactly the keyword arguments get_sde accepts for each type, with its defaults.


class _SDEBase(_Model):
    type: str

    @property
    def family(self) -> str:
        """"vp" | "subvp" | "ve": what decides which samplers apply."""
        return SDE_FAMILY[self.type]

    def build(self) -> SDE:
        # eps=None means "the SDE's own default", which get_sde applies when eps is not passed.
        return get_sde(self.type, **self.model_dump(exclude={"type"}, exclude_none=True))


_VP_EPS: float = inspect.signature(VPSDE.__init__).parameters["eps"].default
_Eps = Annotated[float, Field(gt=0, lt=1)] | None  # smallest time; the continuous SDEs run on [0, T=1]


class _LinearBetaSDE(_SDEBase):
    beta_min: float = Field(0.1, gt=0)
    beta_max: float = Field(20.0, validate_default=True)  # checked against beta_min even when left out
    eps: _Eps = None

    @field_validator("beta_max")
    @classmethod
    def _max_above_min(cls, v: float, info: ValidationInfo) -> float:
        return _above("beta_min", v, info)


class VPConfig(_LinearBetaSDE):
    type: Literal["vp"] = "vp"


class SubVPConfig(_LinearBetaSDE):
    type: Literal["subvp"] = "subvp"


class VPCosineConfig(_SDEBase):
    type: Literal["vp_cosine"] = "vp_cosine"
    s: float = Field(0.008, gt=0, lt=1)
    T: float = Field(0.9946, gt=0, lt=1)  # alpha(1) = 0 would make beta infinite, so T < 1
    eps: Annotated[float, Field(gt=0)] | None = Field(None, validate_default=True)

    @field_validator("eps")
    @classmethod
    def _eps_below_T(cls, v: float | None, info: ValidationInfo) -> float | None:
        eps = _VP_EPS if v is None else v  # None: the SDE's default, which must fit below T too
        if "T" in info.data and eps >= info.data["T"]:
            raise ValueError(f"must be < T ({info.data['T']})" + (f"; the default is {eps}" if v is None else ""))
        return v


class VEConfig(_SDEBase):
    type: Literal["ve"] = "ve"
    sigma_min: float = Field(0.01, gt=0)
    sigma_max: float = Field(50.0, validate_default=True)
    eps: _Eps = None

    @field_validator("sigma_max")
    @classmethod
    def _max_above_min(cls, v: float, info: ValidationInfo) -> float:
        return _above("sigma_min", v, info)


class DDPMConfig(_SDEBase):
    type: Literal["ddpm"] = "ddpm"
    num_steps: int = Field(1000, ge=1)
    schedule: Literal["linear", "cosine"] = "linear"
    beta_start: float = Field(1e-4, gt=0, lt=1)
    beta_end: float = Field(0.02, gt=0, lt=1, validate_default=True)

    @field_validator("beta_end")
    @classmethod
    def _end_above_start(cls, v: float, info: ValidationInfo) -> float:
        v = _above("beta_start", v, info)
        # The linear betas are rescaled by 1000/num_steps (same SDE for any N); they must stay below 1.
        n = info.data.get("num_steps")
        if info.data.get("schedule") == "linear" and n is not None and v * 1000 / n >= 1:
            raise ValueError(f"beta_end * 1000 / num_steps must be < 1 (is {v * 1000 / n:g}); use more steps")
        return v


class NCSNConfig(_SDEBase):
    type: Literal["ncsn"] = "ncsn"
    sigma_min: float = Field(0.01, gt=0)
    sigma_max: float = Field(1.0, validate_default=True)
    num_scales: int = Field(10, ge=2)  # a ladder from sigma_max down to sigma_min has both ends

    @field_validator("sigma_max")
    @classmethod
    def _max_above_min(cls, v: float, info: ValidationInfo) -> float:
        return _above("sigma_min", v, info)


SDEConfig = Annotated[
    Union[VPConfig, VPCosineConfig, SubVPConfig, VEConfig, DDPMConfig, NCSNConfig], Field(discriminator="type")
]


# ---------------------------------------------------------------------------------------------
# What the network predicts, the loss, the EMA.


class EpsParam(_Model):
    type: Literal["eps"] = "eps"


class ScoreParam(_Model):
    type: Literal["score"] = "score"
    scale_by_sigma: bool = False  # network output divided by std(t), as NCSN++ does


class EDMParam(_Model):
    type: Literal["edm"] = "edm"
    sigma_data: float = Field(0.5, gt=0)


ParamConfig = Annotated[Union[EpsParam, ScoreParam, EDMParam], Field(discriminator="type")]


class LossConfig(_Model):
    weighting: Literal["std2", "g2"] = "std2"  # g2 = likelihood weighting (Song et al. 2021b)
    reduction: Literal["mean", "sum"] = "mean"


class EMAConfig(_Model):
    decay: float = Field(0.999, ge=0, lt=1)
    warmup: bool = True  # decay min(decay, (1 + n) / (10 + n)) early in training


# ---------------------------------------------------------------------------------------------
# Samplers: one model per method, holding only that method's options.

Steps = Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=1)]
Grid = Literal["uniform", "log_snr", "edm"]


class _SamplerBase(_Model):
    method: str

    def options(self) -> dict[str, Any]:
        """Keyword options for scorelab.sampling.sample: every field but method and steps."""
        return self.model_dump(exclude={"method", "steps"})

    def step_list(self) -> list[int | None]:
        """The step counts to run; [None] for a sampler that picks its own (ode, ald on NCSN's ladder)."""
        steps = getattr(self, "steps", None)
        return [None] if steps is None else list(steps)


class AncestralSampler(_SamplerBase):
    method: Literal["ancestral"] = "ancestral"
    steps: Steps
    noise: Literal["posterior", "transition"] = "posterior"
    grid: Grid = "uniform"


class EulerMaruyamaSampler(_SamplerBase):
    method: Literal["euler_maruyama"] = "euler_maruyama"
    steps: Steps
    grid: Grid = "uniform"


class ReverseDiffusionSampler(_SamplerBase):
    method: Literal["reverse_diffusion"] = "reverse_diffusion"
    steps: Steps
    grid: Grid = "uniform"


class PCSampler(_SamplerBase):
    method: Literal["pc"] = "pc"
    steps: Steps
    grid: Grid = "uniform"
    predictor: Literal[PREDICTORS] = "reverse_diffusion"  # type: ignore[valid-type]
    corrector: Literal[CORRECTORS] = "langevin"  # type: ignore[valid-type]
    snr: float = Field(0.16, gt=0)
    corrector_steps: int = Field(1, ge=1)


class ALDSampler(_SamplerBase):
    method: Literal["ald"] = "ald"
    steps: Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=1)] | None = None  # noise levels
    steps_each: int = Field(100, ge=1)
    step_lr: float = Field(2e-5, gt=0)
    denoise: bool = True


class ODESampler(_SamplerBase):
    method: Literal["ode"] = "ode"  # adaptive: no steps
    rtol: float = Field(1e-5, gt=0)
    atol: float = Field(1e-5, gt=0)
    solver: Literal["dopri5", "bosh3", "adaptive_heun"] = "dopri5"
    denoise: bool = True


class DDIMSampler(_SamplerBase):
    method: Literal["ddim"] = "ddim"
    steps: Steps
    grid: Grid = "uniform"
    eta: float = Field(0.0, ge=0, le=1)


class HeunSampler(_SamplerBase):
    method: Literal["heun"] = "heun"
    steps: Steps
    grid: Grid = "edm"
    rho: float = Field(7.0, gt=0)


class DPMSolverSampler(_SamplerBase):
    method: Literal["dpm_solver"] = "dpm_solver"
    steps: Steps
    grid: Grid = "log_snr"


_SAMPLERS = (
    AncestralSampler, EulerMaruyamaSampler, ReverseDiffusionSampler, PCSampler, ALDSampler,
    ODESampler, DDIMSampler, HeunSampler, DPMSolverSampler,
)
SamplerConfig = Annotated[Union[_SAMPLERS], Field(discriminator="method")]  # type: ignore[valid-type]


# ---------------------------------------------------------------------------------------------
# Variants and the whole file.


class TrainConfig(_Model):
    """How long and how to optimise. batch_size is global: the same whatever the number of workers
    (each worker takes micro_batch_size rows per forward pass and gradients are accumulated)."""

    steps: int = Field(2000, ge=1)
    batch_size: int = Field(128, ge=1)
    micro_batch_size: int | None = Field(None, ge=1)  # per worker; None = batch_size / num_workers
    lr: float = Field(1e-3, gt=0, le=1)
    warmup_steps: int = Field(100, ge=0)
    grad_clip: float = Field(1.0, ge=0)  # max global gradient norm; 0 turns clipping off
    weight_decay: float = Field(0.0, ge=0)
    checkpoint_every: int = Field(500, ge=1)
    log_every: int = Field(25, ge=1)
    sample_every: int = Field(0, ge=0)  # steps between sample grids logged to MLflow; 0 = only at the end
    bf16: bool = False  # autocast to bfloat16 (GPU only)


class TrainOverrides(_Model):
    """Per-variant changes to the global train section."""

    steps: int | None = Field(None, ge=1)
    batch_size: int | None = Field(None, ge=1)
    micro_batch_size: int | None = Field(None, ge=1)
    lr: float | None = Field(None, gt=0, le=1)
    warmup_steps: int | None = Field(None, ge=0)
    grad_clip: float | None = Field(None, ge=0)
    weight_decay: float | None = Field(None, ge=0)


class RayConfig(_Model):
    address: str = ""  # "" starts a local Ray; "auto" or "host:port" joins a running cluster
    num_workers: int = Field(2, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0)
    use_gpu: bool = False
    placement_strategy: Literal["PACK", "SPREAD"] = "PACK"
    storage_path: str = "outputs/ray"  # checkpoints: a local folder, a shared filesystem or a URI
    max_failures: int = Field(2, ge=0)  # worker or node failures survived by restarting from a checkpoint
    connect_timeout_s: float = Field(10.0, gt=0)  # a host:port address that does not answer by then is an error


class MLflowConfig(_Model):
    tracking_uri: str = ""  # "" = sqlite:///<repo>/mlflow.db with artifacts under <repo>/mlruns
    experiment: str | None = None  # None = "scorelab-<data.source>"
    connect_timeout_s: float = Field(10.0, gt=0)  # an http(s) server that does not answer by then is an error


class EvalConfig(_Model):
    """The evaluate stage: Inception FID from local weights only, and the bits/dim estimate."""

    # pytorch-fid's weights file (relative to the repository root); None: $SCORELAB_INCEPTION_WEIGHTS, then the
    # torch hub cache. Never downloaded.
    inception_weights: str | None = None
    require_inception: bool = False  # fail the stage when no Inception weights are found (else FID is skipped)
    bpd_samples: int = Field(64, ge=0)  # test images for bits/dim (2-D: points for the log-likelihood); 0 skips
    probes: int = Field(4, ge=1)  # Hutchinson probes per image for bits/dim
    # the probability-flow ODE's tolerances for bits/dim (score_sde's 1e-5 costs ~1000 NFE with backward
    # passes; 1e-4 moved digits' bits/dim by 0.005, a tenth of its standard error, at a quarter of the NFE)
    bpd_rtol: float = Field(1e-5, gt=0, lt=1)
    bpd_atol: float = Field(1e-5, gt=0, lt=1)


class SampleConfig(_Model):
    """The sample stage: how many samples per sampler setting, from which seeds, in what chunks."""

    n: int = Field(256, ge=1, le=1_000_000)  # per setting and seed; FID-like numbers are biased at small n
    seeds: tuple[Annotated[int, Field(ge=0)], ...] = Field((0, 1, 2), min_length=1)
    batch_size: int = Field(256, ge=1)  # samples per chunk: one Ray task, and the unit of resumption
    workers: int = Field(2, ge=1)  # chunks in flight, 1 CPU each (or ray.use_gpu: 1 GPU each)

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, seeds: tuple[int, ...]) -> tuple[int, ...]:
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds must be distinct (got {list(seeds)})")
        return seeds


class VariantConfig(_Model):
    sde: SDEConfig
    parameterization: ParamConfig
    net: NetConfig | None = None  # None: an MLP for 2-D data, the default U-Net for images
    loss: LossConfig = Field(default_factory=LossConfig)
    ema: EMAConfig = Field(default_factory=EMAConfig)
    train: TrainOverrides = Field(default_factory=lambda: TrainOverrides())
    samplers: list[SamplerConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _samplers_fit_sde(self) -> VariantConfig:
        errors: list[InitErrorDetails] = []
        for i, s in enumerate(self.samplers):
            try:
                check_method(s.method, self.sde.family)
            except ValueError as e:
                errors.append(_line_error(("samplers", i, "method"), str(e), s.method))
                continue
            if isinstance(s, ALDSampler) and s.steps is None and self.sde.type == "ve":
                msg = "required for a continuous 've' SDE (only 'ncsn' has a noise ladder of its own)"
                errors.append(_line_error(("samplers", i, "steps"), msg, None))
        if errors:  # raised as a ValidationError, pydantic keeps each error at its own location
            raise ValidationError.from_exception_data(type(self).__name__, errors)
        return self


def _line_error(loc: tuple[str | int, ...], message: str, value: Any) -> InitErrorDetails:
    return InitErrorDetails(type=PydanticCustomError("coupled_fields", "{message}", {"message": message}),
                            loc=loc, input=value)


# ---------------------------------------------------------------------------------------------
# The Ray Tune sweep (scorelab.tune): a search space of SDEs, each candidate checked as a variant.

TUNED_VARIANT = "tuned"  # the sweep's winner, a variant of outputs/tune/best_params.yaml (never of params.yaml)
AUTO = "auto"  # tune.space.*.sde.sigma_max: resolved from the data by scorelab.tune.suggest_sigma_max
_INF = float("inf")  # stands for "auto" while the data is unknown: passes sigma_min < sigma_max


class TuneCandidate(_Model):
    """One part of the search space: an SDE with its parameterisation, network and loss. Any value under
    `sde` may be a list of choices (the candidate is then the grid over them), and `sigma_max` may be
    "auto": the largest distance between two training points (Song & Ermon 2020, technique 1),
    computed from the prepared data before the sweep starts."""

    sde: dict[str, Any] = Field(min_length=1)
    parameterization: ParamConfig = Field(default_factory=EpsParam)
    net: NetConfig | None = None
    loss: LossConfig = Field(default_factory=LossConfig)

    def settings(self, sigma_max_auto: float | None = None) -> list[dict[str, Any]]:
        """Every SDE setting of the grid, in order; "auto" replaced by sigma_max_auto when given."""
        from itertools import product

        keys = list(self.sde)
        choices = [v if isinstance(v, list) else [v] for v in self.sde.values()]
        out = [dict(zip(keys, combo)) for combo in product(*choices)]
        if sigma_max_auto is not None:
            out = [{**s, "sigma_max": sigma_max_auto} if s.get("sigma_max") == AUTO else s for s in out]
        return out

    def variant(self, sde: dict[str, Any], samplers: list[Any], lr: float | None = None,
                ema_decay: float | None = None) -> dict[str, Any]:
        """The variant (as params.yaml would spell it) of one SDE setting of this candidate."""
        out: dict[str, Any] = {"sde": sde, "parameterization": self.parameterization.model_dump(mode="json"),
                               "net": self.net.model_dump(mode="json") if self.net else None,
                               "loss": self.loss.model_dump(mode="json"),
                               "samplers": [s.model_dump(mode="json") for s in samplers]}
        if ema_decay is not None:
            out["ema"] = {"decay": ema_decay}
        if lr is not None:
            out["train"] = {"lr": lr}
        return out


class TuneObjective(_Model):
    """What ranks the trials: the distance to the test split of n_samples samples of the EMA model drawn
    with one sampler at one NFE (domain Frechet distance for images, sliced W2 for 2-D points)."""

    sampler: SamplerConfig = Field(default_factory=lambda: DDIMSampler(steps=[20]))
    n_samples: int = Field(256, ge=4, le=100_000)

    @model_validator(mode="after")
    def _one_nfe(self) -> TuneObjective:
        if self.sampler.method == "ode":
            raise ValidationError.from_exception_data(type(self).__name__, [_line_error(
                ("sampler", "method"), "the objective needs a fixed NFE; 'ode' is adaptive: choose a grid sampler "
                "such as ddim", "ode")])
        if len(self.sampler.step_list()) != 1:
            raise ValidationError.from_exception_data(type(self).__name__, [_line_error(
                ("sampler", "steps"), "needs exactly one value, the objective's NFE",
                self.sampler.steps)])
        return self


class TuneConfig(_Model):
    """The sweep: which variants to train (space x lr x ema_decay), for how long, and how ASHA stops them."""

    space: list[TuneCandidate] = Field(min_length=1)
    lr: list[Annotated[float, Field(gt=0, le=1)]] | None = Field(None, min_length=1)  # choices; None: train.lr
    ema_decay: list[Annotated[float, Field(ge=0, lt=1)]] | None = Field(None, min_length=1)  # None: ema default
    num_trials: int = Field(4, ge=1)
    max_concurrent: int = Field(2, ge=1)  # trials training at once
    workers_per_trial: int = Field(1, ge=1)  # Ray Train workers of each trial
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    steps: int = Field(300, ge=1)  # training steps of a trial that ASHA lets finish
    batch_size: int | None = Field(None, ge=1)  # global, per step; None: train.batch_size
    eval_every: int = Field(100, ge=1)  # checkpoint and objective cadence: where ASHA can stop a trial
    grace_period: int = Field(100, ge=1)  # steps every trial gets before ASHA may stop it
    reduction_factor: float = Field(2.0, gt=1)  # at each rung ASHA keeps the best 1/reduction_factor
    objective: TuneObjective = Field(default_factory=TuneObjective)
    samplers: list[SamplerConfig] = Field(min_length=1)  # the `tuned` variant's, for the sample/evaluate stages

    def size(self) -> int:
        """Distinct configurations in the space: SDE settings x lr choices x ema_decay choices."""
        return (sum(len(c.settings()) for c in self.space) * len(self.lr or [None])
                * len(self.ema_decay or [None]))

    @model_validator(mode="after")
    def _space_is_valid(self) -> TuneConfig:
        errors = [e for i, c in enumerate(self.space) for e in self.candidate_errors(i, c, None)]
        if self.grace_period > self.steps:
            errors.append(_line_error(("grace_period",), f"must be <= tune.steps ({self.steps})", self.grace_period))
        if self.eval_every > self.steps:
            errors.append(_line_error(("eval_every",), f"must be <= tune.steps ({self.steps})", self.eval_every))
        if not errors and self.num_trials > self.size():
            errors.append(_line_error(("num_trials",), f"must be <= {self.size()}, the number of distinct "
                                      "configurations in tune.space x lr x ema_decay", self.num_trials))
        if errors:
            raise ValidationError.from_exception_data(type(self).__name__, errors)
        return self

    def candidate_errors(self, i: int, cand: TuneCandidate, sigma_max_auto: float | None) -> list[InitErrorDetails]:
        """Every problem of candidate i, each at its own field: each SDE setting is built as the real variant
        (with the tuned samplers, and with the objective's sampler) and, once "auto" is known, as the SDE."""
        settings = cand.settings(sigma_max_auto)
        if not settings:
            return [_described(("space", i, "sde"), "a list of choices is empty")]
        errors: dict[tuple, InitErrorDetails] = {}  # keyed by (loc, message): a grid repeats its problems
        for sde in settings:
            if sde.get("sigma_max") == AUTO:  # known once the data is: checked again then
                sde = {**sde, "sigma_max": _INF}
            for samplers, where in ((self.samplers, ("samplers",)), ([self.objective.sampler], ("objective",))):
                for parts, message in _variant_problems(cand.variant(sde, samplers)):
                    if parts[0] != "samplers":
                        loc = ("space", i, *parts)
                    elif where == ("samplers",):
                        loc, message = ("samplers", *parts[1:]), f"{message} (for tune.space.{i}, {sde.get('type')})"
                    else:
                        loc, message = ("objective", "sampler", *parts[2:]), f"{message} (for tune.space.{i})"
                    errors.setdefault((loc, message), _described(loc, message))
            if not errors and _INF not in sde.values():
                try:
                    VariantConfig.model_validate(cand.variant(sde, self.samplers)).sde.build()
                except ValueError as e:
                    errors.setdefault((("space", i, "sde"), str(e)), _described(("space", i, "sde"), str(e)))
        return list(errors.values())


def _described(loc: tuple[str | int, ...], message: str) -> InitErrorDetails:
    """An error whose message is already complete (written as _describe writes them)."""
    return InitErrorDetails(type=PydanticCustomError("described", "{message}", {"message": message}), loc=loc,
                            input=None)


def _variant_problems(data: dict[str, Any]) -> list[tuple[list[str], str]]:
    """(location parts inside the variant, message) for each problem of a variant dict, as _describe
    writes them for params.yaml's variants."""
    try:
        VariantConfig.model_validate(data)
    except ValidationError as e:
        out = []
        for err in e.errors(include_url=False):
            where, _, message = _describe({**err, "loc": ("variants", "v", *err["loc"])}).partition(": ")
            out.append((where.split(".")[2:] or ["sde"], message))
        return out
    return []


VariantName = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$")]


class DemoConfig(_Model):
    n_samples: int = Field(2000, ge=1, le=100_000)
    steps: int = Field(200, ge=1, le=10_000)


class Params(_Model):
    """params.yaml: the whole configuration, validated once at the edge."""

    seed: int = Field(0, ge=0)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    mlflow: MLflowConfig = Field(default_factory=MLflowConfig)
    evaluate: EvalConfig = Field(default_factory=EvalConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)
    variants: dict[VariantName, VariantConfig] = Field(min_length=1)
    demo: DemoConfig = Field(default_factory=DemoConfig)
    tune: TuneConfig | None = None  # the Ray Tune sweep of pipeline/tune.py; None: no sweep

    @model_validator(mode="after")
    def _batches_fit_workers(self) -> Params:
        errors: list[InitErrorDetails] = []
        workers = self.ray.num_workers
        for where, batch, micro in [(("train",), self.train.batch_size, self.train.micro_batch_size)] + [
            (("variants", name, "train"), v.train.batch_size or self.train.batch_size,
             v.train.micro_batch_size or self.train.micro_batch_size)
            for name, v in self.variants.items() if v.train.batch_size or v.train.micro_batch_size
        ]:
            rows = micro or batch // workers
            if batch < workers:
                errors.append(_line_error((*where, "batch_size"),
                                          f"must be >= ray.num_workers ({workers})", batch))
            elif batch % (workers * rows):
                errors.append(_line_error((*where, "batch_size"), f"must be a multiple of ray.num_workers x "
                                          f"micro_batch_size = {workers} x {rows}", batch))
        if self.tune is not None:  # every trial trains with this batch on tune.workers_per_trial workers
            workers, micro = self.tune.workers_per_trial, self.train.micro_batch_size
            batch = self.tune.batch_size or self.train.batch_size
            rows = micro or batch // workers
            if batch < workers or batch % (workers * rows):
                errors.append(_line_error(("tune", "workers_per_trial"), f"must divide the batch ({batch}) into "
                                          f"micro-batches of {rows} rows per worker", workers))
        if self.tune is not None and TUNED_VARIANT in self.variants:
            errors.append(_line_error(("variants", TUNED_VARIANT), f"the name {TUNED_VARIANT!r} is the tune stage's "
                                      "winner's; rename this variant", TUNED_VARIANT))
        if self.train.bf16 and not self.ray.use_gpu:
            errors.append(_line_error(("train", "bf16"), "needs ray.use_gpu: true (bf16 autocast is GPU only)",
                                      True))
        if errors:
            raise ValidationError.from_exception_data(type(self).__name__, errors)
        return self


# ---------------------------------------------------------------------------------------------
# Loading, and errors one line each.


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys, which PyYAML would silently resolve to the last one."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        self.flatten_mapping(node)  # resolve `<<` merges first: keys they bring in may be overridden
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # unhashable: the base class reports it
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark, f"duplicate key {key!r}", key_node.start_mark
                )
        return super().construct_mapping(node, deep)


def load_params(path: str | Path) -> Params:
    """Read and validate a params file; ConfigError names the file, or lists every problem in it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{path}: file not found"], str(path)) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError([f"{path}: cannot read: {getattr(e, 'strerror', None) or e}"], str(path)) from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError([f"{path}: invalid YAML{where}: {problem}"], str(path)) from None
    return parse_params(data, source=str(path))


def parse_params(data: Any, source: str | None = None) -> Params:
    """Validate already-parsed params; ConfigError lists every problem."""
    where = source or "params"
    if data is None:
        raise ConfigError([f"{where}: is empty; expected a mapping with keys seed, variants, demo"], source)
    if not isinstance(data, dict):
        raise ConfigError([f"{where}: top level must be a mapping of sections, got {type(data).__name__}"], source)
    try:
        return Params.model_validate(data)
    except ValidationError as e:
        raise ConfigError([_describe(err) for err in e.errors(include_url=False)], source) from None


# A pydantic schema label in a loc, e.g. "function-after[_check(), VPConfig]", "list[int]", "constrained-int".
_LABEL = re.compile(r"^[a-z][a-z-]*(\[.*\])?$")


def _unwrap(tp: Any, disc: str | None = None) -> tuple[Any, str | None]:
    """Strip Annotated and Optional around a type; also return a union discriminator found on the way."""
    while True:
        if typing.get_origin(tp) is Annotated:
            tp, *meta = typing.get_args(tp)
            disc = next((m.discriminator for m in meta if getattr(m, "discriminator", None)), disc)
            continue
        if _is_union(tp):
            members = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(members) == 1:
                tp = members[0]
                continue
        return tp, disc


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _tags(union: Any, field: str) -> dict[Any, type[BaseModel]]:
    """A discriminated union's members by their tag values."""
    tags = {}
    for member in typing.get_args(union):
        member, _ = _unwrap(member)
        if _is_model(member) and field in member.model_fields:
            tags.update(dict.fromkeys(typing.get_args(member.model_fields[field].annotation), member))
    return tags


def _walk(loc: tuple) -> tuple[list[str], Any]:
    """Follow a pydantic loc through the Params type tree: the human path (union tags and schema labels
    dropped, dict keys and list indices kept) and the type found at its end (None if lost)."""
    parts: list[str] = []
    tp: Any = Params
    disc: str | None = None
    for item in loc:
        tp, disc = _unwrap(tp, disc)
        origin = typing.get_origin(tp)
        if item == "[key]":  # the error is about the dict key just passed
            continue
        if origin is dict:
            parts.append(str(item))
            tp, disc = typing.get_args(tp)[1], None
        elif origin is list and isinstance(item, int):
            parts.append(str(item))
            tp, disc = typing.get_args(tp)[0], None
        elif _is_union(tp) and disc and item in _tags(tp, disc):
            tp, disc = _tags(tp, disc)[item], None  # pydantic's union tag, not a key the user wrote
        elif _is_model(tp) and item in tp.model_fields:
            parts.append(str(item))
            field = tp.model_fields[item]
            tp, disc = field.annotation, field.discriminator
        elif isinstance(item, str) and _LABEL.match(item) and ("[" in item or "-" in item):
            continue
        else:
            parts.append(str(item))
            tp, disc = None, None
    return parts, (_unwrap(tp)[0] if tp is not None else None)


def _suggest(word: Any, valid: list[str]) -> str:
    close = difflib.get_close_matches(str(word), valid, n=1)
    return f"did you mean {close[0]!r}? " if close else ""


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# pydantic error type -> (its ctx key, the operator to show)
_BOUNDS = {"greater_than": ("gt", ">"), "greater_than_equal": ("ge", ">="), "less_than": ("lt", "<"),
           "less_than_equal": ("le", "<=")}


def _describe(err: dict) -> str:
    """One line "dotted.location: message" for one pydantic error."""
    kind, loc, ctx, value = err["type"], tuple(err["loc"]), err.get("ctx") or {}, err.get("input")
    got = f" (got {_show(value)})"

    if kind == "extra_forbidden":
        parts, owner = _walk(loc[:-1])
        key = loc[-1]
        where = ".".join([*parts, str(key)])
        if not _is_model(owner):
            return f"{where}: unknown key {key!r}"
        valid = sorted(owner.model_fields)
        return f"{where}: unknown key {key!r}; {_suggest(key, valid)}valid keys: {', '.join(valid)}"

    parts, tp = _walk(loc)
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        field = ctx.get("discriminator", "type").strip("'")
        where = ".".join([*parts, field])
        valid = sorted(_tags(tp, field)) if _is_union(tp) else []
        if kind == "union_tag_not_found":
            return f"{where}: missing required key" + (f"; valid {field}s: {', '.join(valid)}" if valid else "")
        tag = ctx.get("tag")
        return f"{where}: unknown {field} {tag!r}; {_suggest(tag, valid)}valid {field}s: {', '.join(valid)}"

    where = ".".join(parts) or "top level"
    if loc and loc[-1] == "[key]":  # a dict key, i.e. a variant name
        rule = f"must match {ctx['pattern']}" if kind == "string_pattern_mismatch" else _pydantic_msg(err)
        return f"{where}: invalid name {loc[-2]!r}; {rule}"
    if kind == "missing":
        return f"{where}: missing required key"
    if kind in _BOUNDS:
        key, op = _BOUNDS[kind]
        return f"{where}: must be {op} {ctx[key]:g}{got}"
    if kind == "too_short":
        return f"{where}: must have at least {ctx['min_length']} item(s){got}"
    if kind == "literal_error":
        valid = re.findall(r"'([^']*)'", ctx.get("expected", ""))
        hint = _suggest(value, valid) if isinstance(value, str) else ""
        return f"{where}: must be one of {', '.join(valid)}{got}" + (f"; {hint.strip()}" if hint else "")
    if kind in ("sampler_sde", "described"):  # the message is complete as it is
        return f"{where}: {err['msg']}"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"{where}: must be a mapping{got}"
    return f"{where}: {_pydantic_msg(err)}{got}"


def _pydantic_msg(err: dict) -> str:
    msg = err["msg"]
    for prefix in ("Value error, ", "Assertion failed, "):
        msg = msg.removeprefix(prefix)
    return msg.replace("Input should be", "must be")


__all__ = [
    "ALDSampler", "AncestralSampler", "ConfigError", "DDIMSampler", "DDPMConfig", "DPMSolverSampler", "DemoConfig",
    "EDMParam", "EMAConfig", "EpsParam", "EulerMaruyamaSampler", "HeunSampler", "LossConfig", "NCSNConfig",
    "ODESampler", "PCSampler", "ParamConfig", "Params", "ReverseDiffusionSampler", "SDEConfig", "SamplerConfig",
    "ScoreParam", "SubVPConfig", "VEConfig", "VPConfig", "VPCosineConfig", "VariantConfig", "load_params",
    "parse_params",
]
