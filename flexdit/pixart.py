"""PixArt-α (text-to-image DiT with adaLN-single and caption cross-attention) and its FlexDiT version.

Parameter names follow the original PixArt-α repository (`t_block`, `blocks.i.scale_shift_table`,
`blocks.i.cross_attn.q_linear` ...); `pixart_state_dict_from_diffusers` reads a diffusers `PixArtTransformer2DModel`.
In FlexPixArt every layer keeps its caption cross-attention, applied to whichever tokens it holds (sparse or dense).
"""
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import flexdit_kernels as fk

from .checkpoint import load_state_dict_strict
from .convert import map_dense_blocks
from .layers import (Attention, CrossAttention, Mlp, PatchEmbed, PoolingAttention, TimestepEmbedder, _1d_sincos,
                     modulate, to_pair)
from .models import FLEX_PLANS, FlexDiTConfig, GridLike, RecoveryBlock, _check_grid


@dataclass
class PixArtConfig:
    """PixArt-α's size (latent input_size, caption_channels ...) plus FlexDiT's layer plan (used by FlexPixArt)."""

    input_size: Union[int, Tuple[int, int]] = 32
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    caption_channels: int = 4096
    learn_sigma: bool = True
    interpolation_scale: Optional[float] = None  # positions / scale; default max(latent side // 64, 1) as diffusers
    num_pool: int = 2
    num_modules: int = 4
    group: Tuple[int, int, int, int] = (1, 3, 1, 1)
    num_top: int = 2
    grid: GridLike = 8

    def flex_config(self) -> FlexDiTConfig:
        """The plan as a FlexDiTConfig (validates depth and grid; gives `layer_kinds()`)."""
        names = ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "mlp_ratio",
                 "num_pool", "num_modules", "group", "num_top", "grid")
        return FlexDiTConfig(**{n: getattr(self, n) for n in names})


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


class _PixArtBlockBase(nn.Module):
    """adaLN-single (a learned `scale_shift_table` plus the shared t_block output), caption attention and MLP."""

    def __init__(self, hidden_size, num_heads, mlp_ratio):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.cross_attn = TextCrossAttention(hidden_size, num_heads)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.scale_shift_table = nn.Parameter(torch.randn(6, hidden_size) / hidden_size ** 0.5)

    def modulation(self, t0):
        """t0: (B, 6C) → shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp, each (B, C)."""
        return (self.scale_shift_table[None] + t0.reshape(len(t0), 6, -1)).unbind(1)

    def text_mlp(self, x, text, bias, shift, scale, gate):
        x = x + self.cross_attn(x, text, bias)
        return x + gate.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift, scale))


class PixArtBlock(_PixArtBlockBase):
    """A PixArt-α block: self-attention, caption cross-attention, MLP."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, use_kernel=False):
        super().__init__(hidden_size, num_heads, mlp_ratio)
        self.attn = Attention(hidden_size, num_heads, use_kernel=use_kernel)

    def forward(self, x, t0, text, bias=None):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.modulation(t0)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return self.text_mlp(x, text, bias, shift_mlp, scale_mlp, gate_mlp)


class PixArtPoolingBlock(_PixArtBlockBase):
    """Poolingformer layer with caption attention: self-attention replaced by the mean of the values."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__(hidden_size, num_heads, mlp_ratio)
        self.attn = PoolingAttention(hidden_size)

    def forward(self, x, t0, text, bias=None):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.modulation(t0)
        u_mean = fk.token_mean(x, self.norm1.eps) * (1 + scale_msa) + shift_msa  # (B, C)
        x = x + (gate_msa * self.attn(u_mean)).unsqueeze(1)                        # broadcast to all N tokens
        return self.text_mlp(x, text, bias, shift_mlp, scale_mlp, gate_mlp)


class PixArtCrossBlock(_PixArtBlockBase):
    """Sparse-token generation with caption attention: pooled queries attend to the dense tokens."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__(hidden_size, num_heads, mlp_ratio)
        self.attn = CrossAttention(hidden_size, num_heads)

    def forward(self, xs, x, t0, text, bias=None):
        """xs: (B, M, C) sparse queries, x: (B, N, C) dense keys/values → (B, M, C)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.modulation(t0)
        q_in = modulate(self.norm1(xs), shift_msa, scale_msa)
        kv_in = modulate(self.norm1(x), shift_msa, scale_msa)
        xs = xs + gate_msa.unsqueeze(1) * self.attn(q_in, kv_in)
        return self.text_mlp(xs, text, bias, shift_mlp, scale_mlp, gate_mlp)


class PixArtRecoveryBlock(_PixArtBlockBase):
    """Dense recovery with caption attention: W1·upsample(X_s) + W2·X, then dense queries attend to the sparse."""

    reset_fusion = RecoveryBlock.reset_fusion

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__(hidden_size, num_heads, mlp_ratio)
        self.attn = CrossAttention(hidden_size, num_heads)
        self.fuse_sparse = nn.Linear(hidden_size, hidden_size)  # W1, applied to the M sparse tokens
        self.fuse_dense = nn.Linear(hidden_size, hidden_size)   # W2, applied to the N dense tokens

    def forward(self, xs, x, t0, text, bias, hw, grid):
        """xs: (B, M, C) sparse, x: (B, N, C) dense skip → (B, N, C)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.modulation(t0)
        xm = fk.upsample_add(self.fuse_sparse(xs), self.fuse_dense(x), hw, grid)  # (B, N, C)
        q_in = modulate(self.norm1(xm), shift_msa, scale_msa)
        kv_in = modulate(self.norm1(xs), shift_msa, scale_msa)
        xm = xm + gate_msa.unsqueeze(1) * self.attn(q_in, kv_in)
        return self.text_mlp(xm, text, bias, shift_mlp, scale_mlp, gate_mlp)


class PixArtFinalLayer(nn.Module):
    """LayerNorm, shift/scale from `scale_shift_table` + the timestep embedding, linear to patch pixels."""

    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size ** 0.5)

    def forward(self, x, t_emb):
        shift, scale = (self.scale_shift_table[None] + t_emb[:, None]).unbind(1)   # (B, C) each
        return self.linear(modulate(self.norm_final(x), shift, scale))


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
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(c, 6 * c))
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
            if isinstance(block, PixArtRecoveryBlock):
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
        tokens = (tokens + self.pos_embed).to(tokens.dtype)                     # (B, N, C)
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


_PIXART_BLOCKS = {"pool": PixArtPoolingBlock, "gen": PixArtCrossBlock, "sparse": PixArtBlock,
                  "recover": PixArtRecoveryBlock, "dense": PixArtBlock}


class FlexPixArt(_PixArtShell):
    """PixArt-α with Poolingformers, Sparse-Dense Token Modules and dense top blocks; caption attention everywhere."""

    def __init__(self, config: PixArtConfig):
        super().__init__(config)
        flex = config.flex_config()
        self.kinds = flex.layer_kinds()
        module_len = sum(flex.group)
        self.module_starts = {flex.num_pool + k * module_len for k in range(flex.num_modules)}
        self.blocks = nn.ModuleList()
        for kind in self.kinds:
            kwargs = {"use_kernel": True} if _PIXART_BLOCKS[kind] is PixArtBlock else {}
            self.blocks.append(_PIXART_BLOCKS[kind](config.hidden_size, config.num_heads, config.mlp_ratio, **kwargs))
        self.initialize_weights()

    def extra_repr(self):
        cfg = self.config
        return (f"plan: P={cfg.num_pool}, K={cfg.num_modules} x (g, s, r, d)={tuple(cfg.group)}, T={cfg.num_top}, "
                f"grid={cfg.grid}")

    def forward(self, x, t, y, mask=None, grid: Optional[GridLike] = None):
        """As PixArt.forward; grid: sparse grid side G or (G_h, G_w) for this call (default config.grid)."""
        hw = self.token_grid
        grid = _check_grid(self.config.grid if grid is None else grid, hw) if self.config.num_modules else None
        x, t_emb, t0, text, bias = self.embed(x, t, y, mask)   # (B, N, C)
        for i, (kind, block) in enumerate(zip(self.kinds, self.blocks)):
            if i in self.module_starts:
                dense_in = x
                xs = fk.token_pool(x, hw, grid)                  # (B, M, C)
            if kind == "gen":
                xs = block(xs, dense_in, t0, text, bias)         # (B, M, C)
            elif kind == "sparse":
                xs = block(xs, t0, text, bias)                   # (B, M, C)
            elif kind == "recover":
                x = block(xs, x, t0, text, bias, hw, grid)       # (B, N, C)
            else:
                x = block(x, t0, text, bias)                     # (B, N, C)
        return self.unpatchify(self.final_layer(x, t_emb))


#################################################################################
#                          Registry and conversion                              #
#################################################################################

PixArt_models = {"PixArt-XL/2": dict(depth=28, hidden_size=1152, num_heads=16, patch_size=2)}
FlexPixArt_models = {f"Flex{k}": v for k, v in PixArt_models.items()}


def create_pixart(name: str, **overrides) -> nn.Module:
    """"PixArt-XL/2" (dense) or "FlexPixArt-XL/2" (decided plan for its depth, grid 8 clamped to the token grid)."""
    key = name[4:] if name.startswith("Flex") else name
    if key not in PixArt_models:
        raise ValueError(f"unknown model name {name!r}; known: {sorted(PixArt_models) + sorted(FlexPixArt_models)}")
    kwargs = dict(PixArt_models[key])
    kwargs.update(FLEX_PLANS.get(overrides.get("depth", kwargs["depth"]), {}))
    kwargs.update(overrides)
    if "grid" not in overrides:
        h, w = to_pair(kwargs.get("input_size", 32))
        kwargs["grid"] = min(8, h // kwargs["patch_size"], w // kwargs["patch_size"])
    cfg = PixArtConfig(**kwargs)
    return FlexPixArt(cfg) if name.startswith("Flex") else PixArt(cfg)


def flex_pixart_from_pixart(pixart_or_state_dict: Union[nn.Module, Mapping[str, torch.Tensor]],
                            config: PixArtConfig) -> FlexPixArt:
    """FlexPixArt by the REFERENCE §2 mapping from a dense PixArt (module or state dict); shares no storage."""
    sd = pixart_or_state_dict.state_dict() if isinstance(pixart_or_state_dict, nn.Module) else pixart_or_state_dict
    mapped = map_dense_blocks(sd, config.flex_config().layer_kinds(), config.hidden_size)
    with torch.device("meta"):
        model = FlexPixArt(config)
    load_state_dict_strict(model, mapped, what="converted PixArt state dict", assign=True)
    model.reset_pos_embed(next(iter(mapped.values())).device)
    return model


def pixart_config_from_diffusers(model: nn.Module, **plan) -> PixArtConfig:
    """PixArtConfig of a diffusers `PixArtTransformer2DModel` (plan fields from `plan`, else the decided plan)."""
    cfg = model.config
    c = cfg.num_attention_heads * cfg.attention_head_dim
    out_channels = cfg.out_channels or cfg.in_channels
    problems = [msg for bad, msg in (
        (model.use_additional_conditions, "resolution/aspect-ratio conditions (the 1024² model)"),
        (cfg.caption_channels is None, "no caption projection"),
        (cfg.cross_attention_dim != c, f"cross_attention_dim {cfg.cross_attention_dim} != hidden {c}"),
        (cfg.norm_elementwise_affine, "affine LayerNorms"),
        (out_channels not in (cfg.in_channels, 2 * cfg.in_channels), f"out_channels {out_channels}"),
    ) if bad]
    if problems:
        raise ValueError(f"unsupported PixArtTransformer2DModel: {'; '.join(problems)}")
    side = cfg.sample_size
    plan = {**FLEX_PLANS.get(cfg.num_layers, dict(num_pool=0, num_modules=0, num_top=cfg.num_layers)),
            "grid": min(8, side // cfg.patch_size), **plan}
    return PixArtConfig(input_size=side, patch_size=cfg.patch_size, in_channels=cfg.in_channels, hidden_size=c,
                        depth=cfg.num_layers, num_heads=cfg.num_attention_heads,
                        mlp_ratio=model.transformer_blocks[0].ff.net[0].proj.out_features / c,
                        caption_channels=cfg.caption_channels, learn_sigma=out_channels == 2 * cfg.in_channels,
                        interpolation_scale=cfg.interpolation_scale or max(side // 64, 1), **plan)


def pixart_state_dict_from_diffusers(model_or_state_dict) -> Dict[str, torch.Tensor]:
    """Original-layout PixArt-α state dict (cloned) from a diffusers `PixArtTransformer2DModel` or its state dict."""
    sd = model_or_state_dict.state_dict() if isinstance(model_or_state_dict, nn.Module) else model_or_state_dict
    out = {}

    def lin(src, dst):
        out[f"{dst}.weight"], out[f"{dst}.bias"] = sd[f"{src}.weight"], sd[f"{src}.bias"]

    lin("pos_embed.proj", "x_embedder.proj")
    lin("adaln_single.emb.timestep_embedder.linear_1", "t_embedder.mlp.0")
    lin("adaln_single.emb.timestep_embedder.linear_2", "t_embedder.mlp.2")
    lin("adaln_single.linear", "t_block.1")
    lin("caption_projection.linear_1", "y_embedder.y_proj.fc1")
    lin("caption_projection.linear_2", "y_embedder.y_proj.fc2")
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks."))
    for i in range(depth):
        b, o = f"transformer_blocks.{i}.", f"blocks.{i}."
        out[o + "scale_shift_table"] = sd[b + "scale_shift_table"]
        for part in ("weight", "bias"):
            out[o + f"attn.qkv.{part}"] = torch.cat([sd[b + f"attn1.to_{n}.{part}"] for n in "qkv"])
            out[o + f"cross_attn.kv_linear.{part}"] = torch.cat([sd[b + f"attn2.to_{n}.{part}"] for n in "kv"])
        lin(b + "attn1.to_out.0", o + "attn.proj")
        lin(b + "attn2.to_q", o + "cross_attn.q_linear")
        lin(b + "attn2.to_out.0", o + "cross_attn.proj")
        lin(b + "ff.net.0.proj", o + "mlp.fc1")
        lin(b + "ff.net.2", o + "mlp.fc2")
    out["final_layer.scale_shift_table"] = sd["scale_shift_table"]
    lin("proj_out", "final_layer.linear")
    return {k: v.detach().clone() for k, v in out.items()}


def pixart_from_diffusers(model: nn.Module) -> PixArt:
    """The project's dense PixArt from a diffusers `PixArtTransformer2DModel` (same function; no shared storage)."""
    cfg = pixart_config_from_diffusers(model)
    sd = pixart_state_dict_from_diffusers(model)
    with torch.device("meta"):
        pixart = PixArt(cfg)
    load_state_dict_strict(pixart, sd, what="converted diffusers PixArt state dict", assign=True)
    pixart.reset_pos_embed(sd["x_embedder.proj.weight"].device)
    return pixart
