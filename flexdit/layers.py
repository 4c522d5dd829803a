"""Building blocks shared by the dense DiT and FlexDiT, with DiT's module and parameter names."""
import math
from typing import Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import flexdit_kernels as fk
from flexdit_kernels._validate import pair


def modulate(x, shift, scale):
    """adaLN modulation; shift, scale: (B, C) broadcast over the tokens of x: (B, L, C)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def to_pair(value: Union[int, Sequence[int]], name: str = "size") -> Tuple[int, int]:
    """An int `n` or a pair `(h, w)` of positive ints, as a tuple (ValueError naming `name` otherwise)."""
    return pair(name, value)


#################################################################################
#               Embedding Layers for Timesteps, Class Labels and Patches        #
#################################################################################

class TimestepEmbedder(nn.Module):
    """Embeds scalar timesteps into vector representations."""

    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t, dim, max_period=10000):
        """Sinusoidal embedding of t: (B,) → (B, dim), [cos, sin] order as in DiT."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t):
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Embeds class labels; index `num_classes` is the null class used by classifier-free guidance."""

    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        use_cfg_embedding = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels, force_drop_ids=None):
        if force_drop_ids is None:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop_ids = force_drop_ids == 1
        return torch.where(drop_ids, self.num_classes, labels)

    def forward(self, labels, train, force_drop_ids=None):
        if (train and self.dropout_prob > 0) or (force_drop_ids is not None):
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


class PatchEmbed(nn.Module):
    """Latent (B, C_in, H, W) → tokens (B, N, C) through a strided convolution (`proj`), row-major."""

    def __init__(self, patch_size, in_chans, embed_dim):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, C)


def get_2d_sincos_pos_embed(embed_dim, grid_size):
    """(h*w, embed_dim) MAE sin-cos table: first half of the channels encodes the column, second half the row."""
    gh, gw = to_pair(grid_size)
    grid = np.meshgrid(np.arange(gw, dtype=np.float32), np.arange(gh, dtype=np.float32))  # w goes first
    emb_w = _1d_sincos(embed_dim // 2, grid[0].reshape(-1))
    emb_h = _1d_sincos(embed_dim // 2, grid[1].reshape(-1))
    return np.concatenate([emb_w, emb_h], axis=1)


def _1d_sincos(embed_dim, pos):
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0))
    out = np.einsum("m,d->md", pos.astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def adaln_silu(x):
    """SiLU of an adaLN projection's input. x (B, C) where the backend runs kernels on it
    (`flexdit_kernels.kernels_active`): one kernel (`flexdit_kernels.silu`) that writes the result in the autocast
    dtype, so the projection's input needs no cast; `F.silu` otherwise."""
    return fk.silu(x) if x.dim() == 2 and fk.kernels_active(x) else F.silu(x)


class SiLU(nn.SiLU):
    """nn.SiLU in front of an adaLN projection: `adaln_silu`."""

    def forward(self, x):
        return adaln_silu(x)


#################################################################################
#                                 Attention and MLP                             #
#################################################################################

class Mlp(nn.Module):
    """fc1 → GELU(tanh) → fc2, as timm's Mlp in DiT."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head self-attention with a fused `qkv` projection (timm layout, as in DiT)."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim)
        # the backend decides: PyTorch SDPA on "reference" (the published DiT) and at dense shapes on the kernels
        out = fk.attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])  # (B, N, H, D)
        return self.proj(out.reshape(b, n, c))


class CrossAttention(nn.Module):
    """Attention whose queries come from one token set and keys/values from another (`q`, `kv`, `proj`)."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim, bias=True)
        self.kv = nn.Linear(dim, dim * 2, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, context):
        b, lq, c = x.shape
        q = self.q(x).view(b, lq, self.num_heads, self.head_dim)
        kv = self.kv(context).view(b, context.shape[1], 2, self.num_heads, self.head_dim)
        out = fk.attention(q, kv[:, :, 0], kv[:, :, 1])  # (B, Lq, H, D); k, v are strided views of kv
        return self.proj(out.reshape(b, lq, c))


class PoolingAttention(nn.Module):
    """Global average pooling of the values: every token receives proj(V(mean of its inputs)) (`v`, `proj`)."""

    def __init__(self, dim):
        super().__init__()
        self.v = nn.Linear(dim, dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, u_mean):
        """u_mean: (B, C) mean of the modulated tokens → (B, C), the same output for every token."""
        return self.proj(self.v(u_mean))
