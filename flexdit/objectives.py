"""Training objectives of the hosts `flexdit-finetune` trains, with FlexDiT's density-stage bucketing.

    dit      class-conditional DiT / FlexDiT: ε-prediction with learned variance, MSE + variational bound
             (`flexdit.diffusion.GaussianDiffusion.training_losses`, DiT's hybrid loss)
    pixart   PixArt-α (diffusers `PixArtTransformer2DModel`): the same IDDPM hybrid loss (PixArt-α trains with
             learn_sigma and the 1000-step linear schedule), the caption as `encoder_hidden_states` /
             `encoder_attention_mask`; an ε-only host (out_channels = in_channels) trains on the MSE alone
    sd3      rectified flow (flow matching) as diffusers' SD3 / FLUX training scripts: t drawn through
    flux     `compute_density_for_timestep_sampling` onto the `FlowMatchEulerDiscreteScheduler`'s timesteps,
             x_t = (1 − σ)·x + σ·ε, target ε − x, weighted by `compute_loss_weighting_for_sd3`; SD3 receives σ·1000,
             FLUX σ, its latents packed 2x2 into tokens (`FluxPipeline._pack_latents`), `img_ids` / `txt_ids`,
             and the guidance scale when the transformer has a guidance embedding

Bucketing (arXiv 2412.06028): every step draws one stage of the density schedule and its timesteps inside it, so a
batch runs one grid and t keeps its distribution over steps. For the flow hosts the schedule reads σ·1000 (as a
patched host does): the stage is that of one draw from the training density, the rest of the batch is drawn from the
same density restricted to that stage, so each sample's t is distributed as in the host's own training.
"""
from __future__ import annotations

import torch

from .diffusion import GaussianDiffusion, _mean_flat, create_diffusion
from .schedule import DensitySchedule

__all__ = ["Objective", "DiffusionObjective", "PixArtObjective", "FlowMatchingObjective", "make_objective",
           "HOSTS", "WEIGHTINGS"]

HOSTS = ("dit", "pixart", "sd3", "flux")
WEIGHTINGS = ("logit_normal", "mode", "uniform", "sigma_sqrt", "cosmap", "none")


class Objective:
    """Draws one step's timesteps and computes per-sample losses; `batch` is a dict of tensors ("latents", the
    host's conditioning keys)."""

    name = ""

    def sample_timesteps(self, batch_size: int, schedule: DensitySchedule | None, generator: torch.Generator):
        """(stage, t) for one step: t (B,) as `losses` takes it, all in one stage of `schedule` (stage 0 without)."""
        raise NotImplementedError

    def model_inputs(self, model, batch: dict, x_t: torch.Tensor, t: torch.Tensor) -> dict:
        """The keyword arguments of the transformer's forward for x_t at t (text-to-image hosts)."""
        raise NotImplementedError

    def losses(self, model, batch: dict, t: torch.Tensor, noise: torch.Tensor, grid=None) -> dict:
        """{"loss": (B,), ...}: the training loss per sample at timesteps t with noise ε (the shape of the latents)."""
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------------------------
# ε-prediction with learned variance (DiT, PixArt-α)
# ---------------------------------------------------------------------------------------------------------------

class DiffusionObjective(Objective):
    """DiT's hybrid loss on a class-conditional model called as model(x_t, t, y[, grid=...])."""

    name = "dit"

    def __init__(self, diffusion: GaussianDiffusion | None = None):
        self.diffusion = diffusion or create_diffusion()

    def sample_timesteps(self, batch_size, schedule, generator):
        if schedule is not None:
            return schedule.sample_timesteps(batch_size, generator)
        return 0, torch.randint(0, self.diffusion.num_timesteps, (batch_size,), generator=generator)

    def forward(self, model, batch, x_t, t, grid):
        kwargs = {} if grid is None else {"grid": grid}
        return model(x_t, t, batch["y"], **kwargs)

    def losses(self, model, batch, t, noise, grid=None):
        return self.diffusion.training_losses(lambda xt, tt: self.forward(model, batch, xt, tt, grid),
                                              batch["latents"], t, noise)


class PixArtObjective(DiffusionObjective):
    """PixArt-α: the hybrid loss with the caption; the patched host chooses its grid from t itself."""

    name = "pixart"

    def model_inputs(self, model, batch, x_t, t) -> dict:
        """The transformer's keyword arguments for x_t at timesteps t."""
        h, w = x_t.shape[-2:]
        added = {"resolution": None, "aspect_ratio": None}
        if getattr(_unwrap(model), "use_additional_conditions", False):   # PixArt-α 1024²: size micro-conditions
            b = x_t.shape[0]
            added = {"resolution": torch.tensor([[8.0 * h, 8.0 * w]], device=x_t.device).repeat(b, 1),
                     "aspect_ratio": torch.tensor([[h / w]], device=x_t.device).repeat(b, 1)}
        return dict(hidden_states=x_t, encoder_hidden_states=batch["encoder_hidden_states"],
                    encoder_attention_mask=batch.get("encoder_attention_mask"), timestep=t, added_cond_kwargs=added)

    def forward(self, model, batch, x_t, t, grid=None):
        return model(**self.model_inputs(model, batch, x_t, t)).sample

    def losses(self, model, batch, t, noise, grid=None):
        x = batch["latents"]
        if _out_channels(model, x.shape[1]) == 2 * x.shape[1]:
            return super().losses(model, batch, t, noise)
        x_t = self.diffusion.q_sample(x, t, noise)                  # an ε-only host: the MSE alone
        mse = _mean_flat((noise - self.forward(model, batch, x_t, self.diffusion.original_timestep(t)).float()) ** 2)
        return {"loss": mse, "mse": mse}


def _unwrap(model):
    """The module under a DistributedDataParallel wrapper."""
    return getattr(model, "module", model)


def _out_channels(model, default: int) -> int:
    config = getattr(_unwrap(model), "config", None)
    out = getattr(config, "out_channels", None)
    return int(out) if out else default


# ---------------------------------------------------------------------------------------------------------------
# Rectified flow (SD3 / SD3.5, FLUX.1)
# ---------------------------------------------------------------------------------------------------------------

class FlowMatchingObjective(Objective):
    """Flow matching as diffusers' `train_dreambooth_sd3.py` / `train_dreambooth_flux.py` (without their optional
    output preconditioning).

    scheduler: a `FlowMatchEulerDiscreteScheduler` (its training sigmas and timesteps, shift included); host "sd3" or
    "flux"; weighting: the timestep density and loss weighting scheme (logit_normal, mode, uniform: uniform loss
    weights; sigma_sqrt, cosmap: uniform timesteps, weighted loss; "none": both uniform); guidance: FLUX's guidance
    embedding input (used when the transformer has `guidance_embeds`).
    """

    MAX_DRAWS = 10_000     # rounds of rejection before a stage is declared unreachable

    def __init__(self, host: str, scheduler=None, weighting: str = "logit_normal", logit_mean: float = 0.0,
                 logit_std: float = 1.0, mode_scale: float = 1.29, guidance: float = 3.5):
        if host not in ("sd3", "flux"):
            raise ValueError(f"host must be 'sd3' or 'flux', got {host!r}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        if scheduler is None:
            from diffusers import FlowMatchEulerDiscreteScheduler
            scheduler = FlowMatchEulerDiscreteScheduler()
        self.name = host
        self.scheduler = scheduler
        self.timesteps = scheduler.timesteps.float().cpu()              # σ·1000, descending
        self.sigmas = scheduler.sigmas.float().cpu()[:len(self.timesteps)]
        self.weighting, self.logit_mean, self.logit_std = weighting, logit_mean, logit_std
        self.mode_scale, self.guidance = mode_scale, guidance

    def draw(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """n indices into the scheduler's timesteps from the training density."""
        from diffusers.training_utils import compute_density_for_timestep_sampling
        u = compute_density_for_timestep_sampling(self.weighting, n, logit_mean=self.logit_mean,
                                                  logit_std=self.logit_std, mode_scale=self.mode_scale,
                                                  generator=generator)
        return (u * len(self.timesteps)).long().clamp(0, len(self.timesteps) - 1)

    def model_timestep(self, index: torch.Tensor) -> torch.Tensor:
        """The timestep the transformer receives: σ·1000 (SD3) or σ (FLUX)."""
        t = self.timesteps[index.cpu()]
        return t / 1000 if self.name == "flux" else t

    def stage_of(self, index: torch.Tensor, schedule: DensitySchedule) -> torch.Tensor:
        """The density stage a patched host picks for these indices: σ·1000 as it computes it from its input."""
        from .mmdit import HOSTS as MMDIT
        return schedule.stage(MMDIT[self.name].schedule_time(self.model_timestep(index), schedule).long())

    def sample_timesteps(self, batch_size, schedule, generator):
        first = self.draw(1 if schedule is not None else batch_size, generator)
        if schedule is None:
            return 0, first
        stage = int(self.stage_of(first, schedule)[0])
        kept, n = [first], 1
        for _ in range(self.MAX_DRAWS):
            if n >= batch_size:
                return stage, torch.cat(kept)[:batch_size]
            idx = self.draw(4 * batch_size, generator)
            idx = idx[self.stage_of(idx, schedule) == stage]
            kept.append(idx)
            n += len(idx)
        raise RuntimeError(f"stage {stage} of {schedule} is too rare under the {self.weighting} density")

    def model_inputs(self, model, batch, x_t, index) -> dict:
        """The transformer's keyword arguments for x_t (B, C, H, W) at scheduler indices `index` (FLUX: x_t packed
        into tokens (B, H/2·W/2, 4C), with their ids and the guidance scale)."""
        b = x_t.shape[0]
        kwargs = dict(encoder_hidden_states=batch["encoder_hidden_states"],
                      pooled_projections=batch["pooled_projections"], timestep=self.model_timestep(index).to(x_t.device),
                      return_dict=False)
        if self.name == "sd3":
            return dict(kwargs, hidden_states=x_t)
        from diffusers import FluxPipeline
        c, h, w = x_t.shape[1:]
        if getattr(_unwrap(model).config, "guidance_embeds", False):
            kwargs["guidance"] = torch.full((b,), float(self.guidance), device=x_t.device)
        return dict(kwargs, hidden_states=FluxPipeline._pack_latents(x_t, b, c, h, w),
                    img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x_t.device, x_t.dtype),
                    txt_ids=torch.zeros(batch["encoder_hidden_states"].shape[1], 3, device=x_t.device,
                                        dtype=x_t.dtype))

    def forward(self, model, batch, x_t, index):
        """The prediction for x_t, in the transformer's layout (FLUX: packed tokens)."""
        return model(**self.model_inputs(model, batch, x_t, index))[0]

    def losses(self, model, batch, t, noise, grid=None):
        from diffusers.training_utils import compute_loss_weighting_for_sd3
        x = batch["latents"]
        shape = (-1,) + (1,) * (x.dim() - 1)
        sigma = self.sigmas[t.cpu()].to(x.device, x.dtype).view(shape)
        x_t = (1.0 - sigma) * x + sigma * noise
        target = noise - x
        if self.name == "flux":                                      # the loss in the token layout
            from diffusers import FluxPipeline
            target = FluxPipeline._pack_latents(target, *target.shape)
            sigma = sigma.view(-1, 1, 1)
        pred = self.forward(model, batch, x_t, t).float()
        weight = compute_loss_weighting_for_sd3(self.weighting, sigma.float())
        mse = (weight * (pred - target.float()) ** 2).reshape(len(x), -1).mean(1)
        return {"loss": mse, "mse": mse}


def make_objective(host: str, scheduler=None, **flow_options) -> Objective:
    """The objective of a host name of `HOSTS`; `flow_options` go to `FlowMatchingObjective`."""
    if host == "dit":
        return DiffusionObjective()
    if host == "pixart":
        return PixArtObjective()
    if host in ("sd3", "flux"):
        return FlowMatchingObjective(host, scheduler, **flow_options)
    raise ValueError(f"host must be one of {HOSTS}, got {host!r}")
