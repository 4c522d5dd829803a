"""Guard buffers: kernel inputs as views inside NaN-filled buffers with gaps between rows (and heads, channels ...),
and every tensor a launcher allocates placed inside a sentinel-filled buffer, so that a read outside an input's
bounds shows up as NaN and a write outside an output's or workspace's bounds as a changed sentinel, on the CPU
interpreter as on a GPU."""
import contextlib
import math
from typing import List

import torch

_real_empty = torch.empty
_real_empty_like = torch.empty_like


def _sentinel(dtype: torch.dtype):
    return float("nan") if dtype.is_floating_point else torch.iinfo(dtype).max


def _is_sentinel(t: torch.Tensor) -> torch.Tensor:
    return t.isnan() if t.dtype.is_floating_point else t == torch.iinfo(t.dtype).max


def guarded(t: torch.Tensor, gap: int = 3, margin: int = 64) -> torch.Tensor:
    """A copy of `t` as a strided view inside a NaN-filled buffer: each dim is `gap` elements longer than the view
    (so rows, heads and channels have gaps between them), with `margin` NaNs before and after. The innermost stride
    stays 1. `check_gaps(view)` then shows whether anything wrote outside the view."""
    padded = [s + gap for s in t.shape]
    buf = _real_empty(2 * margin + math.prod(padded), dtype=t.dtype, device=t.device).fill_(_sentinel(t.dtype))
    view = buf[margin:margin + math.prod(padded)].view(padded)[tuple(slice(0, s) for s in t.shape)]
    view.copy_(t)
    view.requires_grad_(t.requires_grad)
    return view


def check_gaps(view: torch.Tensor, name: str = "tensor") -> None:
    """Everything of `view`'s guard buffer outside the view still holds the sentinel (nothing wrote there)."""
    base = view._base if view._base is not None else view
    outside = torch.ones(base.numel(), dtype=torch.bool, device=base.device)
    offsets = torch.zeros((), dtype=torch.long, device=base.device) + view.storage_offset() - base.storage_offset()
    for size, stride in zip(view.shape, view.stride()):
        offsets = offsets.unsqueeze(-1) + torch.arange(size, device=base.device) * stride
    outside[offsets.flatten()] = False
    flat = base.detach().reshape(-1)
    bad = int((~_is_sentinel(flat[outside])).sum())
    assert bad == 0, f"{bad} elements outside {name} were written"


class Allocations:
    """Tensors allocated by `torch.empty` / `torch.empty_like` inside `guard_allocations`, each the middle of a
    sentinel-filled buffer (the tensor itself starts filled with the sentinel too: NaN for floats)."""

    def __init__(self):
        self.tensors: List[torch.Tensor] = []

    def check(self) -> None:
        """No launcher wrote outside any tensor it allocated."""
        for i, t in enumerate(self.tensors):
            check_gaps(t, f"allocation {i} {tuple(t.shape)} {t.dtype}")


@contextlib.contextmanager
def guard_allocations(margin: int = 256):
    """Within the block, `torch.empty(...)` and `torch.empty_like(...)` return contiguous tensors inside guard buffers;
    yields an `Allocations` whose `check()` asserts that no write landed outside them."""
    allocs = Allocations()

    def empty(*size, dtype=None, device=None, requires_grad=False, **_):
        if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)):
            size = tuple(size[0])
        dtype = dtype or torch.get_default_dtype()
        n = math.prod(size)
        buf = _real_empty(2 * margin + n, dtype=dtype, device=device).fill_(_sentinel(dtype))
        t = buf[margin:margin + n].view(size)
        allocs.tensors.append(t)
        return t.requires_grad_(requires_grad)

    def empty_like(t, dtype=None, device=None, requires_grad=False, **_):
        return empty(tuple(t.shape), dtype=dtype or t.dtype, device=device or t.device, requires_grad=requires_grad)

    torch.empty, torch.empty_like = empty, empty_like
    try:
        yield allocs
    finally:
        torch.empty, torch.empty_like = _real_empty, _real_empty_like


def check_guards(allocs: Allocations, outputs, **inputs: torch.Tensor) -> None:
    """After a run inside `guard_allocations` on `guarded` inputs: no output holds a NaN (nothing read outside an
    input), nothing was written outside a launcher's allocations or outside an input's view."""
    for i, t in enumerate(outputs):
        assert not t.isnan().any(), f"output {i} read outside its inputs"
    allocs.check()
    for name, t in inputs.items():
        check_gaps(t, name)
