"""What the benchmarks share: the machine's description, the digits data with the domain Frechet distance of
the evaluate stage, scorelab's training step (the loop of scorelab.training, in-process) and diffusers' own
DDPM recipe, and a sampling loop for diffusers' schedulers.

Not a library module: imported by the scripts beside it (`bench/` is on sys.path when they run).
"""

from __future__ import annotations

import copy
import inspect
import math
import os
import platform
import tempfile
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# The machine


def machine() -> dict[str, Any]:
    """CPU model, cores, torch version and threads: the line every table carries."""
    cpu = platform.processor() or "unknown"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "cpu": cpu,
            "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "loadavg_1min": round(os.getloadavg()[0], 2)}


def machine_line(m: dict[str, Any]) -> str:
    return (f"{m['date']} · {m['cpu']} · {m['cores']} cores · torch {m['torch']} · {m['threads']} threads · "
            f"load average {m['loadavg_1min']} at start")


def mean_std(values: list[float]) -> tuple[float, float]:
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else float("nan")


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


# ---------------------------------------------------------------------------------------------
# Params and data


def add_scoring_args(parser, seeds: list[int], threads: int = 1) -> None:
    """The options of a script that scores samples with DomainFD: --n per seed, --seeds, --threads, the
    featurizer's --classifier-epochs, and --out (the CSV folder)."""
    parser.add_argument("--n", type=int, default=1000, help="samples per seed")
    parser.add_argument("--seeds", type=int, nargs="+", default=seeds)
    parser.add_argument("--threads", type=int, default=threads)
    parser.add_argument("--classifier-epochs", type=int, default=12)
    parser.add_argument("--out", default=str(REPO / "docs" / "bench"))


def load_params(path: str | Path, data_dir: Path):
    """params.yaml, validated, with the data prepared into data_dir (a temporary folder)."""
    from scorelab.config import parse_params
    from scorelab.data import prepare

    raw = yaml.safe_load(Path(path).read_text())
    raw["data"] = {**raw.get("data", {}), "out_dir": str(data_dir)}
    params = parse_params(raw)
    if not (params.data.dataset_dir / "manifest.json").exists():
        prepare(params.data, params.seed)
    return params


class DomainFD:
    """The evaluate stage's domain Frechet distance: the featurizer stage's classifier (scorelab.featurizer.
    build_featurizer: DigitClassifier trained by features.train_classifier on the train split, one thread,
    seed params.seed) and the test split's feature statistics as the reference. Samples are quantised to
    uint8 and back first, as the sample stage stores them. reference="train": the whole train split, as the
    evaluate stage scores now (its baseline is then held-out test data, `baseline(..., split="test")`);
    reference="full": every image of the data set, train and test split (`baseline(..., split="full")` draws
    from the same images, so that baseline is the floor of a perfect sampler at N, a little optimistic)."""

    def __init__(self, params, work: Path, epochs: int = 12, reference: str = "test"):
        from scorelab.data import read_split
        from scorelab.features import load_classifier
        from scorelab.featurizer import REF_TEST_FILE, REF_TRAIN_FILE, build_featurizer, read_stats

        self.params = params
        self.meta = build_featurizer(params, root=work, out_dir=work / "featurizer", epochs=epochs)
        self.clf, _ = load_classifier(work / "featurizer" / "classifier.pt")
        self.x_train = read_split(params.data.dataset_dir, "train")
        self.shape = tuple(self.x_train.shape[1:])
        if reference == "full":
            from scorelab.features import feature_stats

            self.ref_mu, self.ref_sigma = feature_stats(self.clf, self.real("full"))
        else:
            ref_file = {"test": REF_TEST_FILE, "train": REF_TRAIN_FILE}[reference]
            self.ref_mu, self.ref_sigma = read_stats(work / "featurizer" / ref_file)

    def real(self, split: str) -> torch.Tensor:
        """The images of a split of the prepared data; "full": train and test together, every image."""
        from scorelab.data import read_split

        if split == "train":
            return self.x_train
        if split == "full":
            return torch.cat([self.x_train, read_split(self.params.data.dataset_dir, "test")])
        return read_split(self.params.data.dataset_dir, split)

    def __call__(self, x: torch.Tensor) -> float:
        from scorelab.features import domain_frechet
        from scorelab.modality import dequantize, quantize

        x = torch.from_numpy(dequantize(quantize(x.detach().cpu().numpy())))
        return domain_frechet(self.clf, x, self.ref_mu, self.ref_sigma)

    def baseline(self, n: int, seeds: list[int], split: str = "train") -> list[float]:
        """N random real images of `split` per seed against the reference: the real-vs-real baseline (split
        "test" with reference "train" is the evaluate stage's)."""
        real = self.real(split)
        out = []
        for seed in seeds:
            idx = np.sort(np.random.default_rng([self.params.seed, seed]).choice(len(real), n, replace=False))
            out.append(self(real[torch.from_numpy(idx)]))
        return out


def peak_matmul(sizes=(512, 1024, 2048), seconds: float = 1.0, device: str = "cpu", dtype=torch.float32,
                clock: Callable[[], float] = time.perf_counter) -> tuple[float, int]:
    """(best GFLOP/s, at size) of square torch.mm on `device` in `dtype`: the machine's practical peak."""
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    best = (0.0, 0)
    for n in sizes:
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        torch.mm(a, b)
        sync()
        reps, start = 0, clock()
        while clock() - start < seconds or reps < 3:
            torch.mm(a, b)
            reps += 1
            if reps % 16 == 0:
                sync()
        sync()
        best = max(best, (2 * n**3 * reps / (clock() - start) / 1e9, n))
    return best


def count_flops(fn) -> int:
    """FLOPs of fn() by torch.utils.flop_counter (matmuls, convolutions, attention; not norms or activations)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def prior_noise(n: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The standard normals scorelab.sampling.sample starts sample i of `seed` from (x_T = prior_std * this):
    handed to diffusers' schedulers too, so both sides start from the same x_T (common random numbers)."""
    return seed_noise(n, shape, seed)[0]


def seed_noise(n: int, shape: tuple[int, ...], seed: int):
    """(prior_noise, the SampleNoise stream it was drawn from): the stream's next draws are the ones scorelab's
    stochastic samplers take per step, for sample_diffusers(..., noise=) to share."""
    from scorelab.rng import SampleNoise

    noise = SampleNoise(seed, torch.arange(n))
    return noise.randn(shape), noise


# ---------------------------------------------------------------------------------------------
# scorelab's training step: the loop of scorelab.training.train_loop with one worker, in-process


def stratified_chain_times(sde, n: int, gen: torch.Generator) -> torch.Tensor:
    """n times of a discrete chain, one in each of n equal strata of its levels, in random order: the batch
    covers the chain evenly, which lowers the variance of the loss's estimate (Kingma et al. 2021, VDM)."""
    chain = sde.discrete_times()
    if chain is None:
        raise ValueError("stratified times are written for a discrete chain (ddpm, ncsn) only")
    u = (torch.randperm(n, generator=gen, dtype=torch.float64) + torch.rand(n, generator=gen, dtype=torch.float64)) / n
    return chain[(u * len(chain)).long().clamp(max=len(chain) - 1)].float()


class ScorelabTrainer:
    """One variant of params.yaml trained with training.py's own pieces: build_model, PartitionLoader
    (the worker's data stream), the (seed, rank, k) generators of mix_seed (dropout's too), losses.dsm_loss with the variant's
    weighting and reduction, clip_grad_norm_ at train.grad_clip, Adam with linear warm-up, ema.EMA. What
    is left out is Ray (one worker: no DDP), MLflow logging and checkpoints. fused=False is the per-tensor
    Adam that training.py used before it switched to the fused one (for before/after measurements)."""

    name = "scorelab"

    def __init__(self, params, variant: str, batch_size: int | None = None, fused: bool = True, *,
                 lr: float | None = None, steps: int | None = None, bf16: bool = False,
                 profiles: tuple[float, ...] = (), loss_weight: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 stratified_times: bool = False, adam_betas: tuple[float, float] = (0.9, 0.999)):
        from scorelab.ema import EMA, PowerEMA
        from scorelab.checkpoint import build_model
        from scorelab.training import PartitionLoader, resolve_train
        from scorelab.variant_config import profile_name

        self.params, self.variant = params, params.variants[variant]
        self.train = resolve_train(params, variant)
        update = {k: v for k, v in (("lr", lr), ("steps", steps)) if v is not None}
        if update:  # the lr schedule's length is train.steps: a run of another length needs it too
            self.train = self.train.model_copy(update=update)
        self.batch_size = batch_size or self.train.batch_size
        self.bf16 = bf16  # bfloat16 autocast of the forward pass and loss, as train_loop does with train.bf16
        # a factor on each sample's loss from its SNR = alpha^2 / std^2 (bench/recipe_ablations.py); None: the variant's
        self.loss_weight = loss_weight
        # one chain level per 1/B of the chain in each batch (VDM's low-discrepancy times) instead of B iid draws
        self.stratified_times = stratified_times
        torch.manual_seed(params.seed)
        self.model = build_model(self.variant, tuple(self._shape()))
        self.ema = EMA(self.model, decay=self.variant.ema.decay, warmup=self.variant.ema.warmup)
        # power EMA profiles kept beside the classic EMA (the variant's ema.profiles does this in train_loop)
        self.profiles = {profile_name(s): PowerEMA(self.model, s) for s in profiles}
        self.opt = torch.optim.Adam(self.model.parameters(), lr=self.train.lr, weight_decay=self.train.weight_decay,
                                    betas=adam_betas, fused=fused)
        self.loader = PartitionLoader(str(params.data.dataset_dir), 0, 1, self.batch_size, params.seed, params.data.hflip)
        self.sde = self.model.sde
        self.steps = 0

    def _shape(self):
        from scorelab.data import load_manifest

        return load_manifest(self.params.data.dataset_dir).shape

    def step(self) -> float:
        from scorelab.losses import dsm_loss
        from scorelab.training import mix_seed, seed_dropout

        from scorelab.training import learning_rate

        train, k = self.train, self.steps
        lr = learning_rate(train, k)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.zero_grad(set_to_none=True)
        x0 = self.loader.batch(k)
        gen = torch.Generator().manual_seed(mix_seed(self.params.seed, 0, k, 2))
        seed_dropout(torch.device("cpu"), mix_seed(self.params.seed, 0, k, 4))  # as train_loop does per micro-batch
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            t = stratified_chain_times(self.sde, x0.shape[0], gen) if self.stratified_times else None
            out = dsm_loss(self.model, self.sde, x0, weighting=self.variant.loss.weighting,
                           reduction=self.variant.loss.reduction, generator=gen, t=t)
            loss = out.loss
            if self.loss_weight is not None:
                alpha, std = self.sde.alpha_std(out.t)
                loss = (self.loss_weight((alpha / std) ** 2).float() * out.per_sample.float()).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), train.grad_clip or math.inf)
        self.opt.step()
        self.ema.update(self.model)
        for profile in self.profiles.values():
            profile.update(self.model)
        self.steps += 1
        return float(loss.detach())

    def sampling_model(self):
        """The EMA ScoreModel, eval mode."""
        return self.ema.module.eval()

    def candidates(self) -> dict:
        """{name: EMA ScoreModel in eval mode}: the classic EMA ("ema") and each power profile."""
        return {"ema": self.sampling_model(), **{n: p.module.eval() for n, p in self.profiles.items()}}

    def num_params(self) -> int:
        from scorelab.nets import count_parameters

        return count_parameters(self.model.net)


# ---------------------------------------------------------------------------------------------
# diffusers' own DDPM recipe (examples/unconditional_image_generation/train_unconditional.py defaults)


DIFFUSERS_RECIPE = {
    "learning_rate": 1e-4, "lr_warmup_steps": 500, "lr_scheduler": "cosine", "adam_beta1": 0.95,
    "adam_beta2": 0.999, "adam_weight_decay": 1e-6, "adam_epsilon": 1e-8, "ema_inv_gamma": 1.0,
    "ema_power": 0.75, "ema_max_decay": 0.9999, "ddpm_num_steps": 1000, "ddpm_beta_schedule": "linear",
    "prediction_type": "epsilon", "max_grad_norm": 1.0,
}


def diffusers_unet(image_size: int, channels: int = 32, channel_mult=(1, 2), layers_per_block: int = 1):
    """UNet2DModel at the size of scorelab's digits U-Net: the same widths and blocks per level, plain
    DownBlock2D/UpBlock2D (no attention but the mid block's, as scorelab's), GroupNorm groups that divide
    the widths."""
    from diffusers import UNet2DModel

    widths = tuple(channels * m for m in channel_mult)
    return UNet2DModel(sample_size=image_size, in_channels=1, out_channels=1, layers_per_block=layers_per_block,
                       block_out_channels=widths, down_block_types=("DownBlock2D",) * len(widths),
                       up_block_types=("UpBlock2D",) * len(widths), norm_num_groups=min(32, channels // 4) or 1,
                       attention_head_dim=widths[-1])


class DiffusersTrainer:
    """diffusers' train_unconditional.py recipe on the same data stream: DDPMScheduler (1000 linear
    betas) add_noise at uniform timesteps, MSE to the noise, AdamW (0.95, 0.999, wd 1e-6), gradient
    clipping at 1, get_cosine_schedule_with_warmup (500 warm-up steps) and EMAModel (inv_gamma 1, power
    3/4, max decay 0.9999). The cosine schedule needs the run's length: with a wall-clock budget it is
    re-estimated after every slice from the measured step rate (`set_total`)."""

    name = "diffusers"

    def __init__(self, params, image_size: int, batch_size: int, lr: float | None = None, bf16: bool = False,
                 **unet_kw):
        from diffusers import DDPMScheduler
        from diffusers.training_utils import EMAModel

        from scorelab.training import PartitionLoader

        r = DIFFUSERS_RECIPE
        self.params, self.batch_size = params, batch_size
        self.bf16 = bf16  # the recipe's --mixed_precision bf16: autocast of the forward pass
        torch.manual_seed(params.seed)
        self.model = diffusers_unet(image_size, **unet_kw)
        self.noise_scheduler = DDPMScheduler(num_train_timesteps=r["ddpm_num_steps"],
                                             beta_schedule=r["ddpm_beta_schedule"], prediction_type=r["prediction_type"])
        self.lr = lr or r["learning_rate"]
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=self.lr, betas=(r["adam_beta1"], r["adam_beta2"]),
                                     weight_decay=r["adam_weight_decay"], eps=r["adam_epsilon"])
        self.ema = EMAModel(self.model.parameters(), decay=r["ema_max_decay"], use_ema_warmup=True,
                            inv_gamma=r["ema_inv_gamma"], power=r["ema_power"], model_cls=type(self.model),
                            model_config=self.model.config)
        self.loader = PartitionLoader(str(params.data.dataset_dir), 0, 1, batch_size, params.seed, False)
        self.gen = torch.Generator().manual_seed(params.seed + 1)
        self.steps = 0
        self.sched = None
        self.set_total(10**6)

    def set_total(self, total: int) -> None:
        """A cosine schedule with warm-up over `total` steps, continuing at the current step."""
        from diffusers.optimization import get_cosine_schedule_with_warmup

        total = max(int(total), self.steps + 1, DIFFUSERS_RECIPE["lr_warmup_steps"] + 1)
        self.total = total
        self.sched = get_cosine_schedule_with_warmup(self.opt, DIFFUSERS_RECIPE["lr_warmup_steps"], total,
                                                     last_epoch=self.steps - 1)

    def step(self) -> float:
        import torch.nn.functional as F

        clean = self.loader.batch(self.steps)
        noise = torch.randn(clean.shape, generator=self.gen)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (clean.shape[0],),
                                  generator=self.gen).long()
        noisy = self.noise_scheduler.add_noise(clean, noise, timesteps)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            pred = self.model(noisy, timesteps, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), DIFFUSERS_RECIPE["max_grad_norm"])
        self.opt.step()
        if self.steps + 1 < self.total:  # past the estimate the cosine would climb again: hold its end
            self.sched.step()
        self.opt.zero_grad()
        self.ema.step(self.model.parameters())
        self.steps += 1
        return float(loss.detach())

    def sampling_model(self):
        """A copy of the network holding the EMA weights, eval mode."""
        net = copy.deepcopy(self.model)
        self.ema.copy_to(net.parameters())
        return net.eval()

    def candidates(self) -> dict:
        """{"ema": the EMA network}: the recipe keeps one EMA (ScorelabTrainer.candidates' counterpart)."""
        return {"ema": self.sampling_model()}

    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)


def train_alternating(trainers: list, budget_s: float, slice_s: float, log: Callable[[str], None] = print):
    """Each trainer gets `budget_s` seconds of training, in slices of `slice_s` taken in turn, so that
    machine noise (other processes on shared cores) falls on all of them alike. A slice ends at the first
    step boundary past its time; the last slice of each trainer stops at its budget. Returns
    {name: {"seconds", "steps", "images_per_s"}}. Trainers with set_total get their cosine schedule
    re-aimed at the end of the budget after every slice."""
    spent = {t.name: 0.0 for t in trainers}
    while any(spent[t.name] < budget_s for t in trainers):
        for t in trainers:
            left = budget_s - spent[t.name]
            if left <= 0:
                continue
            start = time.perf_counter()
            end = start + min(slice_s, left)
            t.model.train()
            while True:
                loss = t.step()
                now = time.perf_counter()
                if now >= end:
                    break
            spent[t.name] += now - start
            if hasattr(t, "set_total"):
                rate = t.steps / spent[t.name]
                t.set_total(t.steps + rate * max(budget_s - spent[t.name], 0.0))
            log(f"  {t.name}: {spent[t.name]:6.1f}/{budget_s:.0f} s, step {t.steps}, loss {loss:.4f}")
    return {t.name: {"seconds": spent[t.name], "steps": t.steps,
                     "images_per_s": t.steps * t.batch_size / spent[t.name]} for t in trainers}


# ---------------------------------------------------------------------------------------------
# Sampling with diffusers' schedulers


DIFFUSERS_SCHEDULERS = {
    "ddpm": "DDPMScheduler", "ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler",
    "heun": "HeunDiscreteScheduler", "dpm_solver": "DPMSolverMultistepScheduler",
}


def diffusers_scheduler(kind: str, train_config: dict | None = None):
    """A sampling scheduler built from the training scheduler's config (diffusers' documented way to
    swap schedulers: from_config), otherwise with its own defaults. dpm_solver is DPM-Solver++ (2M)."""
    import diffusers

    from diffusers import DDPMScheduler

    config = train_config or DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").config
    return getattr(diffusers, DIFFUSERS_SCHEDULERS[kind]).from_config(config)


@dataclass
class DiffusersSample:
    x: torch.Tensor
    nfe: int


@contextmanager
def ddpm_variance_noise(noise):
    """DDPMScheduler.step's variance noise drawn from `noise` (a scorelab.rng.SampleNoise) instead of its
    generator: each step takes the stream's next draw per sample, as scorelab's ancestral sampler does, so that
    both libraries' ancestral samples of a seed share their noise (common random numbers; tests/test_sampling.py
    patches the same function to match the two samplers sample for sample)."""
    import diffusers.schedulers.scheduling_ddpm as ddpm_module

    original = ddpm_module.randn_tensor
    ddpm_module.randn_tensor = lambda shape, **kw: noise.randn(tuple(shape[1:]), dtype=kw.get("dtype") or torch.float32)
    try:
        yield
    finally:
        ddpm_module.randn_tensor = original


@torch.no_grad()
def sample_diffusers(eps_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], scheduler, steps: int,
                     z: torch.Tensor, seed: int, noise=None) -> DiffusersSample:
    """The loop of diffusers' pipelines: set_timesteps, x_T = init_noise_sigma * z, then per timestep
    scale_model_input, the model, scheduler.step. eps_fn(x, t) with t a (B,) tensor of (possibly
    fractional) timesteps; NFE counted by calls. Stochastic steps draw from a torch.Generator seeded with
    `seed`, or, given `noise` (the SampleNoise whose first draw is z), DDPMScheduler's from that stream."""
    scheduler.set_timesteps(steps)
    gen = torch.Generator().manual_seed(seed)
    x = z * scheduler.init_noise_sigma
    nfe = 0
    with ddpm_variance_noise(noise) if noise is not None else nullcontext():
        for t in scheduler.timesteps:
            inp = scheduler.scale_model_input(x, t)
            eps = eps_fn(inp, t.expand(x.shape[0]))
            nfe += 1
            kwargs = {"generator": gen} if "generator" in inspect.signature(scheduler.step).parameters else {}
            x = scheduler.step(eps, t, x, **kwargs).prev_sample
    return DiffusersSample(x=x, nfe=nfe)


def sample_unet_from_seed(unet, kind: str, train_config, steps: int, n: int, shape: tuple[int, ...], seed: int,
                          shared_noise: bool = True) -> DiffusersSample:
    """A diffusers UNet2DModel sampled by its scheduler `kind` (built from the training scheduler's config) from
    the x_T of `seed` that scorelab's samplers start from; DDPMScheduler's variance noise continues that stream
    (shared_noise, common random numbers with scorelab's ancestral sampler) or comes from a generator of the seed."""
    z, noise = seed_noise(n, shape, seed)
    return sample_diffusers(lambda x, t: unet(x, t, return_dict=False)[0], diffusers_scheduler(kind, train_config),
                            steps, z, seed, noise=noise if shared_noise else None)


def tmpdir(prefix: str) -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix=prefix)
