"""Gaussian diffusion: respacing, the hybrid loss against direct formulas, samplers, guidance, density schedule."""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from flexdit.diffusion import (GaussianDiffusion, create_diffusion, grid_steps, guided_model_fn, linear_betas,
                               sample_latents, space_timesteps)
from flexdit.schedule import DensitySchedule


class ToyEpsModel(nn.Module):
    """A stand-in with DiT's call signature: (B, 4, h, w) → (B, 8, h, w), depends on x, t, y; records grids."""

    def __init__(self, num_classes=3, channels=4):
        super().__init__()
        self.conv = nn.Conv2d(channels, 2 * channels, 3, padding=1)
        self.embed = nn.Embedding(num_classes + 1, 2 * channels)
        self.config = SimpleNamespace(num_classes=num_classes)
        self.calls = []

    def forward(self, x, t, y, grid=None):
        self.calls.append((t.clone(), grid))
        out = self.conv(x) + self.embed(y)[:, :, None, None] + torch.sin(t.float() / 100)[:, None, None, None]
        c = x.shape[1]
        return torch.cat([out[:, :c], torch.tanh(out[:, c:])], dim=1)

    def forward_with_cfg(self, x, t, y, cfg_scale, cfg_channels=3, grid=None):
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half]), t, y, grid=grid)
        eps, rest = out[:, :cfg_channels], out[:, cfg_channels:]
        cond, uncond = eps.chunk(2)
        half_eps = uncond + cfg_scale * (cond - uncond)
        return torch.cat([torch.cat([half_eps, half_eps]), rest], dim=1)


def test_space_timesteps():
    s = space_timesteps(1000, 250)
    assert len(s) == 250 and s[0] == 0 and s[-1] == 999
    assert space_timesteps(1000, "250") == s
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    s3 = space_timesteps(300, "10,15,20")
    assert len(s3) == 45 and s3[:2] == [0, 11] and s3[9] == 99 and s3[10] == 100 and s3[-1] == 299
    assert space_timesteps(1000, 1000) == list(range(1000))
    with pytest.raises(ValueError):
        space_timesteps(10, 11)


def test_respaced_chain_keeps_alphas_cumprod():
    full = create_diffusion()
    assert full.num_timesteps == 1000 and full.betas[0] == pytest.approx(1e-4) and full.betas[-1] == pytest.approx(0.02)
    sp = create_diffusion(250)
    kept = sp.timestep_map
    torch.testing.assert_close(sp.alphas_cumprod, full.alphas_cumprod[kept], rtol=1e-12, atol=0)
    assert sp.original_timestep(torch.tensor([0, 249])).tolist() == [0, 999]


def _direct_vb(betas, x0, x_t, t, eps, v):
    """The vb term from scratch: q-posterior vs the learned-range Gaussian, with torch.distributions' KL."""
    alphas = 1 - betas
    abar = torch.cumprod(alphas, 0)
    out = []
    for i in range(x0.shape[0]):
        ti = int(t[i])
        ab, ab_prev = abar[ti].item(), (abar[ti - 1].item() if ti > 0 else 1.0)
        beta = betas[ti].item()
        post_var = beta * (1 - ab_prev) / (1 - ab)
        post_var_1 = betas[1].item() * (1 - abar[0].item()) / (1 - abar[1].item())
        log_post = math.log(post_var if ti > 0 else post_var_1)
        coef1 = beta * math.sqrt(ab_prev) / (1 - ab)
        coef2 = (1 - ab_prev) * math.sqrt(alphas[ti].item()) / (1 - ab)
        true_mean = coef1 * x0[i] + coef2 * x_t[i]
        x0_pred = (x_t[i] - math.sqrt(1 - ab) * eps[i]) / math.sqrt(ab)
        mean = coef1 * x0_pred + coef2 * x_t[i]
        frac = (v[i] + 1) / 2
        log_var = frac * math.log(beta) + (1 - frac) * log_post
        p = torch.distributions.Normal(mean, torch.exp(0.5 * log_var))
        if ti == 0:
            # discretised Gaussian log-likelihood of bins of width 2/255, with ADM's tanh approximation of the
            # normal CDF (the exact CDF differs by 0.7% at this small σ)
            def cdf(z):
                u = (z - mean) / p.stddev
                return 0.5 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u ** 3)))
            lo = torch.where(x0[i] < -0.999, torch.full_like(x0[i], -1e9), x0[i] - 1 / 255)
            hi = torch.where(x0[i] > 0.999, torch.full_like(x0[i], 1e9), x0[i] + 1 / 255)
            out.append(-torch.log(cdf(hi) - cdf(lo)).mean() / math.log(2))
        else:
            q = torch.distributions.Normal(true_mean, torch.full_like(true_mean, math.sqrt(post_var)))
            out.append(torch.distributions.kl_divergence(q, p).mean() / math.log(2))
    return torch.stack(out)


def test_training_losses_match_direct_formula():
    torch.manual_seed(0)
    d = create_diffusion()
    model = ToyEpsModel().double()
    x0 = (torch.rand(5, 4, 6, 6, dtype=torch.float64) * 1.6 - 0.8)
    t = torch.tensor([0, 1, 10, 500, 999])
    noise = torch.randn_like(x0)
    y = torch.tensor([0, 1, 2, 0, 1])

    def fn(x, tt):
        return model(x, tt, y)

    losses = d.training_losses(fn, x0, t, noise)
    x_t = torch.sqrt(torch.cumprod(1 - linear_betas(), 0))[t].view(-1, 1, 1, 1) * x0 + \
        torch.sqrt(1 - torch.cumprod(1 - linear_betas(), 0))[t].view(-1, 1, 1, 1) * noise
    out = model(x_t, t, y).float().double()
    eps, v = out[:, :4], out[:, 4:]
    torch.testing.assert_close(losses["mse"].double(), ((noise - eps) ** 2).mean(dim=(1, 2, 3)), rtol=1e-5, atol=1e-6)
    direct = _direct_vb(linear_betas(), x0, x_t, t, eps, v)
    torch.testing.assert_close(losses["vb"].double(), direct, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(losses["loss"], losses["mse"] + losses["vb"])


def test_vb_term_does_not_train_the_mean():
    d = create_diffusion()
    x0 = torch.randn(3, 4, 4, 4) * 0.5
    out = torch.randn(3, 8, 4, 4, requires_grad=True)
    losses = d.training_losses(lambda x, t: out * 1.0, x0, torch.tensor([3, 300, 900]))
    (grad,) = torch.autograd.grad(losses["vb"].sum(), out)
    assert grad[:, :4].abs().max() == 0 and grad[:, 4:].abs().max() > 0


def test_vb_scaled_by_respaced_length():
    d = create_diffusion(100)
    x0 = torch.randn(2, 4, 4, 4) * 0.5
    out = torch.randn(2, 8, 4, 4).clamp(-1, 1)
    losses = d.training_losses(lambda x, t: out, x0, torch.tensor([5, 50]), torch.zeros_like(x0))
    t = torch.tensor([5, 50])
    x_t = d.q_sample(x0, t, torch.zeros_like(x0))
    torch.testing.assert_close(losses["vb"], d.vb_terms(out, x0, x_t, t) * 0.1)


def test_ddim_eta0_deterministic_and_ddpm_seeded():
    model = ToyEpsModel().eval()
    d = create_diffusion(20)
    y = torch.tensor([0, 1, 2])
    noise = torch.randn(3, 4, 5, 5)
    a = sample_latents(model, d, y, (4, 5, 5), cfg_scale=2.0, sampler="ddim", noise=noise,
                       generator=torch.Generator().manual_seed(1))
    b = sample_latents(model, d, y, (4, 5, 5), cfg_scale=2.0, sampler="ddim", noise=noise,
                       generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and torch.isfinite(a).all()
    c = sample_latents(model, d, y, (4, 5, 5), cfg_scale=2.0, sampler="ddim", eta=1.0, noise=noise,
                       generator=torch.Generator().manual_seed(2))
    assert not torch.allclose(a, c)
    p1 = sample_latents(model, d, y, (4, 5, 5), generator=torch.Generator().manual_seed(5))
    p2 = sample_latents(model, d, y, (4, 5, 5), generator=torch.Generator().manual_seed(5))
    p3 = sample_latents(model, d, y, (4, 5, 5), generator=torch.Generator().manual_seed(6))
    assert torch.equal(p1, p2) and not torch.allclose(p1, p3)


def test_per_sample_generators_independent_of_batching():
    model = ToyEpsModel().eval()
    d = create_diffusion(10)
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    both = sample_latents(model, d, torch.tensor([0, 2]), (4, 5, 5), cfg_scale=3.0, generator=gens([11, 12]))
    alone = sample_latents(model, d, torch.tensor([2]), (4, 5, 5), cfg_scale=3.0, generator=gens([12]))
    torch.testing.assert_close(both[1:], alone, rtol=1e-5, atol=1e-6)


def test_guidance_scale_one_equals_conditional():
    model = ToyEpsModel().eval()
    x = torch.randn(3, 4, 5, 5)
    t = torch.tensor([7, 7, 7])
    y = torch.tensor([0, 1, 2])
    guided = guided_model_fn(model, y, 1.0, use_cfg=True)(x, t)
    torch.testing.assert_close(guided, model(x, t, y), rtol=1e-5, atol=1e-6)
    d = create_diffusion(10)
    noise = torch.randn(3, 4, 5, 5)
    cond = d.p_sample_loop(guided_model_fn(model, y, 1.0, use_cfg=False), noise,
                           generator=torch.Generator().manual_seed(0))
    cfg1 = d.p_sample_loop(guided_model_fn(model, y, 1.0, use_cfg=True), noise,
                           generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(cfg1, cond, rtol=1e-4, atol=1e-5)
    cfg4 = d.p_sample_loop(guided_model_fn(model, y, 4.0), noise, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(cfg4, cond, atol=1e-3)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_schedule_queried_with_original_timestep(sampler):
    model = ToyEpsModel().eval()
    sched = DensitySchedule.from_rates(0.61, 0.86, 16)
    d = create_diffusion(25)
    sample_latents(model, d, torch.tensor([1, 2]), (4, 5, 5), cfg_scale=1.5, schedule=sched, sampler=sampler,
                   generator=torch.Generator().manual_seed(0))
    assert len(model.calls) == 25
    seen = set()
    for t, grid in model.calls:
        assert t.max() < 1000 and grid == sched.grid(int(t[0]))
        seen.add(grid)
    assert seen == set(sched.grids)
    # the first call is the noisiest original step (999), not spaced index 24
    assert int(model.calls[0][0][0]) == 999 and model.calls[0][1] == (6, 6)
    # dense model: no schedule, no grid keyword
    model.calls.clear()
    sample_latents(model, d, torch.tensor([1]), (4, 5, 5), generator=torch.Generator().manual_seed(0))
    assert all(g is None for _, g in model.calls)


def _guided_fn_before_cuda_graphs(model, y, cfg_scale, schedule, null_class=3, cfg_channels=3):
    """The eager model_fn as it was before the CUDA-graph path existed (kept verbatim as the reference)."""
    y_null = torch.full_like(y, null_class)

    def fn(x, t):
        kwargs = {} if schedule is None else {"grid": schedule.grid(int(t[0]) if t.ndim else int(t))}
        b = x.shape[0]
        out = model.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y_null]),
                                     cfg_scale, cfg_channels=cfg_channels, **kwargs)
        return out[:b]

    return fn


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_eager_sampling_with_schedule_and_guidance_unchanged(sampler):
    model = ToyEpsModel().eval()
    sched = DensitySchedule.from_rates(0.61, 0.86, 16)          # grids (10, 9, 8, 6)
    d = create_diffusion(12)
    y, noise = torch.tensor([0, 2]), torch.randn(2, 4, 5, 5)
    got, info = sample_latents(model, d, y, (4, 5, 5), cfg_scale=3.0, schedule=sched, sampler=sampler,
                               noise=noise, generator=torch.Generator().manual_seed(3), return_info=True)
    fn = _guided_fn_before_cuda_graphs(model, y, 3.0, sched)
    loop = d.p_sample_loop if sampler == "ddpm" else d.ddim_sample_loop
    want = loop(fn, noise, generator=torch.Generator().manual_seed(3))
    assert torch.equal(got, want)
    assert info["cuda_graph"] is None and info["steps"] == 12
    assert info["grid_steps"] == grid_steps(d, sched) and sum(info["grid_steps"].values()) == 12
    assert set(info["grid_steps"]) == {(10, 10), (9, 9), (8, 8), (6, 6)}


def test_grid_steps_follow_the_original_timesteps():
    sched = DensitySchedule([10, 9, 8, 6])
    assert grid_steps(create_diffusion(), sched) == {(10, 10): 250, (9, 9): 250, (8, 8): 250, (6, 6): 250}
    assert grid_steps(create_diffusion("ddim50"), sched) == {(10, 10): 13, (9, 9): 12, (8, 8): 13, (6, 6): 12}
    assert grid_steps(create_diffusion(4), None) == {None: 4}


def test_single_step_chain():
    d = GaussianDiffusion(use_timesteps=[999])
    assert d.num_timesteps == 1 and torch.isfinite(d.posterior_log_variance_clipped).all()


def test_works_without_tqdm_and_diffusers():
    import subprocess
    import sys
    code = ("import sys; sys.modules['tqdm'] = None; sys.modules['diffusers'] = None\n"
            "import flexdit, flexdit.sample, flexdit.train, flexdit.data\n"
            "assert list(flexdit.create_diffusion(3)._steps(progress=True)) == [2, 1, 0]\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
