"""token_mean: mean over tokens of LayerNorm(x) without affine (the Poolingformer's pooled input).
x: (B, N, C) fp32/fp16/bf16, any N and C -> (B, C) in x's dtype, statistics and sums in fp32."""
from typing import Sequence

import torch

from ._dispatch import use_triton
from ._validate import check_tensor


# ----------------------------------------------------------------------------------------------------------------
# Autograd and the public op
# ----------------------------------------------------------------------------------------------------------------

@torch.library.custom_op("flexdit::token_mean", mutates_args=())
def _token_mean_op(x: torch.Tensor, eps: float) -> torch.Tensor:
    return token_mean_ref(x, eps)


@_token_mean_op.register_fake
def _(x, eps):
    return x.new_empty(x.shape[0], x.shape[2])


@torch.library.custom_op("flexdit::token_mean_backward", mutates_args=())
def _token_mean_backward_op(grad_out: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    return token_mean_backward_ref(grad_out, x, eps)


@_token_mean_backward_op.register_fake
def _(grad_out, x, eps):
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output):
    x, ctx.eps = inputs
    ctx.save_for_backward(x)


def _backward(ctx, grad_out):
    (x,) = ctx.saved_tensors
    return _token_mean_backward_op(grad_out.contiguous(), x, ctx.eps), None


_token_mean_op.register_autograd(_backward, setup_context=_setup_context)


def token_mean(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Mean over tokens of each token's LayerNorm (no affine): `LayerNorm(x).mean(1)`.

    Args:
        x: (B, N, C) tokens; eps: LayerNorm epsilon (DiT uses 1e-6).
    Returns:
        (B, C) in x's dtype.
    """
    check_tensor("x", x, 3)
    if x.shape[1] == 0 or x.shape[2] == 0:
        raise ValueError(f"x must have at least one token and one channel, got shape {tuple(x.shape)}")
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")
    return _token_mean_op(x, float(eps))


# ----------------------------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------------------------

def token_mean_ref(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Pure-PyTorch token_mean in fp32."""
    xf = x.float()
    return torch.nn.functional.layer_norm(xf, xf.shape[-1:], eps=eps).mean(1).to(x.dtype)


def token_mean_backward_ref(grad_out: torch.Tensor, x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Gradient of token_mean: LayerNorm's backward with the upstream gradient grad_out / N on every token."""
    xf = x.float()
    mu = xf.mean(-1, keepdim=True)
    rstd = torch.rsqrt(xf.var(-1, unbiased=False, keepdim=True) + eps)
    xhat = (xf - mu) * rstd                                     # (B, N, C)
    g = grad_out.float()[:, None, :] / x.shape[1]               # (B, 1, C)
    dx = rstd * (g - g.mean(-1, keepdim=True) - xhat * (xhat * g).mean(-1, keepdim=True))
    return dx.to(x.dtype)
