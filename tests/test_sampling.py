"""Every sampler on every SDE it applies to, driven by the exact score of a 2-D Gaussian mixture.

The mixture (toy.three_blobs: weights 0.5/0.3/0.2, well separated) has an exact score at every t,
so the only errors left are the sampler's own. Each sample is assigned to its most likely component
and the test checks, with N = 8000 samples:
- component weights within 4 binomial standard errors;
- component means within 4 standard errors + 0.03 (discretisation allowance);
- component standard deviations (principal axes) within 4/sqrt(2 n_k) + 0.05 of the truth;
- sliced Wasserstein-2 distance to fresh data below 0.2 (two independent data sets of this size
  are about 0.12 apart at 256 projections: the estimator's noise floor);
- no sample further than 8 component-stds from every mean.
"""

from __future__ import annotations

import math

import pytest
import torch

from scorelab.metrics import sliced_wasserstein
from scorelab.rng import SampleNoise
from scorelab.sampling import CORRECTORS, PREDICTORS, SAMPLER_FAMILIES, sample, time_grid
from scorelab.sde import get_sde
from scorelab.toy import three_blobs

N = 8000
GM = three_blobs()
SW_BOUND = 0.2

SDES = {
    "vp": lambda: get_sde("vp"),
    "vp_cosine": lambda: get_sde("vp_cosine"),
    "subvp": lambda: get_sde("subvp"),
    "ve": lambda: get_sde("ve"),
    "ddpm": lambda: get_sde("ddpm"),
    # sigma_max well above the data's largest pairwise distance (~5.6), so the prior covers p_T
    "ncsn": lambda: get_sde("ncsn", sigma_min=0.01, sigma_max=50.0, num_scales=300),
}

# (method, steps, options): enough steps to make the statistical checks sharp
CASES = [
    ("ancestral", 500, {}),
    ("ancestral", 500, {"noise": "transition"}),
    ("euler_maruyama", 500, {}),
    ("reverse_diffusion", 500, {}),
    ("pc", 200, {"predictor": "reverse_diffusion", "corrector": "ald", "snr": 0.16}),
    ("pc", 200, {"predictor": "euler_maruyama", "corrector": "langevin", "snr": 0.16}),
    ("pc", 200, {"predictor": "ancestral", "corrector": "none"}),
    ("ald", 30, {"steps_each": 200, "step_lr": 1e-5}),
    ("ode", None, {}),
    ("ddim", 200, {}),
    ("ddim", 500, {"eta": 1.0}),
    ("heun", 50, {}),
    ("dpm_solver", 50, {}),
]


def _applicable():
    for sde_name, make in SDES.items():
        family = make().family
        for method, steps, opts in CASES:
            if family in SAMPLER_FAMILIES[method]:
                label = f"{sde_name}-{method}" + "".join(f"-{k}={v}" for k, v in opts.items())
                yield pytest.param(sde_name, method, steps, opts, id=label)


@pytest.fixture(scope="module")
def fresh_data():
    return GM.sample(N, generator=torch.Generator().manual_seed(123))


def mixture_report(x: torch.Tensor) -> dict:
    """Per-component weight z-score, mean error and std ratios of samples x against GM."""
    labels = GM.component_posterior(x).argmax(1)
    report = {}
    for k in range(len(GM.weights)):
        xk = x[labels == k].double()
        w, n_k = GM.weights[k].item(), len(xk)
        std_k = GM.stds[k].item()
        report[k] = {
            "weight_z": (n_k / len(x) - w) / math.sqrt(w * (1 - w) / len(x)),
            "mean_err": (xk.mean(0) - GM.means[k]).abs().max().item(),
            "mean_tol": 4 * std_k / math.sqrt(n_k) + 0.03,
            "std_ratio": (torch.linalg.eigvalsh(torch.cov(xk.T)).sqrt() / std_k).tolist(),
            "std_tol": 4 / math.sqrt(2 * n_k) + 0.05,
        }
    return report


@pytest.mark.parametrize("sde_name,method,steps,opts", list(_applicable()))
def test_sampler_matches_mixture(sde_name, method, steps, opts, fresh_data):
    sde = SDES[sde_name]()
    if sde.discrete_times() is not None and steps is not None:
        steps = min(steps, len(sde.discrete_times()))
    result = sample(GM.score_fn(sde), sde, (N, 2), method=method, steps=steps, seed=1, **opts)
    x = result.x
    assert x.shape == (N, 2) and torch.isfinite(x).all()

    nearest = torch.cdist(x.double(), GM.means).min(1).values
    assert nearest.max() < 8 * GM.stds.max(), "a sample far away from every component"
    for k, r in mixture_report(x).items():
        assert abs(r["weight_z"]) < 4, f"component {k} weight off by {r['weight_z']:.1f} SE"
        assert r["mean_err"] < r["mean_tol"], f"component {k} mean off by {r['mean_err']:.4f}"
        for ratio in r["std_ratio"]:
            assert abs(ratio - 1) < r["std_tol"], f"component {k} std ratio {ratio:.3f}"
    sw = sliced_wasserstein(x, fresh_data)
    assert sw < SW_BOUND, f"sliced W2 {sw:.3f}"


def test_sliced_wasserstein_bound_is_meaningful(fresh_data):
    """The bound separates good samples from slightly wrong ones: the data shrunk by 10% towards its
    mean, or a mixture with one component's weight moved by 0.1, both fail it."""
    other = GM.sample(N, generator=torch.Generator().manual_seed(5))
    assert sliced_wasserstein(other, fresh_data) < SW_BOUND
    shrunk = other.mean(0) + 0.85 * (other - other.mean(0))
    assert sliced_wasserstein(shrunk, fresh_data) > SW_BOUND
    wrong = type(GM)([0.4, 0.4, 0.2], GM.means, GM.stds).sample(N, generator=torch.Generator().manual_seed(5))
    assert sliced_wasserstein(wrong, fresh_data) > SW_BOUND or any(
        abs(r["weight_z"]) > 4 for r in mixture_report(wrong).values()
    )


# -- NFE: counted calls, never a formula ------------------------------------------------------


class Counter:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, x, t):
        self.calls += 1
        return self.fn(x, t)


@pytest.mark.parametrize(
    "sde_name,method,steps,opts,expected",
    [
        ("vp", "ancestral", 7, {}, 7),
        ("vp", "euler_maruyama", 7, {}, 7),
        ("vp", "reverse_diffusion", 7, {}, 7),
        ("vp", "pc", 7, {"corrector_steps": 2}, 21),
        ("vp", "pc", 7, {"corrector": "none"}, 7),
        ("ve", "ald", 4, {"steps_each": 3, "denoise": True}, 13),
        ("ve", "ald", 4, {"steps_each": 3, "denoise": False}, 12),
        ("subvp", "ddim", 7, {}, 7),
        ("vp", "heun", 7, {}, 13),
        ("ve", "dpm_solver", 7, {}, 7),
        ("ncsn", "ald", None, {"steps_each": 2}, 21),
        ("ddpm", "ancestral", 1000, {}, 1000),
        ("vp", "ode", None, {}, None),
        ("ve", "ode", None, {"denoise": False}, None),
    ],
)
def test_nfe_equals_score_calls(sde_name, method, steps, opts, expected):
    sde = get_sde(sde_name)
    counter = Counter(GM.score_fn(sde))
    result = sample(counter, sde, (16, 2), method=method, steps=steps, seed=0, **opts)
    assert result.nfe == counter.calls
    if expected is not None:
        assert result.nfe == expected
    else:
        assert result.nfe > 10  # an adaptive solver makes many calls; the count is whatever it made


# -- per-sample seeding -----------------------------------------------------------------------

BATCH_INVARIANT = [
    ("vp", "ancestral", 50, {}),
    ("ve", "euler_maruyama", 50, {}),
    ("subvp", "reverse_diffusion", 50, {}),
    ("vp", "pc", 30, {"corrector": "ald"}),
    ("ve", "ald", 5, {"steps_each": 5}),
    ("vp_cosine", "ddim", 20, {"eta": 0.5}),
    ("ve", "heun", 10, {}),
    ("ddpm", "dpm_solver", 20, {}),
]


@pytest.mark.parametrize("sde_name,method,steps,opts", BATCH_INVARIANT)
def test_sample_does_not_depend_on_batch(sde_name, method, steps, opts):
    sde = get_sde(sde_name)
    score = GM.score_fn(sde)
    batch = sample(score, sde, (64, 2), method=method, steps=steps, seed=3, **opts).x
    for i in (0, 17, 63):
        alone = sample(score, sde, (1, 2), method=method, steps=steps, seed=3, indices=torch.tensor([i]), **opts).x
        assert torch.equal(alone[0], batch[i])
    other_seed = sample(score, sde, (64, 2), method=method, steps=steps, seed=4, **opts).x
    assert not torch.allclose(other_seed, batch)


def test_adaptive_ode_depends_on_batch_only_within_tolerance():
    sde = get_sde("vp")
    score = GM.score_fn(sde)
    batch = sample(score, sde, (64, 2), method="ode", seed=3, rtol=1e-6, atol=1e-6).x
    alone = sample(score, sde, (1, 2), method="ode", seed=3, indices=torch.tensor([17]), rtol=1e-6, atol=1e-6).x
    assert torch.allclose(alone[0], batch[17], atol=1e-3)


# -- the discrete models, exactly as in their papers ------------------------------------------


def test_ddpm_ancestral_is_ho_et_al_algorithm_2():
    """scorelab's ancestral sampler on the DDPM chain equals Algorithm 2 of Ho et al. (2020), written
    here from the paper with sigma_t^2 = beta-tilde_t, given the same noise draws."""
    sde = get_sde("ddpm")
    score = GM.score_fn(sde)
    n, seed = 32, 11
    ours = sample(score, sde, (n, 2), method="ancestral", steps=1000, seed=seed).x.double()

    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    alphas = 1 - betas
    abar = torch.cumprod(alphas, 0)
    noise = SampleNoise(seed, n)
    x = math.sqrt(1 - abar[-1].item()) * noise.randn((2,)).double()  # scorelab's prior: N(0, std(T)^2)
    for i in range(999, -1, -1):  # paper's t = i + 1
        t = torch.full((n,), (i + 1) / 1000, dtype=torch.float64)
        eps = -math.sqrt(1 - abar[i].item()) * score(x, t)
        mean = (x - betas[i] / math.sqrt(1 - abar[i].item()) * eps) / math.sqrt(alphas[i].item())
        if i > 0:
            var = (1 - abar[i - 1]) / (1 - abar[i]) * betas[i]
            x = mean + math.sqrt(var.item()) * noise.randn((2,)).double()
        else:
            x = mean
    assert torch.allclose(ours, x, atol=1e-4)


def test_ncsn_ald_is_song_ermon_algorithm_1():
    """scorelab's ALD on the NCSN ladder equals Algorithm 1 of Song & Ermon (2019) (plus the final
    denoising step of NCSNv2), written here from the paper, given the same noise draws."""
    sde = get_sde("ncsn", sigma_min=0.01, sigma_max=10.0, num_scales=10)
    score = GM.score_fn(sde)
    n, seed, steps_each, lr = 16, 5, 7, 2e-5
    ours = sample(score, sde, (n, 2), method="ald", seed=seed, steps_each=steps_each, step_lr=lr).x.double()

    sigmas = torch.logspace(math.log10(10.0), math.log10(0.01), 10, dtype=torch.float64)
    noise = SampleNoise(seed, n)
    x = sde.prior_std * noise.randn((2,)).double()
    for i, sigma in enumerate(sigmas):
        t = torch.full((n,), (10 - i) / 10, dtype=torch.float64)  # NCSN level i lives at t = (L - i)/L
        alpha = lr * sigma**2 / sigmas[-1] ** 2
        for _ in range(steps_each):
            x = x + alpha / 2 * score(x, t) + torch.sqrt(alpha) * noise.randn((2,)).double()
    x = x + sigmas[-1] ** 2 * score(x, torch.full((n,), 0.1, dtype=torch.float64))
    assert torch.allclose(ours, x, atol=1e-4)


def test_ddim_with_eta_one_is_the_ancestral_posterior():
    """DDIM's eta = 1 is exactly the ancestral sampler with the posterior variance, on any SDE."""
    for name in ("vp", "subvp", "ve"):
        sde = get_sde(name)
        score = GM.score_fn(sde)
        a = sample(score, sde, (64, 2), method="ddim", steps=40, seed=2, eta=1.0).x
        b = sample(score, sde, (64, 2), method="ancestral", steps=40, seed=2).x
        assert torch.allclose(a, b, atol=1e-5), name


def test_heun_first_stage_is_ddim():
    """One Heun step to t = 0 is a plain Euler step in (x/alpha, std/alpha), which is DDIM (eta = 0)."""
    for name in ("vp", "ve", "subvp"):
        sde = get_sde(name)
        score = GM.score_fn(sde)
        a = sample(score, sde, (64, 2), method="heun", steps=1, seed=2).x
        b = sample(score, sde, (64, 2), method="ddim", steps=1, seed=2).x
        assert torch.allclose(a, b, atol=1e-4), (name, (a - b).abs().max())


# -- time grids -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["vp", "vp_cosine", "subvp", "ve"])
@pytest.mark.parametrize("grid", ["uniform", "log_snr", "edm"])
def test_time_grid_endpoints_and_spacing(name, grid):
    """12 evaluations spaced over 13 nodes from T to t_min; the last step skips t_min and lands on 0."""
    sde = get_sde(name)
    g = time_grid(sde, 12, grid)
    assert len(g) == 13 and g[0] == sde.T and g[-1] == 0
    t_lo = torch.tensor(sde.eps, dtype=torch.float64)
    if grid != "uniform":  # these stop at sigma_hat = 0.01 where eps lies below it
        t_lo = torch.maximum(t_lo, sde.t_from_log_snr(torch.tensor(-math.log(0.01), dtype=torch.float64)))
    assert (g[1:] < g[:-1]).all() and g[-2] > t_lo
    nodes = torch.cat([g[:-1], t_lo.reshape(1)])
    if grid == "uniform":
        spacing = nodes[:-1] - nodes[1:]
    elif grid == "log_snr":
        spacing = sde.log_snr(nodes[1:]) - sde.log_snr(nodes[:-1])
    else:
        sig = torch.exp(-sde.log_snr(nodes)) ** (1 / 7)
        spacing = sig[:-1] - sig[1:]
    assert torch.allclose(spacing, spacing.mean().expand_as(spacing), rtol=1e-6)


def test_time_grid_few_steps_spends_no_evaluation_at_the_clean_end():
    """Five DDPM-chain steps evaluate at 999, 799, 599, 399, 199 (0-based chain index) and then jump to 0,
    the spacing diffusers' DPM-Solver++ uses; all 1000 steps are the whole chain."""
    sde = get_sde("ddpm")
    idx = (time_grid(sde, 5)[:-1] * 1000).round().long() - 1
    assert idx.tolist() == [999, 799, 599, 399, 199]
    assert torch.equal(time_grid(sde, 1000)[:-1], sde.discrete_times().flip(0))
    assert time_grid(get_sde("vp"), 1).tolist() == [1.0, 0.0]


def test_time_grid_on_a_chain_uses_distinct_chain_times():
    sde = get_sde("ddpm")
    chain = set((sde.discrete_times() * 1000).round().long().tolist())
    for grid in ("uniform", "log_snr", "edm"):
        for steps in (1, 10, 999, 1000):
            g = time_grid(sde, steps, grid)
            idx = (g[:-1] * 1000).round().long().tolist()
            assert len(set(idx)) == steps and set(idx) <= chain and idx[0] == 1000
    with pytest.raises(ValueError, match="exceeds the 1000 steps"):
        time_grid(sde, 1001)


@pytest.mark.parametrize("steps", [5, 20])
def test_ddim_on_the_ddpm_chain_is_diffusers_euler_with_trailing_spacing(steps):
    """An independent implementation of the same step on the same times: diffusers' EulerDiscreteScheduler
    with timestep_spacing "trailing" evaluates at 999, 799, ... (for 5 steps), steps in sigma = std/alpha
    and ends at sigma 0, which is scorelab's DDIM (eta 0) on its grid for the 1000-step chain."""
    diffusers = pytest.importorskip("diffusers")
    from scorelab.parameterization import ScoreModel

    class Net(torch.nn.Module):  # any eps-network of (x, timestep index) will do
        def forward(self, x, k):
            return torch.tanh(x * (1 + k.float()[:, None] / 500) + 0.1)

    sde, net, n = get_sde("ddpm"), Net(), 64
    ours = sample(ScoreModel(net, sde, "eps"), sde, (n, 2), method="ddim", steps=steps, seed=3, dtype=torch.float64).x
    scheduler = diffusers.EulerDiscreteScheduler(num_train_timesteps=1000, beta_schedule="linear",
                                                 timestep_spacing="trailing")
    scheduler.set_timesteps(steps)
    assert [round(float(t)) for t in scheduler.timesteps] == \
        ((time_grid(sde, steps)[:-1] * 1000).round().long() - 1).tolist()
    x = sde.prior_std * SampleNoise(3, torch.arange(n)).randn((2,), dtype=torch.float64)
    x = x * scheduler.init_noise_sigma / sde.prior_std  # its x lives in x / alpha coordinates
    for t in scheduler.timesteps:
        eps = net(scheduler.scale_model_input(x, t), t.expand(n))
        x = scheduler.step(eps, t, x).prev_sample
    assert torch.allclose(ours, x.to(ours.dtype), atol=1e-4), (ours - x).abs().max()


@pytest.mark.parametrize("steps,x0_threshold", [(1000, "none"), (100, "none"), (100, "clip"), (20, "dynamic")])
def test_ancestral_on_the_ddpm_chain_is_diffusers_ddpm_scheduler(steps, x0_threshold, monkeypatch):
    """An independent implementation of DDPM's sampler: diffusers' DDPMScheduler (posterior variance
    "fixed_small", "trailing" spacing: 999, 989, ..., 9 for 100 steps, then the clean data) fed the same
    noise draws. clip is its clip_sample, dynamic its thresholding with no upper bound on s."""
    diffusers = pytest.importorskip("diffusers")
    import diffusers.schedulers.scheduling_ddpm as ddpm_module
    from scorelab.parameterization import ScoreModel

    class Net(torch.nn.Module):  # the exact eps of data N(0, 0.5^2 I), plus an error that thresholding cuts
        def forward(self, x, k):
            alpha_bar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)[k.long()].view(-1, 1, 1)
            return (1 - alpha_bar).sqrt() * x / (0.25 * alpha_bar + 1 - alpha_bar) + 0.1 * torch.tanh(x + 0.1)

    sde, net, n = get_sde("ddpm"), Net(), 64
    ours = sample(ScoreModel(net, sde, "eps"), sde, (n, 1, 4), method="ancestral", steps=steps, seed=3,
                  dtype=torch.float64, x0_threshold=x0_threshold).x
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", timestep_spacing="trailing",
                                        variance_type="fixed_small", clip_sample=x0_threshold == "clip",
                                        thresholding=x0_threshold == "dynamic", dynamic_thresholding_ratio=0.995,
                                        sample_max_value=float("inf"))
    scheduler.set_timesteps(steps)
    assert [round(float(t)) for t in scheduler.timesteps] == \
        ((time_grid(sde, steps)[:-1] * 1000).round().long() - 1).tolist()
    noise = SampleNoise(3, torch.arange(n))
    x = noise.randn((1, 4), dtype=torch.float64)  # channels first, as its thresholding expects
    # The scheduler's variance noise is scorelab's next draw (its last step draws one it multiplies by ~0).
    monkeypatch.setattr(ddpm_module, "randn_tensor", lambda shape, **kw: noise.randn(shape[1:], dtype=kw["dtype"]))
    for t in scheduler.timesteps:
        x = scheduler.step(net(x, t.expand(n)), t, x).prev_sample
    if x0_threshold != "none":  # the thresholding acts: without it the samples differ
        plain = sample(ScoreModel(net, sde, "eps"), sde, (n, 1, 4), method="ancestral", steps=steps, seed=3,
                       dtype=torch.float64).x
        assert (plain - x).abs().max() > 100 * 1e-4
    assert torch.allclose(ours, x.to(ours.dtype), atol=1e-4), (ours - x).abs().max()


# -- bad input ------------------------------------------------------------------------------


def test_unknown_method_lists_valid_ones():
    with pytest.raises(ValueError, match="unknown sampling method 'eulr'.*euler_maruyama"):
        sample(GM.score_fn(get_sde("vp")), get_sde("vp"), (4, 2), method="eulr", steps=3)


def test_method_undefined_for_sde_lists_valid_ones():
    with pytest.raises(ValueError, match="'ald' is not defined for 'vp'.*ancestral"):
        sample(GM.score_fn(get_sde("vp")), get_sde("vp"), (4, 2), method="ald", steps=3)


@pytest.mark.parametrize(
    "method,steps,opts,message",
    [
        ("ddim", 3, {"snr": 0.1}, "unknown option.*'snr'.*'ddim'.*eta"),
        ("pc", 3, {"predictor": "heun"}, "unknown predictor 'heun'"),
        ("pc", 3, {"corrector": "mala"}, "unknown corrector 'mala'"),
        ("ddim", 3, {"eta": 2.0}, "eta must be in"),
        ("ddim", None, {}, "needs steps"),
        ("ddim", 0, {}, "steps must be >= 1"),
        ("ddim", 3, {"grid": "cosine"}, "unknown grid 'cosine'"),
        ("ancestral", 3, {"noise": "beta"}, "noise must be"),
    ],
)
def test_bad_options_raise_clear_errors(method, steps, opts, message):
    sde = get_sde("vp")
    with pytest.raises(ValueError, match=message):
        sample(GM.score_fn(sde), sde, (4, 2), method=method, steps=steps, **opts)


def test_registry_names_match_the_public_lists():
    assert set(SAMPLER_FAMILIES) == {
        "ancestral", "euler_maruyama", "reverse_diffusion", "pc", "ald", "ode", "ddim", "heun", "dpm_solver"
    }
    assert PREDICTORS == ("euler_maruyama", "reverse_diffusion", "ancestral")
    assert CORRECTORS == ("none", "langevin", "ald")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_samples_on_cuda_match_cpu():
    sde = get_sde("vp")
    score = GM.score_fn(sde)
    cpu = sample(score, sde, (32, 2), method="ancestral", steps=50, seed=0).x
    gpu = sample(score, sde, (32, 2), method="ancestral", steps=50, seed=0, device="cuda").x
    assert gpu.device.type == "cuda"
    assert torch.allclose(cpu, gpu.cpu(), atol=1e-4)
