"""Class-conditional video FlexDiT: diffusers' Latte patched by `apply_patch`, with one learned caption per class.

The paper fine-tunes class-conditional Latte models (UCF101, ...). diffusers' `LatteTransformer3DModel` is
text-conditioned, so `FlexLatte` gives each class (and the null class of classifier-free guidance) a learned caption
of `caption_len` tokens that the model cross-attends to. The FlexDiT layers are the patch's (one router, no copy of
the layer math); a spatial/temporal block pair is one layer of the plan. `flexdit-finetune --model FlexLatte` trains
it on video latent shards of shape (n, T, C, H, W). Needs diffusers.
"""
import dataclasses
from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch
import torch.nn as nn

from .models import _DiTShell
from .plan import GridLike, Plan
from .patch import apply_patch
from .sizes import ModelArgs

LATTE_XL = ModelArgs.from_name("Latte-XL/2").diffusers_config()   # the default transformer (Latte-1's)


@dataclass
class FlexLatteConfig:
    """The diffusers `LatteTransformer3DModel` config (`transformer`), the classes and the FlexDiT plan."""

    transformer: dict = field(default_factory=lambda: dict(LATTE_XL))
    num_classes: int = 101
    caption_len: int = 1
    class_dropout_prob: float = 0.1
    input_size: Optional[int] = None     # latent side; replaces transformer["sample_size"] when given
    plan: Optional[Plan] = None

    def __post_init__(self):
        self.transformer = {**LATTE_XL, **self.transformer}
        if self.input_size is not None:
            self.transformer["sample_size"] = int(self.input_size)
        self.input_size = self.transformer["sample_size"]
        for name in ("num_classes", "caption_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        self.plan = Plan.coerce(self.plan, self.depth, self.token_grid)

    @property
    def depth(self) -> int:
        return self.transformer["num_layers"]

    @property
    def frames(self) -> int:
        return self.transformer["video_length"]

    @property
    def token_grid(self) -> Tuple[int, int]:
        side = self.transformer["sample_size"] // self.transformer["patch_size"]
        return side, side

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "FlexLatteConfig":
        return cls(**d)


class FlexLatte(nn.Module):
    """A patched Latte with class captions: forward(x (B, C, T, H, W), t (B,), y (B,), grid) -> (B, C_out, T, H, W)."""

    def __init__(self, config: FlexLatteConfig, transformer: Optional[nn.Module] = None):
        super().__init__()
        import diffusers
        self.config = config
        if transformer is None:
            transformer = diffusers.LatteTransformer3DModel(**config.transformer)
        self.transformer = apply_patch(transformer, config.plan, keep_original=False)   # never unpatched
        width = config.transformer["caption_channels"]
        self.class_captions = nn.Parameter(torch.randn(config.num_classes + 1, config.caption_len, width) * 0.02)
        self.in_channels = config.transformer["in_channels"]
        self.input_size = (config.input_size, config.input_size)
        self.token_grid = config.token_grid
        self.frames = config.frames

    # classifier-free guidance as DiT's: eps channels are dim 1 of (B, C, T, H, W) as of (B, C, H, W)
    forward_with_cfg = _DiTShell.forward_with_cfg

    def forward(self, x, t, y, grid: Optional[GridLike] = None):
        """x: (B, C, T, H, W) latents, t: (B,) timesteps, y: (B,) labels (num_classes: the null class), grid: the
        sparse grid of this call (default: the plan's)."""
        if x.dim() != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must be (B, {self.in_channels}, T, H, W), got {tuple(x.shape)}")
        if self.training and self.config.class_dropout_prob > 0:   # label dropout for classifier-free guidance
            drop = torch.rand(y.shape[0], device=y.device) < self.config.class_dropout_prob
            y = torch.where(drop, self.config.num_classes, y)
        return self.transformer(x, timestep=t, encoder_hidden_states=self.class_captions[y], return_dict=False,
                                grid=grid)[0]
