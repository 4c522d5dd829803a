"""token_mean: mean over tokens of LayerNorm(x) without affine (the Poolingformer's pooled input).
x: (B, N, C) fp32/fp16/bf16, any strides, N and C -> (B, C) in x's dtype, statistics and sums in fp32."""
from typing import Tuple

import torch
import triton
import triton.language as tl

from ._dispatch import call_op, custom_op, register_autograd, run_variant
from ._launch import (WAVES, cdiv, compiled_ctas_per_sm, ctas_per_sm, device_limits, next_pow2, resident_programs,
                      run_length, wave_programs, wave_split)
from ._tune import alternatives
from ._validate import check_kernel_device, fits_int32, mean_args, mean_backward_args


# ----------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------
# A program owns a run of tokens of one batch entry and whole channel rows (BLOCK_C = next_pow2(C) >= C), so each
# token's LayerNorm statistics come from registers: x crosses memory once in the forward, and x and grad_out once in
# the backward. Grid: (token run, batch); int32 index math on an int64 batch base.

@triton.jit
def _normalize_rows(x_base, offs_n, mask_n, offs_c, mask_c, stride_x_n, stride_x_c, n_channels, eps,
                    IDX64: tl.constexpr):
    """Load BLOCK_N token rows and return (xhat, rstd, mask): xhat = (x - mean) * rstd per row in fp32, 0 outside
    the mask. Two passes over the row in registers (mean, then the mean squared deviation): exact when the mean is
    large against the spread, unlike E[x^2] - E[x]^2."""
    tok = offs_n
    if IDX64:
        tok = tok.to(tl.int64)
    mask = mask_n[:, None] & mask_c[None, :]
    x = tl.load(x_base + tok[:, None] * stride_x_n + offs_c[None, :] * stride_x_c, mask=mask, other=0.0)
    x = x.to(tl.float32)
    mean = tl.sum(x, axis=1) / n_channels
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / n_channels + eps)
    return xc * rstd[:, None], rstd, mask


@triton.jit
def _token_mean_fwd_kernel(
    X, OUT,
    n_tokens, n_channels, tokens_per_program, eps,
    stride_x_b, stride_x_n, stride_x_c,
    stride_out_b, stride_out_k, stride_out_c,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, FINAL: tl.constexpr, IDX64: tl.constexpr,
):
    """Program (token run k, batch): the run's sum of normalized tokens, BLOCK_N rows at a time, in fp32. FINAL
    (one run covers all N tokens): OUT is the (B, C) result, the sum / N in its dtype; otherwise OUT is the fp32
    (B, runs, C) workspace, row k, which `_token_mean_combine_kernel` adds up in a fixed order (no atomics)."""
    k = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_c = tl.max_contiguous(tl.multiple_of(tl.arange(0, BLOCK_C), BLOCK_C), BLOCK_C)
    mask_c = offs_c < n_channels
    x_base = X + b * stride_x_b
    start = k * tokens_per_program
    end = tl.minimum(start + tokens_per_program, n_tokens)
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        xhat, rstd, mask = _normalize_rows(x_base, offs_n, offs_n < end, offs_c, mask_c, stride_x_n, stride_x_c,
                                           n_channels, eps, IDX64)
        acc += tl.sum(xhat, axis=0)
    out_ptrs = OUT + b * stride_out_b + k * stride_out_k + offs_c * stride_out_c
    if FINAL:
        tl.store(out_ptrs, (acc / n_tokens).to(OUT.dtype.element_ty), mask=mask_c)
    else:
        tl.store(out_ptrs, acc, mask=mask_c)


@triton.jit
def _token_mean_combine_kernel(
    PARTIAL, OUT,
    n_runs, n_tokens, n_channels,
    stride_p_b, stride_p_k,
    stride_out_b, stride_out_c,
    BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Program (channel block, batch): the runs' partial rows summed in order, divided by N, cast."""
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_c = tl.max_contiguous(tl.multiple_of(offs_c, BLOCK_C), BLOCK_C)
    b = tl.program_id(1).to(tl.int64)
    mask_c = offs_c < n_channels
    acc = tl.zeros([BLOCK_K, BLOCK_C], dtype=tl.float32)
    for k0 in range(0, n_runs, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask = (offs_k < n_runs)[:, None] & mask_c[None, :]
        acc += tl.load(PARTIAL + b * stride_p_b + offs_k[:, None] * stride_p_k + offs_c[None, :], mask=mask, other=0.0)
    out = tl.sum(acc, axis=0) / n_tokens
    tl.store(OUT + b * stride_out_b + offs_c * stride_out_c, out.to(OUT.dtype.element_ty), mask=mask_c)


@triton.jit
def _token_mean_bwd_kernel(
    DOUT, X, DX,
    n_tokens, n_channels, tokens_per_program, eps,
    stride_dout_b, stride_dout_c,
    stride_x_b, stride_x_n, stride_x_c,
    stride_dx_b, stride_dx_n, stride_dx_c,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, IDX64: tl.constexpr,
):
    """Program (token run, batch): LayerNorm backward with the same upstream g = grad_out / N on every token,
    dx = rstd * (g - mean_c(g) - xhat * mean_c(xhat * g)); g is loaded once per program, each x row once, and the
    statistics are recomputed in registers (the forward keeps none)."""
    k = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_c = tl.max_contiguous(tl.multiple_of(tl.arange(0, BLOCK_C), BLOCK_C), BLOCK_C)
    mask_c = offs_c < n_channels
    x_base = X + b * stride_x_b
    dx_base = DX + b * stride_dx_b
    g = tl.load(DOUT + b * stride_dout_b + offs_c * stride_dout_c, mask=mask_c, other=0.0).to(tl.float32)
    g = g / n_tokens
    g_mean = tl.sum(g, axis=0) / n_channels
    start = k * tokens_per_program
    end = tl.minimum(start + tokens_per_program, n_tokens)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        xhat, rstd, mask = _normalize_rows(x_base, offs_n, offs_n < end, offs_c, mask_c, stride_x_n, stride_x_c,
                                           n_channels, eps, IDX64)
        dot_mean = tl.sum(xhat * g[None, :], axis=1) / n_channels
        dx = rstd[:, None] * ((g - g_mean)[None, :] - xhat * dot_mean[:, None])
        tok = offs_n
        if IDX64:
            tok = tok.to(tl.int64)
        tl.store(dx_base + tok[:, None] * stride_dx_n + offs_c[None, :] * stride_dx_c,
                 dx.to(DX.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------

# NOTE: whole rows in registers (C = 1152 -> BLOCK_C = 2048, the masked lanes load nothing) in tiles of 32
# elements per thread: 4 token rows at C = 1152 on 8 warps (sm_90 static report, triton 3.9: 64 registers forward,
# 80 backward, no spill, 16-byte accesses); C = 200 takes 16 rows on 4 warps (32 rows needed 167 and 252
# registers). Runs of tiles per program grow only while the grid keeps 4 waves of programs (`wave_programs`). The
# forward's runs are at least _MIN_FWD_RUN tokens, so that its fp32 partial row per run (4*C bytes) is at most an
# eighth of the bf16 rows it sums; one run per batch entry skips the combine.
_PER_THREAD = 32
_MAX_RUN = 128
_MIN_FWD_RUN = 16
_COMBINE_BLOCK_C = 256


def _blocks(n_tokens: int, n_channels: int, num_warps: int = 0) -> Tuple[int, int, int]:
    """(BLOCK_N, BLOCK_C, num_warps) for whole channel rows, _PER_THREAD elements per thread (num_warps: a
    configuration's, else the heuristic's)."""
    block_c = max(16, next_pow2(n_channels))
    num_warps = num_warps or (8 if block_c >= 1024 else 4)
    block_n = max(1, min(_PER_THREAD * 32 * num_warps // block_c, next_pow2(n_tokens), 64))
    return block_n, block_c, num_warps


def _run(n_tokens: int, n_batch: int, block_n: int, min_run: int, num_warps: int, device: torch.device) -> int:
    """Tokens per program: a multiple of block_n, at least min_run (rounded up to one), at most _MAX_RUN, the
    longest whose grid of n_batch * ceil(N / run) programs still makes 4 waves."""
    min_tiles = cdiv(min_run, block_n)
    tiles = cdiv(n_tokens, block_n * min_tiles)
    grow = run_length(tiles, n_batch, wave_programs(device, num_warps), max(1, _MAX_RUN // (block_n * min_tiles)))
    return block_n * min_tiles * grow


# NOTE: registers per thread of the forward kernel at _PER_THREAD values per thread (`python -m bench static`: sm_90
# and sm_80 with triton 3.6, sm_90 with 3.9): off the GPU they give the CTAs per SM that `_fwd_run` counts waves in.
_FWD_REGS = 64


def _fwd_run(x: torch.Tensor, block_n: int, block_c: int, num_warps: int, waves: int) -> int:
    """Tokens per program of the forward. waves = 0: the heuristic (`_run`: runs of at least _MIN_FWD_RUN tokens).
    Else the longest run of whole tiles whose grid makes `waves` waves of the compiled kernel's resident programs,
    one tile where none does: more, shorter programs, each writing its own fp32 partial row."""
    b, n, c = x.shape
    if not waves:
        return _run(n, b, block_n, _MIN_FWD_RUN, num_warps, x.device)
    idx64 = not fits_int32(x)
    per_sm = compiled_ctas_per_sm(
        _token_mean_fwd_kernel, x.device, ctas_per_sm(_FWD_REGS, num_warps, 0, device_limits(x.device))[0],
        x, torch.empty(1, device=x.device, dtype=torch.float32), n, c, block_n, 1e-6, *x.stride(), c, c, 1,
        BLOCK_N=block_n, BLOCK_C=block_c, FINAL=False, IDX64=idx64, num_warps=num_warps)
    return block_n * wave_split(b, cdiv(n, block_n), resident_programs(x.device, per_sm), waves)


# The launchers' config spaces besides their heuristics (`config`: num_warps, which sets the token tile with it; the
# forward's `waves`, runs that reach WAVES waves of programs, see `_fwd_run`), checked and timed per device and
# shape by `_tune` (docs/kernels.md, "Tuning").
def _warps_space(x: torch.Tensor) -> list:
    return alternatives({"num_warps": _blocks(x.shape[1], x.shape[2])[2]}, num_warps=(4, 8, 16))


CONFIGS = {
    "token_mean": lambda x: _warps_space(x) + [{"waves": WAVES}],
    "token_mean_backward": lambda g, x: _warps_space(x),
}


def _token_mean_fwd(x: torch.Tensor, eps: float, config=None) -> torch.Tensor:
    b, n, c = x.shape
    out = torch.empty((b, c), device=x.device, dtype=x.dtype)
    if b == 0:
        return out
    config = config or {}
    block_n, block_c, num_warps = _blocks(n, c, config.get("num_warps", 0))
    run = _fwd_run(x, block_n, block_c, num_warps, config.get("waves", 0))
    n_runs = cdiv(n, run)
    idx64 = not fits_int32(x)
    if n_runs == 1:
        _token_mean_fwd_kernel[(1, b)](
            x, out, n, c, run, eps,
            x.stride(0), x.stride(1), x.stride(2),
            out.stride(0), 0, out.stride(1),
            BLOCK_N=block_n, BLOCK_C=block_c, FINAL=True, IDX64=idx64, num_warps=num_warps,
        )
        return out
    partial = torch.empty((b, n_runs, c), device=x.device, dtype=torch.float32)
    _token_mean_fwd_kernel[(n_runs, b)](
        x, partial, n, c, run, eps,
        x.stride(0), x.stride(1), x.stride(2),
        partial.stride(0), partial.stride(1), partial.stride(2),
        BLOCK_N=block_n, BLOCK_C=block_c, FINAL=False, IDX64=idx64, num_warps=num_warps,
    )
    combine_c = min(_COMBINE_BLOCK_C, block_c)
    block_k = max(1, min(next_pow2(n_runs), 4096 // combine_c))
    _token_mean_combine_kernel[(cdiv(c, combine_c), b)](
        partial, out, n_runs, n, c,
        partial.stride(0), partial.stride(1),
        out.stride(0), out.stride(1),
        BLOCK_K=block_k, BLOCK_C=combine_c, num_warps=4,
    )
    return out


def _token_mean_bwd(grad_out: torch.Tensor, x: torch.Tensor, eps: float, config=None) -> torch.Tensor:
    b, n, c = x.shape
    dx = torch.empty((b, n, c), device=x.device, dtype=x.dtype)
    if b == 0:
        return dx
    block_n, block_c, num_warps = _blocks(n, c, (config or {}).get("num_warps", 0))
    run = _run(n, b, block_n, block_n, num_warps, x.device)
    _token_mean_bwd_kernel[(cdiv(n, run), b)](
        grad_out, x, dx, n, c, run, eps,
        grad_out.stride(0), grad_out.stride(1),
        x.stride(0), x.stride(1), x.stride(2),
        dx.stride(0), dx.stride(1), dx.stride(2),
        BLOCK_N=block_n, BLOCK_C=block_c, IDX64=not fits_int32(x, dx), num_warps=num_warps,
    )
    return dx


def token_mean_fwd(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Launch the LayerNorm-mean kernels. x: (B, N, C), any strides (read in place, no copy) -> (B, C) contiguous."""
    eps = mean_args(x, eps)
    check_kernel_device("x", x)
    return _token_mean_fwd(x, eps)


def token_mean_bwd(grad_out: torch.Tensor, x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Launch the backward. grad_out: (B, C), x: (B, N, C), any strides -> dx (B, N, C) contiguous."""
    check_kernel_device("x", x)
    eps = mean_backward_args(grad_out, x, eps)
    check_kernel_device("grad_out", grad_out)
    return _token_mean_bwd(grad_out, x, eps)


# ----------------------------------------------------------------------------------------------------------------
# Autograd and the public op
# ----------------------------------------------------------------------------------------------------------------
# As in _token_pool: compilers, tracers, dispatch modes and meta tensors see the custom op `flexdit::token_mean`;
# eager calls take `_forward` (no gradient needed) or `_Function`, the op's autograd twin (`call_op`).

def _forward(x: torch.Tensor, eps: float) -> torch.Tensor:
    b, n, c = x.shape
    return run_variant("token_mean", x, batch=b, tokens=n, channels=c, params=(eps,),
                       kernel=lambda t, config=None: _token_mean_fwd(t, eps, config),
                       reference=lambda t: token_mean_ref(t, eps), space=CONFIGS["token_mean"])


def _backward(grad_out: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    # No .contiguous(): the kernel reads any strides (e.g. the stride-0 gradient of a .sum()).
    b, n, c = x.shape
    return run_variant("token_mean_backward", grad_out, x, batch=b, tokens=n, channels=c, params=(eps,),
                       kernel=lambda g, t, config=None: _token_mean_bwd(g, t, eps, config),
                       reference=lambda g, t: token_mean_backward_ref(g, t, eps),
                       space=CONFIGS["token_mean_backward"])


@custom_op("flexdit::token_mean", mutates_args=())
def _token_mean_op(x: torch.Tensor, eps: float) -> torch.Tensor:
    return _forward(x, eps)


@_token_mean_op.register_fake
def _(x, eps):
    return x.new_empty(x.shape[0], x.shape[2])


@custom_op("flexdit::token_mean_backward", mutates_args=())
def _token_mean_backward_op(grad_out: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    return _backward(grad_out, x, eps)


@_token_mean_backward_op.register_fake
def _(grad_out, x, eps):
    return x.new_empty(x.shape)


def _op_setup_context(ctx, inputs, output):
    x, ctx.eps = inputs
    ctx.save_for_backward(x)


def _op_backward(ctx, backward, grad_out):
    (x,) = ctx.saved_tensors
    return backward(grad_out, x, ctx.eps), None


_Function = register_autograd(_token_mean_op, _forward, _token_mean_backward_op,
                              _backward, _op_setup_context, _op_backward)


def token_mean(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Mean over tokens of each token's LayerNorm (no affine): `LayerNorm(x).mean(1)`.

    Args:
        x: (B, N, C) tokens, any strides; eps: LayerNorm epsilon (DiT uses 1e-6).
    Returns:
        (B, C) in x's dtype.
    """
    eps = mean_args(x, eps)
    return call_op(_token_mean_op, _Function, _forward, (x,), x, eps)


# ----------------------------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------------------------

def token_mean_ref(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Pure-PyTorch token_mean in fp32 (same arguments and checks as the op)."""
    eps = mean_args(x, eps)
    xf = x.float()
    return torch.nn.functional.layer_norm(xf, xf.shape[-1:], eps=eps).mean(1).to(x.dtype)


def token_mean_backward_ref(grad_out: torch.Tensor, x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Gradient of token_mean: LayerNorm's backward with the upstream gradient grad_out / N on every token."""
    eps = mean_backward_args(grad_out, x, eps)
    xf = x.float()
    mu = xf.mean(-1, keepdim=True)
    rstd = torch.rsqrt(xf.var(-1, unbiased=False, keepdim=True) + eps)
    xhat = (xf - mu) * rstd                                     # (B, N, C)
    g = grad_out.float()[:, None, :] / x.shape[1]               # (B, 1, C)
    dx = rstd * (g - g.mean(-1, keepdim=True) - xhat * (xhat * g).mean(-1, keepdim=True))
    return dx.to(x.dtype)
