"""PixArt-α (text-to-image DiT with adaLN-single and caption cross-attention) and its FlexDiT version.

Parameter names follow the original PixArt-α repository (`t_block`, `blocks.i.scale_shift_table`,
`blocks.i.cross_attn.q_linear` ...); `pixart_state_dict_from_diffusers` reads a diffusers `PixArtTransformer2DModel`.
In FlexPixArt every layer keeps its caption cross-attention, applied to whichever tokens it holds (sparse or dense).
"""
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import Mlp, PatchEmbed, SiLU, TimestepEmbedder, _1d_sincos, to_pair
from .models import BackboneConfig
from .plan import DECIDED_PLANS, GridLike, Plan, Slot, split_plan_fields
from .router import FlexLayer, RouteState, norm_modulate, set_fused


@dataclass
class PixArtConfig(BackboneConfig):
    """PixArt-α's size (latent input_size, caption_channels ...) plus FlexDiT's layer plan (used by FlexPixArt)."""

    caption_channels: int = 4096
    interpolation_scale: Optional[float] = None  # positions / scale; default max(latent side // 64, 1) as diffusers


def pixart_sincos(embed_dim, token_grid, interpolation_scale=1.0):
    """(h*w, embed_dim) sin-cos table of diffusers' PixArt: MAE layout on positions / interpolation_scale."""
    h, w = token_grid
    gw, gh = np.meshgrid(np.arange(w) / interpolation_scale, np.arange(h) / interpolation_scale)
    return np.concatenate([_1d_sincos(embed_dim // 2, gw.reshape(-1)), _1d_sincos(embed_dim // 2, gh.reshape(-1))],
                          axis=1)


#################################################################################
#                               PixArt-α layers                                 #
#################################################################################

class CaptionEmbedder(nn.Module):
    """Caption features (B, L, caption_channels) → tokens (B, L, C): fc1 → GELU(tanh) → fc2 (`y_proj`)."""

    def __init__(self, caption_channels, hidden_size):
        super().__init__()
        self.y_proj = nn.Module()
        self.y_proj.fc1 = nn.Linear(caption_channels, hidden_size)
        self.y_proj.act = nn.GELU(approximate="tanh")
        self.y_proj.fc2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, y):
        return self.y_proj.fc2(self.y_proj.act(self.y_proj.fc1(y)))


class TextCrossAttention(nn.Module):
    """Tokens attend to caption tokens (`q_linear`, `kv_linear`, `proj`); `bias` (B, L) masks padded captions."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, y, bias=None):
        b, n, c = x.shape
        q = self.q_linear(x).view(b, n, self.num_heads, -1).transpose(1, 2)               # (B, H, N, D)
        k, v = self.kv_linear(y).view(b, y.shape[1], 2, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        mask = None if bias is None else bias[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class PixArtBlock(FlexLayer):
    """A PixArt-α block (self-attention, caption cross-attention, MLP, adaLN-single), as any FlexDiT layer kind.

    In FlexPixArt every layer keeps its caption cross-attention, applied to whichever tokens it holds.
    """

    has_after_attention = True

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, use_kernel=False, slot: Slot = Slot("dense"),
                 state: Optional[RouteState] = None):
        super().__init__(slot, state)
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.build_attention(hidden_size, num_heads, use_kernel)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.cross_attn = TextCrossAttention(hidden_size, num_heads)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.scale_shift_table = nn.Parameter(torch.randn(6, hidden_size) / hidden_size ** 0.5)

    def forward(self, x, t0, text, bias=None):
        """x: (B, L, C), t0: (B, 6C) adaLN-single input, text: (B, L_text, C), bias: (B, L_text) or None."""
        return self.route(x, (t0, text, bias))

    def modulation(self, x, cond):
        """shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp, each (B, C)."""
        t0 = cond[0]
        return (self.scale_shift_table[None] + t0.reshape(len(t0), 6, -1)).unbind(1)

    def after_attention(self, x, cond):
        return x + self.cross_attn(x, cond[1], cond[2])


class PixArtFinalLayer(nn.Module):
    """LayerNorm, shift/scale from `scale_shift_table` + the timestep embedding, linear to patch pixels."""

    fused = False  # LayerNorm and modulation in one kernel (see `set_fused`)

    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size ** 0.5)

    def forward(self, x, t_emb):
        shift, scale = (self.scale_shift_table[None] + t_emb[:, None]).unbind(1)   # (B, C) each
        return self.linear(norm_modulate(self.norm_final, x, shift, scale, self.fused))


#################################################################################
#                                    Models                                     #
#################################################################################

class _PixArtShell(nn.Module):
    """Patch/caption/timestep embedders, final layer and unpatchify shared by PixArt and FlexPixArt."""

    def __init__(self, config: PixArtConfig):
        super().__init__()
        cfg = self.config = config
        c, p = cfg.hidden_size, cfg.patch_size
        self.out_channels = cfg.in_channels * 2 if cfg.learn_sigma else cfg.in_channels
        h, w = to_pair(cfg.input_size)
        if h % p or w % p or c % cfg.num_heads:
            raise ValueError(f"input_size {h}x{w} must be divisible by patch_size {p} and hidden_size {c} by "
                             f"num_heads {cfg.num_heads}")
        self.token_grid = (h // p, w // p)
        self.x_embedder = PatchEmbed(p, cfg.in_channels, c)
        self.register_buffer("pos_embed", None, persistent=False)
        self.reset_pos_embed()                                                   # (1, N, C), fixed
        self.t_embedder = TimestepEmbedder(c)
        self.t_block = nn.Sequential(SiLU(), nn.Linear(c, 6 * c))
        self.y_embedder = CaptionEmbedder(cfg.caption_channels, c)
        self.final_layer = PixArtFinalLayer(c, p, self.out_channels)

    def reset_pos_embed(self, device=None):
        """(Re)compute the fixed sin-cos table (it is not part of the state dict, as in diffusers)."""
        scale = self.config.interpolation_scale or max(to_pair(self.config.input_size)[0] // 64, 1)
        pos = torch.from_numpy(pixart_sincos(self.config.hidden_size, self.token_grid, scale))
        self.pos_embed = pos.to(device, torch.float32).unsqueeze(0)

    def initialize_weights(self):
        """PixArt-α's initialisation: xavier linears, zeroed caption-attention output and final linear."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        nn.init.normal_(self.t_block[1].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.cross_attn.proj.weight)
            if block.kind == "recover":
                block.reset_fusion()
        nn.init.zeros_(self.final_layer.linear.weight)

    def embed(self, x, t, y, mask):
        """x: (B, C_in, H, W), t: (B,), y: (B, L, caption_channels), mask: (B, L) 1 = keep or None."""
        h, w = self.token_grid
        p = self.config.patch_size
        if x.dim() != 4 or tuple(x.shape[1:]) != (self.config.in_channels, h * p, w * p):
            raise ValueError(f"x must be (B, {self.config.in_channels}, {h * p}, {w * p}), got {tuple(x.shape)}")
        if y.dim() != 3 or y.shape[0] != x.shape[0] or y.shape[2] != self.config.caption_channels:
            raise ValueError(f"y must be (B, L, {self.config.caption_channels}), got {tuple(y.shape)}")
        tokens = self.x_embedder(x)
        tokens = (self.pos_embed + tokens).to(tokens.dtype)  # (B, N, C), row-major as pos_embed (see DiT's embed)
        t_emb = self.t_embedder(t)                                               # (B, C)
        t0 = self.t_block(t_emb)                                                 # (B, 6C)
        text = self.y_embedder(y)                                                # (B, L, C)
        bias = None if mask is None else (1 - mask.to(tokens.dtype)) * -10000.0   # diffusers' masking convention
        return tokens, t_emb, t0, text, bias

    def unpatchify(self, x):
        """x: (B, N, p*p*c) → (B, c, H, W)."""
        c, p = self.out_channels, self.config.patch_size
        h, w = self.token_grid
        x = torch.einsum("nhwpqc->nchpwq", x.reshape(x.shape[0], h, w, p, p, c))
        return x.reshape(x.shape[0], c, h * p, w * p)


class PixArt(_PixArtShell):
    """Dense PixArt-α (depth 28, hidden 1152, 16 heads for PixArt-XL/2)."""

    def __init__(self, config: PixArtConfig):
        super().__init__(config)
        self.blocks = nn.ModuleList([PixArtBlock(config.hidden_size, config.num_heads, config.mlp_ratio)
                                     for _ in range(config.depth)])
        self.initialize_weights()

    def forward(self, x, t, y, mask=None):
        """x: (B, C_in, H, W) latents, t: (B,), y: (B, L, caption_channels) T5 features, mask: (B, L) or None
        → (B, out_channels, H, W)."""
        x, t_emb, t0, text, bias = self.embed(x, t, y, mask)   # (B, N, C)
        for block in self.blocks:
            x = block(x, t0, text, bias)
        return self.unpatchify(self.final_layer(x, t_emb))


class FlexPixArt(_PixArtShell):
    """PixArt-α with Poolingformers, Sparse-Dense Token Modules and dense top blocks; caption attention everywhere."""

    def __init__(self, config: PixArtConfig):
        super().__init__(config)
        self.kinds = config.layer_kinds()
        self.route_state = RouteState()
        self.blocks = nn.ModuleList([PixArtBlock(config.hidden_size, config.num_heads, config.mlp_ratio,
                                                 use_kernel=True, slot=slot, state=self.route_state)
                                     for slot in config.plan.slots()])
        self.initialize_weights()
        set_fused(self)

    def extra_repr(self):
        return f"plan: {self.config.plan}"

    def forward(self, x, t, y, mask=None, grid: Optional[GridLike] = None):
        """As PixArt.forward; grid: sparse grid G, (G_h, G_w) or "GhxGw" for this call (default: the plan's)."""
        hw = self.token_grid
        grid = self.config.plan.sparse_grid(grid, hw)
        x, t_emb, t0, text, bias = self.embed(x, t, y, mask)   # (B, N, C)
        x = self.route_state.run(self.blocks, x, hw, grid, t0, text, bias)
        return self.unpatchify(self.final_layer(x, t_emb))


#################################################################################
#                          Registry and conversion                              #
#################################################################################

PixArt_models = {"PixArt-XL/2": dict(depth=28, hidden_size=1152, num_heads=16, patch_size=2)}
FlexPixArt_models = {f"Flex{k}": v for k, v in PixArt_models.items()}


def create_pixart(name: str, **overrides) -> nn.Module:
    """"PixArt-XL/2" (dense) or "FlexPixArt-XL/2" (the decided plan for its depth, grid 8 clamped to the token grid;
    plan fields in `overrides` replace the decided ones)."""
    key = name[4:] if name.startswith("Flex") else name
    if key not in PixArt_models:
        raise ValueError(f"unknown model name {name!r}; known: {sorted(PixArt_models) + sorted(FlexPixArt_models)}")
    plan_kw, rest = split_plan_fields(overrides)
    kwargs = {**PixArt_models[key], **rest}
    if kwargs.get("plan") is None:
        h, w = to_pair(kwargs.get("input_size", 32))
        token_grid = (h // kwargs["patch_size"], w // kwargs["patch_size"])
        dense = not name.startswith("Flex") and kwargs["depth"] not in DECIDED_PLANS
        kwargs["plan"] = Plan.dense(kwargs["depth"]) if dense else Plan.for_depth(kwargs["depth"], token_grid,
                                                                                  **plan_kw)
    cfg = PixArtConfig(**kwargs)
    return FlexPixArt(cfg) if name.startswith("Flex") else PixArt(cfg)
