"""upsample_add: nearest-neighbour upsampling of sparse tokens to the dense grid fused with a residual add.
sparse: (B, M = G_h*G_w, C), dense: (B, N = h*w, C), fp32/fp16/bf16, any C -> (B, N, C), PyTorch `nearest` rule."""
from typing import List, Sequence

import torch

from ._dispatch import use_triton
from ._validate import check_grid, check_same, check_tensor
from .token_pool import Grid


# ----------------------------------------------------------------------------------------------------------------
# Autograd and the public op
# ----------------------------------------------------------------------------------------------------------------

@torch.library.custom_op("flexdit::upsample_add", mutates_args=())
def _upsample_add_op(sparse: torch.Tensor, dense: torch.Tensor, hw: List[int], grid: List[int]) -> torch.Tensor:
    return upsample_add_ref(sparse, dense, hw, grid)


@_upsample_add_op.register_fake
def _(sparse, dense, hw, grid):
    return torch.empty_like(dense)


@torch.library.custom_op("flexdit::upsample_add_backward", mutates_args=())
def _upsample_add_backward_op(grad_out: torch.Tensor, hw: List[int], grid: List[int]) -> torch.Tensor:
    return upsample_add_backward_ref(grad_out, hw, grid)


@_upsample_add_backward_op.register_fake
def _(grad_out, hw, grid):
    return grad_out.new_empty(grad_out.shape[0], grid[0] * grid[1], grad_out.shape[2])


def _setup_context(ctx, inputs, output):
    _, _, ctx.hw, ctx.grid = inputs


def _backward(ctx, grad_out):
    grad_out = grad_out.contiguous()
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
    return (up + dense.float()).to(dense.dtype)


def upsample_add_backward_ref(grad_out: torch.Tensor, hw: Sequence[int], grid: Sequence[int]) -> torch.Tensor:
    """Gradient for `sparse`: the sum of each parent's children's gradients (the dense gradient is grad_out)."""
    b, _, c = grad_out.shape
    out = torch.zeros(b, grid[0] * grid[1], c, dtype=torch.float32, device=grad_out.device)
    out.index_add_(1, parent_index(hw, grid, grad_out.device), grad_out.float())
    return out.to(grad_out.dtype)
