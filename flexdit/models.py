"""The dense DiT (Peebles & Xie) and FlexDiT (arXiv 2412.06028) with published-checkpoint parameter names."""
import dataclasses
from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

import torch
import torch.nn as nn

from .diffusion import check_labels, check_timesteps
from .layers import LabelEmbedder, Mlp, PatchEmbed, SiLU, TimestepEmbedder, get_2d_sincos_pos_embed, to_pair
from .plan import GridLike, Plan, Slot, split_plan_fields
from .router import FlexLayer, RouteState, norm_modulate
from .sizes import ModelArgs, names as size_names


#################################################################################
#                                 Core DiT Blocks                               #
#################################################################################

class DiTBlock(FlexLayer):
    """A DiT block with adaptive layer norm zero (adaLN-Zero) conditioning, as any FlexDiT layer kind.

    kind "dense" (the default) is DiT's block; "pool", "gen" and "recover" swap its attention for the Poolingformer,
    sparse-generation and dense-recovery forms (see `FlexLayer`). The parameter names are DiT's.
    """

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, slot: Slot = Slot("dense"),
                 state: Optional[RouteState] = None):
        super().__init__(slot, state)
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.build_attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x, c):
        """x: (B, L, C) tokens, c: (B, C) conditioning -> the next layer's tokens."""
        return self.route(x, c)

    def modulation(self, x, c):
        """shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp, each (B, C)."""
        return self.adaLN_modulation(c).chunk(6, dim=1)


class FinalLayer(nn.Module):
    """The final layer of DiT: adaLN (shift, scale) and a linear map to patch pixels."""

    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(norm_modulate(self.norm_final, x, shift, scale))


#################################################################################
#                                   DiT models                                  #
#################################################################################

class _DiTShell(nn.Module):
    """Embedders, positional table, final layer and (un)patchify shared by DiT and FlexDiT."""

    gradient_checkpointing = False  # recompute every block in the backward (see `flexdit.set_checkpointing`)

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
        t = check_timesteps(t, x.shape[0]).to(x.device)
        # The null label of guidance exists only when the model was built with label dropout.
        y = check_labels(y, x.shape[0], self.y_embedder.num_classes, null=self.y_embedder.dropout_prob > 0)
        # pos_embed first: the sum takes its row-major layout, so the residual stream is contiguous from the first
        # layer on (the patch embedding's tokens are a transposed view of the convolution's output).
        tokens = self.pos_embed + self.x_embedder(x)                         # (B, N, C)
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

        Guidance is applied to the first `cfg_channels` eps channels (3 as in DiT; 4 for all eps channels). The
        batch goes through `self(...)`, so module hooks (a patch's, a profiler's) see the call.
        """
        half = x[: len(x) // 2]
        combined = torch.cat([half, half], dim=0)
        model_out = self(combined, t, y, **kwargs)
        eps, rest = model_out[:, :cfg_channels], model_out[:, cfg_channels:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        eps = torch.cat([half_eps, half_eps], dim=0)
        return torch.cat([eps, rest], dim=1)


class DiT(_DiTShell):
    """Diffusion model with a Transformer backbone. Attention (`flexdit_kernels.attention`: PyTorch SDPA at dense
    shapes) and the adaLN steps follow the kernels backend; under `flexdit_kernels.backend("reference")` it is the
    published computation."""

    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                 mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000, learn_sigma=True):
        super().__init__(input_size, patch_size, in_channels, hidden_size, num_heads, class_dropout_prob,
                         num_classes, learn_sigma)
        self.route_state = RouteState()
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio, state=self.route_state)
                                     for _ in range(depth)])
        self.initialize_weights()

    def forward(self, x, t, y):
        """x: (B, C_in, H, W) latents, t: (B,) timesteps, y: (B,) labels → (B, out_channels, H, W)."""
        x, c = self.embed(x, t, y)       # (B, N, C)
        x = self.route_state.run(self.blocks, x, self.token_grid, None, c,
                                 checkpointing=self.gradient_checkpointing)  # (B, N, C)
        x = self.final_layer(x, c)       # (B, N, p*p*out)
        return self.unpatchify(x)


#################################################################################
#                                   FlexDiT                                     #
#################################################################################

@dataclass
class FlexDiTConfig:
    """A class-conditional DiT's size plus FlexDiT's layer plan (default: the decided plan for its depth)."""

    input_size: Union[int, Tuple[int, int]] = 32
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    learn_sigma: bool = True
    plan: Optional[Plan] = None
    class_dropout_prob: float = 0.1
    num_classes: int = 1000

    def __post_init__(self):
        if isinstance(self.input_size, (list, tuple)):
            self.input_size = tuple(int(v) for v in self.input_size)
        self.plan = Plan.coerce(self.plan, self.depth, self.token_grid)

    @property
    def token_grid(self) -> Tuple[int, int]:
        h, w = to_pair(self.input_size)
        return h // self.patch_size, w // self.patch_size

    def layer_kinds(self) -> List[str]:
        return self.plan.layer_kinds()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        """A config from `to_dict()`'s output, or from a flat dict whose plan fields stand beside the sizes."""
        plan_kw, rest = split_plan_fields(d)
        if plan_kw:
            rest["plan"] = {**(rest.get("plan") or {}), **plan_kw}
        return cls(**rest)

    def dit_kwargs(self) -> dict:
        """Constructor arguments of the dense DiT this FlexDiT is built from."""
        names = ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "mlp_ratio",
                 "class_dropout_prob", "num_classes", "learn_sigma")
        return {n: getattr(self, n) for n in names}


class FlexDiT(_DiTShell):
    """DiT with Poolingformers at the bottom, Sparse-Dense Token Modules in the middle and dense blocks on top."""

    def __init__(self, config: FlexDiTConfig):
        cfg = config
        super().__init__(cfg.input_size, cfg.patch_size, cfg.in_channels, cfg.hidden_size, cfg.num_heads,
                         cfg.class_dropout_prob, cfg.num_classes, cfg.learn_sigma)
        self.config = cfg
        self.kinds = cfg.layer_kinds()
        self.route_state = RouteState()
        self.blocks = nn.ModuleList([DiTBlock(cfg.hidden_size, cfg.num_heads, cfg.mlp_ratio,
                                              slot=slot, state=self.route_state) for slot in cfg.plan.slots()])
        self.initialize_weights()

    def initialize_weights(self):
        super().initialize_weights()
        for block in self.blocks:
            if block.kind == "recover":
                block.reset_fusion()

    def extra_repr(self):
        return f"plan: {self.config.plan}"

    def forward(self, x, t, y, grid: Optional[GridLike] = None):
        """x: (B, C_in, H, W), t: (B,), y: (B,), grid: sparse grid G, (G_h, G_w) or "GhxGw" (default: the plan's).

        Returns (B, out_channels, H, W). The grid may change from call to call (temporal density schedule).
        """
        token_grid = self.token_grid
        grid = self.config.plan.sparse_grid(grid, token_grid)
        x, c = self.embed(x, t, y)                                      # (B, N, C)
        x = self.route_state.run(self.blocks, x, token_grid, grid, c,
                                 checkpointing=self.gradient_checkpointing)  # (B, N, C)
        x = self.final_layer(x, c)                                      # (B, N, p*p*out)
        return self.unpatchify(x)


#################################################################################
#                                   Registry                                    #
#################################################################################

DiT_models = {name: ModelArgs.from_name(name).dit_kwargs() for name in size_names("dit")}
FlexDiT_models = {f"Flex{name}": kw for name, kw in DiT_models.items()}


def dit_size(name: str) -> dict:
    """The DiT / FlexDiT constructor fields of a size name of `flexdit.sizes` ("DiT-XL/2" or "FlexDiT-XL/2")."""
    args = ModelArgs.from_name(name)
    if args.host != "dit":
        raise ValueError(f"unknown model name {name!r} for a DiT or FlexDiT (it is a {args.host} size); known: "
                         f"{', '.join(sorted(DiT_models) + sorted(FlexDiT_models))}")
    return args.dit_kwargs()


def flexdit_config(name: str, **overrides) -> FlexDiTConfig:
    """The decided FlexDiT config for a registry name ("FlexDiT-XL/2", or the dense name "DiT-XL/2").

    `overrides` replace size fields, and plan fields (num_pool, num_modules, group, num_top, grid) replace those of
    the decided plan (grid 8x8, clamped to the token grid); or pass a whole `plan=Plan(...)`.
    """
    kwargs = dit_size(name)
    plan_kw, rest = split_plan_fields(overrides)
    kwargs.update(rest)
    if kwargs.get("plan") is None:
        h, w = to_pair(kwargs.get("input_size", 32))
        kwargs["plan"] = Plan.for_depth(kwargs["depth"], (h // kwargs["patch_size"], w // kwargs["patch_size"]),
                                        **plan_kw)
    elif plan_kw:
        raise ValueError(f"give plan fields {sorted(plan_kw)} or plan=, not both")
    return FlexDiTConfig(**kwargs)


def create_model(name: str, **overrides) -> nn.Module:
    """Build a registered model by name: "DiT-XL/2" (dense) or "FlexDiT-XL/2"; overrides replace config fields."""
    if isinstance(name, str) and name.startswith("FlexDiT-"):
        return FlexDiT(flexdit_config(name, **overrides))
    kwargs = dit_size(name)
    kwargs.update(overrides)
    return DiT(**kwargs)
