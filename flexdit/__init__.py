"""FlexDiT: Diffusion Transformers with dynamic token density (arXiv 2412.06028)."""
from . import diffusion
from .checkpoint import (check_state_dict, load_dit_checkpoint, load_flexdit, load_model, load_state_dict_strict,
                         model_config, read_checkpoint, save_flexdit)
from .convert import from_dit, map_dense_state_dict
from .diffusers_convert import (dit_from_diffusers, dit_state_dict_from_diffusers, pixart_state_dict_from_diffusers,
                                use_diffusers_timesteps_)
from .diffusion import GaussianDiffusion, create_diffusion, sample_latents
from .flops import MacCount, count_macs, count_ops  # fvcore is imported only when counting MACs
from .models import DiT, DiT_models, FlexDiT, FlexDiT_models, FlexDiTConfig, create_model, flexdit_config
from .patch import FlexPatch, apply_patch, is_patched, remove_patch, set_checkpointing
from .plan import Plan, parse_grid
from .router import FlexLayer, RouteState
from .save import load_patched, save_patched
from .schedule import DensitySchedule
from .sizes import ModelArgs
from .video import FlexLatte, FlexLatteConfig

__version__ = "0.1.0"

__all__ = [
    # models, conversion, checkpoints
    "DiT", "FlexDiT", "FlexDiTConfig", "DiT_models", "FlexDiT_models", "ModelArgs", "create_model", "flexdit_config",
    "from_dit", "map_dense_state_dict", "load_model", "model_config", "load_dit_checkpoint", "load_flexdit",
    "save_flexdit", "read_checkpoint",
    "load_state_dict_strict", "check_state_dict",
    # density schedule, diffusion, sampling
    "DensitySchedule", "diffusion", "GaussianDiffusion", "create_diffusion", "sample_latents",
    # patching models in place; diffusers conversions
    "Plan", "parse_grid", "FlexLayer", "RouteState",
    "apply_patch", "remove_patch", "is_patched", "FlexPatch", "set_checkpointing", "save_patched", "load_patched",
    "dit_from_diffusers", "dit_state_dict_from_diffusers", "use_diffusers_timesteps_",
    "FlexLatte", "FlexLatteConfig",
    "pixart_state_dict_from_diffusers",
    # FLOP accounting
    "count_macs", "count_ops", "MacCount",
]
