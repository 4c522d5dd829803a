"""gated_residual_layernorm_modulate: r = x + gate·y, then u = LayerNorm(r)·(1 + scale) + shift, in one pass.
x, y: (B, L, C) fp32/fp16/bf16, any strides; gate, shift, scale: (B, C) -> r (B, L, C) in x's dtype, u in out_dtype."""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._dispatch import call_op, custom_op, register_autograd, use_triton
from ._gated_residual import _check_args as _check_residual_args
from ._gated_residual import gated_residual_ref
from ._layernorm_modulate import (
    _centered_rows, _check_eps, _check_modulation, _check_out_dtype, _check_x, _default_out_dtype,
    _modulated_rows_grad, _num_warps, _row_blocks, _splits, column_sum, layernorm_modulate_backward_ref,
    layernorm_modulate_ref,
)
from ._validate import check_kernel_device, check_tensor


# ----------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------

@triton.jit
def _gated_residual_layernorm_modulate_fwd_kernel(
    X, Y, GATE, SHIFT, SCALE, R, U,
    n_tokens, n_channels, eps,
    stride_x_b, stride_x_n, stride_x_c,
    stride_y_b, stride_y_n, stride_y_c,
    stride_gate_b, stride_gate_c,
    stride_shift_b, stride_shift_c,
    stride_scale_b, stride_scale_c,
    stride_r_b, stride_r_n,
    stride_u_b, stride_u_n,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One program per (batch, BLOCK_N tokens), whole rows in registers: r = x + gate·y is stored in R's dtype, and
    the LayerNorm statistics are taken from that stored (rounded) value, as the unfused ops would see it."""
    n_blocks = (n_tokens + BLOCK_N - 1) // BLOCK_N  # inline cdiv: tl.cdiv is a jit call, slow when interpreted
    pid = tl.program_id(0).to(tl.int64)
    b = pid // n_blocks
    offs_n = (pid % n_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < n_channels
    mask = (offs_n < n_tokens)[:, None] & mask_c[None, :]
    x = tl.load(X + b * stride_x_b + offs_n[:, None] * stride_x_n + offs_c[None, :] * stride_x_c,
                mask=mask, other=0.0).to(tl.float32)
    y = tl.load(Y + b * stride_y_b + offs_n[:, None] * stride_y_n + offs_c[None, :] * stride_y_c,
                mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(GATE + b * stride_gate_b + offs_c * stride_gate_c, mask=mask_c, other=0.0).to(tl.float32)
    r = (x + gate[None, :] * y).to(R.dtype.element_ty)
    tl.store(R + b * stride_r_b + offs_n[:, None] * stride_r_n + offs_c[None, :], r, mask=mask)
    rc, rstd = _centered_rows(r.to(tl.float32), mask, n_channels, eps)
    shift = tl.load(SHIFT + b * stride_shift_b + offs_c * stride_shift_c, mask=mask_c, other=0.0).to(tl.float32)
    scale = tl.load(SCALE + b * stride_scale_b + offs_c * stride_scale_c, mask=mask_c, other=0.0).to(tl.float32)
    u = rc * rstd[:, None] * (1.0 + scale[None, :]) + shift[None, :]
    tl.store(U + b * stride_u_b + offs_n[:, None] * stride_u_n + offs_c[None, :], u.to(U.dtype.element_ty), mask=mask)


@triton.jit
def _gated_residual_layernorm_modulate_bwd_kernel(
    DR, DU, R, Y, GATE, SCALE, DX, DY, DGATE_PART, DSHIFT_PART, DSCALE_PART,
    n_tokens, n_channels, tokens_per_split, eps,
    stride_dr_b, stride_dr_n, stride_dr_c,
    stride_du_b, stride_du_n, stride_du_c,
    stride_r_b, stride_r_n, stride_r_c,
    stride_y_b, stride_y_n, stride_y_c,
    stride_gate_b, stride_gate_c,
    stride_scale_b, stride_scale_c,
    stride_dx_b, stride_dx_n,
    stride_dy_b, stride_dy_n,
    stride_part_b, stride_part_s,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One program per (batch, split of `tokens_per_split` tokens), BLOCK_N whole rows at a time. The gradient
    reaching r is the residual's own plus LayerNorm-modulate's backward of du:
    d = dr + rstd·(ĝ − mean_c(ĝ) − r̂·mean_c(ĝ·r̂)), ĝ = du·(1 + scale); then dx = d, dy = gate·d. The sums over tokens
    of d·y (dgate), du (dshift) and du·r̂ (dscale) stay in fp32 registers and go to the split's rows of the
    partials: no atomics, a fixed order of additions."""
    b = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < n_channels
    gate = tl.load(GATE + b * stride_gate_b + offs_c * stride_gate_c, mask=mask_c, other=0.0).to(tl.float32)
    scale = tl.load(SCALE + b * stride_scale_b + offs_c * stride_scale_c, mask=mask_c, other=0.0).to(tl.float32)
    scale1 = 1.0 + scale
    acc_gate = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_shift = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_scale = tl.zeros([BLOCK_C], dtype=tl.float32)
    for n0 in range(0, tokens_per_split, BLOCK_N):
        offs_n = split * tokens_per_split + n0 + tl.arange(0, BLOCK_N)
        mask = (offs_n < n_tokens)[:, None] & mask_c[None, :]
        r = tl.load(R + b * stride_r_b + offs_n[:, None] * stride_r_n + offs_c[None, :] * stride_r_c,
                    mask=mask, other=0.0).to(tl.float32)
        du = tl.load(DU + b * stride_du_b + offs_n[:, None] * stride_du_n + offs_c[None, :] * stride_du_c,
                     mask=mask, other=0.0).to(tl.float32)
        rc, rstd = _centered_rows(r, mask, n_channels, eps)
        rhat = rc * rstd[:, None]
        acc_shift += tl.sum(du, axis=0)
        acc_scale += tl.sum(du * rhat, axis=0)
        d = _modulated_rows_grad(du, rhat, rstd, scale1, n_channels)
        d += tl.load(DR + b * stride_dr_b + offs_n[:, None] * stride_dr_n + offs_c[None, :] * stride_dr_c,
                     mask=mask, other=0.0).to(tl.float32)
        y = tl.load(Y + b * stride_y_b + offs_n[:, None] * stride_y_n + offs_c[None, :] * stride_y_c,
                    mask=mask, other=0.0).to(tl.float32)
        acc_gate += tl.sum(d * y, axis=0)
        tl.store(DX + b * stride_dx_b + offs_n[:, None] * stride_dx_n + offs_c[None, :],
                 d.to(DX.dtype.element_ty), mask=mask)
        tl.store(DY + b * stride_dy_b + offs_n[:, None] * stride_dy_n + offs_c[None, :],
                 (gate[None, :] * d).to(DY.dtype.element_ty), mask=mask)
    part = b * stride_part_b + split * stride_part_s + offs_c
    tl.store(DGATE_PART + part, acc_gate, mask=mask_c)
    tl.store(DSHIFT_PART + part, acc_shift, mask=mask_c)
    tl.store(DSCALE_PART + part, acc_scale, mask=mask_c)


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------

# NOTE: tiles as layernorm_modulate's (whole rows padded to a power of two, untuned on a GPU); the backward holds
# three row tiles (r, du, then dr and y) and takes a quarter of the forward's rows per step.

def _check_all(x, y, gate, shift, scale) -> None:
    _check_residual_args(x, y, gate)
    _check_x(x)
    _check_modulation("shift", shift, x)
    _check_modulation("scale", scale, x)


def gated_residual_layernorm_modulate_fwd(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor,
                                          scale: torch.Tensor, eps: float = 1e-6,
                                          out_dtype: Optional[torch.dtype] = None
                                          ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward. x, y: (B, L, C), gate, shift, scale: (B, C), any strides -> (r in x's dtype, u in
    out_dtype (x's dtype if None)), both (B, L, C) contiguous."""
    _check_all(x, y, gate, shift, scale)
    check_kernel_device("x", x)
    _check_eps(eps)
    out_dtype = x.dtype if out_dtype is None else out_dtype
    _check_out_dtype(out_dtype)
    b, n, c = x.shape
    r = torch.empty((b, n, c), dtype=x.dtype, device=x.device)
    u = torch.empty((b, n, c), dtype=out_dtype, device=x.device)
    if r.numel() == 0:
        return r, u
    block_n, block_c = _row_blocks(n, c)
    _gated_residual_layernorm_modulate_fwd_kernel[(b * triton.cdiv(n, block_n),)](
        x, y, gate, shift, scale, r, u, n, c, float(eps),
        x.stride(0), x.stride(1), x.stride(2),
        y.stride(0), y.stride(1), y.stride(2),
        gate.stride(0), gate.stride(1),
        shift.stride(0), shift.stride(1),
        scale.stride(0), scale.stride(1),
        r.stride(0), r.stride(1),
        u.stride(0), u.stride(1),
        BLOCK_N=block_n, BLOCK_C=block_c, num_warps=_num_warps(block_n * block_c),
    )
    return r, u


def gated_residual_layernorm_modulate_bwd(grad_r: torch.Tensor, grad_u: torch.Tensor, r: torch.Tensor,
                                          y: torch.Tensor, gate: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6,
                                          shift_dtype: Optional[torch.dtype] = None
                                          ) -> Tuple[torch.Tensor, ...]:
    """Launch the backward. grad_r, grad_u, r (the forward's residual output), y: (B, L, C); gate, scale: (B, C);
    any strides -> (dx in r's dtype, dy in y's dtype, both (B, L, C) contiguous; dgate, dshift, dscale (B, C) in the
    dtypes of gate, shift (shift_dtype, scale's if None) and scale)."""
    _check_residual_args(r, y, gate, x_name="r")
    _check_x(r)
    check_kernel_device("r", r)
    _check_modulation("scale", scale, r)
    for name, g in (("grad_r", grad_r), ("grad_u", grad_u)):
        check_tensor(name, g, 3)
        if g.device != r.device:
            raise ValueError(f"{name} is on {g.device} but r is on {r.device}")
        if g.shape != r.shape:
            raise ValueError(f"{name} must have r's shape {tuple(r.shape)}, got {tuple(g.shape)}")
    _check_eps(eps)
    shift_dtype = scale.dtype if shift_dtype is None else shift_dtype
    _check_out_dtype(shift_dtype)
    b, n, c = r.shape
    dx = torch.empty((b, n, c), dtype=r.dtype, device=r.device)
    dy = torch.empty((b, n, c), dtype=y.dtype, device=r.device)
    if n == 0 or b == 0:
        return (dx, dy, torch.zeros((b, c), dtype=gate.dtype, device=r.device),
                torch.zeros((b, c), dtype=shift_dtype, device=r.device),
                torch.zeros((b, c), dtype=scale.dtype, device=r.device))
    block_n, block_c = _row_blocks(n, c)
    block_n = max(1, block_n // 4)
    per_split, n_splits = _splits(b, n, block_n)
    parts = torch.empty((3, b, n_splits, c), dtype=torch.float32, device=r.device)
    _gated_residual_layernorm_modulate_bwd_kernel[(b, n_splits)](
        grad_r, grad_u, r, y, gate, scale, dx, dy, parts[0], parts[1], parts[2],
        n, c, per_split, float(eps),
        grad_r.stride(0), grad_r.stride(1), grad_r.stride(2),
        grad_u.stride(0), grad_u.stride(1), grad_u.stride(2),
        r.stride(0), r.stride(1), r.stride(2),
        y.stride(0), y.stride(1), y.stride(2),
        gate.stride(0), gate.stride(1),
        scale.stride(0), scale.stride(1),
        dx.stride(0), dx.stride(1),
        dy.stride(0), dy.stride(1),
        parts.stride(1), parts.stride(2),
        BLOCK_N=block_n, BLOCK_C=block_c, num_warps=_num_warps(4 * block_n * block_c),
    )
    return (dx, dy, column_sum(parts[0], gate.dtype), column_sum(parts[1], shift_dtype),
            column_sum(parts[2], scale.dtype))


# ----------------------------------------------------------------------------------------------------------------
# Autograd and the public op
# ----------------------------------------------------------------------------------------------------------------

def _gated_residual_layernorm_modulate_body(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor,
                                            scale: torch.Tensor, eps: float, out_dtype: torch.dtype
                                            ) -> Tuple[torch.Tensor, torch.Tensor]:
    if use_triton(x, y, gate, shift, scale):
        return gated_residual_layernorm_modulate_fwd(x, y, gate, shift, scale, eps, out_dtype)
    return gated_residual_layernorm_modulate_ref(x, y, gate, shift, scale, eps, out_dtype)


_gated_residual_layernorm_modulate_op = custom_op("flexdit::gated_residual_layernorm_modulate", mutates_args=())(
    _gated_residual_layernorm_modulate_body)


@_gated_residual_layernorm_modulate_op.register_fake
def _(x, y, gate, shift, scale, eps, out_dtype):
    return x.new_empty(x.shape), x.new_empty(x.shape, dtype=out_dtype)


def _gated_residual_layernorm_modulate_backward_body(
        grad_r: torch.Tensor, grad_u: torch.Tensor, r: torch.Tensor, y: torch.Tensor, gate: torch.Tensor,
        scale: torch.Tensor, eps: float, shift_dtype: torch.dtype
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if use_triton(grad_r, grad_u, r, y, gate, scale):
        return gated_residual_layernorm_modulate_bwd(grad_r, grad_u, r, y, gate, scale, eps, shift_dtype)
    return gated_residual_layernorm_modulate_backward_ref(grad_r, grad_u, r, y, gate, scale, eps, shift_dtype)


_gated_residual_layernorm_modulate_backward_op = custom_op(
    "flexdit::gated_residual_layernorm_modulate_backward", mutates_args=())(
    _gated_residual_layernorm_modulate_backward_body)


@_gated_residual_layernorm_modulate_backward_op.register_fake
def _(grad_r, grad_u, r, y, gate, scale, eps, shift_dtype):
    return (r.new_empty(r.shape), y.new_empty(y.shape), gate.new_empty(gate.shape),
            scale.new_empty(scale.shape, dtype=shift_dtype), scale.new_empty(scale.shape))


def _setup_context(ctx, inputs, output):
    _, y, gate, shift, scale, ctx.eps, _ = inputs
    ctx.shift_dtype = shift.dtype
    ctx.save_for_backward(output[0], y, gate, scale)      # r, not x: the statistics are r's


def _op_backward(ctx, backward_op, grad_r, grad_u):
    r, y, gate, scale = ctx.saved_tensors
    dx, dy, dgate, dshift, dscale = backward_op(grad_r, grad_u, r, y, gate, scale, ctx.eps, ctx.shift_dtype)
    return dx, dy, dgate, dshift, dscale, None, None


_Function = register_autograd(
    _gated_residual_layernorm_modulate_op, _gated_residual_layernorm_modulate_body,
    _gated_residual_layernorm_modulate_backward_op, _gated_residual_layernorm_modulate_backward_body, _setup_context,
    _op_backward)


def gated_residual_layernorm_modulate(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor,
                                      scale: torch.Tensor, eps: float = 1e-6, out_dtype: Optional[torch.dtype] = None
                                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    """A block's attention residual and the MLP's modulated LayerNorm in one pass:
    `r = gated_residual(x, y, gate)`, `u = layernorm_modulate(r, shift, scale, eps, out_dtype)`.

    Args:
        x: (B, L, C) the residual stream, any strides; y: (B, L, C) the branch output, any float dtype.
        gate, shift, scale: (B, C), any float dtype and strides, broadcast over L.
        eps: LayerNorm epsilon (DiT uses 1e-6); out_dtype: u's dtype, by default the autocast dtype when autocast
            is enabled on x's device, else x's dtype.
    Returns:
        (r, u): r (B, L, C) in x's dtype (always a new tensor), u (B, L, C) in out_dtype, both contiguous.
        u's statistics are taken from r as stored (rounded to x's dtype), in fp32.
    Gradients: dx in x's dtype, dy in y's, dgate, dshift, dscale in their inputs' dtypes; sums over L are
    deterministic (fixed-order partial sums, no atomics).
    """
    _check_all(x, y, gate, shift, scale)
    _check_eps(eps)
    out_dtype = _default_out_dtype(x) if out_dtype is None else out_dtype
    _check_out_dtype(out_dtype)
    return call_op(_gated_residual_layernorm_modulate_op, _Function, _gated_residual_layernorm_modulate_body,
                   (x, y, gate, shift, scale), x, y, gate, shift, scale, float(eps), out_dtype)


# ----------------------------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------------------------

def gated_residual_layernorm_modulate_ref(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor,
                                          scale: torch.Tensor, eps: float = 1e-6,
                                          out_dtype: Optional[torch.dtype] = None
                                          ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pure-PyTorch composition of the two references: (r in x's dtype, u in out_dtype, x's dtype if None)."""
    r = gated_residual_ref(x, y, gate)
    return r, layernorm_modulate_ref(r, shift, scale, eps, out_dtype)


def gated_residual_layernorm_modulate_backward_ref(grad_r: torch.Tensor, grad_u: torch.Tensor, r: torch.Tensor,
                                                   y: torch.Tensor, gate: torch.Tensor, scale: torch.Tensor,
                                                   eps: float = 1e-6, shift_dtype: Optional[torch.dtype] = None
                                                   ) -> Tuple[torch.Tensor, ...]:
    """Gradients in fp32 from the forward's r: (dx, dy, dgate, dshift, dscale) in the dtypes of r, y, gate, shift
    (shift_dtype, scale's if None) and scale."""
    dr_ln, dshift, dscale = layernorm_modulate_backward_ref(grad_u, r.float(), scale, eps, shift_dtype)
    d = grad_r.float() + dr_ln                                   # dr_ln is fp32: r was passed as fp32
    dy = (gate.float().unsqueeze(1) * d).to(y.dtype)
    dgate = (d * y.float()).sum(1).to(gate.dtype)
    return d.to(r.dtype), dy, dgate, dshift, dscale
