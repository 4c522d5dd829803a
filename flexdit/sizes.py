"""One table of named model sizes over every host (gpt-fast's `ModelArgs`): `ModelArgs.from_name("DiT-XL/2")`.

A row names a size (depth, width, heads, patch) and the host that builds it: "dit" (the project's `DiT` / `FlexDiT`,
and diffusers' `DiTTransformer2DModel` at the same size), "pixart-alpha", "latte", "flux" or "sd3" (diffusers). The
diffusers configuration of a row is `diffusers_config()`; the registries `DiT_models`, `FlexDiT_models`,
`flexdit.video.LATTE_XL` and `flexdit.mmdit.MMDIT_SIZES` are read off this table.
"""
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

HOSTS = ("dit", "pixart-alpha", "latte", "flux", "sd3")


@dataclass(frozen=True)
class ModelArgs:
    """A named size on its host. `config`: the host's own constructor fields beyond the size (diffusers)."""

    name: str
    host: str
    depth: int
    hidden_size: int
    num_heads: int
    patch_size: int = 2
    config: Tuple[Tuple[str, Any], ...] = field(default=(), repr=False)
    text_tokens: Optional[int] = None   # MMDiT hosts: text tokens of one forward (the bench inputs)

    @classmethod
    def from_name(cls, name: str) -> "ModelArgs":
        """The row of `name` ("DiT-XL/2", "FlexDiT-XL/2": the same size, "PixArt-XL/2", "Latte-XL/2", "FLUX.1-dev",
        "SD3.5-medium", "SD3.5-large"); ValueError naming the known ones otherwise."""
        key = name[len("Flex"):] if isinstance(name, str) and name.startswith("FlexDiT-") else name
        if key not in SIZES:
            raise ValueError(f"unknown model name {name!r}; known: {', '.join(sorted(SIZES))}")
        return SIZES[key]

    def dit_kwargs(self) -> Dict[str, Any]:
        """The size as the project's DiT / FlexDiT constructor fields."""
        return dict(patch_size=self.patch_size, depth=self.depth, hidden_size=self.hidden_size,
                    num_heads=self.num_heads)

    def diffusers_config(self) -> Dict[str, Any]:
        """The diffusers constructor fields of this size (the MMDiT rows hold theirs whole: FLUX.1-dev is diffusers'
        default `FluxTransformer2DModel` with the guidance embedding)."""
        if self.host in ("flux", "sd3"):
            return dict(self.config)
        return dict(num_attention_heads=self.num_heads, attention_head_dim=self.hidden_size // self.num_heads,
                    in_channels=4, out_channels=8, num_layers=self.depth, **dict(self.config))


def _dit(size: str, depth: int, hidden: int, heads: int):
    return {f"DiT-{size}/{p}": ModelArgs(f"DiT-{size}/{p}", "dit", depth, hidden, heads, p) for p in (2, 4, 8)}


# Latte-XL/2 is Latte-1's transformer: 28 spatial/temporal pairs of 16 heads x 72.
SIZES: Dict[str, ModelArgs] = {
    **_dit("S", 12, 384, 6), **_dit("B", 12, 768, 12), **_dit("L", 24, 1024, 16), **_dit("XL", 28, 1152, 16),
    "PixArt-XL/2": ModelArgs("PixArt-XL/2", "pixart-alpha", 28, 1152, 16, 2, (
        ("cross_attention_dim", 1152), ("caption_channels", 4096))),
    "Latte-XL/2": ModelArgs("Latte-XL/2", "latte", 28, 1152, 16, 2, (
        ("cross_attention_dim", 1152), ("caption_channels", 4096), ("sample_size", 32), ("patch_size", 2),
        ("norm_type", "ada_norm_single"), ("activation_fn", "gelu-approximate"), ("attention_bias", True),
        ("num_embeds_ada_norm", 1000), ("norm_elementwise_affine", False), ("norm_eps", 1e-6),
        ("video_length", 16))),
    # FLUX.1-dev: 19 double- + 38 single-stream blocks, 512 T5 tokens; SD3.5: 77 CLIP + 256 T5 tokens.
    "FLUX.1-dev": ModelArgs("FLUX.1-dev", "flux", 57, 3072, 24, 1, (("guidance_embeds", True),), 512),
    "SD3.5-medium": ModelArgs("SD3.5-medium", "sd3", 24, 1536, 24, 2, (
        ("sample_size", 128), ("patch_size", 2), ("in_channels", 16), ("num_layers", 24), ("attention_head_dim", 64),
        ("num_attention_heads", 24), ("joint_attention_dim", 4096), ("caption_projection_dim", 1536),
        ("pooled_projection_dim", 2048), ("out_channels", 16), ("pos_embed_max_size", 384),
        ("dual_attention_layers", tuple(range(13))), ("qk_norm", "rms_norm")), 333),
    "SD3.5-large": ModelArgs("SD3.5-large", "sd3", 38, 2432, 38, 2, (
        ("sample_size", 128), ("patch_size", 2), ("in_channels", 16), ("num_layers", 38), ("attention_head_dim", 64),
        ("num_attention_heads", 38), ("joint_attention_dim", 4096), ("caption_projection_dim", 2432),
        ("pooled_projection_dim", 2048), ("out_channels", 16), ("pos_embed_max_size", 192),
        ("qk_norm", "rms_norm")), 333),
}


def names(host: str):
    """The size names a host builds, in table order."""
    if host not in HOSTS:
        raise ValueError(f"host must be one of {HOSTS}, got {host!r}")
    return [name for name, args in SIZES.items() if args.host == host]
