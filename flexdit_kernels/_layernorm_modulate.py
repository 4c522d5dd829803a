"""layernorm_modulate: LayerNorm without affine, then adaLN's modulate x̂·(1 + scale) + shift, in one pass.
x: (B, L, C) fp32/fp16/bf16, any strides; shift, scale: (B, C) any float dtype -> (B, L, C) contiguous in out_dtype."""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._dispatch import autocast_dtype, call_op, custom_op, register_autograd, use_triton
from ._validate import FLOAT_DTYPES, check_kernel_device, check_tensor


# ----------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------

@triton.jit
def _centered_rows(x, mask, n_channels, eps):
    """For a (BLOCK_N, BLOCK_C) fp32 tile of whole rows (zeros where masked): the centered rows (zeros where masked)
    and each row's 1/std. Two passes over registers: exact when the mean is large against the spread."""
    mean = tl.sum(x, axis=1) / n_channels
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / n_channels + eps)
    return xc, rstd


@triton.jit
def _modulated_rows_grad(g, xhat, rstd, scale1, n_channels):
    """The gradient w.r.t. the LayerNorm input of rows whose output was xhat·scale1 + shift, given its gradient g:
    rstd·(g·scale1 − mean(g·scale1) − xhat·mean(g·scale1·xhat)), for (BLOCK_N, BLOCK_C) fp32 tiles."""
    gh = g * scale1[None, :]
    g_mean = tl.sum(gh, axis=1) / n_channels
    dot_mean = tl.sum(gh * xhat, axis=1) / n_channels
    return rstd[:, None] * (gh - g_mean[:, None] - xhat * dot_mean[:, None])


@triton.jit
def _layernorm_modulate_fwd_kernel(
    X, SHIFT, SCALE, OUT,
    n_tokens, n_channels, eps,
    stride_x_b, stride_x_n, stride_x_c,
    stride_shift_b, stride_shift_c,
    stride_scale_b, stride_scale_c,
    stride_out_b, stride_out_n,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One program per (batch, BLOCK_N tokens), each token's whole row of C channels in registers: statistics in
    fp32, modulate, cast, store. x is read once and the output written once."""
    n_blocks = (n_tokens + BLOCK_N - 1) // BLOCK_N  # inline cdiv: tl.cdiv is a jit call, slow when interpreted
    pid = tl.program_id(0).to(tl.int64)
    b = pid // n_blocks
    offs_n = (pid % n_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < n_channels
    mask = (offs_n < n_tokens)[:, None] & mask_c[None, :]
    x = tl.load(X + b * stride_x_b + offs_n[:, None] * stride_x_n + offs_c[None, :] * stride_x_c,
                mask=mask, other=0.0).to(tl.float32)
    xc, rstd = _centered_rows(x, mask, n_channels, eps)
    shift = tl.load(SHIFT + b * stride_shift_b + offs_c * stride_shift_c, mask=mask_c, other=0.0).to(tl.float32)
    scale = tl.load(SCALE + b * stride_scale_b + offs_c * stride_scale_c, mask=mask_c, other=0.0).to(tl.float32)
    out = xc * rstd[:, None] * (1.0 + scale[None, :]) + shift[None, :]
    tl.store(OUT + b * stride_out_b + offs_n[:, None] * stride_out_n + offs_c[None, :],
             out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _layernorm_modulate_bwd_kernel(
    DOUT, X, SCALE, DX, DSHIFT_PART, DSCALE_PART,
    n_tokens, n_channels, tokens_per_split, eps,
    stride_dout_b, stride_dout_n, stride_dout_c,
    stride_x_b, stride_x_n, stride_x_c,
    stride_scale_b, stride_scale_c,
    stride_dx_b, stride_dx_n,
    stride_part_b, stride_part_s,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One program per (batch, split of `tokens_per_split` tokens), BLOCK_N whole rows at a time. With
    ĝ = g·(1 + scale): dx = rstd·(ĝ − mean_c(ĝ) − x̂·mean_c(ĝ·x̂)) per token; the split's sums over tokens of g and
    g·x̂ (dshift, dscale) stay in fp32 registers and go to the split's own row of the partials, so the reduction
    over L needs no atomics and adds in a fixed order. Statistics are recomputed from x (the forward keeps none)."""
    b = tl.program_id(0).to(tl.int64)
    start = tl.program_id(1).to(tl.int64) * tokens_per_split
    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < n_channels
    scale = tl.load(SCALE + b * stride_scale_b + offs_c * stride_scale_c, mask=mask_c, other=0.0).to(tl.float32)
    scale1 = 1.0 + scale
    acc_shift = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_scale = tl.zeros([BLOCK_C], dtype=tl.float32)
    for n0 in range(0, tokens_per_split, BLOCK_N):
        offs_n = start + n0 + tl.arange(0, BLOCK_N)
        mask = (offs_n < n_tokens)[:, None] & mask_c[None, :]
        x = tl.load(X + b * stride_x_b + offs_n[:, None] * stride_x_n + offs_c[None, :] * stride_x_c,
                    mask=mask, other=0.0).to(tl.float32)
        g = tl.load(DOUT + b * stride_dout_b + offs_n[:, None] * stride_dout_n + offs_c[None, :] * stride_dout_c,
                    mask=mask, other=0.0).to(tl.float32)
        xc, rstd = _centered_rows(x, mask, n_channels, eps)
        xhat = xc * rstd[:, None]
        acc_shift += tl.sum(g, axis=0)
        acc_scale += tl.sum(g * xhat, axis=0)
        dx = _modulated_rows_grad(g, xhat, rstd, scale1, n_channels)
        tl.store(DX + b * stride_dx_b + offs_n[:, None] * stride_dx_n + offs_c[None, :],
                 dx.to(DX.dtype.element_ty), mask=mask)
    part = b * stride_part_b + tl.program_id(1).to(tl.int64) * stride_part_s + offs_c
    tl.store(DSHIFT_PART + part, acc_shift, mask=mask_c)
    tl.store(DSCALE_PART + part, acc_scale, mask=mask_c)


@triton.jit
def _column_sum_kernel(
    PART, OUT,
    n_rows, n_channels,
    stride_part_b, stride_part_s,
    stride_out_b, stride_out_c,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One program per (batch, channel block): OUT[b] = sum over rows s of PART[b, s], in a fixed order, cast to
    OUT's dtype. Finishes the deterministic reductions over tokens of the backward kernels."""
    b = tl.program_id(0).to(tl.int64)
    offs_c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < n_channels
    acc = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
    for s0 in range(0, n_rows, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        mask = (offs_s < n_rows)[:, None] & mask_c[None, :]
        acc += tl.load(PART + b * stride_part_b + offs_s[:, None] * stride_part_s + offs_c[None, :],
                       mask=mask, other=0.0)
    tl.store(OUT + b * stride_out_b + offs_c * stride_out_c, tl.sum(acc, axis=0).to(OUT.dtype.element_ty),
             mask=mask_c)


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------

# NOTE: tile sizes are not tuned on a GPU. Reasoning: a program holds BLOCK_N whole rows padded to a power of two
# (C = 1152 -> 2048 lanes, 2 rows = 4096 fp32 values, 16 per thread at 8 warps), so B·L = 32k tokens give 16k
# programs; the backward splits each sample's tokens so that B × splits reaches ~_TARGET_PROGRAMS (4 per SM of a
# 132-SM H100) while its fp32 partials stay a few rows per sample.
MAX_CHANNELS = 16384
_TILE = 4096
_TARGET_PROGRAMS = 528
_SUM_TILE = 2048


def _num_warps(tile: int) -> int:
    return 8 if tile >= 4096 else 4


def _row_blocks(n_tokens: int, n_channels: int) -> Tuple[int, int]:
    """(BLOCK_N, BLOCK_C): whole rows padded to a power of two, as many as fit in _TILE values."""
    block_c = triton.next_power_of_2(n_channels)
    block_n = max(1, min(_TILE // block_c, triton.next_power_of_2(max(n_tokens, 1))))
    return block_n, block_c


def _splits(b: int, n_tokens: int, block_n: int) -> Tuple[int, int]:
    """(tokens per split, a multiple of block_n; number of splits) for the token reductions of a backward."""
    n_blocks = triton.cdiv(n_tokens, block_n)
    want = max(1, min(n_blocks, triton.cdiv(_TARGET_PROGRAMS, max(b, 1))))
    per_split = triton.cdiv(n_blocks, want) * block_n
    return per_split, triton.cdiv(n_tokens, per_split)


def column_sum(part: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """part: (B, S, C) fp32 with unit channel stride -> (B, C) in `dtype`, summed over S in a fixed order."""
    b, s, c = part.shape
    out = torch.empty((b, c), dtype=dtype, device=part.device)
    if out.numel() == 0:
        return out
    block_c = min(triton.next_power_of_2(c), 256)
    block_s = max(1, min(triton.next_power_of_2(s), _SUM_TILE // block_c))
    _column_sum_kernel[(b, triton.cdiv(c, block_c))](
        part, out, s, c,
        part.stride(0), part.stride(1),
        out.stride(0), out.stride(1),
        BLOCK_S=block_s, BLOCK_C=block_c, num_warps=4,
    )
    return out


def _check_x(x: torch.Tensor) -> None:
    check_tensor("x", x, 3)
    if x.shape[2] == 0:
        raise ValueError(f"x must have at least one channel, got shape {tuple(x.shape)}")
    if x.shape[2] > MAX_CHANNELS:
        raise ValueError(f"x has {x.shape[2]} channels; the kernel holds whole rows in registers, at most "
                         f"{MAX_CHANNELS}")


def _check_modulation(name: str, t: torch.Tensor, x: torch.Tensor) -> None:
    check_tensor(name, t, 2)
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if tuple(t.shape) != (x.shape[0], x.shape[2]):
        raise ValueError(f"{name} must have shape (B, C) = {(x.shape[0], x.shape[2])} to match x {tuple(x.shape)}, "
                         f"got {tuple(t.shape)}")


def _check_eps(eps: float) -> None:
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")


def _check_out_dtype(out_dtype) -> None:
    if out_dtype not in FLOAT_DTYPES:
        raise ValueError(f"out_dtype must be one of {[str(d) for d in FLOAT_DTYPES]}, got {out_dtype}")


def layernorm_modulate_fwd(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6,
                           out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Launch the forward. x: (B, L, C), shift, scale: (B, C), any strides (read in place) -> (B, L, C) contiguous
    in out_dtype (x's dtype if None)."""
    _check_x(x)
    check_kernel_device("x", x)
    _check_modulation("shift", shift, x)
    _check_modulation("scale", scale, x)
    _check_eps(eps)
    out_dtype = x.dtype if out_dtype is None else out_dtype
    _check_out_dtype(out_dtype)
    b, n, c = x.shape
    out = torch.empty((b, n, c), dtype=out_dtype, device=x.device)
    if out.numel() == 0:
        return out
    block_n, block_c = _row_blocks(n, c)
    _layernorm_modulate_fwd_kernel[(b * triton.cdiv(n, block_n),)](
        x, shift, scale, out, n, c, float(eps),
        x.stride(0), x.stride(1), x.stride(2),
        shift.stride(0), shift.stride(1),
        scale.stride(0), scale.stride(1),
        out.stride(0), out.stride(1),
        BLOCK_N=block_n, BLOCK_C=block_c, num_warps=_num_warps(block_n * block_c),
    )
    return out


def layernorm_modulate_bwd(grad_out: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6,
                           shift_dtype: Optional[torch.dtype] = None
                           ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward. grad_out, x: (B, L, C), scale: (B, C), any strides -> (dx (B, L, C) contiguous in x's
    dtype, dshift (B, C) in shift_dtype (scale's dtype if None), dscale (B, C) in scale's dtype)."""
    _check_x(x)
    check_kernel_device("x", x)
    _check_modulation("scale", scale, x)
    check_tensor("grad_out", grad_out, 3)
    if grad_out.device != x.device:
        raise ValueError(f"grad_out is on {grad_out.device} but x is on {x.device}")
    if grad_out.shape != x.shape:
        raise ValueError(f"grad_out must have x's shape {tuple(x.shape)}, got {tuple(grad_out.shape)}")
    _check_eps(eps)
    shift_dtype = scale.dtype if shift_dtype is None else shift_dtype
    _check_out_dtype(shift_dtype)
    b, n, c = x.shape
    dx = torch.empty((b, n, c), dtype=x.dtype, device=x.device)
    if n == 0 or b == 0:
        return (dx, torch.zeros((b, c), dtype=shift_dtype, device=x.device),
                torch.zeros((b, c), dtype=scale.dtype, device=x.device))
    block_n, block_c = _row_blocks(n, c)
    block_n = max(1, block_n // 2)          # x and g tiles both live: half the forward's rows per step
    per_split, n_splits = _splits(b, n, block_n)
    parts = torch.empty((2, b, n_splits, c), dtype=torch.float32, device=x.device)
    _layernorm_modulate_bwd_kernel[(b, n_splits)](
        grad_out, x, scale, dx, parts[0], parts[1],
        n, c, per_split, float(eps),
        grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
        x.stride(0), x.stride(1), x.stride(2),
        scale.stride(0), scale.stride(1),
        dx.stride(0), dx.stride(1),
        parts.stride(1), parts.stride(2),
        BLOCK_N=block_n, BLOCK_C=block_c, num_warps=_num_warps(2 * block_n * block_c),
    )
    return dx, column_sum(parts[0], shift_dtype), column_sum(parts[1], scale.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Autograd and the public op
# ----------------------------------------------------------------------------------------------------------------

def _layernorm_modulate_body(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
                             out_dtype: torch.dtype) -> torch.Tensor:
    if use_triton(x, shift, scale):
        return layernorm_modulate_fwd(x, shift, scale, eps, out_dtype)
    return layernorm_modulate_ref(x, shift, scale, eps, out_dtype)


_layernorm_modulate_op = custom_op("flexdit::layernorm_modulate", mutates_args=())(_layernorm_modulate_body)


@_layernorm_modulate_op.register_fake
def _(x, shift, scale, eps, out_dtype):
    return x.new_empty(x.shape, dtype=out_dtype)


def _layernorm_modulate_backward_body(grad_out: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, eps: float,
                                      shift_dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if use_triton(grad_out, x, scale):
        return layernorm_modulate_bwd(grad_out, x, scale, eps, shift_dtype)
    return layernorm_modulate_backward_ref(grad_out, x, scale, eps, shift_dtype)


_layernorm_modulate_backward_op = custom_op("flexdit::layernorm_modulate_backward", mutates_args=())(
    _layernorm_modulate_backward_body)


@_layernorm_modulate_backward_op.register_fake
def _(grad_out, x, scale, eps, shift_dtype):
    return x.new_empty(x.shape), scale.new_empty(scale.shape, dtype=shift_dtype), scale.new_empty(scale.shape)


def _setup_context(ctx, inputs, output):
    x, shift, scale, ctx.eps, _ = inputs
    ctx.shift_dtype = shift.dtype
    ctx.save_for_backward(x, scale)


def _op_backward(ctx, backward_op, grad_out):
    x, scale = ctx.saved_tensors
    # No .contiguous(): the kernel reads any strides (e.g. the stride-0 gradient of a .sum()).
    dx, dshift, dscale = backward_op(grad_out, x, scale, ctx.eps, ctx.shift_dtype)
    return dx, dshift, dscale, None, None


_Function = register_autograd(_layernorm_modulate_op, _layernorm_modulate_body, _layernorm_modulate_backward_op,
                              _layernorm_modulate_backward_body, _setup_context, _op_backward)


def _default_out_dtype(x: torch.Tensor) -> torch.dtype:
    """The autocast dtype of x's device when autocast is on there (the dtype the next GEMM runs in), else x's."""
    return autocast_dtype(x.device.type) or x.dtype


def layernorm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6,
                       out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """adaLN's `modulate(LayerNorm(x), shift, scale)`: LayerNorm without affine, then x̂·(1 + scale) + shift.

    Args:
        x: (B, L, C) fp32/fp16/bf16 tokens, any strides (C at most 16384).
        shift, scale: (B, C), any float dtype and strides (e.g. chunks of the adaLN projection), broadcast over L.
        eps: LayerNorm epsilon (DiT uses 1e-6).
        out_dtype: dtype of the result. Default: the autocast dtype when autocast is enabled on x's device (so the
            result feeds the next GEMM without a cast), else x's dtype.
    Returns:
        (B, L, C) contiguous in out_dtype. Statistics and arithmetic are fp32 whatever the dtypes.
    Gradients: dx in x's dtype, dshift and dscale in the dtypes of shift and scale; their sums over L are
    deterministic (fixed-order partial sums, no atomics).
    """
    _check_x(x)
    _check_modulation("shift", shift, x)
    _check_modulation("scale", scale, x)
    _check_eps(eps)
    out_dtype = _default_out_dtype(x) if out_dtype is None else out_dtype
    _check_out_dtype(out_dtype)
    return call_op(_layernorm_modulate_op, _Function, _layernorm_modulate_body, (x, shift, scale), x, shift, scale,
                   float(eps), out_dtype)


# ----------------------------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------------------------

def layernorm_modulate_ref(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6,
                           out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Pure-PyTorch layernorm_modulate in fp32, cast to out_dtype (x's dtype if None)."""
    xf = x.float()
    xhat = torch.nn.functional.layer_norm(xf, xf.shape[-1:], eps=eps)
    out = xhat * (1 + scale.float().unsqueeze(1)) + shift.float().unsqueeze(1)
    return out.to(x.dtype if out_dtype is None else out_dtype)


def layernorm_modulate_backward_ref(grad_out: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6,
                                    shift_dtype: Optional[torch.dtype] = None
                                    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of layernorm_modulate in fp32: (dx in x's dtype, dshift in shift_dtype (scale's if None), dscale
    in scale's dtype)."""
    xf = x.float()
    g = grad_out.float()
    mu = xf.mean(-1, keepdim=True)
    rstd = torch.rsqrt(xf.var(-1, unbiased=False, keepdim=True) + eps)
    xhat = (xf - mu) * rstd                                              # (B, L, C)
    gh = g * (1 + scale.float().unsqueeze(1))
    dx = rstd * (gh - gh.mean(-1, keepdim=True) - xhat * (gh * xhat).mean(-1, keepdim=True))
    dshift = g.sum(1).to(scale.dtype if shift_dtype is None else shift_dtype)
    dscale = (g * xhat).sum(1).to(scale.dtype)
    return dx.to(x.dtype), dshift, dscale
