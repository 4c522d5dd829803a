"""The dense DiT (Peebles & Xie) and FlexDiT (arXiv 2412.06028) with published-checkpoint parameter names."""
import dataclasses
from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

import torch
import torch.nn as nn

import flexdit_kernels as fk

from .layers import (Attention, CrossAttention, LabelEmbedder, Mlp, PatchEmbed, PoolingAttention,
                     TimestepEmbedder, get_2d_sincos_pos_embed, modulate, to_pair)

GridLike = Union[int, Tuple[int, int]]


#################################################################################
#                                 Core DiT Blocks                               #
#################################################################################

class _AdaLNBlock(nn.Module):
    """Shared parts of every block: the affine-free LayerNorms, the MLP and the 6-way adaLN-Zero modulation."""

    def __init__(self, hidden_size, mlp_ratio):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def modulation(self, c):
        """shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp, each (B, C)."""
        return self.adaLN_modulation(c).chunk(6, dim=1)

    def mlp_residual(self, x, shift, scale, gate):
        return x + gate.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift, scale))


class DiTBlock(_AdaLNBlock):
    """A DiT block with adaptive layer norm zero (adaLN-Zero) conditioning."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, use_kernel=False):
        super().__init__(hidden_size, mlp_ratio)
        self.attn = Attention(hidden_size, num_heads, use_kernel=use_kernel)

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.modulation(c)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return self.mlp_residual(x, shift_mlp, scale_mlp, gate_mlp)


class FinalLayer(nn.Module):
    """The final layer of DiT: adaLN (shift, scale) and a linear map to patch pixels."""

    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


#################################################################################
#                                 FlexDiT Blocks                                #
#################################################################################

class PoolingBlock(_AdaLNBlock):
    """Poolingformer layer: attention replaced by global average pooling of the values, O(N·C)."""

    def __init__(self, hidden_size, num_heads=None, mlp_ratio=4.0):
        super().__init__(hidden_size, mlp_ratio)
        self.attn = PoolingAttention(hidden_size)

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.modulation(c)
        # mean_n(modulate(LN(x_n))) = mean_n(LN(x_n)) * (1 + scale) + shift: one pooled vector per sample.
        u_mean = fk.token_mean(x, self.norm1.eps) * (1 + scale_msa) + shift_msa  # (B, C)
        x = x + (gate_msa * self.attn(u_mean)).unsqueeze(1)                        # broadcast to all N tokens
        return self.mlp_residual(x, shift_mlp, scale_mlp, gate_mlp)


class CrossDiTBlock(_AdaLNBlock):
    """Sparse-token generation: pooled queries attend to the dense tokens; one LN and adaLN for both streams."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__(hidden_size, mlp_ratio)
        self.attn = CrossAttention(hidden_size, num_heads)

    def forward(self, xs, x, c):
        """xs: (B, M, C) sparse queries, x: (B, N, C) dense keys/values, c: (B, C) → (B, M, C)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.modulation(c)
        q_in = modulate(self.norm1(xs), shift_msa, scale_msa)
        kv_in = modulate(self.norm1(x), shift_msa, scale_msa)
        xs = xs + gate_msa.unsqueeze(1) * self.attn(q_in, kv_in)
        return self.mlp_residual(xs, shift_mlp, scale_mlp, gate_mlp)


class RecoveryBlock(_AdaLNBlock):
    """Dense recovery: upsampled sparse tokens fused with the dense skip, then dense queries attend to the sparse."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__(hidden_size, mlp_ratio)
        self.attn = CrossAttention(hidden_size, num_heads)
        self.fuse_sparse = nn.Linear(hidden_size, hidden_size)  # W1, applied to the M sparse tokens
        self.fuse_dense = nn.Linear(hidden_size, hidden_size)   # W2, applied to the N dense tokens

    def reset_fusion(self):
        """W1 = 0, W2 = I (zero biases): the fused tokens equal the dense skip at initialisation."""
        nn.init.zeros_(self.fuse_sparse.weight)
        nn.init.zeros_(self.fuse_sparse.bias)
        with torch.no_grad():
            self.fuse_dense.weight.copy_(torch.eye(self.fuse_dense.weight.shape[0]))
        nn.init.zeros_(self.fuse_dense.bias)

    def forward(self, xs, x, c, hw, grid):
        """xs: (B, M, C) sparse, x: (B, N, C) dense skip, c: (B, C) → (B, N, C)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.modulation(c)
        # W1·upsample(X_s) = upsample(W1·X_s): W1 runs on M tokens, the upsample is fused with the add.
        xm = fk.upsample_add(self.fuse_sparse(xs), self.fuse_dense(x), hw, grid)  # (B, N, C)
        q_in = modulate(self.norm1(xm), shift_msa, scale_msa)
        kv_in = modulate(self.norm1(xs), shift_msa, scale_msa)
        xm = xm + gate_msa.unsqueeze(1) * self.attn(q_in, kv_in)
        return self.mlp_residual(xm, shift_mlp, scale_mlp, gate_mlp)


#################################################################################
#                                   DiT models                                  #
#################################################################################

class _DiTShell(nn.Module):
    """Embedders, positional table, final layer and (un)patchify shared by DiT and FlexDiT."""

    def __init__(self, input_size, patch_size, in_channels, hidden_size, num_heads, class_dropout_prob,
                 num_classes, learn_sigma):
        super().__init__()
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.input_size = to_pair(input_size)
        h, w = self.input_size
        if h % patch_size or w % patch_size:
            raise ValueError(f"input_size {h}x{w} is not divisible by patch_size {patch_size}")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        self.token_grid = (h // patch_size, w // patch_size)

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        num_patches = self.token_grid[0] * self.token_grid[1]
        # Fixed sin-cos table, kept as a frozen parameter so the state dict matches the published checkpoints.
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)

    def initialize_weights(self):
        """DiT's initialisation: xavier linears, sin-cos table, adaLN-Zero (modulations and output zeroed)."""
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                torch.nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)
        self.apply(_basic_init)
        pos = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], self.token_grid)
        self.pos_embed.data.copy_(torch.from_numpy(pos).float().unsqueeze(0))
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def embed(self, x, t, y):
        """x: (B, C_in, H, W), t: (B,), y: (B,) → tokens (B, N, C) and conditioning c (B, C)."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must be (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        h, w = self.input_size
        if tuple(x.shape[2:]) != (h, w):
            raise ValueError(f"x has spatial size {tuple(x.shape[2:])}, the model was built for {h}x{w}")
        if t.shape != x.shape[:1] or y.shape != x.shape[:1]:
            raise ValueError(f"t {tuple(t.shape)} and y {tuple(y.shape)} must be ({x.shape[0]},)")
        tokens = self.x_embedder(x) + self.pos_embed                         # (B, N, C)
        c = self.t_embedder(t) + self.y_embedder(y, self.training)          # (B, C)
        return tokens, c

    def unpatchify(self, x):
        """x: (B, N, p*p*c) → (B, c, H, W)."""
        c, p = self.out_channels, self.patch_size
        h, w = self.token_grid
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def forward_with_cfg(self, x, t, y, cfg_scale, cfg_channels=3, **kwargs):
        """Classifier-free guidance, DiT convention: x = [cond half; null half] sharing noise.

        Guidance is applied to the first `cfg_channels` eps channels (3 as in DiT; 4 for all eps channels).
        """
        half = x[: len(x) // 2]
        combined = torch.cat([half, half], dim=0)
        model_out = self.forward(combined, t, y, **kwargs)
        eps, rest = model_out[:, :cfg_channels], model_out[:, cfg_channels:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        eps = torch.cat([half_eps, half_eps], dim=0)
        return torch.cat([eps, rest], dim=1)


class DiT(_DiTShell):
    """Diffusion model with a Transformer backbone (the dense baseline, PyTorch SDPA attention)."""

    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                 mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000, learn_sigma=True):
        super().__init__(input_size, patch_size, in_channels, hidden_size, num_heads, class_dropout_prob,
                         num_classes, learn_sigma)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.initialize_weights()

    def forward(self, x, t, y):
        """x: (B, C_in, H, W) latents, t: (B,) timesteps, y: (B,) labels → (B, out_channels, H, W)."""
        x, c = self.embed(x, t, y)       # (B, N, C)
        for block in self.blocks:
            x = block(x, c)
        x = self.final_layer(x, c)       # (B, N, p*p*out)
        return self.unpatchify(x)


#################################################################################
#                                   FlexDiT                                     #
#################################################################################

LAYER_KINDS = ("pool", "gen", "sparse", "recover", "dense")


@dataclass
class FlexDiTConfig:
    """A dense DiT's size plus FlexDiT's layer plan: P Poolingformers, K × (g, s, r, d) modules, T top blocks."""

    input_size: Union[int, Tuple[int, int]] = 32
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    num_classes: int = 1000
    learn_sigma: bool = True
    num_pool: int = 2
    num_modules: int = 4
    group: Tuple[int, int, int, int] = (1, 3, 1, 1)
    num_top: int = 2
    grid: Union[int, Tuple[int, int]] = 8

    def __post_init__(self):
        self.group = tuple(int(v) for v in self.group)
        if isinstance(self.input_size, (list, tuple)):
            self.input_size = tuple(int(v) for v in self.input_size)
        if isinstance(self.grid, (list, tuple)):
            self.grid = tuple(int(v) for v in self.grid)
        if len(self.group) != 4 or min(self.group) < 0:
            raise ValueError(f"group must be four non-negative ints (g, s, r, d), got {self.group}")
        if min(self.num_pool, self.num_modules, self.num_top) < 0:
            raise ValueError("num_pool, num_modules and num_top must be non-negative")
        if self.num_modules and self.group[2] < 1:
            raise ValueError(f"group needs at least one recovery block (r >= 1), got {self.group}")
        total = self.num_pool + self.num_modules * sum(self.group) + self.num_top
        if total != self.depth:
            raise ValueError(f"layer plan P={self.num_pool} + K={self.num_modules} x {self.group} + "
                             f"T={self.num_top} = {total} layers, but depth is {self.depth}")
        h, w = to_pair(self.input_size)
        if self.num_modules:
            _check_grid(self.grid, (h // self.patch_size, w // self.patch_size))

    def dit_kwargs(self) -> dict:
        """Constructor arguments of the dense DiT this FlexDiT is built from."""
        names = ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "mlp_ratio",
                 "class_dropout_prob", "num_classes", "learn_sigma")
        return {n: getattr(self, n) for n in names}

    def layer_kinds(self) -> List[str]:
        """Kind of each block, in order: pool, then K × (gen, sparse, recover, dense), then dense (top)."""
        g, s, r, d = self.group
        module = ["gen"] * g + ["sparse"] * s + ["recover"] * r + ["dense"] * d
        return ["pool"] * self.num_pool + module * self.num_modules + ["dense"] * self.num_top

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_grid(grid, token_grid) -> Tuple[int, int]:
    if isinstance(grid, bool) or not isinstance(grid, (int, tuple, list)):
        raise ValueError(f"grid must be an int or a pair of ints, got {grid!r}")
    gh, gw = to_pair(grid)
    h, w = token_grid
    if not (1 <= gh <= h and 1 <= gw <= w):
        raise ValueError(f"grid {gh}x{gw} must be at least 1x1 and at most the token grid {h}x{w}")
    return gh, gw


_BLOCKS = {"pool": PoolingBlock, "gen": CrossDiTBlock, "sparse": DiTBlock, "recover": RecoveryBlock,
           "dense": DiTBlock}


class FlexDiT(_DiTShell):
    """DiT with Poolingformers at the bottom, Sparse-Dense Token Modules in the middle and dense blocks on top."""

    def __init__(self, config: FlexDiTConfig):
        cfg = config
        super().__init__(cfg.input_size, cfg.patch_size, cfg.in_channels, cfg.hidden_size, cfg.num_heads,
                         cfg.class_dropout_prob, cfg.num_classes, cfg.learn_sigma)
        self.config = cfg
        self.kinds = cfg.layer_kinds()
        module_len = sum(cfg.group)
        self.module_starts = {cfg.num_pool + k * module_len for k in range(cfg.num_modules)}
        self.blocks = nn.ModuleList()
        for kind in self.kinds:
            kwargs = {"use_kernel": True} if _BLOCKS[kind] is DiTBlock else {}
            self.blocks.append(_BLOCKS[kind](cfg.hidden_size, cfg.num_heads, cfg.mlp_ratio, **kwargs))
        self.initialize_weights()

    def initialize_weights(self):
        super().initialize_weights()
        for block in self.blocks:
            if isinstance(block, RecoveryBlock):
                block.reset_fusion()

    def extra_repr(self):
        cfg = self.config
        return (f"plan: P={cfg.num_pool}, K={cfg.num_modules} x (g, s, r, d)={cfg.group}, T={cfg.num_top}, "
                f"grid={cfg.grid}")

    def forward(self, x, t, y, grid: Optional[GridLike] = None):
        """x: (B, C_in, H, W), t: (B,), y: (B,), grid: sparse grid side G or (G_h, G_w) (default config.grid).

        Returns (B, out_channels, H, W). The grid may change from call to call (temporal density schedule).
        """
        hw = self.token_grid
        grid = _check_grid(self.config.grid if grid is None else grid, hw) if self.config.num_modules else None
        x, c = self.embed(x, t, y)                       # (B, N, C)
        for i, (kind, block) in enumerate(zip(self.kinds, self.blocks)):
            if i in self.module_starts:
                dense_in = x                             # the module's dense input: keys of gen, skip of recovery
                xs = fk.token_pool(x, hw, grid)          # (B, M, C)
            if kind == "gen":
                xs = block(xs, dense_in, c)              # (B, M, C)
            elif kind == "sparse":
                xs = block(xs, c)                        # (B, M, C)
            elif kind == "recover":
                x = block(xs, x, c, hw, grid)            # (B, N, C)
            else:
                x = block(x, c)                          # (B, N, C)
        x = self.final_layer(x, c)                       # (B, N, p*p*out)
        return self.unpatchify(x)


#################################################################################
#                                   Registry                                    #
#################################################################################

DiT_SIZES = {
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
}

# Decided layer plans by depth (REFERENCE §2): (P, K, (g, s, r, d), T).
FLEX_PLANS = {
    28: dict(num_pool=2, num_modules=4, group=(1, 3, 1, 1), num_top=2),
    24: dict(num_pool=2, num_modules=4, group=(1, 2, 1, 1), num_top=2),
    12: dict(num_pool=1, num_modules=2, group=(1, 2, 1, 1), num_top=1),
}

DiT_models = {f"DiT-{s}/{p}": dict(patch_size=p, **kw) for s, kw in DiT_SIZES.items() for p in (2, 4, 8)}
FlexDiT_models = {f"Flex{name}": kw for name, kw in DiT_models.items()}


def _lookup(name, table):
    if name not in table:
        raise ValueError(f"unknown model name {name!r}; known: {', '.join(sorted(table))}")
    return dict(table[name])


def flexdit_config(name: str, **overrides) -> FlexDiTConfig:
    """The decided FlexDiT config for a registry name ("FlexDiT-XL/2", or the dense name "DiT-XL/2").

    The default sparse grid is 8x8, or the whole token grid when that is smaller.
    """
    key = name if name.startswith("Flex") else f"Flex{name}"
    kwargs = _lookup(key, FlexDiT_models)
    kwargs.update(FLEX_PLANS.get(overrides.get("depth", kwargs["depth"]), {}))
    kwargs.update(overrides)
    if "grid" not in overrides:
        h, w = to_pair(kwargs.get("input_size", 32))
        kwargs["grid"] = min(8, h // kwargs["patch_size"], w // kwargs["patch_size"])
    return FlexDiTConfig(**kwargs)


def create_model(name: str, **overrides) -> nn.Module:
    """Build a registered model by name: "DiT-XL/2" (dense) or "FlexDiT-XL/2"; overrides replace config fields."""
    if isinstance(name, str) and name.startswith("FlexDiT-"):
        return FlexDiT(flexdit_config(name, **overrides))
    kwargs = _lookup(name, DiT_models)
    kwargs.update(overrides)
    return DiT(**kwargs)
