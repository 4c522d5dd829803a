"""attention: multi-head softmax attention for FlexDiT's shapes (few queries, few keys, or both dense).
q: (B, Lq, H, D), k, v: (B, Lk, H, D), any strides, fp32/fp16/bf16 -> (B, Lq, H, D) contiguous."""
import math
from typing import Optional, Tuple

import torch

from ._dispatch import use_triton
from ._validate import check_same, check_tensor

MAX_HEAD_DIM = 128


# ----------------------------------------------------------------------------------------------------------------
# Autograd and the public op
# ----------------------------------------------------------------------------------------------------------------

@torch.library.custom_op("flexdit::attention", mutates_args=())
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    return attention_ref(q, k, v, scale)


@_attention_op.register_fake
def _(q, k, v, scale):
    return q.new_empty(q.shape)


@torch.library.custom_op("flexdit::attention_backward", mutates_args=())
def _attention_backward_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           out: torch.Tensor, scale: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return attention_backward_ref(grad_out, q, k, v, out, scale)


@_attention_backward_op.register_fake
def _(grad_out, q, k, v, out, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, ctx.scale = inputs
    ctx.save_for_backward(q, k, v, output)


def _backward(ctx, grad_out):
    q, k, v, out = ctx.saved_tensors
    dq, dk, dv = _attention_backward_op(grad_out.contiguous(), q, k, v, out, ctx.scale)
    return dq, dk, dv, None


_attention_op.register_autograd(_backward, setup_context=_setup_context)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None) -> torch.Tensor:
    """softmax(q kᵀ · scale) v per batch and head.

    Args:
        q: (B, Lq, H, D); k, v: (B, Lk, H, D). Any strides: views of a fused qkv / kv projection work without copies.
        scale: softmax scale, 1/sqrt(D) by default. D must be a multiple of 8, at most 128.
    Returns:
        (B, Lq, H, D) contiguous in q's dtype, so `.reshape(B, Lq, H * D)` is free.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, 4)
    check_same(("q", "k", "v"), (q, k, v))
    b, lq, h, d = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if k.shape[0] != b:
        raise ValueError(f"k has batch {k.shape[0]} but q has {b}")
    if k.shape[2] != h:
        raise ValueError(f"k has {k.shape[2]} heads but q has {h}")
    if k.shape[3] != d:
        raise ValueError(f"k has head dim {k.shape[3]} but q has {d}")
    if d % 8 != 0 or d > MAX_HEAD_DIM:
        raise ValueError(f"head dim (q.shape[3]) must be a multiple of 8 and at most {MAX_HEAD_DIM}, got {d}")
    if lq == 0 or k.shape[1] == 0:
        raise ValueError(f"q and k need at least one token, got Lq={lq}, Lk={k.shape[1]}")
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    return _attention_op(q, k, v, scale)


# ----------------------------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------------------------

def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None) -> torch.Tensor:
    """Pure-PyTorch attention through `scaled_dot_product_attention` on (B, H, L, D) transposes."""
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return out.transpose(1, 2).contiguous()


def attention_backward_ref(grad_out, q, k, v, out, scale: float):
    """Gradients (dq, dk, dv) of attention, written out in fp32: dS = P ⊙ (dP − rowsum(dO ⊙ O))."""
    qf, kf, vf, of, go = (t.float().transpose(1, 2) for t in (q, k, v, out, grad_out))   # (B, H, L, D)
    p = torch.softmax(qf @ kf.transpose(-1, -2) * scale, dim=-1)                          # (B, H, Lq, Lk)
    dv = p.transpose(-1, -2) @ go
    dp = go @ vf.transpose(-1, -2)
    ds = p * (dp - (go * of).sum(-1, keepdim=True))
    dq = ds @ kf * scale
    dk = ds.transpose(-1, -2) @ qf * scale
    return tuple(g.transpose(1, 2).to(t.dtype).contiguous() for g, t in ((dq, q), (dk, k), (dv, v)))
