"""One training loop for every variant, run by Ray Train's TorchTrainer on 1 to N workers.

The same code runs on a laptop's CPUs, one GPU or a multi-node cluster; params.yaml's `ray` section
decides. What makes it exact and resumable:
- the global batch is fixed: each worker takes micro_batch_size rows per pass and accumulates
  gradients, so the number of workers changes the speed, not the optimisation;
- every random draw (data order, flips, t, noise, dropout) derives from (seed, rank, micro-batch counter)
  and every data position from the step, so a checkpoint needs only the step to continue the same stream:
  a resumed run equals an uninterrupted one bit for bit;
- checkpoints (model, EMA, optimizer, step, config hash) are reported through Ray Train every
  `checkpoint_every` steps; relaunching the same configuration resumes from the latest, and Ray's
  FailureConfig restarts a run whose worker or node dies;
- with power EMA profiles (variant ema.profiles), every candidate EMA is kept and checkpointed, and at the
  last step rank 0 scores each with the sweep's objective (scorelab.objective); the best becomes model.pt;
- only rank 0 logs to MLflow, into the run that the driver created or found for this configuration.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
import warnings
from contextlib import closing, nullcontext
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import torch

from . import storage, tracking
from .checkpoint import (STATE_FILE, CheckpointError, CheckpointMismatchError, build_model, export_model, load_state,
                         load_trained, save_state, state_dict_mismatch)
from .config import Params, TrainConfig, VariantConfig
from .data import Manifest, load_manifest, read_rows, verify
from .ema import EMA, PowerEMA
from .featurizer import FeaturizerError, load_featurizer
from .losses import dsm_loss, loss_per_bin
from .modality import modality_of
from .objective import OBJECTIVE, Objective
from .parameterization import ScoreModel
from .layout import CLASSIFIER_FILE, METRICS_FILE, MODEL_FILE, REF_TEST_FILE, Layout, shared_root
from .variant_config import profile_name
from .runtime import (Shipment, StopWatch, alive_nodes, check_storage_shared, checkpoint_on_sigterm,
                      ray_session, remove_unregistered_checkpoints, resolve_bf16, say, ship_files, torch_trainer,
                      unpack, worker_error)
from .visual import save_samples

STATUS_FILE = "scorelab_status.json"  # in the run's folder under ray.storage_path: rank 0's outcome of a launch
STOP_FILE = "scorelab_stop.json"  # beside it: the driver's request to checkpoint and stop (preemption)


class TrainingError(RuntimeError):
    """Training stopped: non-finite loss, a refused checkpoint, or the run failed."""


class TrainingPreempted(TrainingError):
    """SIGTERM reached the driver: the workers checkpointed the step they were at and stopped."""


# ---------------------------------------------------------------------------------------------
# What a worker is given


@dataclass(frozen=True)
class TrainJob:
    variant: str
    variant_config: dict[str, Any]
    train: dict[str, Any]
    data: Shipment  # the prepared dataset's files, through the object store: workers may not see the driver's disk
    data_shape: list[int]
    seed: int
    config_hash: str
    tracking_uri: str
    run_id: str
    status_path: str  # where rank 0 leaves the outcome the driver reads: a path or URI in the run's storage
    threads_per_worker: int
    hflip: bool = False
    # Preemption: when this file (path or URI in the run's storage) exists the workers checkpoint the step they
    # are at and stop (the driver writes it on SIGTERM; rank 0 watches for it). "" = never.
    stop_path: str = ""
    # Optional: rank 0 calls evaluate(ema_model, step) at each checkpoint step; the returned metrics are
    # logged and reported with the checkpoint (Ray Tune's early stopping reads them). Picklable.
    evaluate: Callable[[ScoreModel, int], dict[str, float]] | None = None
    # With EMA profiles: rank 0 calls select_ema(candidate_model, step) for every candidate EMA at the last step
    # and exports the one of least OBJECTIVE (an Objective; None without profiles). Picklable.
    select_ema: Callable[[ScoreModel, int], dict[str, float]] | None = None

    def as_config(self) -> dict[str, Any]:
        """The train_loop_config: the fields as they are (dataclasses.asdict would copy the object refs)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def ship_dataset(manifest: Manifest) -> Shipment:
    """The prepared dataset (manifest and every shard) in the running Ray's object store."""
    return ship_files(manifest.root, ["manifest.json", *(s.file for s in manifest.shards)])


def resolve_train(params: Params, variant: str) -> TrainConfig:
    """The global train section with the variant's overrides applied."""
    overrides = params.variants[variant].train.model_dump(exclude_none=True)
    return TrainConfig.model_validate({**params.train.model_dump(), **overrides})


def config_hash(params: Params, variant: str, data_checksum: str) -> str:
    """What determines the trained weights: the variant, its optimisation, the data and the seed.
    Not the number of workers (the global batch is fixed) nor where things are stored or logged."""
    train = resolve_train(params, variant).model_dump()
    for cadence in ("checkpoint_every", "log_every", "sample_every"):
        train.pop(cadence)
    blob = json.dumps(
        {"variant": params.variants[variant].model_dump(mode="json", exclude={"samplers"}), "train": train,
         "data": data_checksum, "seed": params.seed},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def micro_batch(train: TrainConfig, world: int) -> tuple[int, int]:
    """(rows per worker per pass, passes per step) so that world * rows * passes = batch_size."""
    if train.batch_size < world:
        raise TrainingError(f"train.batch_size={train.batch_size} is smaller than ray.num_workers={world}")
    rows = train.micro_batch_size or train.batch_size // world
    if train.batch_size % (world * rows):
        raise TrainingError(
            f"train.batch_size={train.batch_size} is not a multiple of ray.num_workers x micro_batch_size "
            f"= {world} x {rows}: choose a batch_size divisible by {world * rows}"
        )
    return rows, train.batch_size // (world * rows)


def learning_rate(train: TrainConfig, step: int) -> float:
    """The learning rate of optimizer step `step` (0-based): a linear warm-up over warmup_steps, then constant or
    a decay towards final_lr_fraction * lr: cosine (Loshchilov & Hutter 2017, SGDR without restarts:
    f + (1 - f) (1 + cos(pi p)) / 2) or linear (f + (1 - f) (1 - p)), p = (step - warmup_steps) / (steps -
    warmup_steps), the convention of torch's CosineAnnealingLR and LinearLR (T_max = total_iters = steps -
    warmup_steps) that the tests check against. A closed form of the step alone, so a resumed run needs no
    scheduler state."""
    if step < train.warmup_steps:
        return train.lr * ((step + 1) / train.warmup_steps)  # this float order: as before, bit for bit
    decay_steps = train.steps - train.warmup_steps
    if train.lr_schedule == "constant" or decay_steps <= 0:
        return train.lr
    p, f = min(1.0, (step - train.warmup_steps) / decay_steps), train.final_lr_fraction
    shape = (1 + math.cos(math.pi * p)) / 2 if train.lr_schedule == "cosine" else 1 - p
    return train.lr * (f + (1 - f) * shape)


def mix_seed(*ints: int) -> int:
    """A 63-bit seed from several integers (stable across processes, unlike hash())."""
    digest = hashlib.blake2b(json.dumps(ints).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def seed_dropout(device: torch.device, seed: int) -> None:
    """Seed the generator dropout draws from on `device`: that device's alone (torch.manual_seed seeds
    every backend, 87 us a call on the CPU against 1 us)."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.manual_seed(seed)
    else:
        torch.default_generator.manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# Data: each worker reads only its contiguous slice of the training rows


class PartitionLoader:
    """Rows [rank*N/W, (rank+1)*N/W) of the train split, shuffled per epoch from (seed, rank, epoch).
    Micro-batch k of this worker is a pure function of k, so resuming needs only the step."""

    def __init__(self, data_dir: str, rank: int, world: int, rows: int, seed: int, hflip: bool = False):
        manifest = load_manifest(data_dir)
        n = manifest.counts["train"]
        lo, hi = rank * n // world, (rank + 1) * n // world
        if hi - lo < rows:
            raise TrainingError(
                f"worker {rank} holds {hi - lo} training rows, fewer than micro_batch_size={rows}: "
                "lower train.batch_size or ray.num_workers"
            )
        self.x = read_rows(data_dir, "train", lo, hi)
        self.rows, self.seed, self.rank, self.hflip = rows, seed, rank, hflip
        self.per_epoch = len(self.x) // rows
        self._epoch, self._perm = -1, None

    def batch(self, k: int) -> torch.Tensor:
        epoch, pos = divmod(k, self.per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(mix_seed(self.seed, self.rank, epoch, 1))
            self._perm, self._epoch = torch.randperm(len(self.x), generator=g), epoch
        x = self.x[self._perm[pos * self.rows:(pos + 1) * self.rows]]
        if self.hflip:  # mirror a random half, drawn from (seed, rank, k) like everything else
            g = torch.Generator().manual_seed(mix_seed(self.seed, self.rank, k, 3))
            flip = torch.rand(len(x), generator=g) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return x


# ---------------------------------------------------------------------------------------------
# What a worker trains: the model on its device, its EMA and optimizer, restored from a checkpoint

SYNC_EVERY = 10  # steps between the host's looks at the device: non-finite values, a stop request


@dataclass
class TrainingState:
    model: ScoreModel
    ema: EMA
    optimizer: torch.optim.Optimizer
    step: int  # the next step to take: 0, or the checkpoint's step
    profiles: dict[str, PowerEMA] = field(default_factory=dict)  # the variant's power EMAs, by candidate name


def training_state(variant: VariantConfig, data_shape: tuple[int, ...], train: TrainConfig, device: torch.device,
                   state: dict[str, Any] | None = None, *, what: str = "the variant",
                   source: str = "the checkpoint") -> TrainingState:
    """Build -> place -> optimizer -> restore, in that order: the model is on `device` before the optimizer
    exists, so that loading a checkpoint's optimizer state puts every moment on its parameter's device
    (torch's Optimizer.load_state_dict casts to it). Adam built over CPU parameters and moved afterwards
    would keep its state on the CPU, and the first GPU step of every resume would fail.

    The weights are drawn on the CPU from torch's global generator (seeded by the caller, the same on
    every rank), so a model's initial weights do not depend on the device it trains on."""
    model = build_model(variant, tuple(data_shape)).to(device)
    ema = EMA(model, decay=variant.ema.decay, warmup=variant.ema.warmup)
    profiles = {profile_name(s): PowerEMA(model, s) for s in variant.ema.profiles}
    # fused: one kernel for all parameters instead of a loop over them; on the CPU it cut the optimizer +
    # EMA share of a digits step from 6.5 to 4.0 ms of CPU (docs/BENCHMARKS.md, "Overheads"). Same update.
    optimizer = torch.optim.Adam(model.parameters(), lr=train.lr, weight_decay=train.weight_decay,
                                 fused=device.type in ("cpu", "cuda"))
    if state is None:
        return TrainingState(model, ema, optimizer, 0, profiles)
    try:
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        for name, profile in profiles.items():
            profile.load_state_dict(state["ema_profiles"][name])
        optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, KeyError, ValueError) as e:  # e.g. the default net changed since it was written
        raise CheckpointMismatchError(
            f"{source} holds weights of another architecture than {what} builds ({state_dict_mismatch(e)}): "
            "it cannot be resumed; change ray.storage_path or remove the old run to start fresh") from None
    return TrainingState(model, ema, optimizer, int(state["step"]), profiles)


# ---------------------------------------------------------------------------------------------
# The loop each Ray Train worker runs


def train_loop(config: dict[str, Any]) -> None:
    import ray
    import ray.train
    import ray.train.torch

    job = TrainJob(**config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(job.threads_per_worker)
    # DDP compares gradient and parameter strides literally. The weight gradient of a 1x1 convolution (the
    # U-Net's attention projections) differs from its weight's strides only on size-1 dimensions, the same
    # memory layout, which DDP reports as a performance warning in every worker's log. It costs nothing.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    variant = VariantConfig.model_validate(job.variant_config)
    train = TrainConfig.model_validate(job.train)
    device = ray.train.torch.get_device()
    use_bf16, problem = resolve_bf16(train.bf16, device)
    if problem:
        raise TrainingError(f"train.bf16 is true but {problem} (worker {rank}): set train.bf16: auto or false")
    rows, accum = micro_batch(train, world)

    state, where = None, ""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = load_state(Path(d), job.config_hash)
            where = f"checkpoint {Path(d) / STATE_FILE}"
    torch.manual_seed(job.seed)  # identical initial weights on every rank
    ts = training_state(variant, tuple(job.data_shape), train, device, state, what=f"variant {job.variant!r}",
                        source=where)
    model, ema, optimizer, start, profiles = ts.model, ts.ema, ts.optimizer, ts.step, ts.profiles
    if profiles and job.select_ema is None:
        raise TrainingError(f"variant {job.variant!r} has ema.profiles but the job has no objective to choose "
                            "among them")
    del state
    ddp = ray.train.torch.prepare_model(model)  # already on its device: wraps it in DDP when world > 1
    nodes = [ray.get_runtime_context().get_node_id()] * world
    if world > 1:  # where the workers landed, for the run's tags (a cluster run should span its nodes)
        torch.distributed.all_gather_object(nodes, nodes[0])
    loader = PartitionLoader(str(unpack(job.data)), rank, world, rows, job.seed, job.hflip)
    logger = tracking.RunLogger(job.tracking_uri, job.run_id) if rank == 0 else None
    if logger is not None:
        logger.tags({"ray.num_workers": world, "ray.num_nodes": len(set(nodes)), "resumed_from_step": start,
                     "device": device.type, "bf16": use_bf16})
    # Steps between the checkpoint and where a killed launch got to are redone, bit for bit the same: their
    # metric points already in the run are not logged again (a gap the killed launch left is filled).
    logged = logger.logged_steps("loss") if logger is not None and start > 0 else set()

    sde = model.sde
    # The host reads the device's values only at sync points (every SYNC_EVERY steps, and where it logs,
    # checkpoints or samples): a per-micro-batch .item() would stall a GPU's queue every step. The first
    # non-finite step is recorded on the device, as (step, loss, grad norm), and acted on there; until then
    # the steps after it change only weights that are never saved.
    nonfinite = torch.full((3,), math.nan, dtype=torch.float64, device=device)
    # rank 0 watches for the driver's stop request in a thread: the step only reads a flag
    stop = StopWatch(job.stop_path) if job.stop_path and rank == 0 else None
    with closing(stop) if stop is not None else nullcontext():
        window: dict[str, list] = {"loss": [], "t": [], "per_sample": []}
        clock, clock_step = time.perf_counter(), start
        phases = ("data", "forward_backward", "optimizer", "log", "checkpoint") + ("evaluate",) * bool(job.evaluate)
        spent = dict.fromkeys(phases, 0.0)  # s per phase (queued device work lands in whichever phase waits)
        for step in range(start, train.steps):
            lr = learning_rate(train, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            step_loss = torch.zeros((), dtype=torch.float64, device=device)
            for a in range(accum):
                k = step * accum + a
                tick = time.perf_counter()
                x0 = loader.batch(k).to(device, non_blocking=True)
                spent["data"] += time.perf_counter() - tick
                tick = time.perf_counter()
                gen = torch.Generator(device=device).manual_seed(mix_seed(job.seed, rank, k, 2))
                # Dropout draws from the global generator: reseeded from (seed, rank, k) so that its masks, like the
                # noise above, depend on nothing but the micro-batch. A resumed run then equals an uninterrupted
                # one bit for bit (the generator's state at a checkpoint is not needed), and ranks differ.
                seed_dropout(device, mix_seed(job.seed, rank, k, 4))
                sync = nullcontext() if (a == accum - 1 or world == 1) else ddp.no_sync()
                with sync, torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                    out = dsm_loss(ddp, sde, x0, weighting=variant.loss.weighting,
                                   reduction=variant.loss.reduction, generator=gen)
                    (out.loss / accum).backward()
                step_loss += out.loss.detach().double() / accum  # float64, as the Python float sum it replaces
                window["t"].append(out.t.detach().float())
                window["per_sample"].append(out.per_sample.detach().float())
                spent["forward_backward"] += time.perf_counter() - tick
            tick = time.perf_counter()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip or math.inf)
            first_bad = (~(torch.isfinite(step_loss) & torch.isfinite(grad_norm))) & torch.isnan(nonfinite[0])
            # torch.full fills on the device; torch.tensor(step) would copy from the host and wait for the queue
            here = torch.stack([torch.full((), step + 1.0, dtype=torch.float64, device=device), step_loss,
                                grad_norm.detach().double()])
            nonfinite = torch.where(first_bad, here, nonfinite)
            optimizer.step()
            ema.update(model)
            for profile in profiles.values():
                profile.update(model)
            window["loss"].append(step_loss)
            spent["optimizer"] += time.perf_counter() - tick  # clipping, Adam and EMA

            done = step + 1
            log_step = done % train.log_every == 0 or done == train.steps
            sample_step = bool(train.sample_every) and done % train.sample_every == 0 and done != train.steps
            checkpoint_now = done % train.checkpoint_every == 0 or done == train.steps
            # Every rank reaches the same sync points, which depend on the step alone (and on the stop flag
            # with one worker); all see the same all-reduced gradient norm, so all stop together, and they agree
            # on a stop request there (an all-reduce where world > 1).
            if not (done % SYNC_EVERY == 0 or log_step or sample_step or checkpoint_now
                    or (world == 1 and stop is not None and stop.requested)):
                continue
            log_now, sample_now = rank == 0 and log_step, rank == 0 and sample_step
            bad = nonfinite.tolist()
            if not math.isnan(bad[0]):
                if logger is not None:
                    logger.flush()
                _stop_nonfinite(job, rank, int(bad[0]), bad[1], bad[2])
                return
            if log_now:
                tick = time.perf_counter()
                elapsed = tick - clock
                images_per_s = (done - clock_step) * train.batch_size / max(elapsed, 1e-9)
                mean_loss = sum(torch.stack(window["loss"]).tolist()) / len(window["loss"])
                metrics = {"loss": mean_loss, "lr": lr, "grad_norm": float(grad_norm), "images_per_s": images_per_s}
                metrics.update(loss_per_bin(torch.cat(window["t"]).cpu(), torch.cat(window["per_sample"]).cpu(), sde))
                # where the wall time went; DDP's gradient all-reduce is inside forward_backward
                metrics.update({f"time_frac_{k}": v / max(elapsed, 1e-9) for k, v in spent.items()})
                if done not in logged:  # background: a tracking server away must not stall the steps
                    logger.metrics(metrics, step=done, background=True)
                eta = (train.steps - done) * elapsed / max(done - clock_step, 1)
                say(f"[{job.variant}] step {done}/{train.steps} | loss {mean_loss:.4f} | "
                    f"{images_per_s:.0f} img/s | ETA {eta:.0f}s")
                spent = dict.fromkeys(spent, 0.0)
                spent["log"] += time.perf_counter() - tick
                clock, clock_step = tick, done
            if log_now or rank != 0:  # the other ranks log nothing: their window is dropped at each sync
                window = {"loss": [], "t": [], "per_sample": []}
            if sample_now:
                _log_samples(ema.module, variant, job, logger, done)
            if checkpoint_now:
                extra: dict[str, float] = {}
                if rank == 0 and job.evaluate is not None:  # the other ranks wait at the report's barrier
                    tick = time.perf_counter()
                    extra = job.evaluate(ema.module, done)
                    if done not in logged:
                        logger.metrics(extra, step=done, background=True)
                    # Tune may stop the trial at this report (ASHA) and end its processes with MLflow's
                    # background queue unsent: the objective curve of a stopped trial would lose its last points
                    logger.flush()
                    spent["evaluate"] += time.perf_counter() - tick
                selection = None
                if rank == 0 and profiles and done == train.steps:  # the other ranks wait at the report's barrier
                    selection = select_ema(job, {variant.ema.candidates()[0]: ema, **profiles}, done)
                    say(f"[{job.variant}] EMA chosen: {selection['chosen']} ({_scores_line(selection)})")
                tick = time.perf_counter()
                _report_checkpoint(job, rank, done, float(step_loss), model, ema, optimizer, accum, extra,
                                   profiles, selection)
                spent["checkpoint"] += time.perf_counter() - tick
            if job.stop_path and done < train.steps and _stop_requested(stop, rank, world, device):
                if not checkpoint_now:  # unless this step's checkpoint was just reported
                    _report_checkpoint(job, rank, done, float(step_loss), model, ema, optimizer, accum,
                                       profiles=profiles)
                if rank == 0:
                    logger.flush()
                    _write_status(job, {"status": "preempted", "step": done})
                    say(f"[{job.variant}] stop requested: checkpointed step {done}/{train.steps}, stopping")
                return
        if rank == 0:
            logger.flush()  # the metrics still in MLflow's background queue land before the run is finished
            _write_status(job, {"status": "finished", "step": train.steps})


def select_ema(job: TrainJob, candidates: dict[str, EMA], step: int) -> dict[str, Any]:
    """Score every candidate EMA with job.select_ema (the same seeds for each, so they are compared on the same
    draws) and choose the one of least objective (the first of equals: the classic EMA before the profiles).
    Returns {"scores": {name: [mean, standard error or None]}, "chosen": name, "seconds": wall time}."""
    start = time.perf_counter()
    scores: dict[str, list[float | None]] = {}
    for name, candidate in candidates.items():
        out = job.select_ema(candidate.module, step)
        scores[name] = [out[OBJECTIVE], out.get("objective_se")]  # no standard error from one seed
    chosen = min(scores, key=lambda name: scores[name][0])
    return {"scores": scores, "chosen": chosen, "seconds": time.perf_counter() - start}


def _scores_line(selection: dict[str, Any]) -> str:
    return ", ".join(f"{name} {mean:.4g}" + (f" +- {se:.2g}" if se is not None else "")
                     for name, (mean, se) in selection["scores"].items())


def _report_checkpoint(job: TrainJob, rank: int, step: int, loss: float, model, ema, optimizer, accum: int,
                       extra: dict[str, float] | None = None, profiles: dict[str, PowerEMA] | None = None,
                       selection: dict[str, Any] | None = None) -> None:
    """Report the step's metrics, and rank 0 its checkpoint: with EMA profiles, their states too (a resumed
    run continues them), and at the last step the EMA selection, which the driver exports."""
    import ray.train

    metrics = {"step": step, "loss": loss, **(extra or {})}
    if rank != 0:
        ray.train.report(metrics, checkpoint=None)  # a barrier: every worker reports each time
        return
    with tempfile.TemporaryDirectory() as d:
        # the data position is implied by the step (micro-batch k = step * accum + a on every worker), and so
        # is every random draw (order, t, noise, dropout: all seeded from (seed, rank, k)); the position is
        # stored so that a checkpoint can be read without this code
        # without profiles the state has exactly the keys it had before they existed
        ema_extra: dict[str, Any] = {"ema_profiles": {n: p.state_dict() for n, p in profiles.items()}} if profiles \
            else {}
        if selection is not None:
            ema_extra["ema_selection"] = selection
        save_state(Path(d), model=model.state_dict(), ema=ema.state_dict(), optimizer=optimizer.state_dict(),
                   step=step, data_position={"micro_batches_per_worker": step * accum}, config_hash=job.config_hash,
                   run_id=job.run_id, **ema_extra)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def _stop_requested(stop: StopWatch | None, rank: int, world: int, device: torch.device) -> bool:
    """Whether the driver asked to stop. Rank 0 watches for the file and all ranks agree through an
    all-reduce, so they stop at the same step (a rank that stopped alone would hang the others)."""
    flag = stop is not None and stop.requested
    if world == 1:
        return flag
    t = torch.tensor([float(flag)], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def _stop_nonfinite(job: TrainJob, rank: int, step: int, loss: float, grad_norm: float) -> None:
    """Every rank sees the same all-reduced gradient norm, so all stop together without a checkpoint;
    the driver turns the status into a clear error and the last good checkpoint stays. step: the first
    step (1-based) whose loss or gradient norm was not finite."""
    if rank == 0:
        _write_status(job, {"status": "nonfinite", "step": step, "loss": loss, "grad_norm": grad_norm})
        say(f"[{job.variant}] non-finite loss ({loss}) or gradient norm ({grad_norm}) at step {step}: stopping")


def _write_status(job: TrainJob, status: dict) -> None:
    storage.write_json(job.status_path, status)


def _log_samples(ema_model: ScoreModel, variant: VariantConfig, job: TrainJob, logger, step: int) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"samples_step{step:07d}.png"
        save_samples(ema_model, variant, tuple(job.data_shape), path, seed=job.seed)
        logger.artifact(path, "samples")


# ---------------------------------------------------------------------------------------------
# The driver


@dataclass
class TrainResult:
    variant: str
    run_id: str
    model_path: Path
    steps: int
    seconds: float
    final_loss: float


def train_variant(params: Params, variant: str, *, root: Path, data_dir: Path, out_dir: Path,
                  featurizer_dir: Path | None = None) -> TrainResult:
    """Train one variant through Ray Train (resuming its run if one exists) and write out_dir: model.pt (its
    EMA weights), config.json, samples_final.png and metrics.json; log config, weights and the final
    sample grid to its MLflow run.

    With EMA profiles (ema.profiles), model.pt holds the candidate EMA of least objective, metrics.json its
    scores (ema_scores: name -> [mean, standard error]) and ema_chosen, and the MLflow run the scores
    (ema_<name>) and the tag scorelab.ema_chosen. For images the objective needs the featurizer stage's
    classifier: featurizer_dir, default <root>/outputs/featurizer."""
    import ray

    root, data_dir, out_dir = root.resolve(), data_dir.resolve(), out_dir.resolve()
    manifest = verify(data_dir)
    vcfg = params.variants[variant]
    modality = modality_of(manifest.shape)
    featurizer_dir = (featurizer_dir or Layout(root).featurizer).resolve()
    if vcfg.ema.profiles and modality.is_image:  # before Ray starts: the selection would fail at the last step
        try:
            load_featurizer(featurizer_dir, manifest)
        except FeaturizerError as e:
            raise TrainingError(f"variant {variant!r} chooses among EMA profiles with the featurizer's "
                                f"classifier: {e}") from None
    train = resolve_train(params, variant)
    key = config_hash(params, variant, manifest.checksum)
    uri = tracking.resolve_tracking_uri(params.mlflow.tracking_uri, root)
    store = storage.resolve(params.ray.storage_path, shared_root(root))
    name = f"{variant}-{key[:12]}"
    run_dir = storage.join(store, name)
    status_path, stop_path = storage.join(run_dir, STATUS_FILE), storage.join(run_dir, STOP_FILE)

    cfg = params.ray
    needed = cfg.num_workers * cfg.cpus_per_worker
    tracking.check_server(uri, params.mlflow.connect_timeout_s)  # before Ray starts: seconds, not minutes
    with ray_session(cfg.address, num_cpus=max(float(os.cpu_count() or 1), needed),
                     connect_timeout_s=cfg.connect_timeout_s):
        tracking.check_reachable_from(uri, alive_nodes())
        check_storage_shared(store)
        if cfg.use_gpu and not ray.cluster_resources().get("GPU"):
            raise TrainingError("ray.use_gpu is true but the Ray cluster has no GPU: set ray.use_gpu: false")
        run_id = tracking.open_run(uri, tracking.experiment_name(params.mlflow.experiment, manifest.source), root,
                                   key, variant, {
            "variant": variant, "sde": vcfg.sde.type, "parameterization": vcfg.parameterization.type,
            "git_commit": tracking.git_commit(root), "dataset_checksum": manifest.checksum,
            "scorelab.config_hash": key,
        })
        logger = tracking.RunLogger(uri, run_id)
        logger.params(tracking.flatten({"variant": vcfg.model_dump(mode="json"), "train": train.model_dump(),
                                        "seed": params.seed, "data": params.data.model_dump(mode="json")}))
        storage.remove(status_path)
        storage.remove(stop_path)  # a stop request of an earlier, preempted launch
        data = ship_dataset(manifest)
        job = TrainJob(
            variant=variant, variant_config=vcfg.model_dump(mode="json"), train=train.model_dump(),
            data=data, data_shape=list(manifest.shape), seed=params.seed, config_hash=key,
            tracking_uri=uri, run_id=run_id, status_path=status_path,
            threads_per_worker=max(1, int(cfg.cpus_per_worker)), hflip=params.data.hflip,
            stop_path=stop_path, select_ema=_ema_objective(params, variant, data, featurizer_dir, manifest),
        )
        trainer = torch_trainer(train_loop, job.as_config(), name=name, storage_path=store, workers=cfg.num_workers,
                                cpus_per_worker=cfg.cpus_per_worker, gpus_per_worker=1.0 if cfg.use_gpu else 0.0,
                                placement_strategy=cfg.placement_strategy, max_failures=cfg.max_failures)
        start = time.perf_counter()
        try:
            with checkpoint_on_sigterm(stop_path, variant):
                result = trainer.fit()
        except Exception as e:
            logger.finish("FAILED")
            cause = worker_error(e)
            if isinstance(cause, (TrainingError, CheckpointError)):  # ours, already one line naming the file or field
                raise type(cause)(f"training {variant!r} failed: {cause}") from e
            raise TrainingError(f"training {variant!r} failed: {type(cause).__name__}: "
                                f"{' '.join(str(cause).split())[:300]}") from e
        seconds = time.perf_counter() - start
        status = storage.read_json(status_path) or {}
    if status.get("status") == "nonfinite":
        logger.finish("FAILED")
        raise TrainingError(
            f"training {variant!r} stopped at step {status['step']}: non-finite loss ({status['loss']}) or "
            f"gradient norm ({status['grad_norm']}); the last good checkpoint is kept in {run_dir}. "
            "Lower train.lr or enable train.grad_clip."
        )
    if status.get("status") == "preempted":
        logger.finish("KILLED")
        raise TrainingPreempted(
            f"training {variant!r} stopped by SIGTERM at step {status['step']} of {train.steps}, after "
            f"checkpointing that step in {run_dir} (no steps lost): rerun to resume from it"
        )
    if result.checkpoint is None:
        raise TrainingError(f"training {variant!r} ended without a checkpoint")
    with result.checkpoint.as_directory() as d:
        state = load_state(Path(d), key)
    removed = remove_unregistered_checkpoints(result)
    if removed:
        say(f"train {variant}: removed {len(removed)} checkpoint folder(s) in {run_dir} that Ray does not keep "
            "(written by a killed launch after its last registered checkpoint)")
    model_path = export_model(state, vcfg, tuple(manifest.shape), out_dir / MODEL_FILE)
    selection = state.get("ema_selection")
    if selection is not None:
        _log_selection(logger, selection, int(state["step"]))
    resolved = {"variant": variant, **vcfg.model_dump(mode="json"), "train": train.model_dump(),
                "seed": params.seed, "data": params.data.model_dump(mode="json"), "ray": params.ray.model_dump(),
                "config_hash": key}
    storage.write_json(out_dir / "config.json", resolved, indent=2)
    logger.artifacts([model_path, out_dir / "config.json"], "model")
    trained = load_trained(model_path)
    sample_path = out_dir / "samples_final.png"
    save_samples(trained.model, vcfg, tuple(manifest.shape), sample_path, seed=params.seed)
    logger.artifact(sample_path, "samples")
    logger.finish()
    out = TrainResult(variant, run_id, model_path, int(state["step"]), seconds, float(result.metrics.get("loss", "nan")))
    metrics = {"steps": out.steps, "seconds": round(out.seconds, 2), "final_loss": out.final_loss,
               "mlflow_run_id": out.run_id}
    if selection is not None:
        metrics.update({"ema_scores": selection["scores"], "ema_chosen": selection["chosen"],
                        "ema_select_seconds": round(selection["seconds"], 2)})
    storage.write_json(out_dir / METRICS_FILE, metrics, indent=2)
    return out


def _ema_objective(params: Params, variant: str, data: Shipment, featurizer_dir: Path,
                   manifest: Manifest) -> Objective | None:
    """The objective that chooses among the variant's candidate EMAs (None without profiles): ema.select's
    sampler and sample size, the sweep's distance; the featurizer's files travel with it for images.
    Call inside the Ray session (the files go through its object store)."""
    ema = params.variants[variant].ema
    if not ema.profiles:
        return None
    modality = modality_of(manifest.shape)
    featurizer = ship_files(featurizer_dir, [CLASSIFIER_FILE, REF_TEST_FILE]) if modality.is_image else None
    sampler = ema.select.sampler
    return Objective(modality.primary_metric, data, featurizer, sampler.method, sampler.step_list()[0],
                     sampler.options(), ema.select.n_samples, ema.select.seeds, params.seed, tuple(manifest.shape))


def _log_selection(logger: tracking.RunLogger, selection: dict[str, Any], step: int) -> None:
    """The candidates' scores as metrics ema_<name> (and ema_<name>_se) at the last step, once (a rerun of a
    finished run logs nothing again), and the chosen one as the tag scorelab.ema_chosen."""
    first = next(iter(selection["scores"]))
    if step not in logger.logged_steps(f"ema_{first}"):
        scores = {f"ema_{name}": mean for name, (mean, _) in selection["scores"].items()}
        scores.update({f"ema_{name}_se": se for name, (_, se) in selection["scores"].items() if se is not None})
        logger.metrics(scores, step=step)
    logger.tags({"scorelab.ema_chosen": selection["chosen"]})
