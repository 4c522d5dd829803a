"""FlexDiT: Diffusion Transformers with dynamic token density (arXiv 2412.06028)."""
from .checkpoint import check_state_dict, load_dit_checkpoint, load_flexdit, load_state_dict_strict, save_flexdit
from .convert import from_dit, map_dense_state_dict
from .models import (DiT, DiT_models, FlexDiT, FlexDiT_models, FlexDiTConfig, create_model, flexdit_config)

__version__ = "0.1.0"

__all__ = [
    "DiT", "FlexDiT", "FlexDiTConfig", "DiT_models", "FlexDiT_models", "create_model", "flexdit_config",
    "from_dit", "map_dense_state_dict", "load_dit_checkpoint", "load_flexdit", "save_flexdit",
    "load_state_dict_strict", "check_state_dict",
]

# --- pipeline (issue 6): density schedule, diffusion, sampling and fine-tuning --------------------------------------
from . import diffusion  # noqa: E402
from .diffusion import GaussianDiffusion, create_diffusion, sample_latents  # noqa: E402
from .schedule import DensitySchedule  # noqa: E402

__all__ += ["diffusion", "DensitySchedule", "GaussianDiffusion", "create_diffusion", "sample_latents"]
