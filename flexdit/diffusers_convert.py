"""diffusers models → the project's layouts: `DiTTransformer2DModel` → the published DiT layout (the inverse of
diffusers' convert_dit_to_diffusers), and a `PixArtTransformer2DModel`'s state dict → the key layout of the original
PixArt-α repository (PixArt-α itself runs through diffusers: `flexdit.apply_patch` patches it in place).

Two differences of diffusers' DiT are kept visible rather than hidden: its timestep frequencies are
exp(−ln(10000)·k/127) (`downscale_freq_shift=1`; DiT uses /128), reproduced by `DiffusersTimestepEmbedder`, and its
LayerNorm before the MLP uses the config's `norm_eps` (1e-5 unless set; DiT uses 1e-6), which the published layout
cannot express (a warning says so). diffusers is never imported: models are read through their attributes.
"""
import math
import warnings
from typing import Dict

import torch
import torch.nn as nn

from .checkpoint import load_state_dict_strict
from .layers import TimestepEmbedder
from .models import DiT


class DiffusersTimestepEmbedder(TimestepEmbedder):
    """DiT's timestep embedder with diffusers' DiT frequencies (exp(−ln(max_period)·k/(half − 1))); same keys."""

    @staticmethod
    def timestep_embedding(t, dim, max_period=10000):
        half = dim // 2
        exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - 1)
        args = t[:, None].float() * torch.exp(exponent)[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def use_diffusers_timesteps_(model: nn.Module) -> nn.Module:
    """Make a DiT / FlexDiT embed timesteps as diffusers' DiT does (in place; the state dict is unchanged)."""
    model.t_embedder.__class__ = DiffusersTimestepEmbedder
    return model


def _linear(sd, out, src, dst):
    out[f"{dst}.weight"] = sd[f"{src}.weight"]
    out[f"{dst}.bias"] = sd[f"{src}.bias"]


def dit_state_dict_from_diffusers(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Published-layout DiT state dict (cloned) from a diffusers `DiTTransformer2DModel`.

    diffusers keeps one timestep/class embedder per block; the published layout has one, so they must agree.
    """
    if type(model).__name__ != "DiTTransformer2DModel":
        raise ValueError(f"expected a diffusers DiTTransformer2DModel, got {type(model).__name__}")
    sd = model.state_dict()
    depth = len(model.transformer_blocks)
    emb = "transformer_blocks.{}.norm1.emb."
    for i in range(1, depth):
        for key in (k for k in sd if k.startswith(emb.format(0))):
            if not torch.equal(sd[key], sd[key.replace(emb.format(0), emb.format(i), 1)]):
                raise ValueError(f"block {i}'s timestep/class embedder differs from block 0's; the published DiT "
                                 f"layout has a single one")
    if any(abs(b.norm3.eps - 1e-6) > 1e-12 for b in model.transformer_blocks):
        warnings.warn(f"diffusers DiT uses LayerNorm eps {model.transformer_blocks[0].norm3.eps} before the MLP; "
                      f"the published DiT layout uses 1e-6, so outputs will differ slightly")
    out = {"pos_embed": model.pos_embed.pos_embed.detach()}  # a non-persistent buffer in diffusers
    _linear(sd, out, "pos_embed.proj", "x_embedder.proj")
    e = emb.format(0)
    _linear(sd, out, e + "timestep_embedder.linear_1", "t_embedder.mlp.0")
    _linear(sd, out, e + "timestep_embedder.linear_2", "t_embedder.mlp.2")
    out["y_embedder.embedding_table.weight"] = sd[e + "class_embedder.embedding_table.weight"]
    for i in range(depth):
        b, o = f"transformer_blocks.{i}.", f"blocks.{i}."
        _linear(sd, out, b + "norm1.linear", o + "adaLN_modulation.1")
        for part in ("weight", "bias"):
            out[o + f"attn.qkv.{part}"] = torch.cat([sd[b + f"attn1.to_{n}.{part}"] for n in "qkv"])
        _linear(sd, out, b + "attn1.to_out.0", o + "attn.proj")
        _linear(sd, out, b + "ff.net.0.proj", o + "mlp.fc1")
        _linear(sd, out, b + "ff.net.2", o + "mlp.fc2")
    _linear(sd, out, "proj_out_1", "final_layer.adaLN_modulation.1")
    _linear(sd, out, "proj_out_2", "final_layer.linear")
    return {k: v.detach().clone() for k, v in out.items()}


def dit_from_diffusers(model: nn.Module) -> DiT:
    """The project's dense `DiT` computing what a diffusers `DiTTransformer2DModel` computes (timestep frequencies
    included; see the module docstring for the LayerNorm eps). Shares no storage with `model`."""
    cfg = model.config
    heads, head_dim = cfg.num_attention_heads, cfg.attention_head_dim
    out_channels = cfg.out_channels or cfg.in_channels
    if out_channels not in (cfg.in_channels, 2 * cfg.in_channels):
        raise ValueError(f"out_channels {out_channels} must be in_channels or twice it (learned sigma)")
    table = model.transformer_blocks[0].norm1.emb.class_embedder
    sd = dit_state_dict_from_diffusers(model)
    ff_inner = sd["blocks.0.mlp.fc1.weight"].shape[0]
    with torch.device("meta"):
        dit = DiT(input_size=cfg.sample_size, patch_size=cfg.patch_size, in_channels=cfg.in_channels,
                  hidden_size=heads * head_dim, depth=cfg.num_layers, num_heads=heads,
                  mlp_ratio=ff_inner / (heads * head_dim), class_dropout_prob=table.dropout_prob,
                  num_classes=table.num_classes, learn_sigma=out_channels == 2 * cfg.in_channels)
    dit.load_state_dict(sd, strict=True, assign=True)
    dit.pos_embed.requires_grad_(False)
    return use_diffusers_timesteps_(dit)


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

