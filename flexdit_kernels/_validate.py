"""Argument checks shared by every op: each failure is a ValueError that names the argument."""
from typing import Sequence, Tuple, Union

import torch

from ._dispatch import interpreting

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


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
