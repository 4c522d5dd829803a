"""upsample_add: nearest-neighbour upsampling of sparse tokens to the dense grid fused with a residual add.
sparse: (B, M = G_h*G_w, C), dense: (B, N = h*w, C), fp32/fp16/bf16, any strides and C -> (B, N, C), `nearest` rule."""
from typing import List, Sequence

import torch
import triton
import triton.language as tl

from ._common import channel_offsets, window_reduce
from ._dispatch import call_op, custom_op, register_autograd, run_variant
from ._grid_ops import grid_op, launch_token_tiles, launch_window_reduce
from ._launch import _WINDOW_RUN
from ._tune import alternatives
from ._validate import Grid, check_kernel_device, upsample_args, upsample_backward_args


# ----------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------
# Grid as token_pool's: channel block on axis 0, a run of dense tokens or of sparse tokens on axis 1, the batch on
# axis 2; int32 index math on an int64 batch base.

@triton.jit
def _upsample_add_fwd_kernel(
    SPARSE, DENSE, OUT,
    h, w, grid_h, grid_w, n_tokens, n_channels, tokens_per_program,
    stride_s_b, stride_s_m, stride_s_c,
    stride_d_b, stride_d_n, stride_d_c,
    stride_out_b, stride_out_n, stride_out_c,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, EVEN_C: tl.constexpr, IDX64: tl.constexpr,
):
    """Program (channel block, run of tokens_per_program dense tokens, batch), BLOCK_N tokens at a time: read each
    dense token and its parent, write the sum. Parents repeat across neighbouring tokens and the sparse tensor is
    small (M << N), so its reads hit the cache; dense and out cross memory once."""
    offs_c, mask_c = channel_offsets(tl.program_id(0), n_channels, BLOCK_C, EVEN_C)
    start = tl.program_id(1) * tokens_per_program
    b = tl.program_id(2).to(tl.int64)
    s_base = SPARSE + b * stride_s_b
    d_base = DENSE + b * stride_d_b
    out_base = OUT + b * stride_out_b
    end = tl.minimum(start + tokens_per_program, n_tokens)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask = (offs_n < end)[:, None] & mask_c[None, :]
        # Nearest rule: parent row floor(i*G_h/h), parent column floor(j*G_w/w).
        parent = ((offs_n // w) * grid_h // h) * grid_w + (offs_n % w) * grid_w // w
        tok = offs_n
        if IDX64:
            parent = parent.to(tl.int64)
            tok = tok.to(tl.int64)
        s = tl.load(s_base + parent[:, None] * stride_s_m + offs_c[None, :] * stride_s_c, mask=mask, other=0.0)
        d = tl.load(d_base + tok[:, None] * stride_d_n + offs_c[None, :] * stride_d_c, mask=mask, other=0.0)
        out = s.to(tl.float32) + d.to(tl.float32)
        tl.store(out_base + tok[:, None] * stride_out_n + offs_c[None, :] * stride_out_c,
                 out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _upsample_add_bwd_kernel(
    DOUT, DSPARSE,
    h, w, grid_h, grid_w, n_channels, windows_per_program, max_area,
    stride_dout_b, stride_dout_n, stride_dout_c,
    stride_ds_b, stride_ds_m, stride_ds_c,
    BLOCK_W: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, EVEN_C: tl.constexpr,
    IDX64: tl.constexpr,
):
    """Program (channel block, run of windows_per_program sparse tokens in row-major order, batch): each sparse
    token (I, J) sums the gradients of its children, so no atomics are needed. The children of (I, J) are the
    rectangle rows ceil(I*h/G_h) .. ceil((I+1)*h/G_h) - 1, same for columns: token_pool's window reduction with
    that window rule and no division."""
    window_reduce(DOUT, DSPARSE, tl.program_id(2).to(tl.int64), tl.program_id(0), tl.program_id(1), h, w, grid_h,
                  grid_w, n_channels, windows_per_program, max_area, stride_dout_b, stride_dout_n,
                  stride_dout_c, stride_ds_b, stride_ds_m, stride_ds_c,
                  BLOCK_W, BLOCK_T, BLOCK_C, EVEN_C, CHILDREN=True, MEAN=False, IDX64=IDX64)


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------

# NOTE: tiles as token_pool's (one 16-byte vector per thread per load, `token_plan`), runs of tiles per program
# only while the grid keeps 4 waves of programs; the backward is `window_plan`'s window reduction.
_NUM_WARPS = 4

# The launchers' config spaces besides their heuristics (`config`: num_warps, and the forward's longest run of tiles
# per program, max_run), checked and timed per device and shape by `_tune` (docs/kernels.md, "Tuning").
CONFIGS = {
    "upsample_add": lambda s, d: alternatives({"num_warps": _NUM_WARPS, "max_run": _WINDOW_RUN},
                                              num_warps=(2, 8), max_run=(1,)),
    "upsample_add_backward": lambda g: alternatives({"num_warps": _NUM_WARPS}, num_warps=(2, 8)),
}


def _upsample_add_fwd(sparse: torch.Tensor, dense: torch.Tensor, h: int, w: int, gh: int, gw: int,
                      config=None) -> torch.Tensor:
    return launch_token_tiles(_upsample_add_fwd_kernel, (sparse, dense), h, w, gh, gw, config, _NUM_WARPS)


def _upsample_add_bwd(grad_out: torch.Tensor, h: int, w: int, gh: int, gw: int, config=None) -> torch.Tensor:
    return launch_window_reduce(_upsample_add_bwd_kernel, grad_out, h, w, gh, gw, True, config, _NUM_WARPS)


def upsample_add_fwd(sparse: torch.Tensor, dense: torch.Tensor, hw: Grid, grid: Grid) -> torch.Tensor:
    """Launch the fused upsample + add. sparse: (B, G_h*G_w, C), dense: (B, h*w, C), any strides (read in place)
    -> (B, h*w, C) contiguous (the op's fake impl promises that layout)."""
    (h, w), (gh, gw) = upsample_args(sparse, dense, hw, grid)
    check_kernel_device("dense", dense)
    return _upsample_add_fwd(sparse, dense, h, w, gh, gw)


def upsample_add_bwd(grad_out: torch.Tensor, hw: Grid, grid: Grid) -> torch.Tensor:
    """Launch the sparse-gradient kernel. grad_out: (B, h*w, C), any strides -> (B, G_h*G_w, C) contiguous.
    The dense gradient is grad_out itself and needs no kernel."""
    (h, w), (gh, gw) = upsample_backward_args(grad_out, hw, grid)
    check_kernel_device("grad_out", grad_out)
    return _upsample_add_bwd(grad_out, h, w, gh, gw)


# ----------------------------------------------------------------------------------------------------------------
# Autograd and the public op
# ----------------------------------------------------------------------------------------------------------------
# As in _token_pool: compilers, tracers, dispatch modes and meta tensors see the custom op `flexdit::upsample_add`;
# eager calls take `_forward` (no gradient needed) or `_Function`, the op's autograd twin (`call_op`).

def _forward(sparse: torch.Tensor, dense: torch.Tensor, hw: Sequence[int], grid: Sequence[int]) -> torch.Tensor:
    (h, w), (gh, gw) = hw, grid
    b, n, c = dense.shape
    return run_variant("upsample_add", sparse, dense, batch=b, tokens=n, sparse=gh * gw, channels=c,
                       params=(h, w, gh, gw),
                       kernel=lambda s, d, config=None: _upsample_add_fwd(s, d, h, w, gh, gw, config),
                       reference=lambda s, d: upsample_add_ref(s, d, hw, grid), space=CONFIGS["upsample_add"])


def _backward(grad_out: torch.Tensor, hw: Sequence[int], grid: Sequence[int]) -> torch.Tensor:
    # No .contiguous(): the kernel reads any strides (e.g. the stride-0 gradient of a .sum()).
    (h, w), (gh, gw) = hw, grid
    b, n, c = grad_out.shape
    return run_variant("upsample_add_backward", grad_out, batch=b, tokens=n, sparse=gh * gw, channels=c,
                       params=(h, w, gh, gw),
                       kernel=lambda g, config=None: _upsample_add_bwd(g, h, w, gh, gw, config),
                       reference=lambda g: upsample_add_backward_ref(g, hw, grid),
                       space=CONFIGS["upsample_add_backward"])


@custom_op("flexdit::upsample_add", mutates_args=())
def _upsample_add_op(sparse: torch.Tensor, dense: torch.Tensor, hw: List[int], grid: List[int]) -> torch.Tensor:
    return _forward(sparse, dense, tuple(hw), tuple(grid))


@_upsample_add_op.register_fake
def _(sparse, dense, hw, grid):
    return dense.new_empty(dense.shape)


_upsample_add_backward_op = grid_op("upsample_add_backward", _backward, to_sparse=True)


def _op_setup_context(ctx, inputs, output):
    _, _, ctx.hw, ctx.grid = inputs


def _op_backward(ctx, backward, grad_out):
    # The dense gradient is grad_out itself.
    ds = backward(grad_out, ctx.hw, ctx.grid) if ctx.needs_input_grad[0] else None
    return ds, grad_out, None, None


_Function = register_autograd(_upsample_add_op, _forward, _upsample_add_backward_op,
                              _backward, _op_setup_context, _op_backward)


def upsample_add(sparse: torch.Tensor, dense: torch.Tensor, hw: Grid, grid: Grid) -> torch.Tensor:
    """`nearest_upsample(sparse) + dense` on the dense token grid.

    Args:
        sparse: (B, G_h * G_w, C) sparse tokens, row-major; any strides.
        dense: (B, h * w, C) dense tokens, same dtype and device; any strides.
        hw: the dense grid `(h, w)` or `h`; grid: the sparse grid `(G_h, G_w)` or `G`.
    Returns:
        (B, h * w, C) contiguous: dense token (i, j) plus sparse token (floor(i*G_h/h), floor(j*G_w/w)).
    """
    hw, grid = upsample_args(sparse, dense, hw, grid)
    return call_op(_upsample_add_op, _Function, _forward, (sparse, dense), sparse, dense, list(hw), list(grid))


# ----------------------------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------------------------

def parent_index(hw: Sequence[int], grid: Sequence[int], device=None) -> torch.Tensor:
    """(N,) index of each dense token's parent sparse token: row floor(i*G_h/h), column floor(j*G_w/w)."""
    (h, w), (gh, gw) = hw, grid
    rows = torch.arange(h, device=device) * gh // h
    cols = torch.arange(w, device=device) * gw // w
    return (rows[:, None] * gw + cols[None, :]).reshape(-1)


def upsample_add_ref(sparse: torch.Tensor, dense: torch.Tensor, hw: Grid, grid: Grid) -> torch.Tensor:
    """Pure-PyTorch upsample_add (same arguments and checks as the op): gather each dense token's parent, add in
    fp32."""
    hw, grid = upsample_args(sparse, dense, hw, grid)
    up = sparse.float()[:, parent_index(hw, grid, sparse.device)]
    return (up + dense.float()).to(dense.dtype).contiguous()


def upsample_add_backward_ref(grad_out: torch.Tensor, hw: Grid, grid: Grid) -> torch.Tensor:
    """Gradient for `sparse`: the sum of each parent's children's gradients (the dense gradient is grad_out)."""
    hw, grid = upsample_backward_args(grad_out, hw, grid)
    b, _, c = grad_out.shape
    out = torch.zeros(b, grid[0] * grid[1], c, dtype=torch.float32, device=grad_out.device)
    out.index_add_(1, parent_index(hw, grid, grad_out.device), grad_out.float())
    return out.to(grad_out.dtype)
