"""upsample_add: nearest-neighbour upsampling of sparse tokens to the dense grid fused with a residual add.
sparse: (B, M = G_h*G_w, C), dense: (B, N = h*w, C), fp32/fp16/bf16, any C -> (B, N, C), PyTorch `nearest` rule."""
from typing import List, Sequence

import torch
import triton
import triton.language as tl

from ._dispatch import use_triton
from ._validate import check_grid, check_kernel_device, check_same, check_tensor, check_tokens
from ._token_pool import Grid


# ----------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------

@triton.jit
def _upsample_add_fwd_kernel(
    SPARSE, DENSE, OUT,
    h, w, grid_h, grid_w, n_tokens, n_channels,
    stride_s_b, stride_s_m, stride_s_c,
    stride_d_b, stride_d_n, stride_d_c,
    stride_out_b, stride_out_n, stride_out_c,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One program per (batch, block of dense tokens, channel block): read each dense token and its parent, write
    the sum. Parents repeat across neighbouring tokens, so the sparse reads mostly hit the cache."""
    n_blocks = (n_tokens + BLOCK_N - 1) // BLOCK_N  # inline cdiv: tl.cdiv is a jit call, slow when interpreted
    pid_bn = tl.program_id(0).to(tl.int64)
    pid_c = tl.program_id(1).to(tl.int64)
    b = pid_bn // n_blocks
    offs_n = (pid_bn % n_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (offs_n < n_tokens)[:, None] & (offs_c < n_channels)[None, :]
    # Nearest rule: parent row floor(i*G_h/h), parent column floor(j*G_w/w).
    parent = ((offs_n // w) * grid_h // h) * grid_w + (offs_n % w) * grid_w // w
    s = tl.load(SPARSE + b * stride_s_b + parent[:, None] * stride_s_m + offs_c[None, :] * stride_s_c,
                mask=mask, other=0.0)
    d = tl.load(DENSE + b * stride_d_b + offs_n[:, None] * stride_d_n + offs_c[None, :] * stride_d_c,
                mask=mask, other=0.0)
    out = s.to(tl.float32) + d.to(tl.float32)
    tl.store(OUT + b * stride_out_b + offs_n[:, None] * stride_out_n + offs_c[None, :] * stride_out_c,
             out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _upsample_add_bwd_kernel(
    DOUT, DSPARSE,
    h, w, grid_h, grid_w, n_channels,
    stride_dout_b, stride_dout_n, stride_dout_c,
    stride_ds_b, stride_ds_m, stride_ds_c,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One program per (batch, sparse token, channel block) sums its children, so no atomics are needed: the
    children of (I, J) are the rectangle rows ceil(I*h/G_h) .. ceil((I+1)*h/G_h) - 1, same for columns, read as
    flattened (BLOCK_T, BLOCK_C) tiles."""
    pid_bm = tl.program_id(0).to(tl.int64)
    pid_c = tl.program_id(1).to(tl.int64)
    n_sparse = grid_h * grid_w
    b = pid_bm // n_sparse
    m = pid_bm % n_sparse
    i = m // grid_w
    j = m % grid_w
    r0 = (i * h + grid_h - 1) // grid_h
    r1 = ((i + 1) * h + grid_h - 1) // grid_h
    c0 = (j * w + grid_w - 1) // grid_w
    c1 = ((j + 1) * w + grid_w - 1) // grid_w
    rect_w = c1 - c0
    area = (r1 - r0) * rect_w

    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < n_channels
    dout_base = DOUT + b * stride_dout_b
    acc = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
    for t0 in range(0, area, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        tok = (r0 + t // rect_w) * w + (c0 + t % rect_w)
        mask = (t < area)[:, None] & mask_c[None, :]
        ptrs = dout_base + tok[:, None] * stride_dout_n + offs_c[None, :] * stride_dout_c
        acc += tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    ds_ptrs = DSPARSE + b * stride_ds_b + m * stride_ds_m + offs_c * stride_ds_c
    tl.store(ds_ptrs, tl.sum(acc, axis=0).to(DSPARSE.dtype.element_ty), mask=mask_c)


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------

# NOTE: block sizes below are unmeasured on GPU (no GPU was available when they were written). The reasoning:
# 128 channels = 256 B per token row in bf16, one fully coalesced segment per warp, and C = 1152 is exactly 9 blocks;
# tiles of at most 2048 elements keep 4 warps at 16 fp32 values per thread and operand.
_MAX_BLOCK_C = 128
_TILE = 2048
_NUM_WARPS = 4


def _block_c(n_channels: int) -> int:
    return min(_MAX_BLOCK_C, triton.next_power_of_2(n_channels))


def upsample_add_fwd(sparse: torch.Tensor, dense: torch.Tensor, hw: Grid, grid: Grid) -> torch.Tensor:
    """Launch the fused upsample + add. sparse: (B, G_h*G_w, C), dense: (B, h*w, C), any strides (read in place)
    -> (B, h*w, C) contiguous (the op's fake impl promises that layout)."""
    check_tensor("sparse", sparse, 3)
    check_tensor("dense", dense, 3)
    check_same(("dense", "sparse"), (dense, sparse))
    check_kernel_device("dense", dense)
    (h, w), (gh, gw) = check_grid(dense, hw, grid)
    if sparse.shape[0] != dense.shape[0] or sparse.shape[2] != dense.shape[2]:
        raise ValueError(f"sparse {tuple(sparse.shape)} and dense {tuple(dense.shape)} differ in batch or channels")
    check_tokens("sparse", sparse, gh * gw, f"grid {gh}x{gw}")
    b, n, c = dense.shape
    out = dense.new_empty(dense.shape)
    if out.numel() == 0:
        return out
    block_c = _block_c(c)
    block_n = min(_TILE // block_c, triton.next_power_of_2(n))
    launch = (b * triton.cdiv(n, block_n), triton.cdiv(c, block_c))
    _upsample_add_fwd_kernel[launch](
        sparse, dense, out, h, w, gh, gw, n, c,
        sparse.stride(0), sparse.stride(1), sparse.stride(2),
        dense.stride(0), dense.stride(1), dense.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        BLOCK_N=block_n, BLOCK_C=block_c, num_warps=_NUM_WARPS,
    )
    return out


def upsample_add_bwd(grad_out: torch.Tensor, hw: Grid, grid: Grid) -> torch.Tensor:
    """Launch the sparse-gradient kernel. grad_out: (B, h*w, C), any strides -> (B, G_h*G_w, C) contiguous.
    The dense gradient is grad_out itself and needs no kernel."""
    check_tensor("grad_out", grad_out, 3)
    check_kernel_device("grad_out", grad_out)
    (h, w), (gh, gw) = check_grid(grad_out, hw, grid)
    b, _, c = grad_out.shape
    ds = grad_out.new_empty(b, gh * gw, c)
    if ds.numel() == 0:
        return ds
    block_c = _block_c(c)
    # Children rectangles have sides ceil(size/G) or floor(size/G): take the largest area.
    max_area = -(-h // gh) * -(-w // gw)
    block_t = max(1, min(triton.next_power_of_2(max_area), _TILE // block_c))
    launch = (b * gh * gw, triton.cdiv(c, block_c))
    _upsample_add_bwd_kernel[launch](
        grad_out, ds, h, w, gh, gw, c,
        grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
        ds.stride(0), ds.stride(1), ds.stride(2),
        BLOCK_T=block_t, BLOCK_C=block_c, num_warps=_NUM_WARPS,
    )
    return ds


# ----------------------------------------------------------------------------------------------------------------
# Autograd and the public op
# ----------------------------------------------------------------------------------------------------------------

@torch.library.custom_op("flexdit::upsample_add", mutates_args=())
def _upsample_add_op(sparse: torch.Tensor, dense: torch.Tensor, hw: List[int], grid: List[int]) -> torch.Tensor:
    if use_triton(sparse, dense):
        return upsample_add_fwd(sparse, dense, hw, grid)
    return upsample_add_ref(sparse, dense, hw, grid)


@_upsample_add_op.register_fake
def _(sparse, dense, hw, grid):
    return dense.new_empty(dense.shape)


@torch.library.custom_op("flexdit::upsample_add_backward", mutates_args=())
def _upsample_add_backward_op(grad_out: torch.Tensor, hw: List[int], grid: List[int]) -> torch.Tensor:
    if use_triton(grad_out):
        return upsample_add_bwd(grad_out, hw, grid)
    return upsample_add_backward_ref(grad_out, hw, grid)


@_upsample_add_backward_op.register_fake
def _(grad_out, hw, grid):
    return grad_out.new_empty(grad_out.shape[0], grid[0] * grid[1], grad_out.shape[2])


def _setup_context(ctx, inputs, output):
    _, _, ctx.hw, ctx.grid = inputs


def _backward(ctx, grad_out):
    # No .contiguous(): the kernel reads any strides (e.g. the stride-0 gradient of a .sum()), and the dense
    # gradient is grad_out itself.
    return _upsample_add_backward_op(grad_out, ctx.hw, ctx.grid), grad_out, None, None


_upsample_add_op.register_autograd(_backward, setup_context=_setup_context)


def upsample_add(sparse: torch.Tensor, dense: torch.Tensor, hw: Grid, grid: Grid) -> torch.Tensor:
    """`nearest_upsample(sparse) + dense` on the dense token grid.

    Args:
        sparse: (B, G_h * G_w, C) sparse tokens, row-major.
        dense: (B, h * w, C) dense tokens, same dtype and device.
        hw: the dense grid `(h, w)` or `h`; grid: the sparse grid `(G_h, G_w)` or `G`.
    Returns:
        (B, h * w, C): dense token (i, j) plus sparse token (floor(i*G_h/h), floor(j*G_w/w)).
    """
    check_tensor("sparse", sparse, 3)
    check_tensor("dense", dense, 3)
    check_same(("dense", "sparse"), (dense, sparse))
    hw, grid = check_grid(dense, hw, grid)
    if sparse.shape[0] != dense.shape[0] or sparse.shape[2] != dense.shape[2]:
        raise ValueError(f"sparse {tuple(sparse.shape)} and dense {tuple(dense.shape)} differ in batch or channels")
    if sparse.shape[1] != grid[0] * grid[1]:
        raise ValueError(f"sparse has {sparse.shape[1]} tokens but grid is {grid[0]}x{grid[1]}")
    return _upsample_add_op(sparse, dense, list(hw), list(grid))


# ----------------------------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------------------------

def parent_index(hw: Sequence[int], grid: Sequence[int], device=None) -> torch.Tensor:
    """(N,) index of each dense token's parent sparse token: row floor(i*G_h/h), column floor(j*G_w/w)."""
    (h, w), (gh, gw) = hw, grid
    rows = torch.arange(h, device=device) * gh // h
    cols = torch.arange(w, device=device) * gw // w
    return (rows[:, None] * gw + cols[None, :]).reshape(-1)


def upsample_add_ref(sparse: torch.Tensor, dense: torch.Tensor, hw: Sequence[int], grid: Sequence[int]) -> torch.Tensor:
    """Pure-PyTorch upsample_add: gather each dense token's parent, add in fp32."""
    up = sparse.float()[:, parent_index(hw, grid, sparse.device)]
    return (up + dense.float()).to(dense.dtype).contiguous()


def upsample_add_backward_ref(grad_out: torch.Tensor, hw: Sequence[int], grid: Sequence[int]) -> torch.Tensor:
    """Gradient for `sparse`: the sum of each parent's children's gradients (the dense gradient is grad_out)."""
    b, _, c = grad_out.shape
    out = torch.zeros(b, grid[0] * grid[1], c, dtype=torch.float32, device=grad_out.device)
    out.index_add_(1, parent_index(hw, grid, grad_out.device), grad_out.float())
    return out.to(grad_out.dtype)
