"""Gaussian diffusion as DiT trains and samples it: 1000-step linear β, ε-prediction with learned variance, DDPM
over any respacing and DDIM, classifier-free guidance, the temporal density schedule, and CUDA-graph sampling.

Timesteps come in two kinds. A *spaced index* i in [0, num_steps) indexes this object's (respaced) chain; the
*original timestep* timestep_map[i] in [0, 1000) is what the network is conditioned on and what the density
schedule is queried with. Without respacing the two coincide.
"""
from __future__ import annotations

import contextlib
import gc
import math
import time
from collections import Counter
from typing import Callable, Iterable, Sequence

import torch

from flexdit_kernels._dispatch import autocast_dtype

from .schedule import DensitySchedule

__all__ = [
    "GaussianDiffusion", "create_diffusion", "linear_betas", "space_timesteps", "guided_model_fn", "sample_latents",
    "normal_kl", "discretized_gaussian_log_likelihood", "model_num_classes", "CudaGraphDenoiser", "grid_steps",
    "check_timesteps", "check_labels",
]

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------------------------------------------------------
# Schedules and respacing
# ---------------------------------------------------------------------------------------------------------------

def linear_betas(num_timesteps: int = 1000) -> torch.Tensor:
    """DiT's β schedule: linear from 1e-4 to 0.02 at 1000 steps (the ends scale by 1000/T otherwise), float64."""
    scale = 1000.0 / num_timesteps
    return torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64)


def space_timesteps(num_timesteps: int, section_counts) -> list[int]:
    """ADM's respacing rule: the original timesteps kept when sampling with fewer steps, ascending.

    section_counts: an int or "250" (one section), "10,15,20" (the range split in equal sections, each strided
    evenly with its own count, ends included), or "ddimN" (a fixed integer stride giving exactly N steps from 0).
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            wanted = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == wanted:
                    return list(range(0, num_timesteps, stride))
            raise ValueError(f"section_counts {section_counts!r}: no integer stride gives {wanted} steps "
                             f"out of {num_timesteps}")
        section_counts = [int(c) for c in section_counts.split(",")]
    elif isinstance(section_counts, int):
        section_counts = [section_counts]
    n_sections = len(section_counts)
    base, extra = divmod(num_timesteps, n_sections)
    kept: list[int] = []
    start = 0
    for i, count in enumerate(section_counts):
        size = base + (1 if i < extra else 0)
        if not 1 <= count <= size:
            raise ValueError(f"section_counts: cannot take {count} steps from a section of {size}")
        stride = 1.0 if count == 1 else (size - 1) / (count - 1)
        kept.extend(start + round(j * stride) for j in range(count))
        start += size
    return sorted(set(kept))


# ---------------------------------------------------------------------------------------------------------------
# Argument checks shared by the models and the samplers
# ---------------------------------------------------------------------------------------------------------------

def check_timesteps(t, batch: int, num_timesteps: int = 1000, name: str = "t") -> torch.Tensor:
    """t as a (batch,) tensor: a Python int (or a 0-d tensor) is broadcast to the batch. ValueError naming `name`
    for another type or shape, and, for tensors on the CPU, for values outside [0, num_timesteps) or not whole
    numbers (a GPU tensor's values are not read here, nor under torch.compile: that would synchronise every
    forward, or break the graph)."""
    if isinstance(t, bool) or not isinstance(t, (int, torch.Tensor)):
        raise ValueError(f"{name} must be a tensor of timesteps (or an int), got {type(t).__name__}")
    if isinstance(t, int):
        t = torch.tensor(t)
    if t.dtype == torch.bool or t.is_complex():
        raise ValueError(f"{name} must hold integer timesteps, got dtype {t.dtype}")
    if t.dim() == 0:
        t = t.expand(batch)
    if tuple(t.shape) != (batch,):
        raise ValueError(f"{name} {tuple(t.shape)} must be ({batch},) (one timestep per sample) or a scalar")
    if t.device.type == "cpu" and t.numel() and not torch.compiler.is_compiling():
        values = t.tolist()        # read in Python: no tensor op joins the forward's
        lo, hi = min(values), max(values)
        if lo < 0 or hi >= num_timesteps:
            raise ValueError(f"{name} must lie in [0, {num_timesteps}), got values in [{lo}, {hi}]")
        if any(v != int(v) for v in values):
            raise ValueError(f"{name} must hold whole timesteps in [0, {num_timesteps}), got {values[:4]}")
    return t


def check_labels(y, batch: int, num_classes: int, name: str = "y", null: bool = True) -> torch.Tensor:
    """y as a (batch,) integer tensor of labels in [0, num_classes) (or num_classes, the null label of guidance,
    when `null`). ValueError naming `name`; values are read for CPU tensors only, as in `check_timesteps`."""
    if not isinstance(y, torch.Tensor) or y.dtype.is_floating_point or y.dtype == torch.bool or y.is_complex():
        raise ValueError(f"{name} must be an integer tensor of class labels, got "
                         f"{y.dtype if isinstance(y, torch.Tensor) else type(y).__name__}")
    if tuple(y.shape) != (batch,):
        raise ValueError(f"{name} {tuple(y.shape)} must be ({batch},) (one label per sample)")
    top = num_classes + 1 if null else num_classes
    bad = [v for v in y.tolist() if not 0 <= v < top] \
        if y.device.type == "cpu" and not torch.compiler.is_compiling() else []
    if bad:
        raise ValueError(f"{name}: label {bad[0]} is outside [0, {num_classes})"
                         + (f" (and not the null label {num_classes})" if null else ""))
    return y


# ---------------------------------------------------------------------------------------------------------------
# Log-likelihood helpers
# ---------------------------------------------------------------------------------------------------------------

def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_standard_normal_cdf(x):
    # the tanh approximation of Φ that ADM's decoder likelihood uses
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log P(x) of data in [-1, 1] quantised to 256 bins under N(means, e^(2·log_scales)), elementwise, nats."""
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_minus = _approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_minus = torch.log((1.0 - cdf_minus).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_minus).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_minus, log_delta))


def _mean_flat(x):
    return x.mean(dim=tuple(range(1, x.ndim)))


def _randn(shape, generator, device, dtype=torch.float32):
    """Gaussian noise drawn on the CPU (so a seed gives the same numbers on every device), then moved.

    generator: None (global RNG), one torch.Generator, or a list of one per sample (per-sample seeds make a sample
    independent of how samples are split into batches and ranks).
    """
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"generator: got {len(generator)} generators for a batch of {shape[0]}")
        noise = torch.stack([torch.randn(shape[1:], generator=g, device=g.device) for g in generator])
    else:
        gen_device = generator.device if generator is not None else "cpu"
        noise = torch.randn(shape, generator=generator, device=gen_device)
    return noise.to(device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------------------------
# The diffusion process
# ---------------------------------------------------------------------------------------------------------------

class GaussianDiffusion:
    """ε-prediction diffusion with learned-range variance, on a chain respaced to `use_timesteps` (or all steps).

    Every array is indexed by the spaced index; `timestep_map[i]` is the original timestep of spaced index i.
    """

    def __init__(self, betas: torch.Tensor | None = None, use_timesteps: Iterable[int] | None = None):
        base_betas = linear_betas(1000) if betas is None else torch.as_tensor(betas, dtype=torch.float64)
        self.original_num_timesteps = len(base_betas)
        base_acp = torch.cumprod(1.0 - base_betas, dim=0)
        if use_timesteps is None:
            kept = list(range(len(base_betas)))
        else:
            kept = sorted(set(int(t) for t in use_timesteps))
            if not kept or kept[0] < 0 or kept[-1] >= len(base_betas):
                raise ValueError(f"use_timesteps must be non-empty and inside [0, {len(base_betas)})")
        # respaced chain: ᾱ at the kept steps is unchanged; β_i = 1 − ᾱ_i / ᾱ_{i-1}
        acp_kept = base_acp[kept]
        prev = torch.cat([torch.ones(1, dtype=torch.float64), acp_kept[:-1]])
        betas = 1.0 - acp_kept / prev
        self.timestep_map = torch.tensor(kept, dtype=torch.long)
        self.betas = betas
        self.num_timesteps = len(betas)

        alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(alphas, dim=0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / self.alphas_cumprod).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / self.alphas_cumprod - 1.0).sqrt()
        # q(x_{t-1} | x_t, x_0)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # the variance is 0 at t = 0: clip its log to the next value (as ADM)
        if self.num_timesteps > 1:
            clipped = torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]])
        else:
            clipped = betas.clone()
        self.posterior_log_variance_clipped = clipped.log()
        self.posterior_mean_coef1 = betas * self.alphas_cumprod_prev.sqrt() / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * alphas.sqrt() / (1.0 - self.alphas_cumprod)
        self.log_betas = betas.log()

    @staticmethod
    def _at(arr: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """arr[t] as x's dtype and device, broadcastable against x: (B, 1, 1, 1)."""
        return arr.to(t.device)[t].to(x.dtype).view(-1, *([1] * (x.ndim - 1)))

    def original_timestep(self, t: torch.Tensor) -> torch.Tensor:
        """The original timestep (what the network and the density schedule see) of spaced indices t."""
        return self.timestep_map.to(t.device)[t]

    # --- forward process ------------------------------------------------------------------------------------------

    def q_sample(self, x_start, t, noise):
        """x_t = √ᾱ_t·x_0 + √(1 − ᾱ_t)·ε."""
        return self._at(self.sqrt_alphas_cumprod, t, x_start) * x_start + \
            self._at(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise

    def q_posterior(self, x_start, x_t, t):
        """Mean and log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = self._at(self.posterior_mean_coef1, t, x_t) * x_start + self._at(self.posterior_mean_coef2, t, x_t) * x_t
        return mean, self._at(self.posterior_log_variance_clipped, t, x_t)

    # --- reverse process ------------------------------------------------------------------------------------------

    def p_mean_variance(self, model_output, x, t, clip_denoised: bool = False):
        """From the network output (B, 2C, ...) = [ε, v]: mean, log-variance of p(x_{t-1} | x_t), predicted x_0.

        Learned range: log σ² = f·log β_t + (1 − f)·log β̃_t with f = (v + 1)/2.
        """
        c = x.shape[1]
        if model_output.shape[1] != 2 * c:
            raise ValueError(f"model_output must have 2x{c} channels (eps and variance), got {model_output.shape[1]}")
        eps, v = model_output[:, :c], model_output[:, c:]
        min_log = self._at(self.posterior_log_variance_clipped, t, x)
        max_log = self._at(self.log_betas, t, x)
        frac = (v + 1.0) / 2.0
        log_var = frac * max_log + (1.0 - frac) * min_log
        x0 = self._at(self.sqrt_recip_alphas_cumprod, t, x) * x - self._at(self.sqrt_recipm1_alphas_cumprod, t, x) * eps
        if clip_denoised:
            x0 = x0.clamp(-1.0, 1.0)
        mean, _ = self.q_posterior(x0, x, t)
        return mean, log_var, x0

    def _eps_from_x0(self, x_t, t, x0):
        return (self._at(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - x0) / \
            self._at(self.sqrt_recipm1_alphas_cumprod, t, x_t)

    # --- training -------------------------------------------------------------------------------------------------

    def vb_terms(self, model_output, x_start, x_t, t):
        """Variational-bound term per sample, in bits: KL(q ‖ p) for t > 0, decoder NLL at t = 0."""
        true_mean, true_log_var = self.q_posterior(x_start, x_t, t)
        mean, log_var, _ = self.p_mean_variance(model_output, x_t, t)
        kl = _mean_flat(normal_kl(true_mean, true_log_var, mean, log_var)) / math.log(2.0)
        nll = -_mean_flat(discretized_gaussian_log_likelihood(x_start, mean, 0.5 * log_var)) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def training_losses(self, model_fn: ModelFn, x_start, t, noise=None) -> dict[str, torch.Tensor]:
        """DiT's hybrid loss per sample: MSE(ε) + vb·T/1000, the vb term seeing the predicted ε detached.

        model_fn(x_t, original_t) → (B, 2C, ...); t are spaced indices (original timesteps without respacing).
        Returns {"loss", "mse", "vb"}, each (B,).
        """
        t = check_timesteps(t, x_start.shape[0], self.num_timesteps)
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise)
        out = model_fn(x_t, self.original_timestep(t)).float()
        c = x_start.shape[1]
        if out.shape[1] != 2 * c:
            raise ValueError(f"the model must predict eps and variance ({2 * c} channels), got {out.shape[1]}")
        eps = out[:, :c]
        mse = _mean_flat((noise - eps) ** 2)
        # the vb term trains only the variance: the mean (through ε) is learned by the MSE alone
        frozen = torch.cat([eps.detach(), out[:, c:]], dim=1)
        vb = self.vb_terms(frozen, x_start, x_t, t) * (self.num_timesteps / 1000.0)
        return {"loss": mse + vb, "mse": mse, "vb": vb}

    # --- sampling -------------------------------------------------------------------------------------------------

    def _steps(self, progress: bool):
        steps = list(range(self.num_timesteps))[::-1]
        if progress:
            try:
                from tqdm.auto import tqdm
                return tqdm(steps, desc="sampling", leave=False)
            except ImportError:
                pass
        return steps

    def _denoise(self, model_fn: ModelFn, x: torch.Tensor, progress: bool, clip_denoised: bool, step) -> torch.Tensor:
        """The reverse chain: at every step i the model's prediction on (x, original timestep), then
        x = step(i, t, x, (mean, log_var, x0))."""
        for i in self._steps(progress):
            t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            out = model_fn(x, self.original_timestep(t)).float()
            x = step(i, t, x, self.p_mean_variance(out, x, t, clip_denoised=clip_denoised))
        return x

    @torch.no_grad()
    def p_sample_loop(self, model_fn: ModelFn, noise: torch.Tensor, generator=None, progress: bool = False,
                      clip_denoised: bool = False) -> torch.Tensor:
        """Ancestral (DDPM) sampling from x_T = noise down to x_0, with the learned variance."""
        def step(i, t, x, pred):
            mean, log_var, _ = pred
            return mean + torch.exp(0.5 * log_var) * _randn(x.shape, generator, x.device, x.dtype) if i > 0 else mean

        return self._denoise(model_fn, noise, progress, clip_denoised, step)

    @torch.no_grad()
    def ddim_sample_loop(self, model_fn: ModelFn, noise: torch.Tensor, eta: float = 0.0, generator=None,
                         progress: bool = False, clip_denoised: bool = False) -> torch.Tensor:
        """DDIM sampling; η = 0 is deterministic given the starting noise, η = 1 matches DDPM's marginals."""
        def step(i, t, x, pred):
            x0 = pred[2]
            eps = self._eps_from_x0(x, t, x0)
            a_bar = self._at(self.alphas_cumprod, t, x)
            a_bar_prev = self._at(self.alphas_cumprod_prev, t, x)
            sigma = eta * ((1 - a_bar_prev) / (1 - a_bar)).sqrt() * (1 - a_bar / a_bar_prev).sqrt()
            x = x0 * a_bar_prev.sqrt() + (1 - a_bar_prev - sigma ** 2).clamp(min=0).sqrt() * eps
            if i > 0 and eta > 0:
                x = x + sigma * _randn(x.shape, generator, x.device, x.dtype)
            return x

        return self._denoise(model_fn, noise, progress, clip_denoised, step)


def create_diffusion(timestep_respacing=None, num_timesteps: int = 1000) -> GaussianDiffusion:
    """DiT's diffusion. timestep_respacing: None / "" (all steps, for training), an int or "250", or "ddimN"."""
    betas = linear_betas(num_timesteps)
    if timestep_respacing in (None, ""):
        return GaussianDiffusion(betas)
    return GaussianDiffusion(betas, use_timesteps=space_timesteps(num_timesteps, timestep_respacing))


# ---------------------------------------------------------------------------------------------------------------
# Guidance, density schedule, and the sampling entry point
# ---------------------------------------------------------------------------------------------------------------

def model_num_classes(model) -> int:
    """num_classes of a DiT / FlexDiT (also through torch.compile or DDP wrappers); the null label's index."""
    model = getattr(model, "module", model)
    cfg = getattr(model, "config", None)
    if cfg is not None and getattr(cfg, "num_classes", None) is not None:
        return int(cfg.num_classes)
    emb = getattr(model, "y_embedder", None)
    if emb is not None:
        if getattr(emb, "num_classes", None) is not None:
            return int(emb.num_classes)
        return int(emb.embedding_table.num_embeddings) - 1
    raise ValueError("null_class: cannot infer num_classes from the model; pass null_class")


def _guided_forward(model, x, t, y, y_null, cfg_scale: float, cfg_channels: int, use_cfg: bool, grid):
    """One network evaluation for the samplers: (B, ...) in, (B, 2C, ...) out; with guidance the batch [x; x] with
    labels [y; null] goes through `forward_with_cfg` and the first half comes back."""
    kwargs = {} if grid is None else {"grid": grid}
    if use_cfg:
        b = x.shape[0]
        out = model.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y_null]),
                                     cfg_scale, cfg_channels=cfg_channels, **kwargs)
        return out[:b]
    return model(x, t, y, **kwargs)


def _grid_of(schedule: DensitySchedule | None, t: torch.Tensor):
    return None if schedule is None else schedule.grid(int(t[0]) if t.ndim else int(t))


def guided_model_fn(model, y: torch.Tensor, cfg_scale: float = 1.0, schedule: DensitySchedule | None = None,
                    null_class: int | None = None, cfg_channels: int = 3, use_cfg: bool | None = None) -> ModelFn:
    """Wrap a DiT / FlexDiT as model_fn(x, original_t) for the samplers.

    With a schedule, the grid (G_h, G_w) of the current ORIGINAL timestep is passed as `grid=` (a FlexDiT); without one,
    the model is called without a grid (a dense DiT, or a FlexDiT at its configured grid).
    Guidance follows DiT: the batch [x; x] with labels [y; null] goes through `forward_with_cfg`, which mixes
    the first `cfg_channels` channels; the first half is returned, so the sampler's state stays (B, ...).
    `use_cfg` defaults to cfg_scale != 1 (at scale 1 the guided ε equals the conditional one).
    """
    if use_cfg is None:
        use_cfg = cfg_scale != 1.0
    if null_class is None:
        null_class = model_num_classes(model)
    y_null = torch.full_like(y, null_class)

    def fn(x, t):
        return _guided_forward(model, x, t, y, y_null, cfg_scale, cfg_channels, use_cfg, _grid_of(schedule, t))

    return fn


def grid_steps(diffusion: GaussianDiffusion, schedule: DensitySchedule | None = None) -> dict:
    """{grid (G_h, G_w): number of sampling steps run at it} over the whole chain of `diffusion` (None: no schedule,
    every step at the model's own grid). The steps are the chain's original timesteps, as the samplers query."""
    if schedule is None:
        return {None: diffusion.num_timesteps}
    return dict(Counter(schedule.grid(int(t)) for t in diffusion.timestep_map))


# ---------------------------------------------------------------------------------------------------------------
# CUDA graphs
# ---------------------------------------------------------------------------------------------------------------

def with_linear_casts(module: torch.nn.Module, dtype: torch.dtype):
    """(call, casts): `call(*args, **kwargs)` runs `module` with the weight and bias of each of its nn.Linear layers
    replaced by a `dtype` copy made here, once (`torch.func.functional_call`); `casts` holds those copies by parameter
    name (parameters already in `dtype` are left as they are). Under autocast to `dtype` the result is autocast's
    own, without the per-forward weight casts: for a CUDA graph, whose capture runs with autocast's cache off, the
    replay then casts no weight. Whoever replays must keep `casts` alive, and the copies do not follow later changes
    of the weights. (A Linear weight shared with another kind of module would reach that module as the copy too.)"""
    if not isinstance(module, torch.nn.Module):
        raise ValueError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    copies: dict[int, torch.Tensor] = {}
    casts = {}
    for prefix, m in module.named_modules():
        if isinstance(m, torch.nn.Linear):
            for name, p in m.named_parameters(recurse=False):
                if p.dtype != dtype:
                    if id(p) not in copies:
                        copies[id(p)] = p.detach().to(dtype)
                    casts[f"{prefix}.{name}" if prefix else name] = copies[id(p)]

    def call(*args, **kwargs):
        return torch.func.functional_call(module, casts, args, kwargs)
    return call, casts


class _GuidedForward(torch.nn.Module):
    """`_guided_forward` of a model as a module, so that `with_linear_casts` can swap the model's parameters."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, *args):
        return _guided_forward(self.model, *args)


class _Graph:
    """One captured guided forward: static inputs (x, t, y), its output, and what the capture cost."""

    def __init__(self, graph, x, t, y, out, capture_s: float, memory_bytes: int):
        self.graph, self.x, self.t, self.y, self.out = graph, x, t, y, out
        self.capture_s, self.memory_bytes, self.replays = capture_s, memory_bytes, 0


class CudaGraphDenoiser:
    """The samplers' network evaluation replayed from CUDA graphs: one graph per (grid, batch) that a run meets.

    A graph is captured the first time its key (grid, latent shape and dtype, guidance settings, autocast
    dtype) is seen: the inputs are copied into static buffers, a few eager calls on a side stream warm up the
    allocator and the kernels' autotuning, then the guided forward (the doubled batch with guidance) is captured
    with autocast's weight cache off (its casts would live outside the graph's memory). Under autocast the denoiser
    holds an autocast-dtype copy of every nn.Linear weight and bias instead (`with_linear_casts`, made once per dtype),
    so a replay casts no weight. Each later call
    copies x, t, y into the buffers, replays, and returns a copy of the output. All graphs share one memory pool:
    they run one at a time and every output is copied out at once.

    Keep one object across batches and runs (flexdit-sample does) so each graph is captured once; `info()` says
    how many graphs exist, their capture time and the GPU memory they hold.

    Args:
        model: a DiT / FlexDiT on a CUDA device (eval mode; it must not change while graphs are held: call `reset()`
            after changing its weights).
        warmup: eager calls before each capture.
    """

    def __init__(self, model, warmup: int = 2):
        if not torch.cuda.is_available():
            raise ValueError("cuda_graph: CUDA graphs need a CUDA GPU (torch.cuda.is_available() is False)")
        param = next(iter(model.parameters()), None)
        if param is not None and param.device.type != "cuda":
            raise ValueError(f"cuda_graph: the model must be on a CUDA device, its parameters are on {param.device}")
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1, got {warmup}")
        self.model = model
        self._guided = _GuidedForward(model)
        self.warmup = int(warmup)
        self._graphs: dict[tuple, _Graph] = {}
        self._casts: dict[torch.dtype, tuple] = {}   # autocast dtype -> with_linear_casts(...) of the guided forward
        self._pool = None

    def model_fn(self, y: torch.Tensor, cfg_scale: float = 1.0, schedule: DensitySchedule | None = None,
                 null_class: int | None = None, cfg_channels: int = 3, use_cfg: bool | None = None) -> ModelFn:
        """`guided_model_fn`'s model_fn(x, original_t), running on graphs."""
        self._check_device(y)
        if use_cfg is None:
            use_cfg = cfg_scale != 1.0
        if null_class is None:
            null_class = model_num_classes(self.model)
        settings = (bool(use_cfg), float(cfg_scale), int(cfg_channels), int(null_class))

        def fn(x, t):
            grid = _grid_of(schedule, t)
            key = (grid, tuple(x.shape), x.dtype, str(x.device), *settings, autocast_dtype(x.device.type))
            g = self._graphs.get(key)
            if g is None:
                g = self._graphs[key] = self._capture(x, t, y, grid, settings)
            g.x.copy_(x)
            g.t.copy_(t)
            g.y.copy_(y)
            g.graph.replay()
            g.replays += 1
            return g.out.clone()

        return fn

    @staticmethod
    def _check_device(y: torch.Tensor) -> None:
        if y.device.type != "cuda":
            raise ValueError(f"cuda_graph: y must be on a CUDA device, got {y.device}")

    def _capture(self, x, t, y, grid, settings) -> _Graph:
        use_cfg, cfg_scale, cfg_channels, null_class = settings
        device = x.device
        dtype = autocast_dtype(device.type)
        guided = self._guided
        if dtype is not None:
            if dtype not in self._casts:
                self._casts[dtype] = with_linear_casts(self._guided, dtype)
            guided = self._casts[dtype][0]

        def forward(xs, ts, ys):
            with torch.no_grad(), (torch.autocast(device.type, dtype=dtype, cache_enabled=False) if dtype is not None
                                   else contextlib.nullcontext()):
                return guided(xs, ts, ys, torch.full_like(ys, null_class), cfg_scale, cfg_channels, use_cfg, grid)

        start = time.perf_counter()
        xs, ts, ys = x.clone(), t.clone(), y.clone()
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                forward(xs, ts, ys)
        torch.cuda.current_stream(device).wait_stream(side)
        torch.cuda.synchronize(device)
        gc.collect()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_reserved(device)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = forward(xs, ts, ys)
        torch.cuda.synchronize(device)
        memory = torch.cuda.memory_reserved(device) - before
        return _Graph(graph, xs, ts, ys, out, time.perf_counter() - start, max(0, memory))

    def info(self) -> dict:
        """{"graphs": [{"grid", "batch", "capture_s", "memory_bytes", "replays"}, ...], "num_graphs",
        "graph_memory_bytes" (growth of reserved GPU memory across the captures), "cast_memory_bytes" (the weight
        copies), "capture_s"}. The batch is the sampler's; with guidance the graph runs twice as many latents."""
        graphs = [{"grid": key[0], "batch": key[1][0], "capture_s": g.capture_s, "memory_bytes": g.memory_bytes,
                   "replays": g.replays} for key, g in self._graphs.items()]
        copies = {id(t): t for _, casts in self._casts.values() for t in casts.values()}.values()
        return {"graphs": graphs, "num_graphs": len(graphs),
                "graph_memory_bytes": sum(g["memory_bytes"] for g in graphs),
                "cast_memory_bytes": sum(t.numel() * t.element_size() for t in copies),
                "capture_s": sum(g["capture_s"] for g in graphs)}

    def reset(self) -> None:
        """Drop every graph, the weight copies and their memory (call after changing the model's weights or
        structure)."""
        self._graphs.clear()
        self._casts.clear()
        self._pool = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------------
# Sampling entry point
# ---------------------------------------------------------------------------------------------------------------

def _check_latent_shape(model, latent_shape) -> None:
    """latent_shape is (C, h, w), or (C, T, h, w) for a video model (one with `frames`), and fits the model."""
    model = getattr(model, "module", model)
    frames = getattr(model, "frames", None)
    shape = tuple(int(v) for v in latent_shape)
    want_dims = 4 if frames else 3
    if len(shape) != want_dims:
        layout = "(C, T, h, w) for a video model" if frames else "(C, h, w)"
        raise ValueError(f"latent_shape must be {layout}, got {shape}")
    channels, size = getattr(model, "in_channels", None), getattr(model, "input_size", None)
    if channels is not None and shape[0] != channels:
        raise ValueError(f"latent_shape {shape}: the model takes {channels} channels")
    if size is not None and tuple(shape[-2:]) != tuple(size):
        raise ValueError(f"latent_shape {shape}: the model was built for {tuple(size)} latents")


def sample_latents(model, diffusion: GaussianDiffusion, y: torch.Tensor, latent_shape: Sequence[int], *,
                   cfg_scale: float = 4.0, schedule: DensitySchedule | None = None, sampler: str = "ddpm",
                   eta: float = 0.0, generator=None, noise: torch.Tensor | None = None, cfg_channels: int = 3,
                   null_class: int | None = None, progress: bool = False,
                   cuda_graph: bool | CudaGraphDenoiser = False, return_info: bool = False):
    """Class-conditional latents (B, *latent_shape) for labels y (B,): latent_shape is (C, h, w), or (C, T, h, w)
    for a video model (`FlexLatte`, whose clips are (B, C, T, h, w)).

    generator: one torch.Generator, or a list of one per sample (then sample i depends only on its own seed).
    Noise is drawn on the CPU and moved to y's device.
    cuda_graph: True replays the network from CUDA graphs, one per (grid, batch) of the run (`CudaGraphDenoiser`);
        pass a `CudaGraphDenoiser` to keep its graphs across calls. ValueError without a CUDA GPU.
    return_info: return (latents, info) with info = {"steps", "grid_steps" ({grid: steps}), "cuda_graph"
        (`CudaGraphDenoiser.info()`, or None)}.
    """
    if sampler not in ("ddpm", "ddim"):
        raise ValueError(f"sampler must be 'ddpm' or 'ddim', got {sampler!r}")
    if not cfg_scale >= 0:
        raise ValueError(f"cfg_scale must be >= 0 (1: no guidance), got {cfg_scale}")
    if eta and sampler != "ddim":
        raise ValueError(f"eta is DDIM's; it needs sampler='ddim', got eta={eta} with sampler={sampler!r}")
    if not isinstance(y, torch.Tensor) or y.dim() != 1:
        raise ValueError(f"y must be a (B,) tensor of class labels, got "
                         f"{tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__}")
    check_labels(y, y.shape[0], model_num_classes(model) if null_class is None else null_class, null=False)
    _check_latent_shape(model, latent_shape)
    denoiser = None
    if isinstance(cuda_graph, CudaGraphDenoiser):
        denoiser = cuda_graph
    elif cuda_graph:
        denoiser = CudaGraphDenoiser(model)
    shape = (y.shape[0], *latent_shape)
    if noise is None:
        noise = _randn(shape, generator, y.device)
    if denoiser is not None:
        fn = denoiser.model_fn(y, cfg_scale, schedule=schedule, null_class=null_class, cfg_channels=cfg_channels)
    else:
        fn = guided_model_fn(model, y, cfg_scale, schedule=schedule, null_class=null_class,
                             cfg_channels=cfg_channels)
    if sampler == "ddpm":
        out = diffusion.p_sample_loop(fn, noise, generator=generator, progress=progress)
    else:
        out = diffusion.ddim_sample_loop(fn, noise, eta=eta, generator=generator, progress=progress)
    if not return_info:
        return out
    return out, {"steps": diffusion.num_timesteps, "grid_steps": grid_steps(diffusion, schedule),
                 "cuda_graph": denoiser.info() if denoiser is not None else None}
