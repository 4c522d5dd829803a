"""FlexDiT on MMDiT hosts: diffusers' SD3 / SD3.5 (`SD3Transformer2DModel`) and FLUX.1 (`FluxTransformer2DModel`).

`flexdit.apply_patch` calls the adapters here; the plan is walked by the one router (`flexdit.router.FlexLayer`).
An MMDiT block carries two token streams, text and image. FlexDiT (arXiv 2412.06028) changes only the image
stream's token count; text tokens are never pooled. Each layer runs a copy of the host's own block (its norms,
modulation, MLPs, gating, text stream): the layer kinds differ only in which image tokens ask and which answer in the
joint attention, set by `JointFlexProcessor` on the copy's attention modules:

    kind       image queries        keys / values                  text queries attend to
    dense      N dense              [text; N dense]                the same keys
    pool       N dense              uniform weights over [text; N dense]: one pooled value vector for all queries
    gen        M sparse             [text; N dense]                the same keys
    sparse     M sparse             [text; M sparse]               the same keys
    recover    N dense (fused X_m)  [text; M sparse]               the same keys

FLUX's double-stream (`FluxTransformerBlock`) and single-stream (`FluxSingleTransformerBlock`) blocks each count as
one layer of the plan, in the host's order (19 double, then 38 single: depth 57). A single-stream block runs text
and image concatenated through one set of weights; its keys in `gen` / `recover` are [text; the other image set].
SD3.5's dual attention (`attn2`, image-only, blocks 0-12 of SD3.5-medium) follows the same rule on image tokens.
RoPE (FLUX): a sparse token sits at its pooling window's centre in the dense grid (the window mean of the host's
`img_ids`, fractional), so one network serves every grid; SD3's absolute position embedding is added before the
first block and needs nothing. Timesteps: diffusers' flow-matching pipelines run σ·1000 (SD3 receives it, FLUX
receives σ and scales it itself): the density schedule is asked at σ·1000, clamped to its last timestep.

A patched model needs fine-tuning before its images are good: the plan changes what every sparse layer sees.
"""
import copy
import math
import weakref
from typing import Dict, Mapping, NamedTuple, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import flexdit_kernels as fk

from .layers import to_pair
from .plan import Plan, Slot
from .router import FlexLayer, RouteState
from .sizes import SIZES


#################################################################################
#                  Joint attention with a key set of its own                    #
#################################################################################

class FlexContext(NamedTuple):
    """The key side of a `gen` / `recover` layer for one call: the image tokens giving keys and values under the
    block's attention LayerNorm and modulation (`kv`; `kv2` with the modulation of SD3.5's `attn2`), their RoPE
    over [text; those tokens] (FLUX), and the text tokens heading the queries of a single-stream block (`prefix`)."""
    kv: torch.Tensor
    kv2: Optional[torch.Tensor] = None
    kv_rope: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
    prefix: int = 0


def _heads(attn, x, norm=None):
    """(B, L, H·D) projection -> (B, L, H, D), with the host's q/k normalisation (over D) if it has one."""
    x = x.unflatten(-1, (attn.heads, -1))
    return norm(x) if norm is not None else x


class JointFlexProcessor:
    """An attention processor for the copies of MMDiT blocks in `pool`, `gen` and `recover` layers.

    `pool`: attention with uniform weights over the joint keys [text; image] (the Poolingformer): every query gets
    the token-count-weighted mean of the text and image values, V applied to the token means, O((T + N)·C).
    Otherwise (`gen`, `recover`): the host's joint attention with queries from `hidden_states` (and the text) and
    keys / values from [text; `flex_context.kv`]; `second` marks SD3.5's image-only `attn2`. q/k normalisation,
    RoPE and output projections are the host attention's own; the product runs on `flexdit_kernels.attention`.
    """

    def __init__(self, pool: bool, second: bool = False):
        self.pool = pool
        self.second = second

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                 flex_context: Optional[FlexContext] = None):
        if attention_mask is not None:
            raise ValueError("attention_mask is not supported by a FlexDiT-patched MMDiT")
        text = encoder_hidden_states
        if self.pool:
            return self._pooled(attn, hidden_states, text)
        if flex_context is None:
            raise ValueError("a FlexDiT gen/recover layer runs only inside its model's forward (no key tokens)")
        kv = flex_context.kv2 if self.second else flex_context.kv
        if flex_context.prefix:  # single stream: the text heading the queries joins the keys
            kv = torch.cat([hidden_states[:, :flex_context.prefix], kv], dim=1)
        q = _heads(attn, attn.to_q(hidden_states), attn.norm_q)                 # (B, Lq, H, D)
        k = _heads(attn, attn.to_k(kv), attn.norm_k)                            # (B, Lk, H, D)
        v = _heads(attn, attn.to_v(kv))
        if text is not None:  # double stream: text projections of its own, text first (RoPE's order)
            q = torch.cat([_heads(attn, attn.add_q_proj(text), getattr(attn, "norm_added_q", None)), q], dim=1)
            k = torch.cat([_heads(attn, attn.add_k_proj(text), getattr(attn, "norm_added_k", None)), k], dim=1)
            v = torch.cat([_heads(attn, attn.add_v_proj(text)), v], dim=1)
        if image_rotary_emb is not None:
            from diffusers.models.embeddings import apply_rotary_emb
            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
            k = apply_rotary_emb(k, flex_context.kv_rope, sequence_dim=1)
        out = fk.attention(q, k, v).flatten(2)                                  # (B, Lq, C)
        if getattr(attn, "pre_only", False):
            return out                                                          # single stream: no projection
        t = 0 if text is None else text.shape[1]
        return self._outputs(attn, out[:, t:], None if text is None else out[:, :t])

    def _pooled(self, attn, hidden_states, text):
        n = hidden_states.shape[1]
        v = attn.to_v(hidden_states.mean(1))                                    # (B, C): V of the token mean
        if text is not None:
            t = text.shape[1]
            v = (n * v + t * attn.add_v_proj(text.mean(1))) / (n + t)           # uniform over [text; image]
        v = v.unsqueeze(1)                                                      # (B, 1, C): one for every query
        if getattr(attn, "pre_only", False):
            return v.expand(-1, n, -1)                                          # (B, T + N, C), single stream
        if text is None:
            return self._outputs(attn, v, None).expand(-1, n, -1)               # (B, N, C)
        image, words = self._outputs(attn, v, v)
        return image.expand(-1, n, -1), words.expand(-1, t, -1)                 # (B, N, C), (B, T, C)

    @staticmethod
    def _outputs(attn, image, text):
        """The host's output projections: `to_out` for the image part, `to_add_out` for the text part (left raw
        where the block discards it: SD3's last block)."""
        image = attn.to_out[1](attn.to_out[0](image))
        if text is None:
            return image
        return image, text if getattr(attn, "context_pre_only", False) else attn.to_add_out(text)


#################################################################################
#                        Layers: MMDiT adapter of the router                    #
#################################################################################

class MMDiTRouteState(RouteState):
    """RouteState plus FLUX's RoPE over [text; sparse image tokens] for the call's grid."""

    def __init__(self):
        super().__init__()
        self.rope_sparse = None

    def clear(self) -> None:
        super().clear()
        self.rope_sparse = None


class MMDiTFlexLayer(FlexLayer):
    """A FlexDiT layer over a copy of an MMDiT block (`JointTransformerBlock`, `FluxTransformerBlock` or
    `FluxSingleTransformerBlock`); the host's loop passes (hidden_states, encoder_hidden_states, temb, ...) and gets
    (encoder_hidden_states, hidden_states) back, hidden_states holding N dense or M sparse image tokens."""

    def __init__(self, block, slot: Slot, state: MMDiTRouteState, copy_block: bool = True):
        super().__init__(slot, state)
        self.block = copy.deepcopy(block) if copy_block else block
        self.single = type(block).__name__ == "FluxSingleTransformerBlock"
        self.uses_rope = type(block).__name__ != "JointTransformerBlock"
        if self.kind in ("pool", "gen", "recover"):
            self.block.attn.set_processor(JointFlexProcessor(self.kind == "pool"))
            if getattr(self.block, "attn2", None) is not None:
                self.block.attn2.set_processor(JointFlexProcessor(self.kind == "pool", second=True))
        if self.kind == "recover":
            w = self.block.attn.to_q.weight
            with torch.device(w.device):
                self.build_fusion(w.shape[1])
            self.fuse_sparse.to(w.dtype)
            self.fuse_dense.to(w.dtype)
            self.reset_fusion()

    def forward(self, hidden_states, encoder_hidden_states=None, temb=None, image_rotary_emb=None,
                joint_attention_kwargs=None):
        cond = dict(text=encoder_hidden_states, temb=temb, rope=image_rotary_emb, kwargs=joint_attention_kwargs)
        x = self.route(hidden_states, cond)
        return cond["text"], x

    def run_block(self, x, cond, rope, context: Optional[FlexContext] = None):
        """The block copy on image tokens x with `rope` over [text; x]; the text stream is updated in `cond`."""
        kwargs = cond["kwargs"] if context is None else {**(cond["kwargs"] or {}), "flex_context": context}
        extra = {"image_rotary_emb": rope} if self.uses_rope else {}
        text, x = self.block(hidden_states=x, encoder_hidden_states=cond["text"], temb=cond["temb"],
                             joint_attention_kwargs=kwargs, **extra)
        cond["text"] = text
        return x

    def key_side(self, kv, cond, rope) -> FlexContext:
        """The image tokens kv as keys: the block's own attention LayerNorm and modulation applied to them."""
        if self.single:
            return FlexContext(self.block.norm(kv, emb=cond["temb"])[0], kv_rope=rope, prefix=cond["text"].shape[1])
        normed = self.block.norm1(kv, emb=cond["temb"])
        return FlexContext(normed[0], normed[5] if len(normed) == 7 else None, rope)  # SD3.5 dual: attn2's too

    # -- the hooks of the router
    def dense(self, x, cond):
        return self.run_block(x, cond, self._state.rope_sparse if self.kind == "sparse" else cond["rope"])

    def pool(self, x, cond):
        return self.run_block(x, cond, cond["rope"])

    def generate(self, xs, x, cond):
        """Sparse image queries (B, M, C) over the keys [text; N dense]."""
        return self.run_block(xs, cond, self._state.rope_sparse, self.key_side(x, cond, cond["rope"]))

    def recover(self, xs, x, token_grid, grid, cond):
        """X_m = W1·upsample(X_s) + W2·X; dense image queries (B, N, C) over the keys [text; M sparse]."""
        xm = self.fuse(xs, x, token_grid, grid)                                         # (B, N, C)
        return self.run_block(xm, cond, cond["rope"], self.key_side(xs, cond, self._state.rope_sparse))


#################################################################################
#                                    Hosts                                      #
#################################################################################

_DOUBLE, _SINGLE = "transformer_blocks", "single_transformer_blocks"
_PROCESSORS = {"JointTransformerBlock": "JointAttnProcessor2_0", "FluxTransformerBlock": "FluxAttnProcessor",
               "FluxSingleTransformerBlock": "FluxAttnProcessor"}


def default_grid(token_grid: Tuple[int, int]) -> Tuple[int, int]:
    """The MMDiT hosts' default sparse grid: a quarter of each side of the token grid (16x16 at 1024², 64x64
    tokens: pruning rate 0.94, as DiT-XL/2's 8x8 on 32x32 at 512²)."""
    return max(1, token_grid[0] // 4), max(1, token_grid[1] // 4)


class MMDiTHost:
    """What `apply_patch` needs to know of an MMDiT host: its block lists, checks, token grid and timestep scale."""

    target = ""
    lists: Tuple[Tuple[str, str], ...] = ()     # (attribute, block class), in the host's order
    time_scale = 1.0                            # forward's timestep x time_scale = the schedule's t (σ·1000)
    refused: Tuple[str, ...] = ()               # forward arguments a patched model refuses

    def block_lists(self, module) -> Dict[str, nn.ModuleList]:
        return {attr: getattr(module, attr) for attr, _ in self.lists}

    def check_blocks(self, module) -> None:
        """Every block is the host's class with its stock attention processor and unfused projections."""
        for attr, name in self.lists:
            blocks = getattr(module, attr)
            flex = [i for i, b in enumerate(blocks) if isinstance(b, FlexLayer)]
            if flex:
                raise ValueError(f"blocks {flex} of this {self.target} are already FlexDiT layers: patch a dense model")
            bad = sorted({type(b).__name__ for b in blocks if type(b).__name__ != name})
            if bad:
                raise ValueError(f"unsupported block types {bad} in {attr} of a {self.target}: every block must be a "
                                 f"{name}")
            for i, b in enumerate(blocks):
                for attn in (b.attn, getattr(b, "attn2", None)):
                    if attn is None:
                        continue
                    proc = type(attn.processor).__name__
                    if proc != _PROCESSORS[name]:
                        raise ValueError(f"unsupported block {i} in {attr} of a {self.target}: attention processor "
                                         f"{proc} (expected {_PROCESSORS[name]}; IP-adapters and custom processors "
                                         f"are not supported)")
                    if getattr(attn, "fused_projections", False):
                        raise ValueError(f"unsupported block {i} in {attr} of a {self.target}: fused QKV projections "
                                         f"(call unfuse_qkv_projections)")

    def token_grid(self, module) -> Tuple[int, int]:
        """The token grid the plan is checked against at patching time (each call reads its own)."""
        raise NotImplementedError

    def coerce_plan(self, plan, depth: int, token_grid) -> Plan:
        """`Plan.coerce` with the MMDiT default grid where the plan does not name one."""
        grid = default_grid(token_grid)
        if plan is None:
            plan = Plan.for_depth(depth, token_grid, grid=grid)
        elif isinstance(plan, Mapping) and "grid" not in plan:
            plan = {**plan, "grid": grid}
        return Plan.coerce(plan, depth, token_grid)

    def call_grid(self, module, bound) -> Tuple[int, int]:
        """The image token grid (h, w) of one call, from its arguments."""
        raise NotImplementedError

    def schedule_time(self, t, schedule):
        """The call's timestep on the schedule's scale (σ·1000), clamped to the schedule's last timestep."""
        t = torch.as_tensor(t).float() * self.time_scale
        last = getattr(schedule, "num_timesteps", None)
        return t.clamp(0, last - 1) if last is not None else t

    def begin(self, module, state: MMDiTRouteState, bound) -> None:
        """Per-call state beyond the grids (FLUX: RoPE of the sparse positions)."""
        for name in self.refused:
            if bound.get(name) is not None:
                raise ValueError(f"{name} is not supported by a FlexDiT-patched {self.target}: its layers hold "
                                 f"sparse tokens")
        kwargs = bound.get("joint_attention_kwargs") or {}
        if "attention_mask" in kwargs or "ip_adapter_image_embeds" in kwargs:
            raise ValueError(f"joint_attention_kwargs {sorted(kwargs)}: attention masks and IP-adapters are not "
                             f"supported by a FlexDiT-patched {self.target}")

    def layers(self, module, plan: Plan, state: MMDiTRouteState, copy_block: bool = True):
        """{attribute: the FlexDiT layers replacing that block list}, the plan walked over the lists in order, each
        over a copy of its block (or the block itself: `copy_block=False`)."""
        slots, out = iter(plan.slots()), {}
        for attr, blocks in self.block_lists(module).items():
            out[attr] = [MMDiTFlexLayer(b, next(slots), state, copy_block) for b in blocks]
        return out


class SD3Host(MMDiTHost):
    """`SD3Transformer2DModel` (SD3, SD3.5 medium / large): latent (B, C, H, W), timestep σ·1000."""

    target = "sd3"
    lists = ((_DOUBLE, "JointTransformerBlock"),)
    refused = ("block_controlnet_hidden_states", "skip_layers")

    def token_grid(self, module):
        h, w = to_pair(module.config.sample_size)
        return h // module.config.patch_size, w // module.config.patch_size

    def call_grid(self, module, bound):
        x, p = bound["hidden_states"], module.config.patch_size
        return x.shape[-2] // p, x.shape[-1] // p


class FluxHost(MMDiTHost):
    """`FluxTransformer2DModel` (FLUX.1 dev / schnell): packed tokens (B, N, C) at `img_ids`, timestep σ."""

    target = "flux"
    lists = ((_DOUBLE, "FluxTransformerBlock"), (_SINGLE, "FluxSingleTransformerBlock"))
    time_scale = 1000.0
    refused = ("controlnet_block_samples", "controlnet_single_block_samples")

    def token_grid(self, module):
        return 64, 64   # no size in the config: 1024² (FLUX's VAE /8, then 2x2 packing)

    def __init__(self):
        self._checked = (None, None, None)   # (weak reference to img_ids, its version, its grid): one check per tensor

    def call_grid(self, module, bound):
        ids = bound.get("img_ids")
        if ids is None or bound.get("txt_ids") is None:
            raise ValueError("a FlexDiT-patched flux needs img_ids and txt_ids (the image tokens' grid positions)")
        ref, version, token_grid = self._checked
        n, now = bound["hidden_states"].shape[1], _version(ids)
        if ref is None or ref() is not ids or now is None or version != now or token_grid[0] * token_grid[1] != n:
            # image_token_grid copies img_ids to the host: done once for the steps of a pipeline, which share one
            token_grid = image_token_grid(ids, n)
            self._checked = (weakref.ref(ids), now, token_grid)
        return token_grid

    def begin(self, module, state, bound):
        super().begin(module, state, bound)
        if state.grid is None:
            return
        img, txt = (_ids2d(bound[name]) for name in ("img_ids", "txt_ids"))
        pooled = sparse_positions(img, state.token_grid, state.grid)                    # (M, 3) window centres
        state.rope_sparse = module.pos_embed(torch.cat([txt.float(), pooled]))


def _version(t):
    """A tensor's in-place version counter; None for inference-mode tensors, which have none."""
    try:
        return t._version
    except RuntimeError:
        return None


def _ids2d(ids):
    return ids[0] if ids.dim() == 3 else ids   # diffusers' deprecated (1, L, 3) form


def image_token_grid(img_ids: torch.Tensor, n: int) -> Tuple[int, int]:
    """(h, w) of FLUX image tokens at positions `img_ids` (N, 3) = (0, row, column), which must form a row-major
    h x w grid (as `FluxPipeline` builds them); on the meta device (MAC counts) a square grid is assumed."""
    ids = _ids2d(img_ids)
    if ids.dim() != 2 or ids.shape[0] != n or ids.shape[1] != 3:
        raise ValueError(f"img_ids must be (N, 3) with N = {n} image tokens, got {tuple(img_ids.shape)}")
    if ids.is_meta:
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"img_ids on the meta device: {n} image tokens are not a square grid")
        return side, side
    ids = ids.detach().to("cpu", torch.float64)
    rows, cols = ids[:, 1].unique(), ids[:, 2].unique()
    h, w = len(rows), len(cols)
    grid = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), -1).reshape(-1, 2)
    if h * w != n or not torch.equal(ids[:, 1:], grid):
        raise ValueError("img_ids are not a row-major grid of image tokens (extra reference-image tokens, as in "
                         "FLUX Kontext, are not supported by a FlexDiT patch)")
    return h, w


def sparse_positions(img_ids: torch.Tensor, token_grid, grid) -> torch.Tensor:
    """(M, 3) float positions of the sparse tokens: the mean of the dense positions in each pooling window, i.e.
    the window's centre (fractional where the window has an even side). img_ids: (h·w, 3), row-major."""
    (h, w), (gh, gw) = token_grid, grid
    if img_ids.dim() != 2 or tuple(img_ids.shape) != (h * w, 3):
        raise ValueError(f"img_ids must be (h·w, 3) = ({h * w}, 3) for the token grid {h}x{w}, got "
                         f"{tuple(img_ids.shape)}")
    pooled = F.adaptive_avg_pool2d(img_ids.double().t().reshape(-1, h, w), (gh, gw))   # the pooling windows of
    return pooled.reshape(-1, gh * gw).t().float()                                      # token_pool, exact in fp64


HOSTS = {"sd3": SD3Host(), "flux": FluxHost()}


def host_of(module) -> Optional[MMDiTHost]:
    """The MMDiT host adapter of a diffusers model, or None."""
    return {"SD3Transformer2DModel": HOSTS["sd3"], "FluxTransformer2DModel": HOSTS["flux"]}.get(type(module).__name__)


#################################################################################
#                 Real sizes (random weights): bench pairs and MACs             #
#################################################################################

# name -> (target, diffusers config, text tokens), read off `flexdit.sizes`.
MMDIT_SIZES = {name: (args.host, args.diffusers_config(), args.text_tokens) for name, args in SIZES.items()
               if args.host in ("flux", "sd3")}
BENCH_NAMES = {"flux": "FLUX.1-dev", "sd3": "SD3.5-medium", "sd3-large": "SD3.5-large"}

# Tiny configurations of depth 12 (the decided plan for 12 applies) for CPU runs: hidden 64, 2 heads of 32.
TINY_CONFIGS = {
    "flux": dict(num_layers=4, num_single_layers=8, attention_head_dim=32, num_attention_heads=2,
                 joint_attention_dim=64, pooled_projection_dim=32, axes_dims_rope=(8, 12, 12), text_tokens=16),
    "sd3": dict(num_layers=12, attention_head_dim=32, num_attention_heads=2, joint_attention_dim=64,
                caption_projection_dim=64, pooled_projection_dim=32, dual_attention_layers=(0, 1, 2), text_tokens=16),
}


def flux_image_ids(h: int, w: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(h·w, 3) positions (0, row, column) of FLUX's packed image tokens, row-major, as `FluxPipeline` builds them."""
    for name, side in (("h", h), ("w", w)):
        if isinstance(side, bool) or not isinstance(side, int) or side < 1:
            raise ValueError(f"{name} must be a positive int (packed tokens per side), got {side!r}")
    ids = torch.zeros(h, w, 3, device=device, dtype=dtype)
    ids[..., 1] = torch.arange(h, device=device, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(w, device=device, dtype=dtype)[None]
    return ids.reshape(h * w, 3)


def build_mmdit_pair(name: str, image_size: int, device=None, dtype=torch.float32, plan=None, schedule=None,
                     config_overrides: Optional[dict] = None):
    """(dense, patched, make_inputs) for an MMDiT size of `MMDIT_SIZES` (or its bench name: flux, sd3, sd3-large)
    with diffusers' random init; `config_overrides` replaces config fields (`text_tokens` too: `TINY_CONFIGS`).

    image_size: pixels; the latent is image_size / 8 (FLUX then packs 2x2 latent pixels into a token, SD3 patches
    2x2). `make_inputs(batch, t=500)` returns one forward's keyword arguments at timestep t on the 0..1000 scale
    (FLUX receives σ = t / 1000). On `device="meta"` the models hold no memory (MAC counts). Needs diffusers.
    """
    import diffusers

    name = BENCH_NAMES.get(name, name)
    if name not in MMDIT_SIZES:
        raise ValueError(f"name must be one of {sorted(MMDIT_SIZES)} or {sorted(BENCH_NAMES)}, got {name!r}")
    if not isinstance(image_size, int) or image_size < 16 or image_size % 16:
        raise ValueError(f"image_size must be a positive multiple of 16 (8x VAE, 2x2 patches), got {image_size!r}")
    target, config, text_tokens = MMDIT_SIZES[name]
    config = {**config, **(config_overrides or {})}
    text_tokens = config.pop("text_tokens", text_tokens)
    cls = diffusers.FluxTransformer2DModel if target == "flux" else diffusers.SD3Transformer2DModel
    on_meta = device is not None and torch.device(device).type == "meta"
    with torch.random.fork_rng(devices=[]), torch.device(device or "cpu"):   # built in place: 12B parameters
        torch.manual_seed(0)
        dense = cls(**config)
    if not on_meta and dtype != torch.float32:
        dense = dense.to(dtype=dtype)
    dense.eval()
    from .patch import apply_patch  # flexdit.patch imports this module
    patched = apply_patch(copy.deepcopy(dense), plan, schedule, keep_original=False)   # `dense` is the original
    c = dense.config
    latent = image_size // 8

    def make_inputs(batch: int, t: int = 500):
        gen = torch.Generator().manual_seed(1)

        def randn(*shape):
            return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

        inputs = dict(encoder_hidden_states=randn(batch, text_tokens, c.joint_attention_dim),
                      pooled_projections=randn(batch, c.pooled_projection_dim), return_dict=False)
        if target == "sd3":
            return dict(inputs, hidden_states=randn(batch, c.in_channels, latent, latent),
                        timestep=torch.full((batch,), float(t), device=device, dtype=dtype))
        side = latent // 2
        inputs.update(hidden_states=randn(batch, side * side, c.in_channels),
                      img_ids=flux_image_ids(side, side, device), txt_ids=torch.zeros(text_tokens, 3, device=device),
                      timestep=torch.full((batch,), t / 1000, device=device, dtype=dtype))
        if c.guidance_embeds:
            inputs["guidance"] = torch.full((batch,), 3.5, device=device, dtype=dtype)
        return inputs

    return dense, patched, make_inputs


def mmdit_macs(name: str, image_size: int, plan=None, schedule=None, config_overrides=None) -> Dict[str, int]:
    """MACs of one image's forward, {"dense": ..., "flexdit": ...}, counted on the meta device by
    `flexdit.flops.count_macs_dispatch` (PyTorch's FlopCounterMode, attention counted)."""
    from .flops import count_macs_dispatch
    dense, patched, make_inputs = build_mmdit_pair(name, image_size, "meta", plan=plan, schedule=schedule,
                                                   config_overrides=config_overrides)
    inputs = make_inputs(1)
    return {"dense": count_macs_dispatch(dense, **inputs).total, "flexdit": count_macs_dispatch(patched, **inputs).total}


def macs_table(image_sizes=(1024, 512)) -> str:
    """A Markdown table of dense vs patched MACs (decided plan, default grid) for every size of `MMDIT_SIZES`."""
    rows = ["| model | image | text + image tokens | plan | dense T MACs | FlexDiT T MACs | fewer |",
            "|---|---|---|---|---|---|---|"]
    for name, (target, config, text) in MMDIT_SIZES.items():
        depth = config.get("num_layers", 19) + (config.get("num_single_layers", 38) if target == "flux" else 0)
        for size in image_sizes:
            side = size // 16
            plan = Plan.for_depth(depth, (side, side), grid=default_grid((side, side)))
            macs = mmdit_macs(name, size, plan)
            rows.append(f"| {name} | {size}² | {text} + {side * side} | {plan} | {macs['dense'] / 1e12:.2f} | "
                        f"{macs['flexdit'] / 1e12:.2f} | {1 - macs['flexdit'] / macs['dense']:.1%} |")
    return "\n".join(rows)
