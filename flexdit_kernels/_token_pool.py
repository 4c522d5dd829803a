"""token_pool: adaptive average pooling of dense tokens onto a sparse grid (FlexDiT's sparse-token generation).
x: (B, N = h*w, C) fp32/fp16/bf16, token-major, any strides and C -> (B, M = G_h*G_w, C), AdaptiveAvgPool2d windows."""
from typing import List, Sequence, Tuple, Union

import torch
import triton
import triton.language as tl

from ._dispatch import call_op, custom_op, register_autograd, use_kernel
from ._validate import (cdiv, check_kernel_device, fits_int32, next_pow2, pool_args, pool_backward_args,
                        sm_count)

Grid = Union[int, Sequence[int]]


# ----------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------
# Every kernel here and in _upsample_add puts the channel block on grid axis 0 (the fastest-launched one), so the
# programs running at once cover whole token rows of neighbouring tokens, the sparse row or token block on axis 1
# and the batch on axis 2. Index math inside one batch entry is int32 (IDX64 widens it when a batch entry spans
# 2**31 elements or more) on an int64 batch base. Channels are the contiguous axis: with a unit channel stride
# (specialised by Triton) and EVEN_C (no channel tail) loads and stores are 16-byte vectors.

@triton.jit
def _channel_offsets(pid_c, n_channels, BLOCK_C: tl.constexpr, EVEN_C: tl.constexpr):
    """(offs_c, mask_c) of channel block pid_c; the mask is all-true when BLOCK_C divides C (EVEN_C)."""
    offs_c = tl.max_contiguous(tl.multiple_of(pid_c * BLOCK_C + tl.arange(0, BLOCK_C), BLOCK_C), BLOCK_C)
    if EVEN_C:
        mask_c = tl.full([BLOCK_C], 1, tl.int1)
    else:
        mask_c = offs_c < n_channels
    return offs_c, mask_c


@triton.jit
def _rect_sum(base, r0, r1, c0, c1, w, stride_n, stride_c, offs_c, mask_c,
              BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, IDX64: tl.constexpr):
    """fp32 sum over the tokens of rows [r0, r1) x columns [c0, c1) of a row-major token grid `w` wide, for the
    channels offs_c: the rectangle is flattened and read as (BLOCK_T, BLOCK_C) tiles (token rows of contiguous
    channels). Shared by token_pool's forward (pooling windows) and upsample_add's backward (children)."""
    rect_w = c1 - c0
    area = (r1 - r0) * rect_w
    acc = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
    for t0 in range(0, area, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        tok = (r0 + t // rect_w) * w + (c0 + t % rect_w)
        if IDX64:
            tok = tok.to(tl.int64)
        ptrs = base + tok[:, None] * stride_n + offs_c[None, :] * stride_c
        acc += tl.load(ptrs, mask=(t < area)[:, None] & mask_c[None, :], other=0.0).to(tl.float32)
    return tl.sum(acc, axis=0)


@triton.jit
def _token_pool_fwd_kernel(
    X, OUT,
    h, w, grid_h, grid_w, n_channels, windows_per_program,
    stride_x_b, stride_x_n, stride_x_c,
    stride_out_b, stride_out_m, stride_out_c,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, EVEN_C: tl.constexpr, IDX64: tl.constexpr,
):
    """Program (channel block, run of windows_per_program windows of window row i, batch), one window after the
    other. With the whole row (large grids) a program reads the band of token rows floor(i*h/G_h) ..
    ceil((i+1)*h/G_h) - 1 once, tens of KB at DiT sizes; small grids split rows so that the GPU stays busy."""
    offs_c, mask_c = _channel_offsets(tl.program_id(0), n_channels, BLOCK_C, EVEN_C)
    n_runs = (grid_w + windows_per_program - 1) // windows_per_program
    i = tl.program_id(1) // n_runs
    j_start = (tl.program_id(1) % n_runs) * windows_per_program
    j_end = tl.minimum(j_start + windows_per_program, grid_w)
    b = tl.program_id(2).to(tl.int64)
    x_base = X + b * stride_x_b
    out_base = OUT + b * stride_out_b
    # AdaptiveAvgPool2d window: [floor(i*h/G), ceil((i+1)*h/G)) on each axis.
    r0 = (i * h) // grid_h
    r1 = ((i + 1) * h + grid_h - 1) // grid_h
    for j in range(j_start, j_end):
        c0 = (j * w) // grid_w
        c1 = ((j + 1) * w + grid_w - 1) // grid_w
        total = _rect_sum(x_base, r0, r1, c0, c1, w, stride_x_n, stride_x_c, offs_c, mask_c,
                          BLOCK_T, BLOCK_C, IDX64)
        mean = total / ((r1 - r0) * (c1 - c0)).to(tl.float32)
        m = i * grid_w + j
        if IDX64:
            m = m.to(tl.int64)
        tl.store(out_base + m * stride_out_m + offs_c * stride_out_c, mean.to(OUT.dtype.element_ty), mask=mask_c)


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
    offs_c, mask_c = _channel_offsets(tl.program_id(0), n_channels, BLOCK_C, EVEN_C)
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
            size_r = ((i + 1) * h + grid_h - 1) // grid_h - (i * h) // grid_h
            for dj in tl.static_range(2):
                j = j_lo + dj
                ok = row_ok & (j <= j_hi)
                size_c = ((j + 1) * w + grid_w - 1) // grid_w - (j * w) // grid_w
                # Masked-off lanes may hold i = grid_h or j = grid_w; their size is still positive, nothing is loaded.
                scale = 1.0 / (size_r * size_c).to(tl.float32)
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

# NOTE: tile sizes are unmeasured on a GPU. The reasoning: a channel block of 256 (or 128, so that C = 1152 is 9
# whole blocks) is 256-512 B of one token row in bf16, whole 32-B sectors, read as 16-B vectors; tiles of at most
# 4096 elements keep 4 warps at 32 fp32 accumulators per thread; a program moves the windows of a sparse row (forward:
# a band of token rows) or up to 128 tokens (backward), tens of KB, and both runs shrink until the grid has about 8
# programs per SM, so that small batches and grids still fill the GPU.
_TILE = 4096
_NUM_WARPS = 4
_MAX_RUN = 128
_PROGRAMS_PER_SM = 8


def channel_block(n_channels: int) -> Tuple[int, bool]:
    """(BLOCK_C, EVEN_C): 256 when it divides C, else 128 (C >= 128), else C rounded up to a power of two."""
    if n_channels % 256 == 0:
        block = 256
    elif n_channels >= 128:
        block = 128
    else:
        block = max(16, next_pow2(n_channels))
    return block, n_channels % block == 0


def token_run(n_items: int, block: int, programs_per_run: int, device: torch.device, max_run: int = _MAX_RUN) -> int:
    """Items (tokens, or windows of a sparse row) per program: up to max_run, at least `block`, halved while the
    grid (programs_per_run programs per run of items) has fewer than _PROGRAMS_PER_SM programs per SM."""
    run = max(block, min(max_run, next_pow2(n_items)))
    target = _PROGRAMS_PER_SM * sm_count(device)
    while run > block and programs_per_run * cdiv(n_items, run) < target:
        run //= 2
    return run


def _max_window(size: int, out: int) -> int:
    """An upper bound on AdaptiveAvgPool's window length: ceil(size/out), plus one when out does not divide size."""
    return -(-size // out) + (size % out != 0)


def _token_pool_fwd(x: torch.Tensor, h: int, w: int, gh: int, gw: int) -> torch.Tensor:
    b, _, c = x.shape
    out = torch.empty((b, gh * gw, c), device=x.device, dtype=x.dtype)
    if out.numel() == 0:
        return out
    block_c, even_c = channel_block(c)
    block_t = max(1, min(next_pow2(_max_window(h, gh) * _max_window(w, gw)), _TILE // block_c))
    c_blocks = cdiv(c, block_c)
    run = token_run(gw, 1, c_blocks * gh * b, x.device, max_run=gw)
    _token_pool_fwd_kernel[(c_blocks, gh * cdiv(gw, run), b)](
        x, out, h, w, gh, gw, c, run,
        x.stride(0), x.stride(1), x.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        BLOCK_T=block_t, BLOCK_C=block_c, EVEN_C=even_c, IDX64=not fits_int32(x, out), num_warps=_NUM_WARPS,
    )
    return out


def _token_pool_bwd(grad_out: torch.Tensor, h: int, w: int, gh: int, gw: int) -> torch.Tensor:
    b, _, c = grad_out.shape
    n = h * w
    dx = torch.empty((b, n, c), device=grad_out.device, dtype=grad_out.dtype)
    if dx.numel() == 0:
        return dx
    block_c, even_c = channel_block(c)
    block_n = min(_TILE // block_c, next_pow2(n))
    c_blocks = cdiv(c, block_c)
    run = token_run(n, block_n, b * c_blocks, grad_out.device)
    _token_pool_bwd_kernel[(c_blocks, cdiv(n, run), b)](
        grad_out, dx, h, w, gh, gw, n, c, run,
        grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
        dx.stride(0), dx.stride(1), dx.stride(2),
        BLOCK_N=block_n, BLOCK_C=block_c, EVEN_C=even_c, IDX64=not fits_int32(grad_out, dx), num_warps=_NUM_WARPS,
    )
    return dx


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
    if use_kernel("token_pool", x, batch=b, tokens=n, sparse=gh * gw, channels=c):
        return _token_pool_fwd(x, h, w, gh, gw)
    return token_pool_ref(x, hw, grid)


def _backward(grad_out: torch.Tensor, hw: Sequence[int], grid: Sequence[int]) -> torch.Tensor:
    # No .contiguous(): the kernel reads any strides (e.g. the stride-0 gradient of a .sum()).
    (h, w), (gh, gw) = hw, grid
    b, m, c = grad_out.shape
    if use_kernel("token_pool_backward", grad_out, batch=b, tokens=h * w, sparse=m, channels=c):
        return _token_pool_bwd(grad_out, h, w, gh, gw)
    return token_pool_backward_ref(grad_out, hw, grid)


@custom_op("flexdit::token_pool", mutates_args=())
def _token_pool_op(x: torch.Tensor, hw: List[int], grid: List[int]) -> torch.Tensor:
    return _forward(x, tuple(hw), tuple(grid))


@_token_pool_op.register_fake
def _(x, hw, grid):
    return x.new_empty(x.shape[0], grid[0] * grid[1], x.shape[2])


@custom_op("flexdit::token_pool_backward", mutates_args=())
def _token_pool_backward_op(grad_out: torch.Tensor, hw: List[int], grid: List[int]) -> torch.Tensor:
    return _backward(grad_out, tuple(hw), tuple(grid))


@_token_pool_backward_op.register_fake
def _(grad_out, hw, grid):
    return grad_out.new_empty(grad_out.shape[0], hw[0] * hw[1], grad_out.shape[2])


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
