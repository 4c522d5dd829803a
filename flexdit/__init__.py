"""FlexDiT: dynamic token density for Diffusion Transformers."""

# --- pipeline (issue 6): density schedule, diffusion, sampling and fine-tuning --------------------------------------
from . import diffusion
from .schedule import DensitySchedule
from .diffusion import GaussianDiffusion, create_diffusion, sample_latents
