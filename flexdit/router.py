"""The one FlexDiT router: each layer kind written once, over any host's blocks.

A host (the native DiT, the native PixArt-α, a patched diffusers model) runs its blocks one after another, passing one
tensor along. `FlexLayer.route` turns that loop into FlexDiT: a module's first layer pools the dense tokens to the
sparse grid and keeps the dense input, sparse layers run on the M sparse tokens, and recovery brings the N dense
tokens back. Host differences (class-label adaLN-Zero, adaLN-single, caption cross-attention, diffusers modules) are
the few hooks a subclass provides: `modulation`, and where they differ from the defaults `attn_layer_norm`,
`mlp_layer_norm`, `feed_forward`, `after_attention` and `dense`.

Activation checkpointing: when a forward's `RouteState` says so, every layer runs under `torch.utils.checkpoint`
(use_reentrant=False) and is recomputed in the backward from a copy of the route state it saw, so a recomputed
layer reads the same token grid, sparse grid and module inputs as its first run.
"""
import copy
from typing import Optional, Tuple

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

import flexdit_kernels as fk

from .layers import Attention, CrossAttention, PoolingAttention, modulate
from .plan import Slot


def norm_modulate(norm: nn.LayerNorm, x, shift, scale):
    """modulate(norm(x), shift, scale): one pass of the fused kernel wherever the backend runs kernels on x
    (`flexdit_kernels.kernels_active`) and the norm has no affine part (output in the autocast dtype then, ready for
    the next GEMM); the PyTorch composition otherwise."""
    if norm.weight is None and fk.kernels_active(x):
        return fk.layernorm_modulate(x, shift, scale, norm.eps)
    return modulate(norm(x), shift, scale)


class RouteState:
    """Per-forward state shared by the layers of one model: token grid, sparse grid, the modules' inputs and whether
    the layers recompute themselves in the backward (`checkpointing`)."""

    def __init__(self):
        self.token_grid: Optional[Tuple[int, int]] = None
        self.grid: Optional[Tuple[int, int]] = None
        self.checkpointing = False
        self.dense = {}   # module index -> its dense input X (keys of generation, skip of recovery)
        self.sparse = {}  # module index -> the sparse tokens X_s entering recovery

    def begin(self, token_grid, grid, checkpointing: bool = False) -> None:
        self.token_grid, self.grid = token_grid, grid
        self.checkpointing = bool(checkpointing) and torch.is_grad_enabled()

    def clear(self) -> None:
        self.token_grid, self.grid = None, None
        self.checkpointing = False
        self.dense.clear()
        self.sparse.clear()

    def snapshot(self) -> "RouteState":
        """A copy of the state as it is now (the module inputs stored so far included), for a recomputation."""
        snap = copy.copy(self)
        snap.dense, snap.sparse = dict(self.dense), dict(self.sparse)
        return snap

    def run(self, blocks, x, token_grid, grid, *cond, checkpointing: bool = False):
        """The native hosts' block loop: x through every block with `token_grid` and `grid` set for this forward
        (and each block recomputed in the backward with `checkpointing`)."""
        self.begin(token_grid, grid, checkpointing)
        try:
            for block in blocks:
                x = block(x, *cond)
        finally:
            self.clear()
        return x


class _Replay:
    """A layer's call under torch.utils.checkpoint: the first run uses the live route state (later layers read the
    module inputs it stores), every recomputation a fresh copy of the state as the layer first saw it."""

    def __init__(self, layer: nn.Module, seen: RouteState):
        self.layer, self.seen, self.ran = layer, seen, False

    def __call__(self, *args, **kwargs):
        if not self.ran:
            self.ran = True
            return nn.Module.__call__(self.layer, *args, **kwargs)
        live, self.layer._state = self.layer._state, self.seen.snapshot()
        try:
            return nn.Module.__call__(self.layer, *args, **kwargs)
        finally:
            self.layer._state = live


class Routed(nn.Module):
    """A module sharing its model's `RouteState` (`_state`); recomputed in the backward when the state asks."""

    _state: Optional[RouteState] = None

    def __call__(self, *args, **kwargs):
        st = self._state
        if st is None or not st.checkpointing or not torch.is_grad_enabled():
            return super().__call__(*args, **kwargs)
        return checkpoint(_Replay(self, st.snapshot()), *args, use_reentrant=False, **kwargs)


class FlexLayer(Routed):
    """One layer of a FlexDiT plan: dense, sparse, Poolingformer (`pool`), sparse generation (`gen`) or dense
    recovery (`recover`). Subclasses build the host's modules and provide `modulation(x, cond)`, which returns
    (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp), each (B, C). Wherever the backend runs kernels
    on the layer's tensors (`flexdit_kernels.kernels_active`), LayerNorm with modulation and the gated residuals run
    as one kernel each (`flexdit_kernels.layernorm_modulate`, `gated_residual`); under the "reference" backend
    (and on the CPU without the interpreter) the layer is the published PyTorch composition.
    """

    has_after_attention = False  # whether `after_attention` does anything

    def __init__(self, slot: Slot = Slot("dense"), state: Optional[RouteState] = None):
        super().__init__()
        self.slot = slot
        self.kind = slot.kind
        self._state = state

    def attach(self, state: Optional[RouteState], slot: Optional[Slot] = None) -> "FlexLayer":
        """Share `state` with the other layers of a model (and move to `slot`)."""
        self._state = state
        if slot is not None:
            self.slot = slot
        return self

    def build_attention(self, dim: int, num_heads: int) -> None:
        """`attn` for this layer's kind (self-attention `qkv`, pooled `v`, or cross `q`/`kv`, each with `proj`), and
        the recovery fusion `fuse_sparse` (W1) and `fuse_dense` (W2)."""
        if self.kind == "pool":
            self.attn = PoolingAttention(dim)
        elif self.kind in ("gen", "recover"):
            self.attn = CrossAttention(dim, num_heads)
        else:
            self.attn = Attention(dim, num_heads)
        if self.kind == "recover":
            self.build_fusion(dim)

    def build_fusion(self, dim: int) -> None:
        """The recovery fusion X_m = W1·upsample(X_s) + W2·X: `fuse_sparse` (W1) and `fuse_dense` (W2)."""
        self.fuse_sparse = nn.Linear(dim, dim)  # W1, applied to the M sparse tokens
        self.fuse_dense = nn.Linear(dim, dim)   # W2, applied to the N dense tokens

    def reset_fusion(self) -> None:
        """W1 = 0, W2 = I (zero biases): the fused tokens equal the dense skip at initialisation."""
        with torch.no_grad():
            self.fuse_sparse.weight.zero_()
            self.fuse_sparse.bias.zero_()
            self.fuse_dense.weight.copy_(torch.eye(self.fuse_dense.weight.shape[0]))
            self.fuse_dense.bias.zero_()

    def extra_repr(self):
        return f"kind={self.kind}" + (f", module={self.slot.module}" if self.slot.module is not None else "")

    # ---------------------------------------------------------------- hooks (defaults: DiT's module names)
    def modulation(self, x, cond):
        raise NotImplementedError

    def attn_layer_norm(self) -> nn.LayerNorm:
        """The LayerNorm before attention (its affine part, if any, is applied too)."""
        return self.norm1

    def mlp_layer_norm(self) -> nn.LayerNorm:
        return self.norm2

    def feed_forward(self, x):
        return self.mlp(x)

    def pooled_norm(self, x):
        """Mean over tokens of the attention LayerNorm of x: (B, N, C) -> (B, C)."""
        norm = self.attn_layer_norm()
        u_mean = fk.token_mean(x, norm.eps)
        if norm.weight is not None:  # the mean commutes with the affine part
            u_mean = u_mean * norm.weight + (norm.bias if norm.bias is not None else 0)
        return u_mean

    def after_attention(self, x, cond):
        """What the host does between attention and MLP (PixArt-α: caption cross-attention); set
        `has_after_attention` where it does something."""
        return x

    # ---------------------------------------------------------------- routing
    def route(self, x, cond):
        """x: the tensor the host's loop passes, (B, N, C) dense or (B, M, C) sparse -> the next one."""
        if self.kind == "pool":
            return self.pool(x, cond)                                           # (B, N, C)
        if self.kind == "dense" and self.slot.module is None:
            return self.dense(x, cond)                                          # (B, N, C)
        st = self._state
        if st is None or st.token_grid is None or self.slot.module is None:
            raise ValueError(f"a FlexDiT {self.kind!r} layer runs only inside its model's forward (no token grid)")
        k = self.slot.module
        if self.slot.starts_module:
            st.dense[k] = x
            x = fk.token_pool(x, st.token_grid, st.grid)                                # (B, M, C)
        if self.kind == "gen":
            return self.generate(x, st.dense[k], cond)                          # (B, M, C)
        if self.kind == "recover":
            if self.slot.first_recover:
                st.sparse[k] = x
                xs, skip = x, st.dense[k]
            else:
                xs, skip = st.sparse[k], x
            return self.recover(xs, skip, st.token_grid, st.grid, cond)                 # (B, N, C)
        return self.dense(x, cond)                                              # (B, N or M, C)

    # ---------------------------------------------------------------- the layer kinds
    def attn_in(self, x, mods):
        return norm_modulate(self.attn_layer_norm(), x, mods[0], mods[1])

    def residual(self, x, y, gate, inplace=False):
        """x + gate·y; gate: (B, C) over the tokens of x and y: (B, L, C). `inplace` (the kernel, outside autograd)
        writes into x: only for an x this layer made itself."""
        if fk.kernels_active(x):
            return fk.gated_residual(x, y, gate, inplace=inplace)
        return x + gate.unsqueeze(1) * y

    def finish(self, x, y, mods, cond):
        """x + gate_msa·y (y: the attention branch), the host's step between attention and MLP, then the MLP residual.
        On the kernels and with nothing in between, the residual and the MLP's LayerNorm-modulate are one kernel."""
        norm = self.mlp_layer_norm()
        if not self.has_after_attention and norm.weight is None and fk.kernels_active(x):
            x, h = fk.gated_residual_layernorm_modulate(x, y, mods[2], mods[3], mods[4], norm.eps)
        else:
            x = self.after_attention(self.residual(x, y, mods[2]), cond)
            h = norm_modulate(norm, x, mods[3], mods[4])
        return self.residual(x, self.feed_forward(h), mods[5], inplace=True)  # x is this layer's own tensor

    def dense(self, x, cond):
        """A DiT block (dense or on the sparse tokens): self-attention, then the MLP."""
        mods = self.modulation(x, cond)
        return self.finish(x, self.attn(self.attn_in(x, mods)), mods, cond)

    def pool(self, x, cond):
        """Poolingformer: attention replaced by global average pooling, O(N·C):
        mean_n(modulate(LN(x_n))) = mean_n(LN(x_n)) * (1 + scale) + shift, one pooled vector per sample."""
        mods = self.modulation(x, cond)
        u_mean = self.pooled_norm(x) * (1 + mods[1]) + mods[0]                   # (B, C)
        y = self.attn(u_mean).unsqueeze(1).expand_as(x)                           # the same vector for all N tokens
        return self.finish(x, y, mods, cond)

    def generate(self, xs, x, cond):
        """Sparse generation: xs (B, M, C) queries attend to x (B, N, C); one LN and adaLN for both streams."""
        mods = self.modulation(xs, cond)
        return self.finish(xs, self.attn(self.attn_in(xs, mods), self.attn_in(x, mods)), mods, cond)  # (B, M, C)

    def fuse(self, xs, x, token_grid, grid):
        """X_m = W1·upsample(X_s) + W2·X, (B, N, C). W1·upsample(X_s) = upsample(W1·X_s): W1 runs on the M sparse
        tokens, the upsample is fused with the add."""
        return fk.upsample_add(self.fuse_sparse(xs), self.fuse_dense(x), token_grid, grid)

    def recover(self, xs, x, token_grid, grid, cond):
        """Dense recovery: X_m = W1·upsample(X_s) + W2·X, then dense queries attend to the sparse tokens."""
        mods = self.modulation(xs, cond)
        xm = self.fuse(xs, x, token_grid, grid)                                            # (B, N, C)
        return self.finish(xm, self.attn(self.attn_in(xm, mods), self.attn_in(xs, mods)), mods, cond)
