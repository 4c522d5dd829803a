"""Patch a dense DiT, a diffusers DiT or a diffusers PixArt-α into FlexDiT in place, and undo it.

`apply_patch` / `remove_patch` follow tomesd: the host's block list is swapped for FlexDiT layers built from copies of
its blocks (REFERENCE §2 mapping), the host's own forward still runs (so pipelines work unchanged), and
`remove_patch` puts the original block objects back, untouched, so outputs are bit-identical to the unpatched model.
"""
import copy
import dataclasses
import inspect
import types
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn

import flexdit_kernels as fk

from .convert import from_dit
from .layers import CrossAttention, PoolingAttention, modulate, to_pair
from .models import FLEX_PLANS, FlexDiTConfig, _check_grid

GridLike = Union[int, Tuple[int, int]]
_RECORD = "_flexdit_patch"


#################################################################################
#                                     Plans                                     #
#################################################################################

@dataclass
class Plan:
    """FlexDiT's layer plan: P Poolingformers, K × (g, s, r, d) modules, T top blocks and the sparse grid."""

    num_pool: int
    num_modules: int
    group: Tuple[int, int, int, int]
    num_top: int
    grid: GridLike = 8

    @classmethod
    def for_depth(cls, depth: int, token_grid: Tuple[int, int] = (8, 8)) -> "Plan":
        """The decided plan for a depth (REFERENCE §2), grid 8 clamped to the token grid."""
        if depth not in FLEX_PLANS:
            raise ValueError(f"no decided FlexDiT plan for depth {depth} (known: {sorted(FLEX_PLANS)}); "
                             f"pass plan=Plan(num_pool, num_modules, group, num_top, grid)")
        return cls(**FLEX_PLANS[depth], grid=min(8, *token_grid))

    def __str__(self):
        return f"P={self.num_pool}, K={self.num_modules} x (g, s, r, d)={tuple(self.group)}, T={self.num_top}, " \
               f"grid={self.grid}"


def as_plan(plan: Any, depth: int, token_grid: Tuple[int, int]) -> Plan:
    """A `Plan` from None (decided plan for `depth`), a Plan, a FlexDiTConfig-like object or a dict."""
    if plan is None:
        return Plan.for_depth(depth, token_grid)
    if isinstance(plan, Plan):
        return dataclasses.replace(plan, group=tuple(plan.group))
    fields = ("num_pool", "num_modules", "group", "num_top", "grid")
    if isinstance(plan, Mapping):
        unknown = set(plan) - set(fields)
        if unknown:
            raise ValueError(f"plan has unknown keys {sorted(unknown)}; expected {fields}")
        kw = {"grid": min(8, *token_grid), **plan}
    elif all(hasattr(plan, f) for f in fields):
        kw = {f: getattr(plan, f) for f in fields}
    else:
        raise ValueError(f"plan must be a Plan, a FlexDiTConfig or a dict of {fields}, got {type(plan).__name__}")
    missing = [f for f in fields if f not in kw]
    if missing:
        raise ValueError(f"plan misses {missing}")
    return Plan(kw["num_pool"], kw["num_modules"], tuple(kw["group"]), kw["num_top"], kw["grid"])


def _grid_of(schedule, t, token_grid) -> Tuple[int, int]:
    """The sparse grid for timestep(s) t: a fixed int/pair, or `schedule.grid(t)`; one grid per forward."""
    if hasattr(schedule, "grid") and callable(schedule.grid):
        if isinstance(t, torch.Tensor) and t.numel() > 0 and bool((t == t.flatten()[0]).all()):
            t = t.flatten()[0]                      # one timestep for the batch (pipelines expand a scalar)
        grid = schedule.grid(t)
    else:
        grid = schedule
    if isinstance(grid, torch.Tensor):
        values = grid.flatten().unique()
        if values.numel() != 1:
            raise ValueError(f"timesteps of one batch select different grids {values.tolist()}; "
                             f"FlexDiT runs one grid per forward")
        grid = int(values.item())
    return _check_grid(grid, token_grid)


#################################################################################
#                     Layers: routing shared by every target                    #
#################################################################################

class _FlexState:
    """Per-forward state shared by the layers of one patch: token grid, sparse grid, module inputs."""

    def __init__(self):
        self.hw = None
        self.grid = None
        self.dense = {}   # module index → its dense input X (keys of generation, skip of recovery)
        self.sparse = {}  # module index → the sparse tokens X_s entering recovery

    def clear(self):
        self.hw, self.grid = None, None
        self.dense.clear()
        self.sparse.clear()


class _FlexLayer(nn.Module):
    """One FlexDiT layer in the host's block loop: the host passes one tensor from block to block, so a module's
    first layer pools it to the sparse grid and stashes the dense input; recovery brings the dense tokens back."""

    def __init__(self, kind, module_index, starts_module, first_recover, state):
        super().__init__()
        self.kind = kind
        self.module_index = module_index
        self.starts_module = starts_module
        self.first_recover = first_recover
        self._state = state

    def route(self, x, **cond):
        st, k = self._state, self.module_index
        if st.hw is None:
            raise ValueError("a patched layer was called outside its model's forward (no token grid known)")
        if self.starts_module:
            st.dense[k] = x
            x = fk.token_pool(x, st.hw, st.grid)                               # (B, M, C)
        if self.kind == "gen":
            return self.generate(x, st.dense[k], **cond)                       # (B, M, C)
        if self.kind == "recover":
            if self.first_recover:
                st.sparse[k] = x
                xs, skip = x, st.dense[k]
            else:
                xs, skip = st.sparse[k], x
            return self.recover(xs, skip, st.hw, st.grid, **cond)              # (B, N, C)
        if self.kind == "pool":
            return self.pool(x, **cond)
        return self.plain(x, **cond)                                           # (B, N or M, C)

    def extra_repr(self):
        return f"kind={self.kind}" + (f", module={self.module_index}" if self.module_index is not None else "")


def _layer_slots(config: FlexDiTConfig):
    """(module index, starts its module, first recovery of its module) for every layer of the plan."""
    g, s, r, d = config.group
    module_len, start, end = g + s + r + d, config.num_pool, config.num_pool + config.num_modules * (g + s + r + d)
    slots = []
    for i, kind in enumerate(config.layer_kinds()):
        if start <= i < end:
            k, j = divmod(i - start, module_len)
            slots.append((k, j == 0, j == g + s))
        else:
            slots.append((None, False, False))
    return slots


# ------------------------------------------------------------------ (a) published DiT layout (and the project's DiT)

class DiTFlexLayer(_FlexLayer):
    """A FlexDiT layer over a DiT-layout block: `block` is the project's FlexDiT block with REFERENCE-mapped weights."""

    def __init__(self, block, kind, slot, state):
        super().__init__(kind, *slot, state)
        self.block = block

    def forward(self, x, c):
        return self.route(x, c=c)

    def plain(self, x, c):
        return self.block(x, c)

    pool = plain

    def generate(self, xs, x, c):
        return self.block(xs, x, c)

    def recover(self, xs, x, hw, grid, c):
        return self.block(xs, x, c, hw, grid)


# ------------------------------------------------------------------ (b, c) diffusers BasicTransformerBlock

def _linear_from(src: nn.Linear, rows=None) -> Tuple[torch.Tensor, torch.Tensor]:
    weight = torch.cat([m.weight for m in rows]) if rows else src.weight
    biases = [m.bias if m.bias is not None else torch.zeros(m.out_features, dtype=m.weight.dtype,
                                                             device=m.weight.device) for m in (rows or [src])]
    return weight.detach().clone(), torch.cat(biases).detach().clone()


def _load_linear(dst: nn.Linear, weight_bias):
    weight, bias = weight_bias
    dst.weight = nn.Parameter(weight)
    dst.bias = nn.Parameter(bias)


class DiffusersFlexLayer(_FlexLayer):
    """A FlexDiT layer over a copy of a diffusers `BasicTransformerBlock` (adaLN-Zero DiT or adaLN-single PixArt-α).

    Dense and sparse layers run a deep copy of the block itself. Poolingformer, generation and recovery layers keep
    copies of the block's norms, feed-forward, adaLN and (PixArt-α) text cross-attention `attn2`, and hold the
    project's `PoolingAttention` (`attn1.to_v`, `to_out.0`) or `CrossAttention` (`to_q`; `to_k` ‖ `to_v`; `to_out.0`).
    Attribute reads the layer lacks fall through to the block copy (the diffusers DiT reads
    `transformer_blocks[0].norm1.emb`).
    """

    def __init__(self, block, kind, slot, state):
        super().__init__(kind, *slot, state)
        self.ada_single = block.norm_type == "ada_norm_single"
        if kind in ("dense", "sparse"):
            self.block = copy.deepcopy(block)
            return
        attn1, dim = block.attn1, block.dim
        self.norm1 = copy.deepcopy(block.norm1)
        if self.ada_single:
            self.scale_shift_table = nn.Parameter(block.scale_shift_table.detach().clone())
        self.norm_mlp = copy.deepcopy(block.norm2 if self.ada_single else block.norm3)
        self.ff = copy.deepcopy(block.ff)
        self.attn2 = copy.deepcopy(block.attn2) if block.attn2 is not None else None
        with torch.device("meta"):
            self.attn = PoolingAttention(dim) if kind == "pool" else CrossAttention(dim, attn1.heads)
        if kind == "pool":
            _load_linear(self.attn.v, _linear_from(attn1.to_v))
        else:
            _load_linear(self.attn.q, _linear_from(attn1.to_q))
            _load_linear(self.attn.kv, _linear_from(None, rows=[attn1.to_k, attn1.to_v]))
        _load_linear(self.attn.proj, _linear_from(attn1.to_out[0]))
        if kind == "recover":
            w = attn1.to_out[0].weight
            self.fuse_sparse = nn.Linear(dim, dim, device=w.device, dtype=w.dtype)  # W1 = 0
            self.fuse_dense = nn.Linear(dim, dim, device=w.device, dtype=w.dtype)   # W2 = I
            with torch.no_grad():
                self.fuse_sparse.weight.zero_()
                self.fuse_sparse.bias.zero_()
                self.fuse_dense.weight.copy_(torch.eye(dim))
                self.fuse_dense.bias.zero_()

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
        return self.route(hidden_states, **cond)

    # -- pieces of a block
    def _modulation(self, x, timestep, class_labels):
        """shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp, each (B, C)."""
        if self.ada_single:
            return (self.scale_shift_table[None] + timestep.reshape(len(timestep), 6, -1)).unbind(1)
        emb = self.norm1.emb(timestep, class_labels, hidden_dtype=x.dtype)
        return self.norm1.linear(self.norm1.silu(emb)).chunk(6, dim=1)

    def _norm1(self, x):
        return self.norm1(x) if self.ada_single else self.norm1.norm(x)

    def _text_and_mlp(self, x, mods, encoder_hidden_states, encoder_attention_mask, cross_attention_kwargs, **_):
        if self.attn2 is not None:  # PixArt-α: every layer attends to the caption, whichever tokens it holds
            x = x + self.attn2(x, encoder_hidden_states=encoder_hidden_states, attention_mask=encoder_attention_mask,
                               **(cross_attention_kwargs or {}))
        shift, scale, gate = mods[3:]
        return x + gate.unsqueeze(1) * self.ff(modulate(self.norm_mlp(x), shift, scale))

    # -- the layer kinds
    def plain(self, x, **cond):
        return self.block(x, **cond)

    def pool(self, x, **cond):
        mods = self._modulation(x, cond["timestep"], cond["class_labels"])
        shift, scale, gate = mods[:3]
        norm = self.norm1 if self.ada_single else self.norm1.norm
        u_mean = fk.token_mean(x, norm.eps)                                     # (B, C)
        if norm.weight is not None:  # mean commutes with the affine part of the LayerNorm
            u_mean = u_mean * norm.weight + (norm.bias if norm.bias is not None else 0)
        x = x + (gate * self.attn(u_mean * (1 + scale) + shift)).unsqueeze(1)  # broadcast to all N tokens
        return self._text_and_mlp(x, mods, **cond)

    def generate(self, xs, x, **cond):
        mods = self._modulation(xs, cond["timestep"], cond["class_labels"])
        shift, scale, gate = mods[:3]
        q_in = modulate(self._norm1(xs), shift, scale)
        kv_in = modulate(self._norm1(x), shift, scale)
        xs = xs + gate.unsqueeze(1) * self.attn(q_in, kv_in)                    # (B, M, C)
        return self._text_and_mlp(xs, mods, **cond)

    def recover(self, xs, x, hw, grid, **cond):
        mods = self._modulation(xs, cond["timestep"], cond["class_labels"])
        shift, scale, gate = mods[:3]
        xm = fk.upsample_add(self.fuse_sparse(xs), self.fuse_dense(x), hw, grid)  # (B, N, C)
        q_in = modulate(self._norm1(xm), shift, scale)
        kv_in = modulate(self._norm1(xs), shift, scale)
        xm = xm + gate.unsqueeze(1) * self.attn(q_in, kv_in)
        return self._text_and_mlp(xm, mods, **cond)


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
    """What a patch replaced, kept on the patched module as `_flexdit_patch` (outside the module tree)."""
    target: str
    attr: str                     # "blocks" or "transformer_blocks"
    original: nn.ModuleList       # the host's block list, untouched
    had_forward: bool             # the instance had its own `forward` attribute (e.g. an accelerate hook)
    saved_forward: Any
    x_name: str
    t_name: str
    patch_size: int
    plan: Plan
    schedule: Any
    state: _FlexState
    outside: Dict[str, torch.Tensor]  # the host's weights outside the blocks (shared with the patch): a snapshot
    signature: Any = None


_TARGETS = {  # target → (block list, block class name, latent argument, timestep argument)
    "dit": ("blocks", "DiTBlock", "x", "t"),
    "diffusers-dit": ("transformer_blocks", "BasicTransformerBlock", "hidden_states", "timestep"),
    "pixart-alpha": ("transformer_blocks", "BasicTransformerBlock", "hidden_states", "timestep"),
}


def _host(model):
    """The nn.Module to patch: the model itself, or a pipeline's `transformer`."""
    if isinstance(model, nn.Module):
        return model
    inner = getattr(model, "transformer", None)
    if isinstance(inner, nn.Module):
        return inner
    raise ValueError(f"cannot patch a {type(model).__name__}: expected a DiT-layout module, a diffusers "
                     f"DiTTransformer2DModel / PixArtTransformer2DModel, or a pipeline with a `.transformer`")


def _target_of(module) -> str:
    name = type(module).__name__
    if name == "DiTTransformer2DModel":
        return "diffusers-dit"
    if name == "PixArtTransformer2DModel":
        return "pixart-alpha"
    if all(hasattr(module, a) for a in ("x_embedder", "t_embedder", "y_embedder", "blocks", "final_layer")):
        return "dit"
    raise ValueError(f"unsupported model {name}: expected the DiT layout (x_embedder, t_embedder, y_embedder, "
                     f"blocks, final_layer), a diffusers DiTTransformer2DModel or a PixArtTransformer2DModel")


def _check_blocks(blocks, class_name, target):
    bad = sorted({type(b).__name__ for b in blocks if type(b).__name__ != class_name})
    if bad:
        raise ValueError(f"unsupported block types {bad} in a {target}: every block must be a {class_name}")
    if class_name != "BasicTransformerBlock":
        return
    norm = "ada_norm_single" if target == "pixart-alpha" else "ada_norm_zero"
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
        learn_sigma=out == 2 * proj.in_channels, **dataclasses.asdict(plan))


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


def _patched_forward(self, *args, **kwargs):
    """The host's own forward with the token grid and the sparse grid for this call set first."""
    rec = getattr(self, _RECORD)
    if torch.is_grad_enabled() and getattr(self, "gradient_checkpointing", False):
        raise ValueError("the host's gradient checkpointing is not supported on a patched model "
                         "(layers share per-forward state): disable it")
    bound = rec.signature.bind(*args, **kwargs).arguments
    x, t = bound.get(rec.x_name), bound.get(rec.t_name)
    if x is None or t is None:
        raise ValueError(f"a patched model needs `{rec.x_name}` and `{rec.t_name}` to choose its grid")
    hw = (x.shape[-2] // rec.patch_size, x.shape[-1] // rec.patch_size)
    st = rec.state
    st.hw = hw
    st.grid = _grid_of(rec.plan.grid if rec.schedule is None else rec.schedule, t, hw) if rec.plan.num_modules \
        else None
    try:
        if rec.had_forward:
            return rec.saved_forward(*args, **kwargs)
        return type(self).forward(self, *args, **kwargs)
    finally:
        st.clear()


def apply_patch(model, plan=None, schedule=None):
    """Turn a dense DiT, diffusers DiT or PixArt-α (model or pipeline) into FlexDiT in place; returns `model`.

    The arguments that matter:
        model: a module with the published DiT layout (`x_embedder`, `t_embedder`, `y_embedder`, `blocks`,
            `final_layer`; the project's `DiT` too), a diffusers `DiTTransformer2DModel` or
            `PixArtTransformer2DModel`, or a pipeline holding one as `.transformer` (`DiTPipeline`,
            `PixArtAlphaPipeline`).
        plan: `Plan(num_pool, num_modules, group, num_top, grid)`, a FlexDiTConfig or a dict of those fields;
            default: the decided plan for the model's depth (28, 24, 12) with grid 8 clamped to the token grid.
        schedule: the sparse grid per call: an object with `grid(t)` (e.g. `flexdit.DensitySchedule`) given the
            timestep the host's forward receives (0..999), or a fixed int / (G_h, G_w); default `plan.grid`.

    To tinker with: `Plan(0, 0, (1, 3, 1, 1), depth)` (all dense) reproduces the host; `group` beyond (1, s, 1, 1).

    Blocks are re-used by REFERENCE §2 (Poolingformers keep V, cross layers split Q and KV, fusion W1 = 0, W2 = I)
    as copies: the original blocks are kept untouched and `remove_patch` restores them. Patching twice equals
    patching once. The forward signature is unchanged. A patched model needs fine-tuning (`flexdit-finetune`)
    before its samples are good. Raises ValueError for unsupported models or blocks, a plan that does not fit
    the depth, or a grid larger than the token grid.
    """
    module = _host(model)
    remove_patch(module)
    target = _target_of(module)
    attr, block_class, x_name, t_name = _TARGETS[target]
    blocks = getattr(module, attr)
    _check_blocks(blocks, block_class, target)
    hw = _token_grid(module, target)
    plan = as_plan(plan, len(blocks), hw)
    if schedule is not None and not (hasattr(schedule, "grid") and callable(schedule.grid)):
        _check_grid(schedule, hw)  # a fixed grid: refuse now rather than at the first call
    state = _FlexState()

    if target == "dit":
        config = _dit_config(module, plan, hw)  # validates depth and grid
        flex_blocks = from_dit(module.state_dict(), config).blocks  # REFERENCE mapping, cloned
        kinds = config.layer_kinds()
        slots = _layer_slots(config)
        layers = [DiTFlexLayer(b, k, s, state) for b, k, s in zip(flex_blocks, kinds, slots)]
        patch_size = config.patch_size
    else:
        patch_size = module.config.patch_size
        config = FlexDiTConfig(input_size=(hw[0] * patch_size, hw[1] * patch_size), patch_size=patch_size,
                               hidden_size=blocks[0].dim, depth=len(blocks), num_heads=blocks[0].attn1.heads,
                               **dataclasses.asdict(plan))  # validates depth and grid
        kinds = config.layer_kinds()
        slots = _layer_slots(config)
        layers = [DiffusersFlexLayer(b, k, s, state) for b, k, s in zip(blocks, kinds, slots)]

    had_forward = "forward" in module.__dict__
    outside = {k: v.detach().clone() for k, v in module.state_dict(keep_vars=True).items()
               if not k.startswith(f"{attr}.")}
    rec = _Record(target, attr, blocks, had_forward, module.__dict__.get("forward"), x_name, t_name, patch_size,
                  plan, schedule, state, outside)
    rec.signature = inspect.signature(rec.saved_forward if had_forward else type(module).forward.__get__(module))
    setattr(module, attr, FlexPatch(layers, target, plan, schedule).train(blocks.training))
    module.__dict__[_RECORD] = rec
    module.forward = types.MethodType(_patched_forward, module)
    return model


def remove_patch(model):
    """Undo `apply_patch`: the original block list and forward come back untouched; returns `model`.

    Weights outside the blocks (embedders, final layer), which the patch shares with the host, are reset to their
    values at patching time, so a fine-tuned patched model returns to the original. A no-op on a model that is not
    patched. If the patched model was moved or cast, the originals follow.
    """
    module = _host(model)
    rec = module.__dict__.pop(_RECORD, None)
    if rec is None:
        return model
    patched = getattr(module, rec.attr)
    ref = next(patched.parameters(), None)
    orig = next(rec.original.parameters(), None)
    if ref is not None and orig is not None:
        if ref.device != orig.device:
            rec.original.to(ref.device)
        if ref.dtype != orig.dtype and ref.dtype.is_floating_point:
            rec.original.to(ref.dtype)
    setattr(module, rec.attr, rec.original)
    current = module.state_dict(keep_vars=True)
    with torch.no_grad():  # embedders and final layer were shared with the patch: undo any fine-tuning of them
        for key, saved in rec.outside.items():
            if key in current and not torch.equal(current[key].detach().to(saved.device, saved.dtype), saved):
                current[key].copy_(saved)
    if rec.had_forward:
        module.forward = rec.saved_forward
    else:
        module.__dict__.pop("forward", None)
    return model


def is_patched(model) -> bool:
    return _RECORD in _host(model).__dict__


#################################################################################
#                     Dense/patched pairs at real sizes (bench)                 #
#################################################################################

def build_patched_pair(target: str, image_size: int, device=None, dtype=torch.float32, plan=None, schedule=None,
                       config_overrides: Optional[Dict[str, Any]] = None):
    """(dense_model, patched_model, make_inputs) for "pixart-alpha" or "diffusers-dit" at real size, random weights.

    image_size: pixels (256, 512, 1024); the latent is image_size / 8. `make_inputs(batch, t=500)` returns the
    keyword arguments of one forward: `model(**make_inputs(8))[0]` is the prediction (B, 8, S, S). The patched model
    is a deep copy of the dense one patched with `plan` (default: the decided plan, grid 8) or `schedule`.
    `config_overrides` replaces diffusers config fields (tiny models for tests). Needs diffusers.
    """
    import diffusers

    latent = image_size // 8
    if target == "pixart-alpha":
        cfg = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                   cross_attention_dim=1152, caption_channels=4096, sample_size=latent,
                   use_additional_conditions=latent == 128)
        cfg.update(config_overrides or {})
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # diffusers' default init: random, nothing zeroed
            dense = diffusers.PixArtTransformer2DModel(**cfg)
    elif target == "diffusers-dit":
        cfg = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                   sample_size=latent)
        cfg.update(config_overrides or {})
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            dense = diffusers.DiTTransformer2DModel(**cfg)
    else:
        raise ValueError(f"target must be 'pixart-alpha' or 'diffusers-dit', got {target!r}")
    dense = dense.to(device=device, dtype=dtype).eval()
    patched = apply_patch(copy.deepcopy(dense), plan=plan, schedule=schedule)
    c = dense.config

    def make_inputs(batch: int, t: int = 500):
        gen = torch.Generator(device="cpu").manual_seed(1)
        x = torch.randn(batch, c.in_channels, c.sample_size, c.sample_size, generator=gen)
        inputs = dict(hidden_states=x.to(device=device, dtype=dtype),
                      timestep=torch.full((batch,), t, dtype=torch.long, device=device), return_dict=False)
        if target == "pixart-alpha":
            text = torch.randn(batch, 120, c.caption_channels, generator=gen)
            mask = torch.ones(batch, 120, dtype=torch.long)
            mask[:, 60:] = 0
            inputs.update(encoder_hidden_states=text.to(device=device, dtype=dtype),
                          encoder_attention_mask=mask.to(device),
                          added_cond_kwargs={"resolution": None, "aspect_ratio": None})
            if dense.use_additional_conditions:
                side = float(image_size)
                inputs["added_cond_kwargs"] = {
                    "resolution": torch.tensor([[side, side]] * batch, device=device, dtype=dtype),
                    "aspect_ratio": torch.tensor([[1.0]] * batch, device=device, dtype=dtype)}
        else:
            inputs["class_labels"] = torch.randint(0, 1000, (batch,), generator=gen).to(device)
        return inputs

    return dense, patched, make_inputs
