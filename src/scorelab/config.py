"""Typed, validated params.yaml: the one place where configuration is read and checked.

    params = load_params("params.yaml")          # raises ConfigError listing every problem
    sde = params.variants["vp"].sde.build()      # -> scorelab.sde.get_sde("vp", ...)
    for s in params.variants["vp"].samplers:
        for steps in s.step_list():
            sample(score_fn, sde, shape, method=s.method, steps=steps, seed=params.seed, **s.options())

    cfg, seed = load_data_params("params.yaml")  # only what the prepare stage reads

Every model forbids unknown keys, so a typo (`sigma_mn`, `continuouse`) is an error that names the key
and suggests the nearest valid one, instead of a setting silently ignored. Validation errors are
turned into one line each, "dotted.location: message", with pydantic's union tags dropped
(scorelab.schema.describe_error). A variant's models are scorelab.variant_config's, the data section
scorelab.data's, a network scorelab.nets'; those a caller needs are re-exported here.
"""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails

from .data import DataConfig, parse_data_config
from .layout import TUNED_VARIANT
from .sde import SDE_FAMILY
from .storage import uri_problem
from .nets import NetConfig
from .rng import MAX_SEED
from .schema import ConfigError, StrictModel as _Model, cut, describe_error, line_error, show
from .variant_config import (
    ALDSampler, AncestralSampler, DDIMSampler, DDPMConfig, DPMSolverSampler, EDMParam, EMAConfig, EpsParam,
    EulerMaruyamaSampler, HeunSampler, LossConfig, NCSNConfig, ODESampler, ParamConfig, PCSampler,
    ReverseDiffusionSampler, SamplerConfig, ScoreParam, SDEConfig, SubVPConfig, TuneObjective, VariantConfig,
    VEConfig, VPConfig, VPCosineConfig,
)


Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]  # scorelab.rng keys its streams by 63 bits: refused, not masked


def _bf16_setting(value: Any) -> Any:
    if value is True or value is False or value == "auto":
        return value
    raise ValueError(f"must be true, false or auto (got {show(value)})")


Bf16 = Annotated[bool | Literal["auto"], BeforeValidator(_bf16_setting)]  # bfloat16 autocast; auto: where it is fast
MAX_GRID = 1000  # configurations a sweep may have: each is checked as a variant before anything runs

# ---------------------------------------------------------------------------------------------
# The sections beside the variants (theirs: scorelab.variant_config; data: scorelab.data; net: scorelab.nets).


class TrainConfig(_Model):
    """How long and how to optimise. batch_size is global: the same whatever the number of workers
    (each worker takes micro_batch_size rows per forward pass and gradients are accumulated)."""

    steps: int = Field(2000, ge=1)
    batch_size: int = Field(128, ge=1)
    micro_batch_size: int | None = Field(None, ge=1)  # per worker; None = batch_size / num_workers
    lr: float = Field(1e-3, gt=0, le=1)
    warmup_steps: int = Field(100, ge=0)
    # After the warm-up: constant, or a decay over the remaining steps to final_lr_fraction * lr
    # (cosine: SGDR's half cosine; linear). scorelab.training.learning_rate has the formulas.
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    final_lr_fraction: float = Field(0.0, ge=0, le=1)
    grad_clip: float = Field(1.0, ge=0)  # max global gradient norm; 0 turns clipping off
    weight_decay: float = Field(0.0, ge=0)
    checkpoint_every: int = Field(500, ge=1)
    log_every: int = Field(25, ge=1)
    sample_every: int = Field(0, ge=0)  # steps between sample grids logged to MLflow; 0 = only at the end
    # Autocast the network's forward pass to bfloat16 (weights, optimizer and EMA stay float32): on a GPU, or a
    # CPU whose oneDNN has bfloat16 kernels (AVX512). 1.4x the images/s of float32 on the 2-core digits default
    # at the same domain FD (docs/BENCHMARKS.md). true where it cannot run fast is an error; auto: where it can.
    bf16: Bf16 = False

    @model_validator(mode="after")
    def _decay_has_a_schedule(self):
        if self.lr_schedule == "constant" and self.final_lr_fraction != 0:
            raise ValueError(f"final_lr_fraction {self.final_lr_fraction} is where a decay ends, but lr_schedule is "
                             "constant: set lr_schedule to cosine or linear, or drop final_lr_fraction")
        return self



class RayConfig(_Model):
    address: str = ""  # "" starts a local Ray; "auto" or "host:port" joins a running cluster
    num_workers: int = Field(2, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0)
    use_gpu: bool = False
    placement_strategy: Literal["PACK", "SPREAD"] = "PACK"
    storage_path: str = "outputs/ray"  # checkpoints: a local folder, a shared filesystem or a URI
    max_failures: int = Field(2, ge=0)  # worker or node failures survived by restarting from a checkpoint
    connect_timeout_s: float = Field(10.0, gt=0)  # a host:port address that does not answer by then is an error

    @field_validator("storage_path")
    @classmethod
    def _openable(cls, path: str) -> str:
        problem = uri_problem(path)
        if problem:  # ftp:// and the like: refused here, not after Ray has started and training has begun
            raise ValueError(problem)
        return path


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
    # intervals: 0 = every interval by Student t over seeds, and the report's pairwise tests paired t-tests over
    # the same seeds; > 0 = the primary metric's by this many bootstrap resamples of each seed's samples (paired
    # across variants). Resampling overstated the domain FD's spread about 7x on digits (64-d features, N = 448:
    # resample sd 1.6-2.9 against 0.35 between seeds), so the default is 0. level: every interval's, and the
    # pairwise tests are at alpha = 1 - level, Holm-corrected
    bootstrap: int = Field(0, ge=0, le=100_000)
    level: float = Field(0.95, gt=0.5, lt=1)


class SampleConfig(_Model):
    """The sample stage: how many samples per sampler setting, from which seeds, in what chunks."""

    n: int = Field(256, ge=1, le=1_000_000)  # per setting and seed; FID-like numbers are biased at small n
    seeds: tuple[Seed, ...] = Field((0, 1, 2), min_length=1)
    batch_size: int = Field(256, ge=1)  # samples per chunk: one Ray task, and the unit of resumption
    workers: int = Field(2, ge=1)  # chunks in flight, 1 CPU each (or ray.use_gpu: 1 GPU each)
    # with ray.use_gpu: samples per chunk and per network call (a GPU is filled by thousands, not 64)
    gpu_batch_size: int = Field(4096, ge=1, le=1_000_000)
    # The divergence guard: a seed whose samples are not finite or reach |x| above this (model space: images lie
    # in [-1, 1], toy2d within 5) is marked diverged in the summary, the report and MLflow instead of scored.
    diverged_above: float = Field(100.0, gt=0, allow_inf_nan=False)
    # The network under bfloat16 autocast (true / false / auto, as train.bf16) for every sampler but the adaptive
    # ODE: 1.55x the samples/s here at the same domain FD (docs/BENCHMARKS.md). bits/dim stays float32.
    bf16: Bf16 = False

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, seeds: tuple[int, ...]) -> tuple[int, ...]:
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds must be distinct (got {list(seeds)})")
        return seeds


# ---------------------------------------------------------------------------------------------
# The Ray Tune sweep (scorelab.tune): a search space of SDEs, each candidate checked as a variant.

AUTO = "auto"  # tune.space.*.sde.sigma_max: resolved from the data by scorelab.tune.suggest_sigma_max
_INF = sys.float_info.max  # stands for "auto" while the data is unknown: passes sigma_min < sigma_max
_AUTO_TIMES = re.compile(r"^auto\s*\*\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)$")


def auto_factor(value: Any) -> float | None:
    """F for sigma_max "auto" (F = 1) or "auto*F" (F > 0): F times the data's largest pairwise distance;
    None for any other value."""
    if value == AUTO:
        return 1.0
    m = _AUTO_TIMES.match(value.strip()) if isinstance(value, str) else None
    return float(m.group(1)) if m and float(m.group(1)) > 0 else None


class TuneCandidate(_Model):
    """One part of the search space: an SDE with its parameterisation, network and loss. Any value under
    `sde` may be a list of choices (the candidate is then the grid over them), and `sigma_max` may be
    "auto": the largest distance between two training points (Song & Ermon 2020, technique 1),
    computed from the prepared data before the sweep starts, or "auto*F": F times it."""

    sde: dict[str, Any] = Field(min_length=1)
    parameterization: ParamConfig = Field(default_factory=EpsParam)
    net: NetConfig | None = None
    loss: LossConfig = Field(default_factory=LossConfig)

    def grid_size(self) -> int:
        """SDE settings in the grid, counted without listing them."""
        return math.prod(len(v) if isinstance(v, list) else 1 for v in self.sde.values())

    @model_validator(mode="after")
    def _grid_is_bounded(self) -> TuneCandidate:
        size = self.grid_size()
        if size > MAX_GRID:  # refused before one setting is built: a short file can name a huge grid
            dims = " x ".join(str(len(v)) for v in self.sde.values() if isinstance(v, list))
            raise ValidationError.from_exception_data(type(self).__name__, [_described(
                ("sde",), f"the grid has {size:,} settings ({dims}); at most {MAX_GRID:,} can be swept: "
                "shorten the lists of choices")])
        return self

    def settings(self, sigma_max_auto: float | None = None) -> list[dict[str, Any]]:
        """Every SDE setting of the grid, in order; "auto" (and "auto*F") replaced by sigma_max_auto (times F)
        when given."""
        from itertools import product

        keys = list(self.sde)
        choices = [v if isinstance(v, list) else [v] for v in self.sde.values()]
        out = [dict(zip(keys, combo)) for combo in product(*choices)]
        if sigma_max_auto is not None:
            out = [{**s, "sigma_max": sigma_max_auto * auto_factor(s["sigma_max"])}
                   if auto_factor(s.get("sigma_max")) is not None else s for s in out]
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


class TuneConfig(_Model):
    """The sweep: which variants to train (space x lr x ema_decay), for how long, and how ASHA stops them."""

    space: list[TuneCandidate] = Field(min_length=1)
    # grid: the configurations in order (every SDE setting with the first lr/ema_decay, then the next), cut at
    # num_trials; random: num_trials of them drawn without replacement, seeded by params.seed
    search: Literal["grid", "random"] = "grid"
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
    # the `tuned` variant's, for the sample/evaluate stages; None: those of the hand-set variant of the winner's
    # SDE type (handset_variant_for), so that its rows compare with that variant's at equal NFE
    samplers: list[SamplerConfig] | None = Field(None, min_length=1)

    def cpus_needed(self) -> float:
        """Logical CPUs of max_concurrent trials at once (each trial's function holds 0.01 CPU besides its workers)."""
        return self.max_concurrent * self.workers_per_trial * self.cpus_per_worker + 0.01 * self.max_concurrent

    def size(self) -> int:
        """Distinct configurations in the space: SDE settings x lr choices x ema_decay choices."""
        return (sum(c.grid_size() for c in self.space) * len(self.lr or [None])
                * len(self.ema_decay or [None]))

    @model_validator(mode="after")
    def _space_is_valid(self) -> TuneConfig:
        if self.size() > MAX_GRID:  # before each configuration is checked
            raise ValidationError.from_exception_data(type(self).__name__, [_described(
                ("space",), f"space x lr x ema_decay has {self.size():,} configurations ({self._dims()}); at most "
                f"{MAX_GRID:,} can be swept: shorten the lists of choices")])
        errors = [e for i, c in enumerate(self.space) for e in self.candidate_errors(i, c, None)]
        if self.grace_period > self.steps:
            errors.append(line_error(("grace_period",), f"must be <= tune.steps ({self.steps})", self.grace_period))
        if self.eval_every > self.steps:
            errors.append(line_error(("eval_every",), f"must be <= tune.steps ({self.steps})", self.eval_every))
        if not errors and self.num_trials > self.size():
            errors.append(line_error(("num_trials",), f"must be <= {self.size()}, the number of distinct "
                                     "configurations in tune.space x lr x ema_decay", self.num_trials))
        if errors:
            raise ValidationError.from_exception_data(type(self).__name__, errors)
        return self

    def _dims(self) -> str:
        return " x ".join(f"{n} {what}" for n, what in [
            (sum(c.grid_size() for c in self.space), "SDE settings"), (len(self.lr or [None]), "lr"),
            (len(self.ema_decay or [None]), "ema_decay")])

    def candidate_errors(self, i: int, cand: TuneCandidate, sigma_max_auto: float | None) -> list[InitErrorDetails]:
        """Every problem of candidate i, each at its own field: each SDE setting is built as the real variant
        (with the tuned samplers, and with the objective's sampler) and, once "auto" is known, as the SDE."""
        settings = cand.settings(sigma_max_auto)
        if not settings:
            return [_described(("space", i, "sde"), "a list of choices is empty")]
        errors: dict[tuple, InitErrorDetails] = {}  # keyed by (loc, message): a grid repeats its problems
        for sde in settings:
            if auto_factor(sde.get("sigma_max")) is not None:  # known once the data is: checked again then
                sde = {**sde, "sigma_max": _INF}
            checks = [([self.objective.sampler], ("objective",))]
            if self.samplers is not None:  # None: the hand-set variants' samplers, checked with those variants
                checks.insert(0, (self.samplers, ("samplers",)))
            for samplers, where in checks:
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
                    VariantConfig.model_validate(cand.variant(sde, [self.objective.sampler])).sde.build()
                except ValueError as e:
                    errors.setdefault((("space", i, "sde"), str(e)), _described(("space", i, "sde"), str(e)))
        return list(errors.values())


def _described(loc: tuple[str | int, ...], message: str) -> InitErrorDetails:
    """An error whose message is already complete (written as describe_error writes them)."""
    return line_error(loc, message, None, kind="described")


def _variant_problems(data: dict[str, Any]) -> list[tuple[list[str], str]]:
    """(location parts inside the variant, message) for each problem of a variant dict, as describe_error
    writes them for params.yaml's variants."""
    try:
        VariantConfig.model_validate(data)
    except ValidationError as e:
        out = []
        for err in e.errors(include_url=False):
            where, _, message = describe_error({**err, "loc": ("variants", "v", *err["loc"])}, Params).partition(": ")
            out.append((where.split(".")[2:] or ["sde"], message))
        return out
    return []


# Variant names become folder names and parts of MLflow run names: a safe charset, well under any file system's
# 255-byte name limit.
VariantName = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$", max_length=64)]


class DemoConfig(_Model):
    n_samples: int = Field(2000, ge=1, le=100_000)
    steps: int = Field(200, ge=1, le=10_000)


class Params(_Model):
    """params.yaml: the whole configuration, validated once at the edge."""

    seed: Seed = 0
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
                errors.append(line_error((*where, "batch_size"),
                                         f"must be >= ray.num_workers ({workers})", batch))
            elif batch % (workers * rows):
                errors.append(line_error((*where, "batch_size"), f"must be a multiple of ray.num_workers x "
                                         f"micro_batch_size = {workers} x {rows}", batch))
        if self.tune is not None:  # every trial trains with this batch on tune.workers_per_trial workers
            workers, micro = self.tune.workers_per_trial, self.train.micro_batch_size
            batch = self.tune.batch_size or self.train.batch_size
            rows = micro or batch // workers
            if batch < workers or batch % (workers * rows):
                errors.append(line_error(("tune", "workers_per_trial"), f"must divide the batch ({batch}) into "
                                         f"micro-batches of {rows} rows per worker", workers))
        if self.tune is not None and TUNED_VARIANT in self.variants:
            errors.append(line_error(("variants", TUNED_VARIANT), f"the name {TUNED_VARIANT!r} is the tune stage's "
                                     "winner's; rename this variant", TUNED_VARIANT))
        if self.tune is not None and self.tune.samplers is None:
            for i, cand in enumerate(self.tune.space):
                for ty in dict.fromkeys(str(s.get("type")) for s in cand.settings()):
                    if handset_variant_for(self, ty) is None:
                        errors.append(line_error(("tune", "samplers"), f"is unset, so the winner samples like the "
                                                 f"hand-set variant of its SDE type, but no variant has sde.type {ty!r} "
                                                 "or its family "
                                                 f"(tune.space.{i}); add one, or list the samplers here", None))
        if self.data.source == "toy2d":  # x0_hat thresholding keeps images inside [-1, 1]; points have no bound
            lists = [(("variants", name, "samplers"), v.samplers) for name, v in self.variants.items()]
            lists += [(("tune", "samplers"), self.tune.samplers)] if self.tune is not None and self.tune.samplers else []
            errors += [line_error((*where, i, "x0_threshold"), "only for image data, bounded in [-1, 1]; "
                                  "data.source is 'toy2d' (unbounded points): use 'none'", s.x0_threshold)
                       for where, samplers in lists for i, s in enumerate(samplers)
                       if getattr(s, "x0_threshold", "none") != "none"]
        if errors:
            raise ValidationError.from_exception_data(type(self).__name__, errors)
        return self


# ---------------------------------------------------------------------------------------------
# Loading: a strict YAML reader, then the models above (errors one line each: scorelab.schema).


MAX_YAML_BYTES = 1_000_000  # a params file is a few KB
MAX_YAML_NODES = 100_000  # nodes of the document with every alias expanded; params.yaml has a few hundred


class YAMLTooLarge(yaml.YAMLError):
    """A document whose aliases expand past MAX_YAML_NODES nodes."""


def expanded_size(node: yaml.Node, limit: int) -> int:
    """Nodes of the document under `node` with every alias expanded, counted up to limit + 1: each distinct
    node is visited once (an alias is the same node object again), so a billion-node alias bomb costs as
    little as its text."""
    sizes: dict[int, int] = {}

    def size(n: yaml.Node) -> int:
        if id(n) not in sizes:
            sizes[id(n)] = limit + 1  # a cycle (a mapping that contains itself) is unbounded too
            children = ([c for pair in n.value for c in pair] if isinstance(n, yaml.MappingNode)
                        else n.value if isinstance(n, yaml.SequenceNode) else [])
            total = 1
            for c in children:
                total = min(limit + 1, total + size(c))
                if total > limit:
                    break
            sizes[id(n)] = total
        return sizes[id(n)]

    return size(node)


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys, which PyYAML would silently resolve to the last one, and
    documents whose aliases expand past MAX_YAML_NODES nodes (checked before any object is built: the
    validation and messages after it would walk every expanded node)."""

    def construct_document(self, node: yaml.Node) -> Any:
        nodes = expanded_size(node, MAX_YAML_NODES)
        if nodes > MAX_YAML_NODES:
            raise YAMLTooLarge(f"expands to more than {MAX_YAML_NODES:,} nodes once its aliases (*name) are "
                               "repeated; a params file has a few hundred")
        return super().construct_document(node)

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


def _read_yaml(path: Path) -> Any:
    """A params file's YAML, read with _StrictLoader; ConfigError names the file and the problem."""
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_YAML_BYTES + 1)  # never more: the path may be a pipe or a device
        if len(raw) > MAX_YAML_BYTES:
            raise ConfigError([f"{path}: larger than {MAX_YAML_BYTES:,} bytes; a params file is a few KB"], str(path))
        text = raw.decode("utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{path}: file not found"], str(path)) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError([f"{path}: cannot read: {getattr(e, 'strerror', None) or e}"], str(path)) from None
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except YAMLTooLarge as e:
        raise ConfigError([f"{path}: {e}"], str(path)) from None
    except RecursionError:  # PyYAML composes nested collections recursively
        raise ConfigError([f"{path}: invalid YAML: nested too deeply"], str(path)) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = cut(getattr(e, "problem", None) or str(e), 200)
        raise ConfigError([f"{path}: invalid YAML{where}: {problem}"], str(path)) from None


def _sections(data: Any, where: str, source: str | None) -> dict:
    """The file's top level, which must be a mapping of sections."""
    if not isinstance(data, dict):
        raise ConfigError([f"{where}: top level must be a mapping of sections, got {type(data).__name__}"], source)
    return data


def load_params(path: str | Path) -> Params:
    """Read and validate a params file; ConfigError names the file, or lists every problem in it."""
    path = Path(path)
    return parse_params(_read_yaml(path), source=str(path))


def parse_params(data: Any, source: str | None = None) -> Params:
    """Validate already-parsed params; ConfigError lists every problem."""
    where = source or "params"
    if data is None:
        raise ConfigError([f"{where}: is empty; expected a mapping with keys seed, variants, demo"], source)
    try:
        return Params.model_validate(_sections(data, where, source))
    except ValidationError as e:
        raise ConfigError([describe_error(err, Params) for err in e.errors(include_url=False)], source) from None


def handset_variant_for(params: Params, sde_type: str) -> str | None:
    """The first variant of params.variants whose SDE has this type, else of its NEAREST_TYPE, else the first
    of its family (vp for vp_cosine and ddpm, ve for ncsn): whose samplers the sweep's winner of that type uses when tune.samplers
    is unset (the same family: the same samplers apply), and which the report compares it with."""
    family = SDE_FAMILY.get(sde_type)
    for wanted in (sde_type, NEAREST_TYPE.get(sde_type)):  # vp_cosine samples like vp before ddpm's chain
        name = next((name for name, v in params.variants.items() if v.sde.type == wanted), None)
        if name is not None:
            return name
    return next((name for name, v in params.variants.items() if v.sde.family == family), None)


# The continuous SDE closest to each type: a vp_cosine winner compares best with the hand-set `vp` (same
# samplers on a continuous time grid), a discrete chain with its own type first.
NEAREST_TYPE = {"vp_cosine": "vp", "ddpm": "vp", "ncsn": "ve"}


def tuned_samplers(params: Params, sde_type: str) -> list[Any]:
    """The samplers of the sweep's winner (as params.yaml spells them): tune.samplers, or those of the
    hand-set variant of its SDE type."""
    tune = params.tune
    if tune is not None and tune.samplers is not None:
        return [s.model_dump(mode="json") for s in tune.samplers]
    name = handset_variant_for(params, sde_type)
    if name is None:
        raise ConfigError([f"tune.samplers: is unset and no variant has sde.type {sde_type!r}, the winner's"])
    return [s.model_dump(mode="json") for s in params.variants[name].samplers]


def with_tuned_variant(params: Params, path: str | Path) -> Params:
    """params with the sweep's winner added as variant `tuned`: the variant of `path` (the tune stage's
    best_variant.yaml: SDE, parameterisation, network, loss, EMA, lr), trained with params.train's budget
    and sampled with tuned_samplers. Read at each stage rather than frozen by the tune stage, so that
    `train:`, `sample:` and the samplers of params.yaml apply to `tuned` as to every other variant.
    ConfigError names the file and every problem in it."""
    path = Path(path)
    data = _read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: must be a mapping (a variant: sde, parameterization, net, ...), got "
                           f"{type(data).__name__}"], str(path))
    if params.tune is None:
        raise ConfigError([f"{path}: params has no tune: section, so there is no variant {TUNED_VARIANT!r}"], str(path))
    sde_type = data.get("sde", {}).get("type") if isinstance(data.get("sde"), dict) else None
    try:
        variant = VariantConfig.model_validate({**data, "samplers": tuned_samplers(params, str(sde_type))})
    except ValidationError as e:
        raise ConfigError([f"{path}: " + describe_error({**err, "loc": ("variants", TUNED_VARIANT, *err["loc"])},
                                                        Params) for err in e.errors(include_url=False)],
                          str(path)) from None
    except ConfigError as e:
        raise ConfigError([f"{path}: {p}" for p in e.problems], str(path)) from None
    return params.model_copy(update={"variants": {**params.variants, TUNED_VARIANT: variant}})


# What the prepare stage reads of params.yaml: Params' own seed field; every other key is left to the later stages.
class _SeedOnly(_Model):
    model_config = ConfigDict(extra="ignore")
    seed: Seed = Params.model_fields["seed"].default


def load_data_params(path: str | Path) -> tuple[DataConfig, int]:
    """(the `data` section, the seed) of a params file, read as load_params reads it and validated as Params
    validates them (the data section's messages: parse_data_config's). The rest of the file is not checked:
    the data is prepared before anything else needs to be valid. An empty file means the defaults.
    ConfigError lists every problem of the two."""
    path = Path(path)
    raw = _read_yaml(path)
    data = {} if raw is None else _sections(raw, str(path), str(path))
    problems: list[str] = []
    try:
        seed = _SeedOnly.model_validate(data).seed
    except ValidationError as e:
        problems += [describe_error(err, Params) for err in e.errors(include_url=False)]
    try:
        cfg = parse_data_config(data.get("data"))
    except ConfigError as e:
        problems += e.problems
    if problems:
        raise ConfigError(problems, str(path))
    return cfg, seed


__all__ = [
    "ALDSampler", "AncestralSampler", "ConfigError", "DDIMSampler", "DDPMConfig", "DPMSolverSampler", "DemoConfig",
    "EDMParam", "EMAConfig", "EpsParam", "EulerMaruyamaSampler", "HeunSampler", "LossConfig", "NCSNConfig",
    "ODESampler", "PCSampler", "ParamConfig", "Params", "ReverseDiffusionSampler", "SDEConfig", "SamplerConfig",
    "ScoreParam", "SubVPConfig", "VEConfig", "VPConfig", "VPCosineConfig", "VariantConfig", "load_data_params",
    "auto_factor", "handset_variant_for", "load_params", "parse_params", "tuned_samplers", "with_tuned_variant",
]
