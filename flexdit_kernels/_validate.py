"""Argument checks shared by every op: each failure is a ValueError that names the argument."""
from typing import Sequence, Tuple, Union

import torch

from ._dispatch import interpreting

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
Grid = Union[int, Sequence[int]]     # a grid side `G` or sides `(G_h, G_w)`, as the pooling ops take them


def check_tensor(name: str, t, ndim: int, dtypes=FLOAT_DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have rank {ndim}, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise ValueError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")


def check_same(names: Sequence[str], tensors: Sequence[torch.Tensor]) -> None:
    """All tensors share the first one's device and dtype."""
    first = tensors[0]
    for name, t in zip(names[1:], tensors[1:]):
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {names[0]} is on {first.device}")
        if t.dtype != first.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but {names[0]} has {first.dtype}")


def pair(name: str, value: Union[int, Sequence[int]]) -> Tuple[int, int]:
    """An int `G` or a pair `(G_h, G_w)` of positive ints, as a tuple."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    try:
        a, b = (int(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}") from None
    if a < 1 or b < 1:
        raise ValueError(f"{name} must be positive, got {(a, b)}")
    return a, b


def check_grid(x: torch.Tensor, hw, grid, n_dim: int = 1) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """Validate a token grid `hw` against x's token count and a sparse `grid` against `hw`."""
    h, w = pair("hw", hw)
    if h * w != x.shape[n_dim]:
        raise ValueError(f"hw={h}x{w} does not match the {x.shape[n_dim]} tokens of the input")
    gh, gw = pair("grid", grid)
    if gh > h or gw > w:
        raise ValueError(f"grid {gh}x{gw} is larger than the token grid {h}x{w}")
    return (h, w), (gh, gw)


def check_grid_sizes(hw, grid) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """Validate a token grid `hw` and a sparse `grid` no larger than it, without a tensor to count tokens from."""
    h, w = pair("hw", hw)
    gh, gw = pair("grid", grid)
    if gh > h or gw > w:
        raise ValueError(f"grid {gh}x{gw} is larger than the token grid {h}x{w}")
    return (h, w), (gh, gw)


def check_tokens(name: str, t: torch.Tensor, count: int, what: str, n_dim: int = 1) -> None:
    """t.shape[n_dim] equals `count`, the token count implied by `what` (a grid, for the message)."""
    if t.shape[n_dim] != count:
        raise ValueError(f"{name} has {t.shape[n_dim]} tokens but {what} needs {count}")


def check_kernel_device(name: str, t: torch.Tensor) -> None:
    """A Triton launcher needs CUDA tensors, or CPU tensors when the interpreter runs the kernels."""
    if not (t.is_cuda or (t.device.type == "cpu" and interpreting())):
        raise ValueError(f"{name} is on {t.device}; Triton kernels need CUDA (or the CPU with TRITON_INTERPRET=1)")


# ----------------------------------------------------------------------------------------------------------------
# Per-op argument checks, shared by each op, its launchers and its reference
# ----------------------------------------------------------------------------------------------------------------

def pool_args(x, hw, grid) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """token_pool(x, hw, grid): x (B, h*w, C) float; returns ((h, w), (G_h, G_w))."""
    check_tensor("x", x, 3)
    return check_grid(x, hw, grid)


def pool_backward_args(grad_out, hw, grid) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """token_pool's backward(grad_out, hw, grid): grad_out (B, G_h*G_w, C) float."""
    check_tensor("grad_out", grad_out, 3)
    hw, grid = check_grid_sizes(hw, grid)
    check_tokens("grad_out", grad_out, grid[0] * grid[1], f"grid {grid[0]}x{grid[1]}")
    return hw, grid


def upsample_args(sparse, dense, hw, grid) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """upsample_add(sparse, dense, hw, grid): sparse (B, G_h*G_w, C), dense (B, h*w, C), same dtype and device."""
    check_tensor("sparse", sparse, 3)
    check_tensor("dense", dense, 3)
    check_same(("dense", "sparse"), (dense, sparse))
    hw, grid = check_grid(dense, hw, grid)
    if sparse.shape[0] != dense.shape[0] or sparse.shape[2] != dense.shape[2]:
        raise ValueError(f"sparse {tuple(sparse.shape)} and dense {tuple(dense.shape)} differ in batch or channels")
    check_tokens("sparse", sparse, grid[0] * grid[1], f"grid {grid[0]}x{grid[1]}")
    return hw, grid


def upsample_backward_args(grad_out, hw, grid) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """upsample_add's backward(grad_out, hw, grid): grad_out (B, h*w, C) float."""
    check_tensor("grad_out", grad_out, 3)
    return check_grid(grad_out, hw, grid)


def mean_args(x, eps) -> float:
    """token_mean(x, eps): x (B, N, C) float with N, C >= 1, eps > 0; returns eps as a float."""
    check_tensor("x", x, 3)
    if x.shape[1] == 0 or x.shape[2] == 0:
        raise ValueError(f"x must have at least one token and one channel, got shape {tuple(x.shape)}")
    try:
        eps = float(eps)
    except (TypeError, ValueError):
        raise ValueError(f"eps must be a positive float, got {eps!r}") from None
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")
    return eps


def mean_backward_args(grad_out, x, eps) -> float:
    """token_mean's backward(grad_out, x, eps): grad_out (B, C) like x's batch and channels."""
    eps = mean_args(x, eps)
    check_tensor("grad_out", grad_out, 2)
    check_same(("x", "grad_out"), (x, grad_out))
    b, _, c = x.shape
    if tuple(grad_out.shape) != (b, c):
        raise ValueError(f"grad_out must have shape {(b, c)} to match x {tuple(x.shape)}, got {tuple(grad_out.shape)}")
    return eps


def fits_int32(*tensors: torch.Tensor) -> bool:
    """Whether every element offset inside one batch entry (dim 0) of each tensor fits in int32: then the kernels
    do their index math in int32 on an int64 batch base."""
    for t in tensors:
        if t.is_contiguous() and t.numel() < 2**31:
            continue
        span = 0
        for size, stride in zip(t.shape[1:], t.stride()[1:]):
            span += (size - 1) * abs(stride) if size > 0 else 0
        if span >= 2**31:
            return False
    return True
