"""token_pool: adaptive average pooling of dense tokens onto a sparse grid (FlexDiT's sparse-token generation).
x: (B, N = h*w, C) fp32/fp16/bf16, token-major, any C -> (B, M = G_h*G_w, C), PyTorch AdaptiveAvgPool2d windows."""
from typing import List, Sequence, Tuple, Union

import torch
import triton
import triton.language as tl

from ._dispatch import use_triton
from ._validate import check_grid, check_grid_sizes, check_kernel_device, check_tensor, check_tokens

Grid = Union[int, Sequence[int]]


# ----------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------

@triton.jit
def _token_pool_fwd_kernel(
    X, OUT,
    h, w, grid_h, grid_w, n_channels,
    stride_x_b, stride_x_n, stride_x_c,
    stride_out_b, stride_out_m, stride_out_c,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One program per (batch, sparse window, channel block): the window's tokens are flattened and read
    BLOCK_T at a time as a (BLOCK_T, BLOCK_C) tile, so a window is one or two wide loads rather than a loop."""
    pid_bm = tl.program_id(0).to(tl.int64)
    pid_c = tl.program_id(1).to(tl.int64)
    n_sparse = grid_h * grid_w
    b = pid_bm // n_sparse
    m = pid_bm % n_sparse
    i = m // grid_w
    j = m % grid_w
    # AdaptiveAvgPool2d window: [floor(i*h/G), ceil((i+1)*h/G)) on each axis.
    r0 = (i * h) // grid_h
    r1 = ((i + 1) * h + grid_h - 1) // grid_h
    c0 = (j * w) // grid_w
    c1 = ((j + 1) * w + grid_w - 1) // grid_w
    win_w = c1 - c0
    area = (r1 - r0) * win_w

    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < n_channels
    x_base = X + b * stride_x_b
    acc = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
    for t0 in range(0, area, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        tok = (r0 + t // win_w) * w + (c0 + t % win_w)              # int64: r0, c0 are int64
        mask = (t < area)[:, None] & mask_c[None, :]
        ptrs = x_base + tok[:, None] * stride_x_n + offs_c[None, :] * stride_x_c
        acc += tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(acc, axis=0) / area.to(tl.float32)
    out_ptrs = OUT + b * stride_out_b + m * stride_out_m + offs_c * stride_out_c
    tl.store(out_ptrs, mean.to(OUT.dtype.element_ty), mask=mask_c)


@triton.jit
def _token_pool_bwd_kernel(
    DOUT, DX,
    h, w, grid_h, grid_w, n_tokens, n_channels,
    stride_dout_b, stride_dout_m, stride_dout_c,
    stride_dx_b, stride_dx_n, stride_dx_c,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One program per (batch, block of dense tokens, channel block), written as a gather so no atomics are needed.

    With G <= h, consecutive windows overlap by at most one row, so row r lies in windows
    floor(r*G/h) .. ceil((r+1)*G/h) - 1, at most two of them; a token sums the gradients of at most 2x2 windows,
    each divided by that window's area."""
    n_blocks = (n_tokens + BLOCK_N - 1) // BLOCK_N  # inline cdiv: tl.cdiv is a jit call, slow when interpreted
    pid_bn = tl.program_id(0).to(tl.int64)
    pid_c = tl.program_id(1).to(tl.int64)
    b = pid_bn // n_blocks
    offs_n = (pid_bn % n_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_n = offs_n < n_tokens
    mask_c = offs_c < n_channels
    r = offs_n // w
    c = offs_n % w
    i_lo = (r * grid_h) // h
    i_hi = ((r + 1) * grid_h - 1) // h
    j_lo = (c * grid_w) // w
    j_hi = ((c + 1) * grid_w - 1) // w

    dout_base = DOUT + b * stride_dout_b
    acc = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
    for di in range(2):
        i = i_lo + di
        row_ok = i <= i_hi
        size_r = ((i + 1) * h + grid_h - 1) // grid_h - (i * h) // grid_h
        for dj in range(2):
            j = j_lo + dj
            ok = row_ok & (j <= j_hi) & mask_n
            size_c = ((j + 1) * w + grid_w - 1) // grid_w - (j * w) // grid_w
            # Masked-off lanes may hold i = grid_h or j = grid_w; their size is still positive, nothing is loaded.
            scale = 1.0 / (size_r * size_c).to(tl.float32)
            ptrs = dout_base + (i * grid_w + j)[:, None] * stride_dout_m + offs_c[None, :] * stride_dout_c
            g = tl.load(ptrs, mask=ok[:, None] & mask_c[None, :], other=0.0).to(tl.float32)
            acc += g * scale[:, None]
    dx_ptrs = DX + b * stride_dx_b + offs_n[:, None] * stride_dx_n + offs_c[None, :] * stride_dx_c
    tl.store(dx_ptrs, acc.to(DX.dtype.element_ty), mask=mask_n[:, None] & mask_c[None, :])


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------

# NOTE: block sizes below are unmeasured on GPU (no GPU was available when they were written). The reasoning:
# 128 channels = 256 B per token row in bf16, one fully coalesced segment per warp, and C = 1152 is exactly 9 blocks;
# tiles of at most 2048 elements keep 4 warps at 16 fp32 accumulators per thread.
_MAX_BLOCK_C = 128
_TILE = 2048
_NUM_WARPS = 4


def _block_c(n_channels: int) -> int:
    return min(_MAX_BLOCK_C, triton.next_power_of_2(n_channels))


def token_pool_fwd(x: torch.Tensor, hw: Grid, grid: Grid) -> torch.Tensor:
    """Launch the pooling kernel. x: (B, h*w, C), any strides (read in place, no copy) -> (B, G_h*G_w, C) contiguous."""
    check_tensor("x", x, 3)
    check_kernel_device("x", x)
    (h, w), (gh, gw) = check_grid(x, hw, grid)
    b, _, c = x.shape
    out = x.new_empty(b, gh * gw, c)
    if out.numel() == 0:
        return out
    block_c = _block_c(c)
    # Largest window area: window sizes are at most ceil(size/G) + 1 on each axis, use the exact maximum.
    max_area = max(e - s for s, e in _windows(h, gh)) * max(e - s for s, e in _windows(w, gw))
    block_t = max(1, min(triton.next_power_of_2(max_area), _TILE // block_c))
    launch = (b * gh * gw, triton.cdiv(c, block_c))
    _token_pool_fwd_kernel[launch](
        x, out, h, w, gh, gw, c,
        x.stride(0), x.stride(1), x.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        BLOCK_T=block_t, BLOCK_C=block_c, num_warps=_NUM_WARPS,
    )
    return out


def token_pool_bwd(grad_out: torch.Tensor, hw: Grid, grid: Grid) -> torch.Tensor:
    """Launch the pooling backward. grad_out: (B, G_h*G_w, C), any strides -> (B, h*w, C) contiguous."""
    check_tensor("grad_out", grad_out, 3)
    check_kernel_device("grad_out", grad_out)
    (h, w), (gh, gw) = check_grid_sizes(hw, grid)
    check_tokens("grad_out", grad_out, gh * gw, f"grid {gh}x{gw}")
    b, _, c = grad_out.shape
    n = h * w
    dx = grad_out.new_empty(b, n, c)
    if dx.numel() == 0:
        return dx
    block_c = _block_c(c)
    block_n = min(_TILE // block_c, triton.next_power_of_2(n))
    launch = (b * triton.cdiv(n, block_n), triton.cdiv(c, block_c))
    _token_pool_bwd_kernel[launch](
        grad_out, dx, h, w, gh, gw, n, c,
        grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
        dx.stride(0), dx.stride(1), dx.stride(2),
        BLOCK_N=block_n, BLOCK_C=block_c, num_warps=_NUM_WARPS,
    )
    return dx


# ----------------------------------------------------------------------------------------------------------------
# Autograd and the public op
# ----------------------------------------------------------------------------------------------------------------

@torch.library.custom_op("flexdit::token_pool", mutates_args=())
def _token_pool_op(x: torch.Tensor, hw: List[int], grid: List[int]) -> torch.Tensor:
    if use_triton(x):
        return token_pool_fwd(x, hw, grid)
    return token_pool_ref(x, hw, grid)


@_token_pool_op.register_fake
def _(x, hw, grid):
    return x.new_empty(x.shape[0], grid[0] * grid[1], x.shape[2])


@torch.library.custom_op("flexdit::token_pool_backward", mutates_args=())
def _token_pool_backward_op(grad_out: torch.Tensor, hw: List[int], grid: List[int]) -> torch.Tensor:
    if use_triton(grad_out):
        return token_pool_bwd(grad_out, hw, grid)
    return token_pool_backward_ref(grad_out, hw, grid)


@_token_pool_backward_op.register_fake
def _(grad_out, hw, grid):
    return grad_out.new_empty(grad_out.shape[0], hw[0] * hw[1], grad_out.shape[2])


def _setup_context(ctx, inputs, output):
    _, ctx.hw, ctx.grid = inputs


def _backward(ctx, grad_out):
    # No .contiguous(): the kernel reads any strides (e.g. the stride-0 gradient of a .sum()).
    return _token_pool_backward_op(grad_out, ctx.hw, ctx.grid), None, None


_token_pool_op.register_autograd(_backward, setup_context=_setup_context)


def token_pool(x: torch.Tensor, hw: Grid, grid: Grid) -> torch.Tensor:
    """Average-pool tokens on their `h x w` grid down to a `G_h x G_w` grid.

    Args:
        x: (B, N, C) dense tokens in row-major grid order, N = h * w.
        hw: the token grid, `(h, w)` or `h` for a square one.
        grid: the sparse grid, `(G_h, G_w)` or `G`; each side at most the token grid's.
    Returns:
        (B, G_h * G_w, C) in x's dtype. Window (i, j) covers rows floor(i*h/G_h) .. ceil((i+1)*h/G_h) - 1 and the
        same for columns, as `torch.nn.AdaptiveAvgPool2d`; windows may overlap or differ in size.
    """
    check_tensor("x", x, 3)
    hw, grid = check_grid(x, hw, grid)
    return _token_pool_op(x, list(hw), list(grid))


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


def token_pool_ref(x: torch.Tensor, hw: Sequence[int], grid: Sequence[int]) -> torch.Tensor:
    """Pure-PyTorch token_pool: the pooling matrix applied in fp32."""
    p = pool_matrix(hw, grid, device=x.device)
    return torch.matmul(p, x.float()).to(x.dtype)


def token_pool_backward_ref(grad_out: torch.Tensor, hw: Sequence[int], grid: Sequence[int]) -> torch.Tensor:
    """Gradient of token_pool: each window's output gradient spread evenly over its tokens (overlaps add up)."""
    p = pool_matrix(hw, grid, device=grad_out.device)
    return torch.matmul(p.t(), grad_out.float()).to(grad_out.dtype)
