"""Batch sampling for the DVC `sample` stage: every sampler setting of a variant, several seeds,
chunks run as Ray tasks, resumable.

On disk, under out_dir:

    <setting>/seed<k>/chunk-<start>-<end>.npz   samples [start, end) of that seed, one file per chunk
    <setting>/seed<k>/manifest.json             written once every chunk is there
    <setting>/seed<k>/fingerprint.json          model, setting and code the chunks were drawn with
    <setting>/grid.png                          first 64 samples of seed 0 (else the first seed);
                                                2-D data: a scatter of all that seed's samples

A chunk file holds
    x        images: uint8 (n, H, W, C) (NHWC, as the prepared data stores pixels), v = round((x + 1) / 2 * 255)
             clipped to 0..255; vector data (toy 2-D): float32 (n, D), unchanged
    indices  int64 (n,): the global sample indices start..end-1
    nfe      int64 scalar: score evaluations the chunk's sampler call made
    seconds  float64 scalar: the sampler call's wall time
    max_abs  float64 scalar: the largest |x| in model space before storing (inf if any value is not finite):
             images are clipped when stored, so an exploded sampler is seen only here

A manifest holds count, shape (per sample, as stored), dtype, layout ("NHWC" or "ND"), nfe (one int;
for the adaptive ODE a list, one per chunk), seconds (sum over chunks, so the same after a resume),
setting {key, method, steps, options}, seed, eval_block, chunks [{start, end, nfe, seconds}], and the
divergence guard: max_abs (null when not finite), finite, diverged_above and diverged. A seed whose samples
are not finite or reach |x| > diverged_above (params sample.diverged_above) is `diverged`: the evaluate stage
then reports the setting as diverged instead of scoring it.

Chunks run as Ray tasks on the cluster named by ray.address (else a local Ray), one CPU each, or one
GPU each with ray.use_gpu: the model file travels through the object store (the tasks' nodes need not
see the driver's disk), each task loads it once onto its device, and the arrays come back to the driver,
which alone writes files. On GPUs a chunk is gpu_batch_size samples, drawn in one network call per step.

Sample i of a seed is drawn with per-sample noise keyed by (seed, i) (scorelab.rng), and the network
always runs on blocks of `eval_block` samples (the last one padded): BLAS and oneDNN pick kernels, and
so summation orders, by batch size, and a chunk of 7 would otherwise differ from a chunk of 64 in the
last bits. So for every sampler except the adaptive ODE and the pc sampler with the snr-controlled
`langevin` corrector (whose step sizes are batch statistics) the arrays do not depend on batch_size
nor on how many tasks ran, bit for bit, on a given kind of device (the fingerprint names it: CPU and GPU
kernels round differently). With bf16 (params sample.bf16: true, or auto where the device has bfloat16
kernels) the network runs under bfloat16 autocast for every setting but the adaptive ODE; the fingerprint
holds the setting, so float32 and bfloat16 chunks are not mixed, and the manifest says which ran (`bf16`).
Chunks are written atomically (temporary file, then os.replace), so a rerun keeps every complete
chunk, regenerates the missing or unreadable ones, and ends with neither gaps nor duplicates.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from . import storage
from .checkpoint import CheckpointMismatchError, check_same_model, load_trained
from .config import VariantConfig
from .layout import GRID_FILE as GRID
from .modality import Modality, modality_of
from .provenance import code_fingerprint
from .runtime import Shipment, ray_session, resolve_bf16, ship_files, task_device, unpack
from .sampling import sample
from .visual import save_preview

CHUNK_RE = re.compile(r"^chunk-(\d+)-(\d+)\.npz$")
MANIFEST = "manifest.json"
FINGERPRINT = "fingerprint.json"
SUMMARY = "summary.json"  # one row per (setting, seed): what generate() returns
_KEYS = ("x", "indices", "nfe", "seconds")  # every chunk file; "max_abs" since the divergence guard, "bf16" since bf16
DIVERGED_ABOVE = 100.0  # |x| in model space; params' sample.diverged_above (images lie in [-1, 1], toy2d within 5)


class GenerateError(RuntimeError):
    """Sampling cannot run: the model does not match the variant, or a task failed."""


# ---------------------------------------------------------------------------------------------
# Sampler settings


@dataclass(frozen=True)
class SamplerSetting:
    key: str  # unique within a variant, safe as a folder name: "ddim-20", "ode-adaptive", "ald-levels"
    method: str
    steps: int | None  # None: the sampler picks its own (adaptive ODE, ALD over NCSN's ladder)
    options: dict[str, Any] = field(hash=False)

    @property
    def adaptive(self) -> bool:
        """The ODE solver picks its steps per batch: its NFE differs from chunk to chunk."""
        return self.method == "ode"

    def autocast(self, bf16: bool | str) -> bool | str:
        """sample.bf16 for this setting: not for the adaptive ODE, whose error control (rtol 1e-3 and finer) is
        as fine as bfloat16's rounding: fed that noise, it took other steps (subvp: NFE 47 against 55)."""
        return False if self.adaptive else bf16

    def describe(self) -> dict[str, Any]:
        return {"key": self.key, "method": self.method, "steps": self.steps, "options": self.options}


def _options_hash(options: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:6]


def sampler_settings(variant: VariantConfig) -> list[SamplerSetting]:
    """Every (method, steps, options) the variant configures, one per step count, in config order.

    Keys are "<method>-<steps>" ("adaptive" for the ODE, "levels" for ALD on the SDE's own ladder), with
    "-clip" or "-dynamic" when x0_hat is thresholded (so every table and chart that names the setting says so);
    settings that share method and steps but differ in options get "-<hash of options>" appended,
    and exact duplicates are dropped (they would draw the same samples).
    """
    raw: list[tuple[str, str, int | None, dict[str, Any]]] = []
    for s in variant.samplers:
        options = s.options()
        for steps in s.step_list():
            tag = str(steps) if steps is not None else ("adaptive" if s.method == "ode" else "levels")
            tag += f"-{options['x0_threshold']}" if "x0_threshold" in options else ""
            candidate = (f"{s.method}-{tag}", s.method, steps, options)
            if candidate not in raw:
                raw.append(candidate)
    counts: dict[str, int] = {}
    for base, *_ in raw:
        counts[base] = counts.get(base, 0) + 1
    return [SamplerSetting(base if counts[base] == 1 else f"{base}-{_options_hash(options)}", method, steps, options)
            for base, method, steps, options in raw]


# ---------------------------------------------------------------------------------------------
# One chunk, in a Ray task

_MODEL_CACHE: dict[tuple[str, str], Any] = {}


def _cached_model(model: Shipment, device: torch.device):
    """The worker process's TrainedModel on `device`: Ray reuses workers across tasks, so a model file is
    unpacked once per node and loaded once per worker."""
    key = (model.key, str(device))
    if key not in _MODEL_CACHE:
        _MODEL_CACHE.clear()  # one model at a time: bounded memory in long-lived workers
        _MODEL_CACHE[key] = load_trained(unpack(model) / model.names[0], device=device)
    return _MODEL_CACHE[key]


class BlockedScore:
    """score_fn evaluated on blocks of exactly `block` samples, the last one padded by repeating its
    last sample: every network call has the same shape, so a sample's result does not depend on how
    many samples share its batch."""

    def __init__(self, score_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], block: int):
        self.score_fn, self.block = score_fn, block

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        out = []
        for a in range(0, x.shape[0], self.block):
            xb, tb = x[a:a + self.block], t[a:a + self.block]
            k = xb.shape[0]
            if k < self.block:
                xb = torch.cat([xb, xb[-1:].expand(self.block - k, *xb.shape[1:])])
                tb = torch.cat([tb, tb[-1:].expand(self.block - k)])
            out.append(self.score_fn(xb, tb)[:k])
        return torch.cat(out)


def _sample_chunk(model: Shipment, setting: dict[str, Any], seed: int, start: int, end: int, eval_block: int,
                  use_gpu: bool = False, bf16: bool | str = False) -> dict[str, Any]:
    """Samples [start, end) of `seed` on this task's device; returns the arrays for the driver to write (so
    the output folder need only exist where the driver runs, not on every node). bf16 (true, false or auto,
    resolved on this device): the network runs under bfloat16 autocast; the sampler's own arithmetic stays
    float32."""
    device = task_device(use_gpu)
    if device.type == "cpu":
        torch.set_num_threads(1)  # one task per CPU: intra-op threads would fight over the same cores
    use_bf16, problem = resolve_bf16(bf16, device)
    if problem:
        raise GenerateError(f"sample.bf16 is true but {problem}: set sample.bf16: auto or false")
    trained = _cached_model(model, device)
    net, shape = trained.model, tuple(trained.data_shape)
    tick = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
        result = sample(BlockedScore(net, eval_block), net.sde, (end - start, *shape), method=setting["method"],
                        steps=setting["steps"], seed=seed, indices=torch.arange(start, end), device=device,
                        **setting["options"])
    x = result.x.cpu().numpy()  # waits for the device: the time below is the sampling's, not the queue's
    seconds = time.perf_counter() - tick
    max_abs = float(np.abs(x).max()) if np.isfinite(x).all() else math.inf  # before images are clipped to uint8
    import ray

    where = f"{ray.get_runtime_context().get_node_id()[:12]}/{device.type}"  # for the summary, not the file
    return {"x": modality_of(shape).to_stored(x), "indices": np.arange(start, end, dtype=np.int64),
            "nfe": np.int64(result.nfe), "seconds": np.float64(seconds), "max_abs": np.float64(max_abs),
            "bf16": np.bool_(use_bf16), "where": where}


@functools.cache
def _remote_chunk(use_gpu: bool):
    import ray

    return ray.remote(num_cpus=1, num_gpus=1 if use_gpu else 0)(_sample_chunk)


# ---------------------------------------------------------------------------------------------
# Files


def chunk_path(folder: Path, start: int, end: int) -> Path:
    return folder / f"chunk-{start}-{end}.npz"


def _write_chunk(path: Path, arrays: dict[str, Any]) -> None:
    with storage.atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: np.savez would append ".npz"
        np.savez(f, **arrays)


def _read_chunk(path: Path) -> dict[str, np.ndarray]:
    """The chunk's arrays; max_abs None for a file written before the divergence guard (its samples still load),
    bf16 False for one written before sample.bf16 (float32 was all there was)."""
    with np.load(path) as z:
        return {**{k: z[k] for k in _KEYS}, "max_abs": z["max_abs"] if "max_abs" in z.files else None,
                "bf16": z["bf16"] if "bf16" in z.files else np.bool_(False)}


def _chunk_ok(path: Path, start: int, end: int, sample_shape: tuple[int, ...], dtype: np.dtype) -> bool:
    """The file exists, reads back whole and holds exactly samples [start, end)."""
    try:
        c = _read_chunk(path)
    except Exception:  # missing, truncated or garbled: np.load and zipfile fail in many ways
        return False
    return (c["x"].shape == (end - start, *sample_shape) and c["x"].dtype == dtype
            and np.array_equal(c["indices"], np.arange(start, end))
            and c["max_abs"] is not None)  # a chunk from before the guard is drawn again: clipped images hide |x|


def load_samples(out_dir: str | Path, setting_key: str, seed: int) -> np.ndarray:
    """All samples of one setting and seed, in index order (the stored dtype and layout).

    Raises ValueError naming the folder if the run is incomplete (no manifest) or its chunks leave a
    gap, overlap, or disagree with the manifest's count.
    """
    folder = Path(out_dir) / setting_key / f"seed{seed}"
    manifest_path = folder / MANIFEST
    if not manifest_path.exists():
        raise ValueError(f"{folder}: no {MANIFEST}: sampling did not finish; rerun generate to complete it")
    count = json.loads(manifest_path.read_text())["count"]
    spans = sorted((int(m[1]), int(m[2])) for p in folder.iterdir() if (m := CHUNK_RE.match(p.name)))
    pos, parts = 0, []
    for start, end in spans:
        if start > pos:
            raise ValueError(f"{folder}: samples {pos}..{start - 1} are missing (no chunk covers them)")
        if start < pos:
            raise ValueError(f"{folder}: chunk-{start}-{end}.npz overlaps samples before {pos} (duplicates)")
        try:
            c = _read_chunk(chunk_path(folder, start, end))
        except Exception as e:
            raise ValueError(f"{folder}: chunk-{start}-{end}.npz is unreadable ({type(e).__name__})") from None
        if not np.array_equal(c["indices"], np.arange(start, end)):
            raise ValueError(f"{folder}: chunk-{start}-{end}.npz does not hold samples {start}..{end - 1}")
        parts.append(c["x"])
        pos = end
    if pos != count:
        raise ValueError(f"{folder}: chunks hold {pos} samples, the manifest says {count}")
    return np.concatenate(parts)


# ---------------------------------------------------------------------------------------------
# The driver


@dataclass
class _Job:
    setting: SamplerSetting
    seed: int
    folder: Path
    plan: list[tuple[int, int]]
    todo: list[tuple[int, int]]
    drawn_on: set[str] = field(default_factory=set)  # "<node id>/<device>" of the tasks that drew chunks now


def _prepare_folder(folder: Path, fingerprint: dict[str, Any], plan: list[tuple[int, int]],
                    sample_shape: tuple[int, ...], dtype: np.dtype) -> list[tuple[int, int]]:
    """Make `folder` ready for `plan`; return the chunks still to draw.

    Chunks from another model, setting or code are discarded (the fingerprint differs), as are chunks of
    another split into files (n_samples or batch_size changed), which would otherwise overlap."""
    folder.mkdir(parents=True, exist_ok=True)
    fp_path = folder / FINGERPRINT
    try:
        same = json.loads(fp_path.read_text()) == fingerprint
    except (FileNotFoundError, json.JSONDecodeError):
        same = False
    planned = {chunk_path(folder, a, b).name for a, b in plan}
    for p in folder.iterdir():
        if (CHUNK_RE.match(p.name) and (not same or p.name not in planned)) or p.name.endswith(".tmp"):
            p.unlink()
    if not same:
        storage.write_json(fp_path, fingerprint, indent=2)
    todo = [(a, b) for a, b in plan if not _chunk_ok(chunk_path(folder, a, b), a, b, sample_shape, dtype)]
    if todo:  # an old manifest would claim completeness while chunks are being replaced
        (folder / MANIFEST).unlink(missing_ok=True)
    return todo


def generate(
    model_path: str | Path,
    out_dir: str | Path,
    *,
    n_samples: int,  # per setting and seed
    seeds: Iterable[int] = (0, 1, 2),
    batch_size: int = 256,  # samples per chunk (one Ray task, one file) on CPUs
    num_workers: int = 2,  # Ray tasks in flight at once, 1 CPU (or 1 GPU) each
    progress: bool = True,
    variant: VariantConfig | None = None,  # samplers to run; default: those saved with the model
    eval_block: int = 64,  # samples per network call on CPUs (see the module docstring); part of a run's identity
    address: str = "",  # the Ray cluster (ray.address); "" = $RAY_ADDRESS, else a local Ray
    connect_timeout_s: float = 10.0,
    use_gpu: bool = False,  # one GPU per task; chunks and network calls of gpu_batch_size samples
    gpu_batch_size: int = 4096,
    diverged_above: float = DIVERGED_ABOVE,  # a seed with |x| beyond this (or not finite) is marked diverged
    bf16: bool | str = False,  # bfloat16 autocast of the network (true, false, auto) but for the adaptive ODE
) -> list[dict[str, Any]]:
    """Draw n_samples per sampler setting and seed into out_dir (format: module docstring), resuming
    whatever an earlier run left; write a manifest per setting/seed and a grid per setting.

    Returns one summary row per (setting, seed), with `diverged` and `max_abs` (the divergence guard). Uses
    the running Ray, else attaches to `address`, else starts a local one.
    """
    from tqdm.auto import tqdm

    if not diverged_above > 0:
        raise ValueError(f"diverged_above must be > 0, got {diverged_above}")
    if min(n_samples, batch_size, num_workers, eval_block, gpu_batch_size) < 1:
        raise ValueError(f"n_samples, batch_size, num_workers, eval_block and gpu_batch_size must be >= 1, "
                         f"got {n_samples}, {batch_size}, {num_workers}, {eval_block}, {gpu_batch_size}")
    if use_gpu:  # a GPU is filled by thousands of samples a call: one call per chunk and step
        batch_size = eval_block = gpu_batch_size
    model_path, out_dir = Path(model_path).resolve(), Path(out_dir).resolve()
    trained = load_trained(model_path)
    variant = variant or trained.variant
    try:
        check_same_model(variant, trained.variant, model_path)
    except CheckpointMismatchError as e:
        raise GenerateError(str(e)) from None
    data_shape = tuple(trained.data_shape)
    modality = modality_of(data_shape)
    sample_shape, dtype = modality.stored_layout(data_shape)
    seeds = list(dict.fromkeys(int(s) for s in seeds))
    if not seeds:
        raise ValueError("seeds must name at least one seed")
    settings = sampler_settings(variant)
    model_sha = storage.sha256_file(model_path)
    code = code_fingerprint("generate")  # this module and all it imports draw the chunks

    plan = [(a, min(a + batch_size, n_samples)) for a in range(0, n_samples, batch_size)]
    jobs: list[_Job] = []
    for s in settings:
        for seed in seeds:
            folder = out_dir / s.key / f"seed{seed}"
            fingerprint = {"model_sha256": model_sha, "setting": s.describe(), "seed": seed,
                           "data_shape": list(data_shape), "eval_block": eval_block, "bf16": s.autocast(bf16),
                           "device": "cuda" if use_gpu else "cpu", "code_sha256": code, "torch": torch.__version__}
            jobs.append(_Job(s, seed, folder, plan, _prepare_folder(folder, fingerprint, plan, sample_shape, dtype)))

    pending = [(job, a, b) for job in jobs for a, b in job.todo]
    if pending:
        import ray

        with ray_session(address, num_cpus=float(max(num_workers, os.cpu_count() or 1)),
                         connect_timeout_s=connect_timeout_s):
            if use_gpu and not ray.cluster_resources().get("GPU"):
                raise GenerateError("ray.use_gpu is true but the Ray cluster has no GPU: set ray.use_gpu: false")
            model = ship_files(model_path.parent, [model_path.name])  # the tasks' nodes may not see this disk
            bar = tqdm(total=sum(b - a for _, a, b in pending), desc="sampling", unit="sample", unit_scale=True,
                       disable=not progress)
            _run_chunks(model, pending, num_workers, eval_block, use_gpu, bf16, bar)

    rows = [_finish(job, sample_shape, dtype, modality.layout, n_samples, eval_block, diverged_above) for job in jobs]
    grid_seed = 0 if 0 in seeds else seeds[0]
    not_finite = {r["setting"] for r in rows if r["seed"] == grid_seed and r["max_abs"] is None}
    for s in settings:
        if s.key not in not_finite:  # NaN has no picture; the manifest and the summary say what happened
            _save_grid(out_dir, s, grid_seed, modality)
    storage.write_json(out_dir / SUMMARY, rows, indent=2)
    return rows


def _run_chunks(model: Shipment, pending: list[tuple[_Job, int, int]], num_workers: int, eval_block: int,
                use_gpu: bool, bf16: bool | str, bar) -> None:
    """Keep num_workers tasks in flight; write each chunk as it arrives, so an interruption loses only
    the chunks still running. The bar counts samples (its rate is samples/s)."""
    import ray

    task = _remote_chunk(use_gpu)
    queue = list(reversed(pending))
    running: dict[Any, tuple[_Job, int, int]] = {}
    try:
        while queue or running:
            while queue and len(running) < num_workers:
                job, a, b = queue.pop()
                ref = task.remote(model, {"method": job.setting.method, "steps": job.setting.steps,
                                          "options": job.setting.options}, job.seed, a, b, eval_block, use_gpu,
                                  job.setting.autocast(bf16))
                running[ref] = (job, a, b)
            done, _ = ray.wait(list(running), num_returns=1)
            for ref in done:
                job, a, b = running.pop(ref)
                try:
                    arrays = ray.get(ref)
                except ray.exceptions.RayError as e:
                    cause = " ".join(str(getattr(e, "cause", None) or e).split())[:300]
                    raise GenerateError(f"{job.setting.key} seed {job.seed}, samples {a}..{b - 1}: {cause}") from e
                job.drawn_on.add(arrays.pop("where"))
                _write_chunk(chunk_path(job.folder, a, b), arrays)
                bar.update(b - a)
    finally:
        for ref in running:
            ray.cancel(ref)
        bar.close()


def _finish(job: _Job, sample_shape: tuple[int, ...], dtype: np.dtype, layout: str, n_samples: int,
            eval_block: int, diverged_above: float) -> dict[str, Any]:
    """Check every planned chunk is on disk and complete, then write the manifest (with the divergence guard)."""
    chunks, max_abs = [], 0.0
    for a, b in job.plan:
        path = chunk_path(job.folder, a, b)
        if not _chunk_ok(path, a, b, sample_shape, dtype):
            raise GenerateError(f"{path} is missing or incomplete after sampling")
        c = _read_chunk(path)
        max_abs = max(max_abs, float(c["max_abs"]))
        chunks.append({"start": a, "end": b, "nfe": int(c["nfe"]), "seconds": float(c["seconds"]),
                       "bf16": bool(c["bf16"])})
    nfes = [c["nfe"] for c in chunks]
    # one NFE for fixed-step samplers; the adaptive ODE's step count is per batch, so one per chunk
    nfe: int | list[int] = nfes if job.setting.adaptive or len(set(nfes)) > 1 else nfes[0]
    seconds = sum(c["seconds"] for c in chunks)
    finite = math.isfinite(max_abs)
    guard = {"max_abs": max_abs if finite else None, "finite": finite, "diverged_above": diverged_above,
             "diverged": not finite or max_abs > diverged_above}
    manifest = {"count": n_samples, "shape": list(sample_shape), "dtype": dtype.name, "layout": layout,
                "nfe": nfe, "seconds": round(seconds, 4), "setting": job.setting.describe(), "seed": job.seed,
                "eval_block": eval_block, "bf16": any(c["bf16"] for c in chunks), "chunks": chunks, **guard}
    storage.write_json(job.folder / MANIFEST, manifest, indent=2)
    return {"setting": job.setting.key, "method": job.setting.method, "steps": job.setting.steps,
            "seed": job.seed, "count": n_samples, "nfe": nfe, "seconds": round(seconds, 4),
            "chunks_drawn": len(job.todo), "chunks_reused": len(job.plan) - len(job.todo), "path": str(job.folder),
            "drawn_on": sorted(job.drawn_on), "diverged": guard["diverged"], "max_abs": guard["max_abs"]}


def _save_grid(out_dir: Path, setting: SamplerSetting, seed: int, modality: Modality) -> Path:
    """The first 64 images of the seed, or a scatter of all its points (of 64 points one sees little)."""
    x = load_samples(out_dir, setting.key, seed)
    x = x[:64] if modality.is_image else x
    return save_preview(modality, torch.from_numpy(modality.from_stored(x)), out_dir / setting.key / GRID,
                        f"{setting.key}, seed {seed}")


__all__ = ["BlockedScore", "GenerateError", "SamplerSetting", "generate", "load_samples", "sampler_settings"]
