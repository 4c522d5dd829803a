"""What the grid ops token_pool and upsample_add share: the launches of their two kernel kinds (a window reduction
onto the sparse grid, a pass over the dense tokens) and the registration of their one-tensor custom ops."""
from typing import List, Sequence

import torch

from ._dispatch import custom_op
from ._launch import _WINDOW_RUN, token_plan, window_plan
from ._validate import fits_int32


def launch_window_reduce(kernel, src: torch.Tensor, h: int, w: int, gh: int, gw: int, children: bool, config,
                         num_warps: int) -> torch.Tensor:
    """Launch a `window_reduce` kernel (token_pool's forward, upsample_add's backward) over src (B, h*w, C), any
    strides: (B, G_h*G_w, C) contiguous, one row per window of the G_h x G_w grid (`children`: upsample_add's
    rule). `config` (the tuner's, or None) may override num_warps."""
    b, _, c = src.shape
    out = torch.empty((b, gh * gw, c), device=src.device, dtype=src.dtype)
    if out.numel() == 0:
        return out
    num_warps = (config or {}).get("num_warps", num_warps)
    p = window_plan(src, h, w, gh, gw, children=children, num_warps=num_warps)
    kernel[p.grid](
        src, out, h, w, gh, gw, c, p.run, p.max_rows * p.max_cols,
        src.stride(0), src.stride(1), src.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        **p.meta, IDX64=not fits_int32(src, out), num_warps=num_warps,
    )
    return out


def launch_token_tiles(kernel, inputs: Sequence[torch.Tensor], h: int, w: int, gh: int, gw: int, config,
                       num_warps: int) -> torch.Tensor:
    """Launch a kernel that writes the dense tokens (token_pool's backward, upsample_add's forward) in `token_plan`'s
    tiles: arguments `inputs`, out, the grids, N, C, the run, then the strides of each. inputs: the tensors it reads,
    any strides, the last one's dtype and device -> out (B, h*w, C) contiguous. `config` (the tuner's, or None)
    may override num_warps and max_run."""
    b, n, c = inputs[-1].shape[0], h * w, inputs[-1].shape[2]
    out = torch.empty((b, n, c), device=inputs[-1].device, dtype=inputs[-1].dtype)
    if out.numel() == 0:
        return out
    num_warps = (config or {}).get("num_warps", num_warps)
    grid, run, meta = token_plan(out, num_warps, (config or {}).get("max_run", _WINDOW_RUN))
    strides = [s for t in (*inputs, out) for s in t.stride()]
    kernel[grid](*inputs, out, h, w, gh, gw, n, c, run, *strides,
                 **meta, IDX64=not fits_int32(*inputs, out), num_warps=num_warps)
    return out


def grid_op(name: str, body, to_sparse: bool):
    """The custom op `flexdit::{name}(Tensor tokens, int[] hw, int[] grid) -> Tensor` that runs
    `body(tokens, hw, grid)`: (B, tokens, C) on one grid to (B, tokens, C) on the other, the sparse G_h x G_w grid
    (`to_sparse`) or the dense h x w one, in tokens' dtype (its fake impl)."""
    @custom_op(f"flexdit::{name}", mutates_args=())
    def op(tokens: torch.Tensor, hw: List[int], grid: List[int]) -> torch.Tensor:
        return body(tokens, tuple(hw), tuple(grid))

    @op.register_fake
    def _(tokens, hw, grid):
        side = grid if to_sparse else hw
        return tokens.new_empty(tokens.shape[0], side[0] * side[1], tokens.shape[2])
    return op
