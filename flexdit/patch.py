"""Patch a dense DiT, a diffusers DiT, PixArt-α or Latte into FlexDiT in place, and undo it.

`apply_patch` / `remove_patch` follow tomesd: the host's block list is swapped for FlexDiT layers built from copies of
its blocks (the paper's weight mapping), the host's own forward still runs (so pipelines work unchanged), and
`remove_patch` puts the original block objects back, untouched, so outputs are bit-identical to the unpatched model.
Each call reaches the layers through forward hooks (tomesd's `hook_tome_model`): the host's pre-hook takes `grid=`
and sets the route state (the DiT layout's `t_embedder` pre-hook does, so that a direct `self.forward` call is
served too), and the host's forward hook, run even when the forward raises, clears it.
"""
import copy
import functools
import inspect
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn

from .convert import from_dit
from .layers import adaln_silu, to_pair
from .mmdit import HOSTS, MMDiTRouteState, host_of
from .models import FlexDiTConfig
from .plan import GridLike, Plan, Slot, parse_grid
from .router import FlexLayer, Routed, RouteState
from .schedule import one_grid

_RECORD = "_flexdit_patch"


#################################################################################
#                  Layers: host adapters of the one router                      #
#################################################################################

def _grid_of(schedule, t, token_grid) -> Tuple[int, int]:
    """The sparse grid for timestep(s) t: a fixed int/pair, or `schedule.grid(t)` (a tensor of per-sample sides
    must hold one value: `one_grid`)."""
    grid = schedule
    if hasattr(schedule, "grid") and callable(schedule.grid):
        if isinstance(t, torch.Tensor) and t.numel() > 0 and bool((t == t.flatten()[0]).all()):
            t = t.flatten()[0]                      # one timestep for the batch (pipelines expand a scalar)
        grid = schedule.grid(t)
    return parse_grid(one_grid(grid) if isinstance(grid, torch.Tensor) else grid, token_grid)


# ------------------------------------------------------------------ (b, c) diffusers BasicTransformerBlock

def _linear_from(src: nn.Linear, rows=None) -> Tuple[torch.Tensor, torch.Tensor]:
    weight = torch.cat([m.weight for m in rows]) if rows else src.weight
    biases = [m.bias if m.bias is not None else torch.zeros(m.out_features, dtype=m.weight.dtype,
                                                             device=m.weight.device) for m in (rows or [src])]
    return weight.detach().clone(), torch.cat(biases).detach().clone()


def _same(module):
    """The block part itself, for layers that take over the host's blocks (`apply_patch(keep_original=False)`)."""
    return module


def _load_linear(dst: nn.Linear, weight_bias):
    weight, bias = weight_bias
    dst.weight = nn.Parameter(weight)
    dst.bias = nn.Parameter(bias)


class DiffusersFlexLayer(FlexLayer):
    """A FlexDiT layer over a copy of a diffusers `BasicTransformerBlock` (adaLN-Zero DiT or adaLN-single PixArt-α).

    Dense and sparse layers run a deep copy of the block itself. Poolingformer, generation and recovery layers keep
    copies of the block's norms, feed-forward, adaLN and (PixArt-α) text cross-attention `attn2`, and hold the
    project's `PoolingAttention` (`attn1.to_v`, `to_out.0`) or `CrossAttention` (`to_q`; `to_k` ‖ `to_v`; `to_out.0`).
    Attribute reads the layer lacks fall through to the block copy (the diffusers DiT reads
    `transformer_blocks[0].norm1.emb`).
    """

    def __init__(self, block, slot: Slot, state: RouteState, copy_block: bool = True):
        super().__init__(slot, state)
        take = copy.deepcopy if copy_block else _same
        self.ada_single = block.norm_type == "ada_norm_single"
        if self.kind in ("dense", "sparse"):
            self.block = take(block)
            return
        attn1, dim = block.attn1, block.dim
        self.norm1 = take(block.norm1)  # DiT: AdaLayerNormZero (the host reads blocks[0].norm1.emb)
        if self.ada_single:
            self.scale_shift_table = nn.Parameter(block.scale_shift_table.detach().clone())
        self.norm2 = take(block.norm2 if self.ada_single else block.norm3)
        self.mlp = take(block.ff)
        self.attn2 = take(block.attn2) if block.attn2 is not None else None
        self.has_after_attention = self.attn2 is not None
        w = attn1.to_out[0].weight
        with torch.device(w.device):
            self.build_attention(dim, attn1.heads)
        self.to(w.dtype)
        if self.kind == "pool":
            _load_linear(self.attn.v, _linear_from(attn1.to_v))
        else:
            _load_linear(self.attn.q, _linear_from(attn1.to_q))
            _load_linear(self.attn.kv, _linear_from(None, rows=[attn1.to_k, attn1.to_v]))
        _load_linear(self.attn.proj, _linear_from(attn1.to_out[0]))
        if self.kind == "recover":
            self.reset_fusion()

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            block = self.__dict__.get("_modules", {}).get("block")
            if block is None:
                raise
            return getattr(block, name)

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                timestep=None, cross_attention_kwargs=None, class_labels=None, added_cond_kwargs=None):
        cond = dict(attention_mask=attention_mask, encoder_hidden_states=encoder_hidden_states,
                    encoder_attention_mask=encoder_attention_mask, timestep=timestep,
                    cross_attention_kwargs=cross_attention_kwargs, class_labels=class_labels,
                    added_cond_kwargs=added_cond_kwargs)
        return self.route(hidden_states, cond)

    # -- the hooks of the router
    def dense(self, x, cond):
        return self.block(x, **cond)

    def modulation(self, x, cond):
        """shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp, each (B, C)."""
        timestep = cond["timestep"]
        if self.ada_single:
            return (self.scale_shift_table[None] + timestep.reshape(len(timestep), 6, -1)).unbind(1)
        ada = self.norm1
        emb = ada.emb(timestep, cond["class_labels"], hidden_dtype=x.dtype)
        return ada.linear(adaln_silu(emb)).chunk(6, dim=1)

    def attn_layer_norm(self):
        return self.norm1 if self.ada_single else self.norm1.norm

    def after_attention(self, x, cond):
        if self.attn2 is None:
            return x
        # PixArt-α: every layer attends to the caption, whichever tokens it holds
        return x + self.attn2(x, encoder_hidden_states=cond["encoder_hidden_states"],
                              attention_mask=cond["encoder_attention_mask"], **(cond["cross_attention_kwargs"] or {}))


# ------------------------------------------------------------------ (d) diffusers Latte: temporal blocks

class VideoRouteState(RouteState):
    """RouteState plus the clip's batch size and frame count: spatial layers see the frames folded into the batch
    (B·T, N or M, C); temporal layers see the tokens folded into it (B·N or B·M, T, C)."""

    def __init__(self):
        super().__init__()
        self.batch: Optional[int] = None
        self.frames: Optional[int] = None

    def begin_clip(self, batch: int, frames: int) -> None:
        self.batch, self.frames = batch, frames

    def clear(self) -> None:
        super().clear()
        self.batch, self.frames = None, None


class TemporalFlexLayer(Routed):
    """The temporal half of a Latte spatial/temporal pair: a copy of the temporal `BasicTransformerBlock`, run as is.

    It attends across the T frames over the tokens its spatial layer left: the N dense tokens, or, where the spatial
    output is sparse (`gen` and `sparse` layers), the M sparse tokens at each sparse location, (B·M, T, C). The host
    passes one timestep row per dense token (B·N rows); for sparse input the layer takes each sample's row M times.
    """

    def __init__(self, block, slot: Slot, state: VideoRouteState, copy_block: bool = True):
        super().__init__()
        self.slot = slot
        self.kind = slot.kind
        self._state = state
        self.block = copy.deepcopy(block) if copy_block else block

    @property
    def sparse_input(self) -> bool:
        return self.slot.module is not None and self.kind in ("gen", "sparse")

    def extra_repr(self):
        return f"kind={self.kind}, tokens={'sparse' if self.sparse_input else 'dense'}"

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                timestep=None, cross_attention_kwargs=None, class_labels=None, added_cond_kwargs=None):
        if self.sparse_input and timestep is not None:
            timestep = self.sparse_rows(hidden_states, timestep)
        return self.block(hidden_states, attention_mask=attention_mask, encoder_hidden_states=encoder_hidden_states,
                          encoder_attention_mask=encoder_attention_mask, timestep=timestep,
                          cross_attention_kwargs=cross_attention_kwargs, class_labels=class_labels,
                          added_cond_kwargs=added_cond_kwargs)

    def sparse_rows(self, x, timestep):
        """The host's per-token timestep rows (B·N, D) → (B·M, D) for the M sparse tokens of each sample."""
        st = self._state
        if st is None or st.batch is None or st.grid is None:
            raise ValueError("a FlexDiT temporal layer runs only inside its model's forward (no clip state)")
        b, n, m = st.batch, st.token_grid[0] * st.token_grid[1], st.grid[0] * st.grid[1]
        if x.shape[0] != b * m:
            raise ValueError(f"temporal layer input has {x.shape[0]} rows, expected batch {b} x {m} sparse tokens")
        if timestep.shape[0] == b * m:
            return timestep
        if timestep.shape[0] != b * n:
            raise ValueError(f"temporal timestep has {timestep.shape[0]} rows, expected batch {b} x {n} tokens")
        rows = timestep.unflatten(0, (b, n))[:, :1]                              # (B, 1, D): one row per sample
        return rows.expand(b, m, *rows.shape[2:]).reshape(b * m, *rows.shape[2:])


#################################################################################
#                                  The patch                                    #
#################################################################################

class FlexPatch(nn.ModuleList):
    """The patched block list: FlexDiT layers standing in for the host's blocks (`print(model)` shows the plan)."""

    def __init__(self, layers, target, plan, schedule):
        super().__init__(layers)
        self.target = target
        self.plan = plan
        self.schedule = schedule

    def extra_repr(self):
        sched = "" if self.schedule is None or not hasattr(self.schedule, "grid") else \
            f", schedule={type(self.schedule).__name__}"
        return f"FlexDiT patch of a {self.target}: {self.plan}{sched}"

    __repr__ = nn.Module.__repr__  # the full listing with extra_repr, not ModuleList's compressed one


@dataclass
class _Record:
    """What a patch changed on its module, kept there as `_flexdit_patch` (outside the module tree): what
    `remove_patch` puts back and removes, and what the patch's hooks read on every call."""
    originals: Optional[Dict[str, nn.ModuleList]]  # attribute -> the host's block list it replaced, untouched (the
    # plan's first); None where the layers took the blocks over (`keep_original=False`)
    outside: Dict[str, torch.Tensor]     # the host's weights outside the blocks (shared with the patch): a snapshot
    plan: Plan
    schedule: Any
    state: RouteState                    # the layers' route state
    handles: list = field(default_factory=list)  # the patch's hooks (torch's RemovableHandle)
    grid: Optional[GridLike] = None      # the running call's `grid=`
    checkpointing: bool = False          # the host's gradient checkpointing, handed to the layers for the call


_TARGETS = {  # target → (block list, block class name, latent argument, timestep argument of the host's forward)
    "dit": ("blocks", "DiTBlock", "x", "t"),
    "diffusers-dit": ("transformer_blocks", "BasicTransformerBlock", "hidden_states", "timestep"),
    "pixart-alpha": ("transformer_blocks", "BasicTransformerBlock", "hidden_states", "timestep"),
    "latte": ("transformer_blocks", "BasicTransformerBlock", "hidden_states", "timestep"),
    "sd3": ("transformer_blocks", "JointTransformerBlock", "hidden_states", "timestep"),
    "flux": ("transformer_blocks", "FluxTransformerBlock", "hidden_states", "timestep"),
}
_TEMPORAL = "temporal_transformer_blocks"  # Latte's temporal blocks, one after each spatial block


def host_module(model) -> nn.Module:
    """The module `apply_patch` patches: `model` itself, or a pipeline's `.transformer`."""
    if isinstance(model, nn.Module):
        return model
    inner = getattr(model, "transformer", None)
    if isinstance(inner, nn.Module):
        return inner
    raise ValueError(f"cannot patch a {type(model).__name__}: expected a DiT-layout module, a diffusers "
                     f"DiTTransformer2DModel / PixArtTransformer2DModel / LatteTransformer3DModel / "
                     f"SD3Transformer2DModel / FluxTransformer2DModel, or a pipeline with a `.transformer`")


def _target_of(module) -> str:
    name = type(module).__name__
    if name == "DiTTransformer2DModel":
        return "diffusers-dit"
    if name == "PixArtTransformer2DModel":
        return "pixart-alpha"
    if name == "LatteTransformer3DModel":
        return "latte"
    if host_of(module) is not None:
        return host_of(module).target
    if all(hasattr(module, a) for a in ("x_embedder", "t_embedder", "y_embedder", "blocks", "final_layer")):
        return "dit"
    raise ValueError(f"unsupported model {name}: expected the DiT layout (x_embedder, t_embedder, y_embedder, "
                     f"blocks, final_layer), a diffusers DiTTransformer2DModel, PixArtTransformer2DModel, "
                     f"LatteTransformer3DModel, SD3Transformer2DModel or FluxTransformer2DModel")


def _check_blocks(blocks, class_name, target):
    bad = sorted({type(b).__name__ for b in blocks if type(b).__name__ != class_name})
    if bad:
        raise ValueError(f"unsupported block types {bad} in a {target}: every block must be a {class_name}")
    flex = [i for i, b in enumerate(blocks) if getattr(b, "kind", "dense") != "dense"]
    if flex:
        raise ValueError(f"blocks {flex} of this {target} are already FlexDiT layers: patch a dense model")
    if class_name != "BasicTransformerBlock":
        return
    norm = "ada_norm_single" if target in ("pixart-alpha", "latte") else "ada_norm_zero"
    for i, b in enumerate(blocks):
        attn = b.attn1
        problems = [msg for bad, msg in (
            (b.norm_type != norm, f"norm_type {b.norm_type!r} (expected {norm!r})"),
            (b.only_cross_attention or b.pos_embed is not None or hasattr(b, "fuser"),
             "cross-only attention, positional embedding or a GLIGEN fuser"),
            (getattr(attn, "fused_projections", False), "fused QKV projections (call unfuse_qkv_projections)"),
            (getattr(attn, "norm_q", None) is not None, "q/k normalisation"),
            (attn.to_q.out_features != b.dim or abs(attn.scale - (b.dim // attn.heads) ** -0.5) > 1e-9,
             "an inner dim or softmax scale other than DiT's"),
        ) if bad]
        if problems:
            raise ValueError(f"unsupported block {i} in a {target}: {'; '.join(problems)}")


def _dit_config(model, plan: Plan, token_grid) -> FlexDiTConfig:
    """The FlexDiTConfig of a DiT-layout module (sizes read off its layers) with `plan`."""
    proj = model.x_embedder.proj
    p = proj.kernel_size[0]
    blk = model.blocks[0]
    hidden = proj.out_channels
    table = model.y_embedder.embedding_table.num_embeddings
    dropout = float(getattr(model.y_embedder, "dropout_prob", 0.1))
    num_classes = int(getattr(model.y_embedder, "num_classes", table - (dropout > 0)))
    out = model.final_layer.linear.out_features // (p * p)
    return FlexDiTConfig(
        input_size=(token_grid[0] * p, token_grid[1] * p), patch_size=p, in_channels=proj.in_channels,
        hidden_size=hidden, depth=len(model.blocks), num_heads=blk.attn.num_heads,
        mlp_ratio=blk.mlp.fc1.out_features / hidden, class_dropout_prob=dropout, num_classes=num_classes,
        learn_sigma=out == 2 * proj.in_channels, plan=plan)


def _token_grid(module, target) -> Tuple[int, int]:
    if target == "dit":
        if hasattr(module, "token_grid"):
            return to_pair(module.token_grid)
        grid = getattr(module.x_embedder, "grid_size", None)  # timm PatchEmbed
        if grid is not None:
            return to_pair(tuple(grid))
        side = int(round(module.pos_embed.shape[1] ** 0.5))
        return side, side
    h, w = to_pair(module.config.sample_size)
    return h // module.config.patch_size, w // module.config.patch_size


def _begin(rec: _Record, token_grid, t) -> None:
    """Set the route state for one call: the token grid and the sparse grid (the call's `grid=`, else the schedule's
    at timestep(s) t, else the plan's)."""
    if not rec.plan.num_modules:
        sparse = None
    elif rec.grid is not None:
        sparse = parse_grid(rec.grid, token_grid)
    else:
        sparse = _grid_of(rec.plan.grid if rec.schedule is None else rec.schedule, t, token_grid)
    rec.state.begin(token_grid, sparse, rec.checkpointing)


def _enter(rec: _Record, target: str, signature: inspect.Signature, module, args, kwargs):
    """The host's forward pre-hook (run first): take the call's `grid=` (G, a pair or "GhxGw"), hand the host's
    gradient checkpointing to the layers (they recompute with the route state they saw; the host's loop calls them
    directly meanwhile) and, on every host but the DiT layout, set the route state from the call's arguments."""
    rec.grid = kwargs.pop("grid", None)
    rec.checkpointing = bool(getattr(module, "gradient_checkpointing", False))
    if rec.checkpointing:
        module.gradient_checkpointing = False
    if target == "dit":                          # its t_embedder's hook sets the route state
        return args, kwargs
    _, _, x_name, t_name = _TARGETS[target]
    # pipelines pass keywords only: the signature is bound just for positional calls
    bound = signature.bind(module, *args, **kwargs).arguments if args else kwargs
    x, t = bound.get(x_name), bound.get(t_name)
    if x is None or t is None:
        raise ValueError(f"a patched model needs `{x_name}` and `{t_name}` to choose its grid")
    host = HOSTS.get(target)
    if host is not None:  # MMDiT: the grid from the call's latent or image positions, t on the σ·1000 scale
        token_grid, t = host.call_grid(module, bound), host.schedule_time(t, rec.schedule)
    else:
        p = module.config.patch_size
        token_grid = (x.shape[-2] // p, x.shape[-1] // p)
    if target == "latte":
        if x.dim() != 5:
            raise ValueError(f"{x_name} must be a clip (B, C, T, H, W), got shape {tuple(x.shape)}")
        rec.state.begin_clip(x.shape[0], x.shape[2])
    _begin(rec, token_grid, t)
    if host is not None:
        host.begin(module, rec.state, bound)
    return args, kwargs


def _begin_dit(rec: _Record, token_grid, t_embedder, args) -> None:
    """The DiT layout's forward pre-hook of `t_embedder`, whose input is the timestep (the token grid is fixed)."""
    _begin(rec, token_grid, args[0])


def _exit(rec: _Record, module, args, output) -> None:
    """The host's forward hook, run even when the forward raises: clear the route state, give the host its gradient
    checkpointing back."""
    rec.state.clear()
    rec.grid = None
    if rec.checkpointing:
        module.gradient_checkpointing, rec.checkpointing = True, False


def apply_patch(model, plan=None, schedule=None, keep_original: bool = True):
    """Turn a dense DiT, diffusers DiT, PixArt-α, Latte, SD3 / SD3.5 or FLUX.1 (model or pipeline) into FlexDiT in
    place; returns `model`.

    The arguments that matter:
        model: a module with the published DiT layout (`x_embedder`, `t_embedder`, `y_embedder`, `blocks`,
            `final_layer`; the project's `DiT` too), a diffusers `DiTTransformer2DModel`,
            `PixArtTransformer2DModel`, `LatteTransformer3DModel`, `SD3Transformer2DModel` or
            `FluxTransformer2DModel`, or a pipeline holding one as `.transformer` (`DiTPipeline`,
            `PixArtAlphaPipeline`, `LattePipeline`, `StableDiffusion3Pipeline`, `FluxPipeline`).
        plan: `Plan(num_pool, num_modules, group, num_top, grid)`, a FlexDiTConfig or a dict of those fields;
            default: the decided plan for the model's depth (28, 24, 12; 57 for FLUX.1, 38 for SD3.5-large) with
            grid 8 clamped to the token grid (SD3 / FLUX: a quarter of each side of the token grid, 16 at 1024²).
        schedule: the sparse grid per call: an object with `grid(t)` (e.g. `flexdit.DensitySchedule`) given the
            timestep the host's forward receives (0..999; SD3 / FLUX: σ·1000, clamped to 999), or a fixed int /
            (G_h, G_w); default `plan.grid`. A call may name its own: `model(..., grid=(G_h, G_w))`.
        keep_original: keep the host's blocks untouched for `remove_patch` and `save_patched` (the layers work on
            copies). False: the layers take the blocks over, so the model holds its block weights once (FLUX.1-dev's
            blocks are 24 GB in bf16); `remove_patch`, patching again and `save_patched` then raise ValueError.

    To tinker with: `Plan(0, 0, (1, 3, 1, 1), depth)` (all dense) reproduces the host; `group` beyond (1, s, 1, 1).

    Blocks are re-used by the paper's mapping (Poolingformers keep V, cross layers split Q and KV, W1 = 0, W2 = I)
    as copies: the original blocks are kept untouched and `remove_patch` restores them. Patching twice equals
    patching once. A patched model needs fine-tuning (`flexdit-finetune`) before its samples are good. The forward
    signature is unchanged; it also takes `grid=` (G, a pair or "GhxGw"): that call's sparse grid,
    in place of the schedule's. Raises ValueError for unsupported models or blocks, a plan that does not fit
    the depth, or a grid larger than the token grid.

    Latte (video): a spatial block and the temporal block after it count as ONE layer of the plan, so the depth is
    the number of pairs (28 for Latte-XL/2: the decided XL plan applies). The spatial block takes the layer's kind
    and runs it within each frame (frames folded into the batch: (B·T, N or M, C)); the temporal block runs as is
    (a copy) across the T frames over the tokens the spatial block left: the M sparse tokens at each sparse
    location after `gen` and `sparse` layers, (B·M, T, C), the N dense tokens after the others, (B·N, T, C).
    Recovery's skip is the module's dense input before its first spatial block, as in the image models. One grid
    (G_h, G_w) serves every frame of a call; the frame count is read from `hidden_states` (B, C, T, H, W).
    MACs of one 16-frame 512² clip at Latte-XL/2 sizes (`flexdit.flops.count_macs_dispatch`, attention counted):
    dense 17.21 T (spatial blocks 9.88 T, temporal 7.33 T); patched with the decided plan and grid 8, 7.74 T
    (spatial 4.33 T, temporal 3.40 T): 55.0% fewer.

    SD3 / SD3.5 and FLUX.1 (MMDiT, `flexdit.mmdit`): text tokens are never pooled. Sparse layers attend over
    [text; M sparse image tokens]; sparse generation: sparse image queries over [text; dense image]; recovery:
    dense image queries over [text; sparse image]; text queries attend to the keys the image queries of their layer
    see; Poolingformers give every token the uniform-weight mean of the [text; image] values. FLUX's double- and
    single-stream blocks count one layer each (19 + 38). Sparse tokens take RoPE at their pooling window's centre;
    the token grid is read per call (SD3: the latent; FLUX: `img_ids`, a row-major grid). Attention masks,
    IP-adapters, ControlNet residuals and SD3's `skip_layers` are refused. MACs at 1024²: FLUX.1-dev 37.20 T ->
    16.17 T (-56.5%), SD3.5-medium 5.63 T -> 2.40 T (-57.3%), decided plans, grid 16.
    """
    module = host_module(model)
    remove_patch(module)
    target = _target_of(module)
    keep_original = bool(keep_original)
    attr, block_class, _, _ = _TARGETS[target]
    blocks = getattr(module, attr)
    host = HOSTS.get(target)  # the MMDiT adapter (SD3, FLUX), None for the others
    if host is None:
        _check_blocks(blocks, block_class, target)
        token_grid = _token_grid(module, target)
        plan = Plan.coerce(plan, len(blocks), token_grid)  # validates depth and grid
    else:
        host.check_blocks(module)
        token_grid = host.token_grid(module)
        plan = host.coerce_plan(plan, sum(map(len, host.block_lists(module).values())), token_grid)
    if schedule is not None and not (hasattr(schedule, "grid") and callable(schedule.grid)):
        parse_grid(schedule, token_grid, "schedule")  # a fixed grid: refuse now rather than at the first call
    temporal = None
    if target == "latte":
        temporal = getattr(module, _TEMPORAL)
        bad = sorted({type(b).__name__ for b in temporal if type(b).__name__ != block_class})
        if bad:
            raise ValueError(f"unsupported temporal block types {bad} in a latte: every block must be a {block_class}")
        if len(temporal) != len(blocks):
            raise ValueError(f"a latte needs one temporal block per spatial block, got {len(temporal)} and "
                             f"{len(blocks)}")
    state = MMDiTRouteState() if host else RouteState() if temporal is None else VideoRouteState()
    new = {}  # attribute -> the FlexDiT layers replacing that block list
    if target == "dit":
        config = _dit_config(module, plan, token_grid)
        new[attr] = [b.attach(state) for b in from_dit(module.state_dict(), config).blocks]  # the paper's mapping
    elif host is not None:
        new = host.layers(module, plan, state, copy_block=keep_original)
    else:
        new[attr] = [DiffusersFlexLayer(b, slot, state, keep_original) for b, slot in zip(blocks, plan.slots())]
    if temporal is not None:
        new[_TEMPORAL] = [TemporalFlexLayer(b, slot, state, keep_original) for b, slot in zip(temporal, plan.slots())]

    originals = {a: getattr(module, a) for a in new}
    swapped = tuple(f"{a}." for a in originals)
    outside = {k: v.detach().clone() for k, v in module.state_dict(keep_vars=True).items()
               if not k.startswith(swapped)} if keep_original else {}
    for a, layers in new.items():
        patched = FlexPatch(layers, target, plan, schedule) if a == attr else nn.ModuleList(layers)
        setattr(module, a, patched.train(originals[a].training))
    rec = module.__dict__[_RECORD] = _Record(originals if keep_original else None, outside, plan, schedule, state)
    enter = functools.partial(_enter, rec, target, inspect.signature(type(module).forward))
    rec.handles = [module.register_forward_pre_hook(enter, prepend=True, with_kwargs=True),
                   module.register_forward_hook(functools.partial(_exit, rec), always_call=True)]
    if target == "dit":   # facebookresearch DiT's forward_with_cfg calls self.forward, which skips the host's hooks
        rec.handles.append(module.t_embedder.register_forward_pre_hook(functools.partial(_begin_dit, rec, token_grid)))
    if hasattr(module, "save_pretrained"):   # it would write blocks that from_pretrained reloads at random
        module.save_pretrained = functools.partial(_refuse_save_pretrained, type(module).__name__)
    return model


def _refuse_save_pretrained(name: str, *args, **kwargs):
    raise ValueError(f"this {name} is patched by flexdit: from_pretrained would reload its FlexDiT "
                     "layers as randomly initialised dense blocks. Use flexdit.save_patched(model, DIR) and "
                     "flexdit.load_patched(DIR), or flexdit.remove_patch(model) first to save the dense model")


def remove_patch(model):
    """Undo `apply_patch`: the original block lists come back untouched and the patch's hooks go; returns `model`.

    Weights outside the blocks (embedders, final layer), which the patch shares with the host, are reset to their
    values at patching time, so a fine-tuned patched model returns to the original. A no-op on a model that is not
    patched. If the patched model was moved or cast, the originals follow. ValueError for a model patched with
    `keep_original=False` (nothing to restore).
    """
    module = host_module(model)
    rec = module.__dict__.get(_RECORD)
    if rec is None:
        return model
    if rec.originals is None:
        raise ValueError(f"model: this {type(module).__name__} was patched with keep_original=False, so its dense "
                         "blocks are gone: it cannot be unpatched or patched again; load the dense model anew")
    del module.__dict__[_RECORD]
    for handle in rec.handles:
        handle.remove()
    for attr, original in rec.originals.items():
        ref = next(getattr(module, attr).parameters(), None)
        orig = next(original.parameters(), None)
        if ref is not None and orig is not None:
            if ref.device != orig.device:
                original.to(ref.device)
            if ref.dtype != orig.dtype and ref.dtype.is_floating_point:
                original.to(ref.dtype)
        setattr(module, attr, original)
    current = module.state_dict(keep_vars=True)
    with torch.no_grad():  # embedders and final layer were shared with the patch: undo any fine-tuning of them
        for key, saved in rec.outside.items():
            if key in current and not torch.equal(current[key].detach().to(saved.device, saved.dtype), saved):
                current[key].copy_(saved)
    module.__dict__.pop("save_pretrained", None)
    return model


def is_patched(model) -> bool:
    return patch_record(model) is not None


def patch_record(model) -> Optional[_Record]:
    """The record of the patch on `model` (a pipeline's `.transformer`), None when it is not patched: its `plan` and
    `schedule`, `originals` (attribute -> the host's block list it replaced) and `outside` (the host's weights outside
    those lists at patching time)."""
    return host_module(model).__dict__.get(_RECORD)


def set_checkpointing(model, on: bool = True):
    """Turn activation checkpointing on or off: every block or FlexDiT layer is recomputed in the backward
    (`torch.utils.checkpoint`, use_reentrant=False), same outputs and gradients, less activation memory; returns
    `model`.

    model: a FlexDiT, DiT or FlexLatte, a patched model or pipeline, or a diffusers model (DDP wrappers are looked
    through). On a diffusers model this is its own `enable_gradient_checkpointing()` / `disable_...()`, which a
    patched one honours too; the project's models and a patched DiT-layout module read `gradient_checkpointing`.
    """
    module = getattr(model, "module", model)
    host = module if hasattr(module, "enable_gradient_checkpointing") else getattr(module, "transformer", None)
    if hasattr(host, "enable_gradient_checkpointing"):       # diffusers models, FlexLatte and pipelines hold one
        if on:
            host.enable_gradient_checkpointing()
        else:
            host.disable_gradient_checkpointing()
    elif isinstance(module, nn.Module) and (hasattr(module, "route_state") or _RECORD in module.__dict__):
        module.gradient_checkpointing = bool(on)
    else:
        raise ValueError(f"model: cannot checkpoint a {type(module).__name__}; expected a FlexDiT, DiT or FlexLatte, "
                         f"a patched model or a diffusers model")
    return model
