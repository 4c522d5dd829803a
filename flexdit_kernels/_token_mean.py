"""token_mean: mean over tokens of LayerNorm(x) without affine (the Poolingformer's pooled input).
x: (B, N, C) fp32/fp16/bf16, any N and C -> (B, C) in x's dtype, statistics and sums in fp32."""
import torch
import triton
import triton.language as tl

from ._dispatch import use_triton
from ._validate import check_kernel_device, check_same, check_tensor


# ----------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------

@triton.jit
def _token_stats(x_base, offs_n, mask_n, stride_x_n, stride_x_c, n_channels, eps,
                 BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per-token LayerNorm mean and 1/std in fp32 for BLOCK_N tokens, one sweep over C in BLOCK_C chunks.
    Chunks are merged with Chan's parallel update (mean and sum of squared deviations), which stays exact when the
    mean is large against the spread, unlike E[x^2] - E[x]^2."""
    mean = tl.zeros([BLOCK_N], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_N], dtype=tl.float32)
    count = tl.zeros([BLOCK_N], dtype=tl.float32)
    for c0 in range(0, n_channels, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < n_channels
        mask = mask_n[:, None] & mask_c[None, :]
        x = tl.load(x_base + offs_n[:, None] * stride_x_n + offs_c[None, :] * stride_x_c,
                    mask=mask, other=0.0).to(tl.float32)
        n_chunk = tl.minimum(n_channels - c0, BLOCK_C).to(tl.float32)
        chunk_mean = tl.sum(x, axis=1) / n_chunk
        dev = tl.where(mask, x - chunk_mean[:, None], 0.0)
        chunk_m2 = tl.sum(dev * dev, axis=1)
        delta = chunk_mean - mean
        total = count + n_chunk
        mean += delta * (n_chunk / total)
        m2 += chunk_m2 + delta * delta * (count * n_chunk / total)
        count = total
    rstd = 1.0 / tl.sqrt(m2 / n_channels + eps)
    return mean, rstd


@triton.jit
def _token_mean_fwd_kernel(
    X, PARTIAL,
    n_tokens, n_channels, eps,
    stride_x_b, stride_x_n, stride_x_c,
    stride_p_b, stride_p_k,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One program per (batch, chunk of BLOCK_N tokens): the chunk's sum of normalized tokens, (C,) in fp32, goes to
    its own row of PARTIAL, so the split over tokens needs no atomics and sums in a fixed order. The second sweep
    over the chunk's C channels re-reads what the first just brought into cache, so x crosses HBM once."""
    n_chunks = (n_tokens + BLOCK_N - 1) // BLOCK_N  # inline cdiv: tl.cdiv is a jit call, slow when interpreted
    pid = tl.program_id(0).to(tl.int64)
    b = pid // n_chunks
    k = pid % n_chunks
    offs_n = k * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < n_tokens
    x_base = X + b * stride_x_b
    mean, rstd = _token_stats(x_base, offs_n, mask_n, stride_x_n, stride_x_c, n_channels, eps, BLOCK_N, BLOCK_C)
    p_base = PARTIAL + b * stride_p_b + k * stride_p_k
    for c0 in range(0, n_channels, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < n_channels
        mask = mask_n[:, None] & mask_c[None, :]
        x = tl.load(x_base + offs_n[:, None] * stride_x_n + offs_c[None, :] * stride_x_c,
                    mask=mask, other=0.0).to(tl.float32)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        tl.store(p_base + offs_c, tl.sum(xhat, axis=0), mask=mask_c)


@triton.jit
def _token_mean_combine_kernel(
    PARTIAL, OUT,
    n_chunks, n_tokens, n_channels,
    stride_p_b, stride_p_k,
    stride_out_b, stride_out_c,
    BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One program per (batch, channel block): sum the chunks' partial rows in order, divide by N, cast."""
    b = tl.program_id(0).to(tl.int64)
    offs_c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < n_channels
    acc = tl.zeros([BLOCK_K, BLOCK_C], dtype=tl.float32)
    for k0 in range(0, n_chunks, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask = (offs_k < n_chunks)[:, None] & mask_c[None, :]
        acc += tl.load(PARTIAL + b * stride_p_b + offs_k[:, None] * stride_p_k + offs_c[None, :], mask=mask, other=0.0)
    out = tl.sum(acc, axis=0) / n_tokens
    tl.store(OUT + b * stride_out_b + offs_c * stride_out_c, out.to(OUT.dtype.element_ty), mask=mask_c)


@triton.jit
def _token_mean_bwd_kernel(
    DOUT, X, DX,
    n_tokens, n_channels, eps,
    stride_dout_b, stride_dout_c,
    stride_x_b, stride_x_n, stride_x_c,
    stride_dx_b, stride_dx_n, stride_dx_c,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One program per (batch, BLOCK_N tokens): LayerNorm backward with the same upstream g = grad_out / N on every
    token, dx = rstd * (g - mean_c(g) - xhat * mean_c(xhat * g)). Statistics are recomputed from x (the forward
    keeps none); three sweeps over C, the last two served from cache."""
    n_blocks = (n_tokens + BLOCK_N - 1) // BLOCK_N  # inline cdiv: tl.cdiv is a jit call, slow when interpreted
    pid = tl.program_id(0).to(tl.int64)
    b = pid // n_blocks
    offs_n = (pid % n_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < n_tokens
    x_base = X + b * stride_x_b
    dout_base = DOUT + b * stride_dout_b
    mean, rstd = _token_stats(x_base, offs_n, mask_n, stride_x_n, stride_x_c, n_channels, eps, BLOCK_N, BLOCK_C)

    dot = tl.zeros([BLOCK_N], dtype=tl.float32)     # sum_c xhat * g, per token
    g_sum = tl.zeros([BLOCK_N], dtype=tl.float32)   # sum_c g, the same for every token
    for c0 in range(0, n_channels, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < n_channels
        mask = mask_n[:, None] & mask_c[None, :]
        x = tl.load(x_base + offs_n[:, None] * stride_x_n + offs_c[None, :] * stride_x_c,
                    mask=mask, other=0.0).to(tl.float32)
        g = tl.load(dout_base + offs_c * stride_dout_c, mask=mask_c, other=0.0).to(tl.float32) / n_tokens
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        dot += tl.sum(xhat * g[None, :], axis=1)
        g_sum += tl.sum(g, axis=0)
    dot_mean = dot / n_channels
    g_mean = g_sum / n_channels

    dx_base = DX + b * stride_dx_b
    for c0 in range(0, n_channels, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < n_channels
        mask = mask_n[:, None] & mask_c[None, :]
        x = tl.load(x_base + offs_n[:, None] * stride_x_n + offs_c[None, :] * stride_x_c,
                    mask=mask, other=0.0).to(tl.float32)
        g = tl.load(dout_base + offs_c * stride_dout_c, mask=mask_c, other=0.0).to(tl.float32) / n_tokens
        xhat = (x - mean[:, None]) * rstd[:, None]
        dx = rstd[:, None] * (g[None, :] - g_mean[:, None] - xhat * dot_mean[:, None])
        tl.store(dx_base + offs_n[:, None] * stride_dx_n + offs_c[None, :] * stride_dx_c,
                 dx.to(DX.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------

# NOTE: block sizes below are unmeasured on GPU (no GPU was available when they were written). The reasoning:
# 128 channels = 256 B per token row in bf16 (C = 1152 is exactly 9 blocks); the forward shrinks its token chunk
# from 32 towards 4 until B * chunks reaches ~_TARGET_PROGRAMS (about 4 programs per SM of a 132-SM H100), so a
# batch of 8 with N = 256 still fills the GPU; partial rows cost C fp32 per chunk, small next to the chunk's x.
_MAX_BLOCK_C = 128
_TILE = 2048
_TARGET_PROGRAMS = 528
_NUM_WARPS = 4


def _block_c(n_channels: int) -> int:
    return min(_MAX_BLOCK_C, triton.next_power_of_2(n_channels))


def _check_x(x: torch.Tensor) -> None:
    check_tensor("x", x, 3)
    check_kernel_device("x", x)
    if x.shape[1] == 0 or x.shape[2] == 0:
        raise ValueError(f"x must have at least one token and one channel, got shape {tuple(x.shape)}")


def token_mean_fwd(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Launch the LayerNorm-mean kernels. x: (B, N, C), any strides (read in place, no copy) -> (B, C) contiguous."""
    _check_x(x)
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")
    b, n, c = x.shape
    out = x.new_empty(b, c)
    if b == 0:
        return out
    block_c = _block_c(c)
    block_n = 32
    while block_n > 4 and b * triton.cdiv(n, block_n) < _TARGET_PROGRAMS:
        block_n //= 2
    block_n = min(block_n, triton.next_power_of_2(n))
    n_chunks = triton.cdiv(n, block_n)
    partial = torch.empty(b, n_chunks, c, dtype=torch.float32, device=x.device)
    _token_mean_fwd_kernel[(b * n_chunks,)](
        x, partial, n, c, float(eps),
        x.stride(0), x.stride(1), x.stride(2),
        partial.stride(0), partial.stride(1),
        BLOCK_N=block_n, BLOCK_C=block_c, num_warps=_NUM_WARPS,
    )
    block_k = max(1, min(triton.next_power_of_2(n_chunks), _TILE // block_c))
    _token_mean_combine_kernel[(b, triton.cdiv(c, block_c))](
        partial, out, n_chunks, n, c,
        partial.stride(0), partial.stride(1),
        out.stride(0), out.stride(1),
        BLOCK_K=block_k, BLOCK_C=block_c, num_warps=_NUM_WARPS,
    )
    return out


def token_mean_bwd(grad_out: torch.Tensor, x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Launch the backward. grad_out: (B, C), x: (B, N, C), any strides -> dx laid out like `torch.empty_like(x)`
    (the op's fake impl promises that layout)."""
    _check_x(x)
    check_tensor("grad_out", grad_out, 2)
    check_same(("x", "grad_out"), (x, grad_out))
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")
    b, n, c = x.shape
    if tuple(grad_out.shape) != (b, c):
        raise ValueError(f"grad_out must have shape {(b, c)} to match x {tuple(x.shape)}, got {tuple(grad_out.shape)}")
    dx = torch.empty_like(x)
    if b == 0:
        return dx
    block_c = _block_c(c)
    block_n = min(_TILE // block_c, triton.next_power_of_2(n))
    _token_mean_bwd_kernel[(b * triton.cdiv(n, block_n),)](
        grad_out, x, dx, n, c, float(eps),
        grad_out.stride(0), grad_out.stride(1),
        x.stride(0), x.stride(1), x.stride(2),
        dx.stride(0), dx.stride(1), dx.stride(2),
        BLOCK_N=block_n, BLOCK_C=block_c, num_warps=_NUM_WARPS,
    )
    return dx


# ----------------------------------------------------------------------------------------------------------------
# Autograd and the public op
# ----------------------------------------------------------------------------------------------------------------

@torch.library.custom_op("flexdit::token_mean", mutates_args=())
def _token_mean_op(x: torch.Tensor, eps: float) -> torch.Tensor:
    if use_triton(x):
        return token_mean_fwd(x, eps)
    return token_mean_ref(x, eps)


@_token_mean_op.register_fake
def _(x, eps):
    return x.new_empty(x.shape[0], x.shape[2])


@torch.library.custom_op("flexdit::token_mean_backward", mutates_args=())
def _token_mean_backward_op(grad_out: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    if use_triton(grad_out, x):
        return token_mean_bwd(grad_out, x, eps)
    return token_mean_backward_ref(grad_out, x, eps)


@_token_mean_backward_op.register_fake
def _(grad_out, x, eps):
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output):
    x, ctx.eps = inputs
    ctx.save_for_backward(x)


def _backward(ctx, grad_out):
    (x,) = ctx.saved_tensors
    # No .contiguous(): the kernel reads any strides (e.g. the stride-0 gradient of a .sum()).
    return _token_mean_backward_op(grad_out, x, ctx.eps), None


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
