"""silu: adaLN's SiLU(c) written straight in the dtype of the projection that reads it (one kernel, no cast).
x: (B, C) fp32/fp16/bf16, any strides -> (B, C) contiguous in out_dtype."""
from typing import Optional

import torch
import triton
import triton.language as tl

from ._dispatch import call_op, custom_op, register_autograd, use_triton
from ._layernorm_modulate import _check_out_dtype, _default_out_dtype
from ._validate import cdiv, check_kernel_device, check_tensor, next_pow2


# ----------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------

@triton.jit
def _silu_fwd_kernel(X, OUT, n_channels, stride_x_b, stride_x_c, stride_out_b, BLOCK_C: tl.constexpr):
    """One program per (row, BLOCK_C channels): out = x·sigmoid(x) in fp32, stored in OUT's dtype."""
    b = tl.program_id(0).to(tl.int64)
    offs_c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = offs_c < n_channels
    x = tl.load(X + b * stride_x_b + offs_c * stride_x_c, mask=mask, other=0.0).to(tl.float32)
    out = x * tl.sigmoid(x)
    tl.store(OUT + b * stride_out_b + offs_c, out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _silu_bwd_kernel(DOUT, X, DX, n_channels, stride_dout_b, stride_dout_c, stride_x_b, stride_x_c, stride_dx_b,
                     BLOCK_C: tl.constexpr):
    """One program per (row, BLOCK_C channels): dx = g·s·(1 + x·(1 - s)), s = sigmoid(x), in fp32, stored in DX's
    dtype."""
    b = tl.program_id(0).to(tl.int64)
    offs_c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = offs_c < n_channels
    g = tl.load(DOUT + b * stride_dout_b + offs_c * stride_dout_c, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(X + b * stride_x_b + offs_c * stride_x_c, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(x)
    tl.store(DX + b * stride_dx_b + offs_c, (g * s * (1.0 + x * (1.0 - s))).to(DX.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------

# NOTE: not tuned on a GPU. An adaLN input is one (B, C) vector per sample (C = 1152 for DiT-XL): programs of up to
# 1024 channels of a row, 4 values per thread (8 warps at 1024, one warp at 128 or fewer).
_MAX_BLOCK_C = 1024


def _block_c(n_channels: int) -> int:
    return min(_MAX_BLOCK_C, next_pow2(n_channels))


def _num_warps(block_c: int) -> int:
    return max(1, min(8, block_c // 128))


def _check_x(x: torch.Tensor, name: str = "x") -> None:
    check_tensor(name, x, 2)


def _check_grad_out(grad_out: torch.Tensor, x: torch.Tensor) -> None:
    _check_x(grad_out, "grad_out")
    if grad_out.device != x.device:
        raise ValueError(f"grad_out is on {grad_out.device} but x is on {x.device}")
    if grad_out.shape != x.shape:
        raise ValueError(f"grad_out must have x's shape {tuple(x.shape)}, got {tuple(grad_out.shape)}")


def silu_fwd(x: torch.Tensor, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Launch the forward. x: (B, C), any strides -> SiLU(x), (B, C) contiguous in out_dtype (x's dtype if None)."""
    _check_x(x)
    check_kernel_device("x", x)
    out_dtype = x.dtype if out_dtype is None else out_dtype
    _check_out_dtype(out_dtype)
    b, c = x.shape
    out = torch.empty((b, c), dtype=out_dtype, device=x.device)
    if out.numel() == 0:
        return out
    block_c = _block_c(c)
    _silu_fwd_kernel[(b, cdiv(c, block_c))](
        x, out, c, x.stride(0), x.stride(1), out.stride(0), BLOCK_C=block_c, num_warps=_num_warps(block_c))
    return out


def silu_bwd(grad_out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Launch the backward. grad_out, x: (B, C), any strides -> dx, (B, C) contiguous in x's dtype."""
    _check_x(x)
    check_kernel_device("x", x)
    _check_grad_out(grad_out, x)
    b, c = x.shape
    dx = torch.empty((b, c), dtype=x.dtype, device=x.device)
    if dx.numel() == 0:
        return dx
    block_c = _block_c(c)
    _silu_bwd_kernel[(b, cdiv(c, block_c))](
        grad_out, x, dx, c, grad_out.stride(0), grad_out.stride(1), x.stride(0), x.stride(1), dx.stride(0),
        BLOCK_C=block_c, num_warps=_num_warps(block_c))
    return dx


# ----------------------------------------------------------------------------------------------------------------
# Autograd and the public op
# ----------------------------------------------------------------------------------------------------------------

def _silu_body(x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    if use_triton(x):
        return silu_fwd(x, out_dtype)
    return silu_ref(x, out_dtype)


_silu_op = custom_op("flexdit::silu", mutates_args=())(_silu_body)


@_silu_op.register_fake
def _(x, out_dtype):
    return x.new_empty(x.shape, dtype=out_dtype)


def _silu_backward_body(grad_out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if use_triton(grad_out, x):
        return silu_bwd(grad_out, x)
    return silu_backward_ref(grad_out, x)


_silu_backward_op = custom_op("flexdit::silu_backward", mutates_args=())(_silu_backward_body)


@_silu_backward_op.register_fake
def _(grad_out, x):
    return x.new_empty(x.shape)


def _setup_context(ctx, inputs, output):
    x, _ = inputs
    ctx.save_for_backward(x)


def _op_backward(ctx, backward_op, grad_out):
    (x,) = ctx.saved_tensors
    return backward_op(grad_out, x), None


_Function = register_autograd(_silu_op, _silu_body, _silu_backward_op,
                              _silu_backward_body, _setup_context, _op_backward)


def silu(x: torch.Tensor, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """`F.silu(x)` computed in fp32 and written once in `out_dtype`: the SiLU in front of an adaLN projection,
    whose input autocast would otherwise cast in a second kernel.

    Args:
        x: (B, C) fp32/fp16/bf16 (the conditioning vector of each sample), any strides.
        out_dtype: dtype of the result. Default: the autocast dtype when autocast is enabled on x's device (so the
            result feeds the projection without a cast), else x's dtype.
    Returns:
        (B, C) contiguous in out_dtype: the same numbers as autocast's SiLU, then cast.
    Gradients: dx in x's dtype, computed in fp32.
    """
    _check_x(x)
    out_dtype = _default_out_dtype(x) if out_dtype is None else out_dtype
    _check_out_dtype(out_dtype)
    return call_op(_silu_op, _Function, _silu_body, (x,), x, out_dtype)


# ----------------------------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------------------------

def silu_ref(x: torch.Tensor, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Pure-PyTorch silu in fp32, cast to out_dtype (x's dtype if None)."""
    return torch.nn.functional.silu(x.float()).to(x.dtype if out_dtype is None else out_dtype)


def silu_backward_ref(grad_out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Gradient of silu with respect to x, in fp32, cast to x's dtype."""
    xf = x.float()
    s = torch.sigmoid(xf)
    return (grad_out.float() * s * (1 + xf * (1 - s))).to(x.dtype)
