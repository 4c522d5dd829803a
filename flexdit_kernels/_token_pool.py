"""token_pool: adaptive average pooling of dense tokens onto a sparse grid (FlexDiT's sparse-token generation).
x: (B, N = h*w, C) fp32/fp16/bf16, token-major, any strides and C -> (B, M = G_h*G_w, C), AdaptiveAvgPool2d windows."""
from typing import List, Sequence, Tuple

import torch
import triton
import triton.language as tl

from ._common import channel_offsets, window_reduce, window_span
from ._dispatch import call_op, register_autograd, run_variant
from ._grid_ops import grid_op, launch_token_tiles, launch_window_reduce
from ._launch import _WINDOW_RUN
from ._tune import alternatives
from ._validate import Grid, check_kernel_device, pool_args, pool_backward_args


# ----------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------
# Grid: channel block on axis 0 (the fastest-launched one, so programs running at once cover whole token rows), a
# run of windows or of dense tokens on axis 1, the batch on axis 2. The window helpers are shared with
# upsample_add's backward, whose children rectangles are windows too.

@triton.jit
def _token_pool_fwd_kernel(
    X, OUT,
    h, w, grid_h, grid_w, n_channels, windows_per_program, max_area,
    stride_x_b, stride_x_n, stride_x_c,
    stride_out_b, stride_out_m, stride_out_c,
    BLOCK_W: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, EVEN_C: tl.constexpr,
    IDX64: tl.constexpr,
):
    """Program (channel block, run of windows_per_program windows in row-major order, batch): each window's mean,
    BLOCK_W windows and BLOCK_T tokens of each per step (`window_reduce`)."""
    window_reduce(X, OUT, tl.program_id(2).to(tl.int64), tl.program_id(0), tl.program_id(1), h, w, grid_h, grid_w,
                  n_channels, windows_per_program, max_area, stride_x_b, stride_x_n, stride_x_c,
                  stride_out_b, stride_out_m, stride_out_c,
                  BLOCK_W, BLOCK_T, BLOCK_C, EVEN_C, CHILDREN=False, MEAN=True, IDX64=IDX64)


@triton.jit
def _token_pool_bwd_kernel(
    DOUT, DX,
    h, w, grid_h, grid_w, n_tokens, n_channels, tokens_per_program,
    stride_dout_b, stride_dout_m, stride_dout_c,
    stride_dx_b, stride_dx_n, stride_dx_c,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, EVEN_C: tl.constexpr, IDX64: tl.constexpr,
):
    """Program (channel block, run of tokens_per_program dense tokens, batch), BLOCK_N tokens at a time, written as
    a gather so no atomics are needed: with G <= h consecutive windows overlap by at most one row, so row r lies in
    windows floor(r*G/h) .. ceil((r+1)*G/h) - 1, at most two; a token sums the gradients of at most 2x2 windows,
    each divided by that window's area. The gradient rows it gathers are few (M << N) and stay in cache."""
    offs_c, mask_c = channel_offsets(tl.program_id(0), n_channels, BLOCK_C, EVEN_C)
    start = tl.program_id(1) * tokens_per_program
    b = tl.program_id(2).to(tl.int64)
    dout_base = DOUT + b * stride_dout_b
    dx_base = DX + b * stride_dx_b
    end = tl.minimum(start + tokens_per_program, n_tokens)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        r = offs_n // w
        c = offs_n % w
        i_lo = (r * grid_h) // h
        i_hi = ((r + 1) * grid_h - 1) // h
        j_lo = (c * grid_w) // w
        j_hi = ((c + 1) * grid_w - 1) // w
        acc = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
        for di in tl.static_range(2):
            i = i_lo + di
            row_ok = (i <= i_hi) & mask_n
            r0, r1 = window_span(i, h, grid_h, False)
            for dj in tl.static_range(2):
                j = j_lo + dj
                ok = row_ok & (j <= j_hi)
                c0, c1 = window_span(j, w, grid_w, False)
                # Masked-off lanes may hold i = grid_h or j = grid_w; their area is still positive, nothing is loaded.
                scale = 1.0 / ((r1 - r0) * (c1 - c0)).to(tl.float32)
                m = i * grid_w + j
                if IDX64:
                    m = m.to(tl.int64)
                ptrs = dout_base + m[:, None] * stride_dout_m + offs_c[None, :] * stride_dout_c
                g = tl.load(ptrs, mask=ok[:, None] & mask_c[None, :], other=0.0).to(tl.float32)
                acc += g * scale[:, None]
        tok = offs_n
        if IDX64:
            tok = tok.to(tl.int64)
        tl.store(dx_base + tok[:, None] * stride_dx_n + offs_c[None, :] * stride_dx_c,
                 acc.to(DX.dtype.element_ty), mask=mask_n[:, None] & mask_c[None, :])


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------

# NOTE: tiles give each thread one 16-byte vector per load (`channel_tile`: (4, 128) in fp32, (8, 128) in bf16 at
# C = 1152 on 4 warps), which keeps registers low in every dtype (sm_90 static report: backward fp32 130 -> 32
# registers with triton 3.6, 113 -> 32 with 3.9) and the grid as fine as 16-byte accesses allow; runs of tiles per
# program grow only while the grid keeps 4 waves of programs (`wave_programs`). The forward is `window_plan`'s
# window reduction, shared with upsample_add's backward: at B = 32, C = 1152, bf16, G = 6-10 it runs 5.6-10.9 waves
# of programs on sm_90, against 0.9-2.4 with one token per window per step (static report, triton 3.6).
_NUM_WARPS = 4

# The launchers' config spaces besides their heuristics (`config`: num_warps, and the backward's longest run of
# tiles per program, max_run), checked and timed per device and shape by `_tune` (docs/kernels.md, "Tuning").
CONFIGS = {
    "token_pool": lambda x: alternatives({"num_warps": _NUM_WARPS}, num_warps=(2, 8)),
    "token_pool_backward": lambda g: alternatives({"num_warps": _NUM_WARPS, "max_run": _WINDOW_RUN},
                                                  num_warps=(2, 8), max_run=(1,)),
}


def _token_pool_fwd(x: torch.Tensor, h: int, w: int, gh: int, gw: int, config=None) -> torch.Tensor:
    return launch_window_reduce(_token_pool_fwd_kernel, x, h, w, gh, gw, False, config, _NUM_WARPS)


def _token_pool_bwd(grad_out: torch.Tensor, h: int, w: int, gh: int, gw: int, config=None) -> torch.Tensor:
    return launch_token_tiles(_token_pool_bwd_kernel, (grad_out,), h, w, gh, gw, config, _NUM_WARPS)


def token_pool_fwd(x: torch.Tensor, hw: Grid, grid: Grid) -> torch.Tensor:
    """Launch the pooling kernel. x: (B, h*w, C), any strides (read in place, no copy) -> (B, G_h*G_w, C) contiguous."""
    (h, w), (gh, gw) = pool_args(x, hw, grid)
    check_kernel_device("x", x)
    return _token_pool_fwd(x, h, w, gh, gw)


def token_pool_bwd(grad_out: torch.Tensor, hw: Grid, grid: Grid) -> torch.Tensor:
    """Launch the pooling backward. grad_out: (B, G_h*G_w, C), any strides -> (B, h*w, C) contiguous."""
    (h, w), (gh, gw) = pool_backward_args(grad_out, hw, grid)
    check_kernel_device("grad_out", grad_out)
    return _token_pool_bwd(grad_out, h, w, gh, gw)


# ----------------------------------------------------------------------------------------------------------------
# Autograd and the public op
# ----------------------------------------------------------------------------------------------------------------
# torch.compile, torch.jit.trace (fvcore), dispatch modes and meta tensors see the custom op `flexdit::token_pool`,
# one opaque node. Plain eager calls skip its dispatcher (`call_op`): `_forward` straight away when no input needs a
# gradient, else `_Function`, the op's autograd twin. All of them run the same `_forward` / `_backward`, which pick
# kernel or reference per shape.

def _forward(x: torch.Tensor, hw: Sequence[int], grid: Sequence[int]) -> torch.Tensor:
    (h, w), (gh, gw) = hw, grid
    b, n, c = x.shape
    return run_variant("token_pool", x, batch=b, tokens=n, sparse=gh * gw, channels=c, params=(h, w, gh, gw),
                       kernel=lambda t, config=None: _token_pool_fwd(t, h, w, gh, gw, config),
                       reference=lambda t: token_pool_ref(t, hw, grid), space=CONFIGS["token_pool"])


def _backward(grad_out: torch.Tensor, hw: Sequence[int], grid: Sequence[int]) -> torch.Tensor:
    # No .contiguous(): the kernel reads any strides (e.g. the stride-0 gradient of a .sum()).
    (h, w), (gh, gw) = hw, grid
    b, m, c = grad_out.shape
    return run_variant("token_pool_backward", grad_out, batch=b, tokens=h * w, sparse=m, channels=c,
                       params=(h, w, gh, gw),
                       kernel=lambda g, config=None: _token_pool_bwd(g, h, w, gh, gw, config),
                       reference=lambda g: token_pool_backward_ref(g, hw, grid),
                       space=CONFIGS["token_pool_backward"])


_token_pool_op = grid_op("token_pool", _forward, to_sparse=True)
_token_pool_backward_op = grid_op("token_pool_backward", _backward, to_sparse=False)


def _op_setup_context(ctx, inputs, output):
    _, ctx.hw, ctx.grid = inputs


def _op_backward(ctx, backward, grad_out):
    return backward(grad_out, ctx.hw, ctx.grid), None, None


_Function = register_autograd(_token_pool_op, _forward, _token_pool_backward_op,
                              _backward, _op_setup_context, _op_backward)


def token_pool(x: torch.Tensor, hw: Grid, grid: Grid) -> torch.Tensor:
    """Average-pool tokens on their `h x w` grid down to a `G_h x G_w` grid.

    Args:
        x: (B, N, C) dense tokens in row-major grid order, N = h * w; any strides (frames folded into B included).
        hw: the token grid, `(h, w)` or `h` for a square one.
        grid: the sparse grid, `(G_h, G_w)` or `G`; each side at most the token grid's.
    Returns:
        (B, G_h * G_w, C) in x's dtype. Window (i, j) covers rows floor(i*h/G_h) .. ceil((i+1)*h/G_h) - 1 and the
        same for columns, as `torch.nn.AdaptiveAvgPool2d`; windows may overlap or differ in size.
    """
    hw, grid = pool_args(x, hw, grid)
    return call_op(_token_pool_op, _Function, _forward, (x,), x, list(hw), list(grid))


# ----------------------------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------------------------

def _windows(size: int, out: int) -> List[Tuple[int, int]]:
    """AdaptiveAvgPool's [start, end) windows: floor(i*size/out) .. ceil((i+1)*size/out)."""
    return [((i * size) // out, -((-(i + 1) * size) // out)) for i in range(out)]


def pool_matrix(hw: Sequence[int], grid: Sequence[int], device=None, dtype=torch.float32) -> torch.Tensor:
    """(M, N) matrix whose row m averages the tokens of sparse window m: token_pool(x) = P @ x."""
    (h, w), (gh, gw) = hw, grid
    rows = torch.zeros(gh, h, dtype=dtype, device=device)
    for i, (a, b) in enumerate(_windows(h, gh)):
        rows[i, a:b] = 1.0 / (b - a)
    cols = torch.zeros(gw, w, dtype=dtype, device=device)
    for j, (a, b) in enumerate(_windows(w, gw)):
        cols[j, a:b] = 1.0 / (b - a)
    return torch.kron(rows, cols)  # (gh*gw, h*w), row-major on both sides


def token_pool_ref(x: torch.Tensor, hw: Grid, grid: Grid) -> torch.Tensor:
    """Pure-PyTorch token_pool (same arguments and checks as the op): the pooling matrix applied in fp32."""
    hw, grid = pool_args(x, hw, grid)
    p = pool_matrix(hw, grid, device=x.device)
    return torch.matmul(p, x.float()).to(x.dtype)


def token_pool_backward_ref(grad_out: torch.Tensor, hw: Grid, grid: Grid) -> torch.Tensor:
    """Gradient of token_pool: each window's output gradient spread evenly over its tokens (overlaps add up)."""
    hw, grid = pool_backward_args(grad_out, hw, grid)
    p = pool_matrix(hw, grid, device=grad_out.device)
    return torch.matmul(p.t(), grad_out.float()).to(grad_out.dtype)
