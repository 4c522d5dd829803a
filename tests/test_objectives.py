"""flexdit.objectives against hand-written formulas on fixed inputs, and density-stage bucketing."""
import math
import types

import pytest
import torch

import flexdit_kernels as fk
from flexdit import DensitySchedule, apply_patch, create_diffusion
from flexdit.objectives import DiffusionObjective, FlowMatchingObjective, PixArtObjective, make_objective

from .test_mmdit import PLAN, tiny_flux, tiny_sd3

diffusers = pytest.importorskip("diffusers")


class Recorder(torch.nn.Module):
    """A stand-in transformer: records its keyword arguments, returns 2·hidden_states (+ a variance half)."""

    def __init__(self, out_factor=1, **config):
        super().__init__()
        self.config = types.SimpleNamespace(**config)
        self.out_factor = out_factor
        self.calls = []

    def forward(self, hidden_states=None, *args, **kwargs):
        x = hidden_states if hidden_states is not None else args[0]
        self.calls.append(dict(kwargs, hidden_states=x))
        out = torch.cat([2 * x] * self.out_factor, dim=1)
        return types.SimpleNamespace(sample=out) if "added_cond_kwargs" in kwargs else (out,)


def _batch(c=4, side=8, text=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"latents": torch.randn(3, c, side, side, generator=g),
            "encoder_hidden_states": torch.randn(3, text, 6, generator=g),
            "pooled_projections": torch.randn(3, 7, generator=g),
            "encoder_attention_mask": torch.ones(3, text, dtype=torch.long)}, torch.randn(3, c, side, side,
                                                                                           generator=g)


def test_sd3_flow_matching_formula():
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    obj = FlowMatchingObjective("sd3", sched, weighting="cosmap")
    batch, noise = _batch()
    x, idx = batch["latents"], torch.tensor([0, 400, 999])
    s = (1000 - idx.double()) / 1000                         # the scheduler's unshifted sigmas, then the shift
    sigma = (3 * s / (1 + 2 * s)).float().view(-1, 1, 1, 1)
    model = Recorder()
    loss = obj.losses(model, batch, idx, noise)["loss"]
    x_t = (1 - sigma) * x + sigma * noise
    torch.testing.assert_close(model.calls[0]["hidden_states"], x_t)
    torch.testing.assert_close(model.calls[0]["timestep"], sigma.flatten() * 1000)
    weight = 2 / (math.pi * (1 - 2 * sigma + 2 * sigma ** 2))
    expected = (weight * (2 * x_t - (noise - x)) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(loss, expected)


def test_flux_packs_tokens_and_passes_ids_and_guidance():
    obj = FlowMatchingObjective("flux", weighting="none", guidance=4.0)
    batch, noise = _batch(side=4)
    x, idx = batch["latents"], torch.tensor([10, 500, 990])
    sigma = ((1000 - idx.float()) / 1000).view(-1, 1, 1, 1)
    model = Recorder(guidance_embeds=True)
    loss = obj.losses(model, batch, idx, noise)["loss"]
    call = model.calls[0]

    def pack(z):    # token (i, j) holds z[:, c, 2i + dy, 2j + dx] in (c, dy, dx) order
        b, c = z.shape[:2]
        return torch.stack([z[:, :, 2 * i:2 * i + 2, 2 * j:2 * j + 2].reshape(b, c * 4)
                            for i in range(2) for j in range(2)], 1)

    x_t = (1 - sigma) * x + sigma * noise
    torch.testing.assert_close(call["hidden_states"], pack(x_t))
    torch.testing.assert_close(call["timestep"], sigma.flatten())
    torch.testing.assert_close(call["guidance"], torch.full((3,), 4.0))
    assert call["img_ids"].tolist() == [[0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 1, 1]]
    assert call["txt_ids"].shape == (5, 3) and not call["txt_ids"].any()
    torch.testing.assert_close(loss, ((2 * pack(x_t) - pack(noise - x)) ** 2).flatten(1).mean(1))
    plain = Recorder(guidance_embeds=False)
    obj.losses(plain, batch, idx, noise)
    assert "guidance" not in plain.calls[0]


def test_flow_timesteps_follow_the_density_and_stay_in_one_stage():
    obj = FlowMatchingObjective("sd3", diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0))
    g = torch.Generator().manual_seed(0)
    u = torch.sigmoid(torch.normal(0.0, 1.0, (6,), generator=g))   # the scripts' draw: indices = (u·1000).long()
    assert torch.equal(obj.sample_timesteps(6, None, torch.Generator().manual_seed(0))[1], (u * 1000).long())
    sched = DensitySchedule.from_rates(0.61, 0.86, 8)
    g = torch.Generator().manual_seed(1)
    stages = []
    for _ in range(300):
        k, idx = obj.sample_timesteps(4, sched, g)
        assert len(idx) == 4 and set(obj.stage_of(idx, sched).tolist()) == {k}
        stages.append(k)
    free = obj.stage_of(obj.draw(20000, torch.Generator().manual_seed(2)), sched)
    for k in range(sched.num_stages):    # the stage marginal is the unconditional density's
        assert abs(stages.count(k) / 300 - (free == k).float().mean().item()) < 0.08


def test_pixart_hybrid_loss_formula():
    d = create_diffusion()
    obj = PixArtObjective(d)
    batch, noise = _batch()
    x, t = batch["latents"], torch.tensor([0, 300, 999])
    model = Recorder(out_factor=2, out_channels=8)
    out = obj.losses(model, batch, t, noise)
    call = model.calls[0]
    acp = d.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    x_t = acp.sqrt() * x + (1 - acp).sqrt() * noise
    torch.testing.assert_close(call["hidden_states"], x_t)
    assert call["encoder_hidden_states"] is batch["encoder_hidden_states"]
    assert call["encoder_attention_mask"] is batch["encoder_attention_mask"]
    assert call["added_cond_kwargs"] == {"resolution": None, "aspect_ratio": None}
    mse = ((noise - 2 * x_t) ** 2).flatten(1).mean(1)
    vb = d.vb_terms(torch.cat([2 * x_t, 2 * x_t], 1), x, x_t, t)
    torch.testing.assert_close(out["mse"], mse)
    torch.testing.assert_close(out["loss"], mse + vb, rtol=1e-5, atol=1e-5)
    eps_only = obj.losses(Recorder(out_channels=4), batch, t, noise)      # an ε-only host: the MSE
    torch.testing.assert_close(eps_only["loss"], mse)


@pytest.mark.parametrize("host", ["sd3", "flux"])
def test_patched_hosts_train_one_grid_per_step(host):
    """Bucketed draws keep a patched host on one grid per batch (its σ·1000 rounds as the sampler's)."""
    model = tiny_flux() if host == "flux" else tiny_sd3()
    sched = DensitySchedule.from_rates(0.6, 0.9, 8)
    apply_patch(model, PLAN, sched)
    obj = make_objective(host, weighting="uniform")
    batch, noise = _batch(c=4, side=16)     # FLUX: 4 latent channels, 16 per packed token
    batch["encoder_hidden_states"] = torch.randn(3, 5, 24)
    batch["pooled_projections"] = torch.randn(3, 12)
    g = torch.Generator().manual_seed(0)
    with fk.backend("reference"):
        for _ in range(3):
            _, idx = obj.sample_timesteps(3, sched, g)
            loss = obj.losses(model, batch, idx, noise)["loss"]
            assert loss.shape == (3,) and torch.isfinite(loss).all()


def test_bad_objective_arguments():
    for bad, match in ((dict(host="sdxl"), "host"), (dict(host="sd3", weighting="nope"), "weighting")):
        with pytest.raises(ValueError, match=match):
            make_objective(**bad)
    assert isinstance(make_objective("dit"), DiffusionObjective)
