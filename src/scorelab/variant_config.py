"""What one variant of params.yaml is: its SDE, what the network predicts, the loss, the EMA, the samplers.

    v = VariantConfig.model_validate(params_yaml["variants"]["vp"])
    sde = v.sde.build()                          # -> scorelab.sde.get_sde("vp", ...)
    for s in v.samplers:
        for steps in s.step_list():
            sample(score_fn, sde, shape, method=s.method, steps=steps, **s.options())

Part of scorelab.config (which re-exports every name here), kept in a module of its own because the
tune section's candidates are checked as variants: both config's Params and its TuneConfig build on it.
"""

from __future__ import annotations

import inspect
import math
from typing import Annotated, Any, Literal, Union

from pydantic import (Field, SerializerFunctionWrapHandler, ValidationError, ValidationInfo, field_validator,
                      model_serializer, model_validator)
from pydantic_core import InitErrorDetails

from .nets import NetConfig
from .sampling import CORRECTORS, PREDICTORS, THRESHOLDS, check_method
from .schema import StrictModel as _Model, line_error
from .sde import SDE, SDE_FAMILY, VPSDE, check_schedule, get_sde


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

    @model_validator(mode="after")
    def _signal_survives(self) -> _SDEBase:
        # A schedule read two ways (DDPM's 1000-step betas given as a shorter chain's) ends with alpha(T)
        # ~1e-14, which no field bound catches: check the built SDE (VE keeps alpha = 1).
        if self.family != "ve":
            try:
                check_schedule(self.build())
            except ValueError as e:  # "described": the message is whole, without pydantic's "(got {...})"
                raise ValidationError.from_exception_data(type(self).__name__, [
                    line_error((), str(e), None, kind="described")]) from None
        return self


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


class _X0Thresholded(_SamplerBase):
    """Samplers that form x0_hat: for bounded data (images in [-1, 1]) it may be kept in range, off by default.
    clip: clamp to [-1, 1]; dynamic: Imagen's dynamic thresholding at the threshold_ratio quantile of |x0_hat|."""

    x0_threshold: Literal[THRESHOLDS] = "none"  # type: ignore[valid-type]
    threshold_ratio: float = Field(0.995, gt=0, lt=1)  # dynamic only

    def options(self) -> dict[str, Any]:
        # Off, the options are as they were before thresholding existed: the same sample folders and keys.
        out = super().options()
        if self.x0_threshold == "none":
            del out["x0_threshold"], out["threshold_ratio"]
        elif self.x0_threshold == "clip":
            del out["threshold_ratio"]
        return out


class AncestralSampler(_X0Thresholded):
    method: Literal["ancestral"] = "ancestral"
    steps: Steps
    noise: Literal["posterior", "transition"] = "posterior"
    grid: Grid = "uniform"


class DDIMSampler(_X0Thresholded):
    method: Literal["ddim"] = "ddim"
    steps: Steps
    grid: Grid = "uniform"
    eta: float = Field(0.0, ge=0, le=1)


class HeunSampler(_X0Thresholded):
    method: Literal["heun"] = "heun"
    steps: Steps
    grid: Grid = "edm"
    rho: float = Field(7.0, gt=0)


class DPMSolverSampler(_X0Thresholded):
    method: Literal["dpm_solver"] = "dpm_solver"
    steps: Steps
    grid: Grid = "log_snr"


_SAMPLERS = (
    AncestralSampler, EulerMaruyamaSampler, ReverseDiffusionSampler, PCSampler, ALDSampler,
    ODESampler, DDIMSampler, HeunSampler, DPMSolverSampler,
)
SamplerConfig = Annotated[Union[_SAMPLERS], Field(discriminator="method")]  # type: ignore[valid-type]


class TuneObjective(_Model):
    """What ranks the sweep's trials (tune.objective) and a variant's candidate EMAs (ema.select): the distance
    to the test split of n_samples samples of the EMA model drawn with one sampler at one NFE (domain Frechet
    distance for images, sliced W2 for 2-D points; scorelab.objective), averaged over `seeds` independent
    draws; the standard error over them is each trial's (or candidate's) measured noise."""

    sampler: SamplerConfig = Field(default_factory=lambda: DDIMSampler(steps=[20]))
    n_samples: int = Field(256, ge=4, le=100_000)  # per seed
    seeds: int = Field(2, ge=1, le=16)  # the objective is the mean over seeds; their spread is its noise

    @model_validator(mode="after")
    def _one_nfe(self) -> TuneObjective:
        if self.sampler.method == "ode":
            raise ValidationError.from_exception_data(type(self).__name__, [line_error(
                ("sampler", "method"), "the objective needs a fixed NFE; 'ode' is adaptive: choose a grid sampler "
                "such as ddim", "ode")])
        if len(self.sampler.step_list()) != 1:
            raise ValidationError.from_exception_data(type(self).__name__, [line_error(
                ("sampler", "steps"), "needs exactly one value, the objective's NFE",
                self.sampler.steps)])
        return self


MAX_SIGMA_REL = math.sqrt(1 / 12)  # a power EMA profile's relative std at gamma = 0 (scorelab.ema.gamma_of)


def classic_ema_name(decay: float) -> str:
    """How the classic EMA is named among the candidates of the EMA selection: "ema-0.995"."""
    return f"ema-{decay:g}"


def profile_name(sigma_rel: float) -> str:
    """How a power EMA profile is named: "power-0.10", with more digits where two would round it."""
    return f"power-{sigma_rel:.2f}" if round(sigma_rel, 2) == sigma_rel else f"power-{sigma_rel:g}"


class EMAConfig(_Model):
    """The classic EMA of the weights, and optionally power-function EMA profiles kept beside it (Karras et al.
    2024; scorelab.ema.PowerEMA), each named by its relative std sigma_rel. With profiles, the end of training
    scores every candidate with `select` (the sweep's objective: a distance of samples to the test split) and
    exports the best; without, the classic EMA is exported and nothing is scored."""

    decay: float = Field(0.999, ge=0, lt=1)
    warmup: bool = True  # decay min(decay, (1 + n) / (10 + n)) early in training
    profiles: list[float] = Field(default_factory=list)  # sigma_rel of each power EMA kept besides the classic one
    # DPM-Solver at 10 steps: valid for every SDE family, and 10 NFE keeps the selection to seconds a candidate
    select: TuneObjective = Field(default_factory=lambda: TuneObjective(sampler=DPMSolverSampler(steps=[10])))

    @field_validator("profiles")
    @classmethod
    def _profiles_are_power_functions(cls, v: list[float]) -> list[float]:
        bad = [s for s in v if not 0 < s < MAX_SIGMA_REL]
        if bad:
            raise ValueError(f"each sigma_rel must be in (0, sqrt(1/12) = {MAX_SIGMA_REL:.4f}), the range of the "
                             f"power profiles t^gamma with gamma > 0; got {', '.join(f'{s:g}' for s in bad)}")
        names = [profile_name(s) for s in v]
        if len(set(names)) != len(names):
            raise ValueError(f"the profiles must differ (named {', '.join(names)})")
        return v

    @model_serializer(mode="wrap")
    def _without_unused_selection(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Without profiles, the section dumps as it did before they existed: the same config hashes (so the same
        # runs resume), config.json and model.pt.
        out = handler(self)
        if not self.profiles:
            out.pop("profiles", None)
            out.pop("select", None)
        return out

    def candidates(self) -> list[str]:
        """The EMAs the end of training chooses among, in order: the classic one, then each profile."""
        return [classic_ema_name(self.decay), *map(profile_name, self.profiles)]


# ---------------------------------------------------------------------------------------------
# The variant.


class TrainOverrides(_Model):
    """Per-variant changes to the global train section."""

    steps: int | None = Field(None, ge=1)
    batch_size: int | None = Field(None, ge=1)
    micro_batch_size: int | None = Field(None, ge=1)
    lr: float | None = Field(None, gt=0, le=1)
    warmup_steps: int | None = Field(None, ge=0)
    lr_schedule: Literal["constant", "cosine", "linear"] | None = None
    final_lr_fraction: float | None = Field(None, ge=0, le=1)
    grad_clip: float | None = Field(None, ge=0)
    weight_decay: float | None = Field(None, ge=0)


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
                errors.append(line_error(("samplers", i, "method"), str(e), s.method))
                continue
            if isinstance(s, ALDSampler) and s.steps is None and self.sde.type == "ve":
                msg = "required for a continuous 've' SDE (only 'ncsn' has a noise ladder of its own)"
                errors.append(line_error(("samplers", i, "steps"), msg, None))
        if self.ema.profiles:  # the selection samples every candidate EMA with its sampler
            try:
                check_method(self.ema.select.sampler.method, self.sde.family)
            except ValueError as e:
                errors.append(line_error(("ema", "select", "sampler", "method"), str(e),
                                         self.ema.select.sampler.method))
        if errors:  # raised as a ValidationError, pydantic keeps each error at its own location
            raise ValidationError.from_exception_data(type(self).__name__, errors)
        return self
