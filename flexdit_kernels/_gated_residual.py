"""gated_residual: adaLN-Zero's gated residual update x + gate·y in one pass, optionally in place on x.
x, y: (B, L, C) fp32/fp16/bf16 (y's dtype may differ from x's), any strides; gate: (B, C) -> (B, L, C) in x's dtype."""
from typing import Tuple

import torch
import triton
import triton.language as tl

from ._dispatch import call_op, custom_op, register_autograd, use_triton
from ._layernorm_modulate import _TARGET_PROGRAMS, column_sum
from ._validate import check_kernel_device, check_tensor


# ----------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------

@triton.jit
def _gated_residual_fwd_kernel(
    X, Y, GATE, OUT,
    n_tokens, n_channels,
    stride_x_b, stride_x_n, stride_x_c,
    stride_y_b, stride_y_n, stride_y_c,
    stride_gate_b, stride_gate_c,
    stride_out_b, stride_out_n, stride_out_c,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One program per (batch, BLOCK_N tokens, BLOCK_C channels): out = x + gate·y in fp32, stored in OUT's dtype.
    Each element is read and written by the same program, so OUT may be X itself (the in-place update)."""
    n_blocks = (n_tokens + BLOCK_N - 1) // BLOCK_N  # inline cdiv: tl.cdiv is a jit call, slow when interpreted
    pid = tl.program_id(0).to(tl.int64)
    b = pid // n_blocks
    offs_n = (pid % n_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < n_channels
    mask = (offs_n < n_tokens)[:, None] & mask_c[None, :]
    gate = tl.load(GATE + b * stride_gate_b + offs_c * stride_gate_c, mask=mask_c, other=0.0).to(tl.float32)
    x = tl.load(X + b * stride_x_b + offs_n[:, None] * stride_x_n + offs_c[None, :] * stride_x_c,
                mask=mask, other=0.0).to(tl.float32)
    y = tl.load(Y + b * stride_y_b + offs_n[:, None] * stride_y_n + offs_c[None, :] * stride_y_c,
                mask=mask, other=0.0).to(tl.float32)
    out = x + gate[None, :] * y
    tl.store(OUT + b * stride_out_b + offs_n[:, None] * stride_out_n + offs_c[None, :] * stride_out_c,
             out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _gated_residual_bwd_kernel(
    DOUT, Y, GATE, DY, DGATE_PART,
    n_tokens, n_channels, tokens_per_split,
    stride_dout_b, stride_dout_n, stride_dout_c,
    stride_y_b, stride_y_n, stride_y_c,
    stride_gate_b, stride_gate_c,
    stride_dy_b, stride_dy_n,
    stride_part_b, stride_part_s,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One program per (batch, split of `tokens_per_split` tokens, BLOCK_C channels): dy = gate·g, and the split's
    sum over tokens of g·y (dgate) in fp32 registers, stored to the split's own row of the partials (no atomics,
    a fixed order of additions)."""
    b = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    offs_c = tl.program_id(2).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < n_channels
    gate = tl.load(GATE + b * stride_gate_b + offs_c * stride_gate_c, mask=mask_c, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for n0 in range(0, tokens_per_split, BLOCK_N):
        offs_n = split * tokens_per_split + n0 + tl.arange(0, BLOCK_N)
        mask = (offs_n < n_tokens)[:, None] & mask_c[None, :]
        g = tl.load(DOUT + b * stride_dout_b + offs_n[:, None] * stride_dout_n + offs_c[None, :] * stride_dout_c,
                    mask=mask, other=0.0).to(tl.float32)
        y = tl.load(Y + b * stride_y_b + offs_n[:, None] * stride_y_n + offs_c[None, :] * stride_y_c,
                    mask=mask, other=0.0).to(tl.float32)
        acc += tl.sum(g * y, axis=0)
        tl.store(DY + b * stride_dy_b + offs_n[:, None] * stride_dy_n + offs_c[None, :],
                 (gate[None, :] * g).to(DY.dtype.element_ty), mask=mask)
    tl.store(DGATE_PART + b * stride_part_b + split * stride_part_s + offs_c, acc, mask=mask_c)


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------

# NOTE: tile sizes are not tuned on a GPU. 128 channels = 512 B of fp32 per row segment and C = 1152 is exactly 9
# blocks; 32 tokens per tile = 4096 values per program (16 per thread at 8 warps). The backward splits each
# sample's tokens so that B × splits × channel blocks reaches ~_TARGET_PROGRAMS.
_MAX_BLOCK_C = 128
_TILE = 4096
_NUM_WARPS = 8


def _blocks(n_tokens: int, n_channels: int) -> Tuple[int, int]:
    block_c = min(_MAX_BLOCK_C, triton.next_power_of_2(n_channels))
    block_n = max(1, min(_TILE // block_c, triton.next_power_of_2(max(n_tokens, 1))))
    return block_n, block_c


def _check_args(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, x_name: str = "x") -> None:
    check_tensor(x_name, x, 3)
    check_tensor("y", y, 3)
    check_tensor("gate", gate, 2)
    for name, t in (("y", y), ("gate", gate)):
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but {x_name} is on {x.device}")
    if y.shape != x.shape:
        raise ValueError(f"y must have {x_name}'s shape {tuple(x.shape)}, got {tuple(y.shape)}")
    if tuple(gate.shape) != (x.shape[0], x.shape[2]):
        raise ValueError(f"gate must have shape (B, C) = {(x.shape[0], x.shape[2])} to match {x_name} "
                         f"{tuple(x.shape)}, got {tuple(gate.shape)}")


def _check_no_overlap(x: torch.Tensor) -> None:
    if any(st == 0 and sz > 1 for st, sz in zip(x.stride(), x.shape)):
        raise ValueError(f"x is expanded (strides {x.stride()}, shape {tuple(x.shape)}): it cannot be updated in "
                         "place")


def _launch_fwd(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, out: torch.Tensor) -> None:
    b, n, c = x.shape
    if x.numel() == 0:
        return
    block_n, block_c = _blocks(n, c)
    _gated_residual_fwd_kernel[(b * triton.cdiv(n, block_n), triton.cdiv(c, block_c))](
        x, y, gate, out, n, c,
        x.stride(0), x.stride(1), x.stride(2),
        y.stride(0), y.stride(1), y.stride(2),
        gate.stride(0), gate.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        BLOCK_N=block_n, BLOCK_C=block_c, num_warps=_NUM_WARPS,
    )


def gated_residual_fwd(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """Launch the forward. x, y: (B, L, C), gate: (B, C), any strides -> x + gate·y, (B, L, C) contiguous in x's
    dtype."""
    _check_args(x, y, gate)
    check_kernel_device("x", x)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch_fwd(x, y, gate, out)
    return out


def gated_residual_inplace_fwd(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> None:
    """Launch the forward writing x + gate·y over x (any strides without overlap)."""
    _check_args(x, y, gate)
    check_kernel_device("x", x)
    _check_no_overlap(x)
    _launch_fwd(x, y, gate, x)


def gated_residual_bwd(grad_out: torch.Tensor, y: torch.Tensor, gate: torch.Tensor
                       ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward. grad_out, y: (B, L, C), gate: (B, C), any strides -> (dy = gate·grad_out, (B, L, C)
    contiguous in y's dtype; dgate = sum over L of grad_out·y, (B, C) in gate's dtype). dx is grad_out itself."""
    _check_args(grad_out, y, gate, x_name="grad_out")
    check_kernel_device("grad_out", grad_out)
    b, n, c = y.shape
    dy = torch.empty((b, n, c), dtype=y.dtype, device=y.device)
    if n == 0 or b == 0:
        return dy, torch.zeros((b, c), dtype=gate.dtype, device=y.device)
    block_n, block_c = _blocks(n, c)
    c_blocks = triton.cdiv(c, block_c)
    n_blocks = triton.cdiv(n, block_n)
    want = max(1, min(n_blocks, triton.cdiv(_TARGET_PROGRAMS, b * c_blocks)))
    per_split = triton.cdiv(n_blocks, want) * block_n
    n_splits = triton.cdiv(n, per_split)
    part = torch.empty((b, n_splits, c), dtype=torch.float32, device=y.device)
    _gated_residual_bwd_kernel[(b, n_splits, c_blocks)](
        grad_out, y, gate, dy, part,
        n, c, per_split,
        grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
        y.stride(0), y.stride(1), y.stride(2),
        gate.stride(0), gate.stride(1),
        dy.stride(0), dy.stride(1),
        part.stride(0), part.stride(1),
        BLOCK_N=block_n, BLOCK_C=block_c, num_warps=_NUM_WARPS,
    )
    return dy, column_sum(part, gate.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Autograd and the public op
# ----------------------------------------------------------------------------------------------------------------

def _gated_residual_body(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    if use_triton(x, y, gate):
        return gated_residual_fwd(x, y, gate)
    return gated_residual_ref(x, y, gate)


_gated_residual_op = custom_op("flexdit::gated_residual", mutates_args=())(_gated_residual_body)


@_gated_residual_op.register_fake
def _(x, y, gate):
    return x.new_empty(x.shape)


def _gated_residual_inplace_body(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> None:
    if use_triton(x, y, gate):
        gated_residual_inplace_fwd(x, y, gate)
    else:
        x.copy_(gated_residual_ref(x, y, gate))


_gated_residual_inplace_op = custom_op("flexdit::gated_residual_inplace",
                                       mutates_args=("x",))(_gated_residual_inplace_body)


def _inplace_eager(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> None:
    """The in-place update outside the dispatcher: the body, then x's version bumped as an in-place op bumps it (the
    kernel's write alone would not), so that autograd refuses a graph that saved the old x."""
    _gated_residual_inplace_body(x, y, gate)
    torch.autograd.graph.increment_version(x)


@_gated_residual_inplace_op.register_fake
def _(x, y, gate):
    return None


def _gated_residual_backward_body(grad_out: torch.Tensor, y: torch.Tensor, gate: torch.Tensor
                                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    if use_triton(grad_out, y, gate):
        return gated_residual_bwd(grad_out, y, gate)
    return gated_residual_backward_ref(grad_out, y, gate)


_gated_residual_backward_op = custom_op("flexdit::gated_residual_backward",
                                        mutates_args=())(_gated_residual_backward_body)


@_gated_residual_backward_op.register_fake
def _(grad_out, y, gate):
    return y.new_empty(y.shape), gate.new_empty(gate.shape)


def _setup_context(ctx, inputs, output):
    x, y, gate = inputs
    ctx.save_for_backward(y, gate)       # d/dx is the identity: x itself is not kept


def _op_backward(ctx, backward_op, grad_out):
    y, gate = ctx.saved_tensors
    dy, dgate = backward_op(grad_out, y, gate)
    return grad_out, dy, dgate


_Function = register_autograd(_gated_residual_op, _gated_residual_body, _gated_residual_backward_op,
                              _gated_residual_backward_body, _setup_context, _op_backward)


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """adaLN-Zero's residual update `x + gate.unsqueeze(1) * y`, read once and written once, arithmetic in fp32.

    Args:
        x: (B, L, C) the residual stream (fp32 usually), any strides.
        y: (B, L, C) the branch output, any float dtype (bf16 under autocast) and strides.
        gate: (B, C), any float dtype and strides, broadcast over L.
        inplace: write the result over x and return x, when autograd does not record the call (grad mode off,
            inference mode, or no input requires grad) outside torch.func transforms. When autograd records (or a
            transform runs), the update is out of place:
            a new tensor is returned and x is left as it was, so callers must use the returned tensor. The op
            mutates the caller's x: pass True only where nothing else holds x.
    Returns:
        (B, L, C) in x's dtype: x itself (updated) or a new contiguous tensor.
    Gradients: dx = g (passed through, x is not saved), dy = gate·g in y's dtype, dgate = sum over L of g·y in
    gate's dtype, summed deterministically (fixed-order partial sums, no atomics).
    """
    _check_args(x, y, gate)
    if inplace and not (torch.is_grad_enabled() and (x.requires_grad or y.requires_grad or gate.requires_grad)
                        or torch._C._are_functorch_transforms_active()):      # vmap: no in-place batching fallback
        _check_no_overlap(x)
        call_op(_gated_residual_inplace_op, None, _inplace_eager, (x, y, gate), x, y, gate)
        return x
    return call_op(_gated_residual_op, _Function, _gated_residual_body, (x, y, gate), x, y, gate)


# ----------------------------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------------------------

def gated_residual_ref(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """Pure-PyTorch gated_residual in fp32, cast to x's dtype."""
    return (x.float() + gate.float().unsqueeze(1) * y.float()).to(x.dtype)


def gated_residual_backward_ref(grad_out: torch.Tensor, y: torch.Tensor, gate: torch.Tensor
                                ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Gradients of gated_residual with respect to y (in y's dtype) and gate (in gate's dtype); dx is grad_out."""
    g = grad_out.float()
    return (gate.float().unsqueeze(1) * g).to(y.dtype), (g * y.float()).sum(1).to(gate.dtype)
