"""token_pool: adaptive average pooling of dense tokens onto a sparse grid (FlexDiT's sparse-token generation).
x: (B, N = h*w, C) fp32/fp16/bf16, token-major, any C -> (B, M = G_h*G_w, C), PyTorch AdaptiveAvgPool2d windows."""
from typing import List, Sequence, Tuple, Union

import torch

from ._dispatch import use_triton
from ._validate import check_grid, check_tensor

Grid = Union[int, Sequence[int]]


# ----------------------------------------------------------------------------------------------------------------
# Autograd and the public op
# ----------------------------------------------------------------------------------------------------------------

@torch.library.custom_op("flexdit::token_pool", mutates_args=())
def _token_pool_op(x: torch.Tensor, hw: List[int], grid: List[int]) -> torch.Tensor:
    return token_pool_ref(x, hw, grid)


@_token_pool_op.register_fake
def _(x, hw, grid):
    return x.new_empty(x.shape[0], grid[0] * grid[1], x.shape[2])


@torch.library.custom_op("flexdit::token_pool_backward", mutates_args=())
def _token_pool_backward_op(grad_out: torch.Tensor, hw: List[int], grid: List[int]) -> torch.Tensor:
    return token_pool_backward_ref(grad_out, hw, grid)


@_token_pool_backward_op.register_fake
def _(grad_out, hw, grid):
    return grad_out.new_empty(grad_out.shape[0], hw[0] * hw[1], grad_out.shape[2])


def _setup_context(ctx, inputs, output):
    _, ctx.hw, ctx.grid = inputs


def _backward(ctx, grad_out):
    return _token_pool_backward_op(grad_out.contiguous(), ctx.hw, ctx.grid), None, None


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
