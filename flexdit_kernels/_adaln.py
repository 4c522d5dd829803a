"""The adaLN family (LayerNorm-modulate, gated residual, both fused; SiLU): one forward and one backward row kernel
with constexpr switches. x, y: (B, L, C) fp32/fp16/bf16, any strides; gate, shift, scale, SiLU's x: (B, C)."""
import functools
from typing import Dict, List, Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import centered_rows, channel_offsets, column_sum, row_tile
from ._dispatch import autocast_dtype, call_op, custom_op, kernel_variant, register_autograd, run_variant
from ._launch import WAVES, cdiv, ctas_per_sm, device_limits, next_pow2, wave_split, whole_wave_splits
from ._tune import alternatives
from ._validate import FLOAT_DTYPES, check_kernel_device, check_tensor, fits_int32


# ----------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------
# One forward and one backward kernel serve three ops (flash-attention's `ops/triton/layer_norm.py` is the model):
#   layernorm_modulate                 HAS_NORM                 u = LayerNorm(x)·(1 + scale) + shift
#   gated_residual                     HAS_RESIDUAL             r = x + gate·y
#   gated_residual_layernorm_modulate  HAS_RESIDUAL, HAS_NORM   r = x + gate·y, u = LayerNorm(r)·(1 + scale) + shift
# With HAS_NORM a program holds whole rows (one channel block of next_pow2(C)); without it, channel blocks of a row
# run in separate programs. Index math inside one batch entry is int32 (IDX64 widens it) on an int64 batch base.

@triton.jit
def _modulated_rows_grad(g, xhat, rstd, scale1, n_channels):
    """The gradient w.r.t. the LayerNorm input of rows whose output was xhat·scale1 + shift, given its gradient g:
    rstd·(g·scale1 − mean(g·scale1) − xhat·mean(g·scale1·xhat)), for (BLOCK_N, BLOCK_C) fp32 tiles."""
    gh = g * scale1[None, :]
    g_mean = tl.sum(gh, axis=1) / n_channels
    dot_mean = tl.sum(gh * xhat, axis=1) / n_channels
    return rstd[:, None] * (gh - g_mean[:, None] - xhat * dot_mean[:, None])


@triton.jit
def _adaln_fwd_kernel(
    X, Y, GATE, SHIFT, SCALE, R, U,
    n_tokens, n_channels, eps,
    stride_x_b, stride_x_n, stride_x_c,
    stride_y_b, stride_y_n, stride_y_c,
    stride_gate_b, stride_gate_c,
    stride_shift_b, stride_shift_c,
    stride_scale_b, stride_scale_c,
    stride_r_b, stride_r_n, stride_r_c,
    stride_u_b, stride_u_n,
    HAS_RESIDUAL: tl.constexpr, HAS_NORM: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, EVEN_C: tl.constexpr, IDX64: tl.constexpr,
):
    """One program per (batch, BLOCK_N tokens; channel block). HAS_RESIDUAL: r = x + gate·y in fp32, stored in R's
    dtype; each element is read and written by the same program, so R may be X itself (the in-place update).
    HAS_NORM: u = x̂·(1 + scale) + shift with the statistics of h (r as stored, rounded, as the unfused ops would
    see it; else x) in fp32, stored in U's dtype. Every input is read once and every output written once."""
    n_blocks = (n_tokens + BLOCK_N - 1) // BLOCK_N  # inline cdiv: tl.cdiv is a jit call, slow when interpreted
    pid = tl.program_id(0)
    b = (pid // n_blocks).to(tl.int64)
    offs_n = (pid % n_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    if IDX64:
        offs_n = offs_n.to(tl.int64)
    offs_c, mask_c = channel_offsets(tl.program_id(1), n_channels, BLOCK_C, EVEN_C)
    mask = (offs_n < n_tokens)[:, None] & mask_c[None, :]
    h = row_tile(X + b * stride_x_b, offs_n, offs_c, mask, stride_x_n, stride_x_c)
    if HAS_RESIDUAL:
        gate = tl.load(GATE + b * stride_gate_b + offs_c * stride_gate_c, mask=mask_c, other=0.0).to(tl.float32)
        y = row_tile(Y + b * stride_y_b, offs_n, offs_c, mask, stride_y_n, stride_y_c)
        r = (h + gate[None, :] * y).to(R.dtype.element_ty)
        tl.store(R + b * stride_r_b + offs_n[:, None] * stride_r_n + offs_c[None, :] * stride_r_c, r, mask=mask)
        h = r.to(tl.float32)
    if HAS_NORM:
        hc, rstd = centered_rows(h, mask, n_channels, eps)
        shift = tl.load(SHIFT + b * stride_shift_b + offs_c * stride_shift_c, mask=mask_c, other=0.0).to(tl.float32)
        scale = tl.load(SCALE + b * stride_scale_b + offs_c * stride_scale_c, mask=mask_c, other=0.0).to(tl.float32)
        u = hc * rstd[:, None] * (1.0 + scale[None, :]) + shift[None, :]
        tl.store(U + b * stride_u_b + offs_n[:, None] * stride_u_n + offs_c[None, :], u.to(U.dtype.element_ty),
                 mask=mask)


@triton.jit(do_not_specialize=["tokens_per_split"])
def _adaln_bwd_kernel(
    DR, DU, H, Y, GATE, SCALE, DX, DY, DGATE_PART, DSHIFT_PART, DSCALE_PART,
    n_tokens, n_channels, tokens_per_split, eps,
    stride_dr_b, stride_dr_n, stride_dr_c,
    stride_du_b, stride_du_n, stride_du_c,
    stride_h_b, stride_h_n, stride_h_c,
    stride_y_b, stride_y_n, stride_y_c,
    stride_gate_b, stride_gate_c,
    stride_scale_b, stride_scale_c,
    stride_dx_b, stride_dx_n,
    stride_dy_b, stride_dy_n,
    stride_part_b, stride_part_s,
    HAS_RESIDUAL: tl.constexpr, HAS_NORM: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, EVEN_C: tl.constexpr, IDX64: tl.constexpr,
):
    """One program per (batch, split of `tokens_per_split` tokens, channel block), BLOCK_N tokens per step. The
    gradient d reaching the residual stream is DR (HAS_RESIDUAL) plus, with HAS_NORM, LayerNorm-modulate's backward
    of DU at H: rstd·(ĝ − mean_c(ĝ) − ĥ·mean_c(ĝ·ĥ)), ĝ = du·(1 + scale), statistics recomputed from H (the forward
    keeps none). HAS_NORM stores dx = d (without it dx is DR itself, not written); HAS_RESIDUAL stores dy = gate·d.
    The split's sums over tokens of d·y (dgate), du (dshift) and du·ĥ (dscale) stay in fp32 registers and go to the
    split's own row of the partials: no atomics, a fixed order of additions."""
    b = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    offs_c, mask_c = channel_offsets(tl.program_id(2), n_channels, BLOCK_C, EVEN_C)
    if HAS_RESIDUAL:
        gate = tl.load(GATE + b * stride_gate_b + offs_c * stride_gate_c, mask=mask_c, other=0.0).to(tl.float32)
        acc_gate = tl.zeros([BLOCK_C], dtype=tl.float32)
    if HAS_NORM:
        scale1 = 1.0 + tl.load(SCALE + b * stride_scale_b + offs_c * stride_scale_c, mask=mask_c,
                               other=0.0).to(tl.float32)
        acc_shift = tl.zeros([BLOCK_C], dtype=tl.float32)
        acc_scale = tl.zeros([BLOCK_C], dtype=tl.float32)
    start = split * tokens_per_split
    for n0 in range(0, tokens_per_split, BLOCK_N):
        offs_n = start + n0 + tl.arange(0, BLOCK_N)
        if IDX64:
            offs_n = offs_n.to(tl.int64)
        mask = (offs_n < n_tokens)[:, None] & mask_c[None, :]
        if HAS_NORM:
            h = row_tile(H + b * stride_h_b, offs_n, offs_c, mask, stride_h_n, stride_h_c)
            du = row_tile(DU + b * stride_du_b, offs_n, offs_c, mask, stride_du_n, stride_du_c)
            hc, rstd = centered_rows(h, mask, n_channels, eps)
            hhat = hc * rstd[:, None]
            acc_shift += tl.sum(du, axis=0)
            acc_scale += tl.sum(du * hhat, axis=0)
            d = _modulated_rows_grad(du, hhat, rstd, scale1, n_channels)
            if HAS_RESIDUAL:
                d += row_tile(DR + b * stride_dr_b, offs_n, offs_c, mask, stride_dr_n, stride_dr_c)
            tl.store(DX + b * stride_dx_b + offs_n[:, None] * stride_dx_n + offs_c[None, :],
                     d.to(DX.dtype.element_ty), mask=mask)
        else:
            d = row_tile(DR + b * stride_dr_b, offs_n, offs_c, mask, stride_dr_n, stride_dr_c)
        if HAS_RESIDUAL:
            y = row_tile(Y + b * stride_y_b, offs_n, offs_c, mask, stride_y_n, stride_y_c)
            acc_gate += tl.sum(d * y, axis=0)
            tl.store(DY + b * stride_dy_b + offs_n[:, None] * stride_dy_n + offs_c[None, :],
                     (gate[None, :] * d).to(DY.dtype.element_ty), mask=mask)
    part = b * stride_part_b + split * stride_part_s + offs_c
    if HAS_RESIDUAL:
        tl.store(DGATE_PART + part, acc_gate, mask=mask_c)
    if HAS_NORM:
        tl.store(DSHIFT_PART + part, acc_shift, mask=mask_c)
        tl.store(DSCALE_PART + part, acc_scale, mask=mask_c)


@triton.jit
def _column_sum_kernel(
    PART, OUT,
    n_rows, n_channels,
    stride_part_b, stride_part_s,
    stride_out_b, stride_out_c,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, EVEN_C: tl.constexpr,
):
    """One program per (batch, channel block): OUT[b] = sum over rows s of PART[b, s], in a fixed order, cast to
    OUT's dtype. Finishes the deterministic reductions over tokens of the backward kernel."""
    b = tl.program_id(0).to(tl.int64)
    offs_c, mask_c = channel_offsets(tl.program_id(1), n_channels, BLOCK_C, EVEN_C)
    total = column_sum(PART + b * stride_part_b, n_rows, stride_part_s, offs_c, mask_c, BLOCK_S, BLOCK_C)
    tl.store(OUT + b * stride_out_b + offs_c * stride_out_c, total.to(OUT.dtype.element_ty), mask=mask_c)


@triton.jit
def _silu_fwd_kernel(X, OUT, n_channels, stride_x_b, stride_x_c, stride_out_b,
                     BLOCK_C: tl.constexpr, EVEN_C: tl.constexpr):
    """One program per (row, BLOCK_C channels): out = x·sigmoid(x) in fp32, stored in OUT's dtype."""
    b = tl.program_id(0).to(tl.int64)
    offs_c, mask = channel_offsets(tl.program_id(1), n_channels, BLOCK_C, EVEN_C)
    x = tl.load(X + b * stride_x_b + offs_c * stride_x_c, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + b * stride_out_b + offs_c, (x * tl.sigmoid(x)).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _silu_bwd_kernel(DOUT, X, DX, n_channels, stride_dout_b, stride_dout_c, stride_x_b, stride_x_c, stride_dx_b,
                     BLOCK_C: tl.constexpr, EVEN_C: tl.constexpr):
    """One program per (row, BLOCK_C channels): dx = g·s·(1 + x·(1 - s)), s = sigmoid(x), in fp32, stored in DX's
    dtype."""
    b = tl.program_id(0).to(tl.int64)
    offs_c, mask = channel_offsets(tl.program_id(1), n_channels, BLOCK_C, EVEN_C)
    g = tl.load(DOUT + b * stride_dout_b + offs_c * stride_dout_c, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(X + b * stride_x_b + offs_c * stride_x_c, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(x)
    tl.store(DX + b * stride_dx_b + offs_c, (g * s * (1.0 + x * (1.0 - s))).to(DX.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------------
# Launch sizes
# ----------------------------------------------------------------------------------------------------------------
# A row tile holds _MIN_TILE to _TILE values: 8 to 16 per thread at 8 warps (two to four 16-byte vectors of fp32,
# one to two of bf16). With HAS_NORM a tile is BLOCK_N whole rows padded to a power of two (C = 1152 -> 2048
# lanes); without it, token blocks of _MAX_BLOCK_C channels (C = 1152 is exactly 9 blocks). A wave is the programs
# resident at once: CTAs per SM from the compiled kernel's registers and shared memory (`ctas_per_sm`) times the
# SMs; off the GPU, from the registers the kernel has when compiled for the default target (_SM90_REGS), so that
# grids keep the GPU's shape there.
# - forward: the most rows per program that still leave _FWD_WAVES waves of programs (a short last wave then costs
#   little), down to _MIN_TILE values; where none does, the tile with the most waves;
# - backward: whole rows take BLOCK_N = 1 or 2 per step, whichever keeps more rows in flight on the device (resident
#   programs x BLOCK_N; the tie to 1); the token splits fill whole waves (`whole_wave_splits`): at B = 32 one wave,
#   each program walking its rows. The config space's `waves` variant splits the tokens into WAVES waves instead,
#   writing as many more fp32 partial rows for the column sums to read back.
MAX_CHANNELS = 16384
_TILE = 4096
_MIN_TILE = 2048
_BWD_TILE = 4096
_MAX_BLOCK_C = 128
_FWD_WAVES = 4
_SUM_TILE = 2048
_ROW_MAX_BLOCK_C = 1024

# NOTE: registers per thread of each variant (direction, HAS_RESIDUAL, HAS_NORM, BLOCK_N) compiled for sm_90 at
# C = 1152 (triton 3.9, fp32 stream, bf16 branch and modulation, `cuobjdump -res-usage`; docs/kernels.md).
# Shared memory is at most 1 KiB (the cross-warp reductions) for all of them.
_SM90_REGS = {
    ("fwd", False, True, 1): 32, ("fwd", False, True, 2): 40, ("fwd", True, True, 1): 32, ("fwd", True, True, 2): 40,
    ("fwd", True, False, 16): 31, ("fwd", True, False, 32): 44,
    ("bwd", False, True, 1): 80, ("bwd", False, True, 2): 124, ("bwd", True, True, 1): 120, ("bwd", True, True, 2): 153,
    ("bwd", True, False, 32): 64,
}
_PER_SM: Dict[tuple, int] = {}
_whole_wave_splits = functools.lru_cache(maxsize=4096)(whole_wave_splits)    # once per shape


def _num_warps(values: int) -> int:
    """Warps for a tile of `values`: 8 per thread up to 8 warps (16 per thread at _TILE)."""
    return max(1, min(8, values // 256))


def _channel_block(n_channels: int, whole_rows: bool) -> Tuple[int, bool]:
    """(BLOCK_C, EVEN_C): whole rows padded to a power of two, or blocks of _MAX_BLOCK_C channels at most."""
    block_c = next_pow2(n_channels) if whole_rows else min(_MAX_BLOCK_C, next_pow2(n_channels))
    return block_c, n_channels % block_c == 0


def _resident(variant: tuple, num_warps: int, device: torch.device, compile_variant) -> int:
    """Programs of a kernel variant resident at once on `device` (one wave), cached per variant and device: on a
    GPU from the compiled kernel (`compile_variant()` returns it without launching it), elsewhere from _SM90_REGS
    (variant[:4] is its key; the most registers of that kernel's entries for a tile the table lacks)."""
    key = (variant, num_warps, device)
    per_sm = _PER_SM.get(key)
    if per_sm is None:
        if device.type == "cuda":
            compiled = compile_variant()
            compiled._init_handles()          # loads the binary: n_regs is known from here on
            regs, shared = compiled.n_regs, compiled.metadata.shared
        else:
            regs = _SM90_REGS.get(variant[:4]) or max(v for k, v in _SM90_REGS.items() if k[:3] == variant[:3])
            shared = 1024
        per_sm = _PER_SM[key] = max(1, ctas_per_sm(regs, num_warps, shared, device_limits(device))[0])
    return per_sm * device_limits(device).sm_count


def _fwd_space(x: torch.Tensor, has_norm: bool) -> List[Dict[str, int]]:
    """The forward's token tiles the heuristic searches (the largest and two halvings), as configurations."""
    n, c = x.shape[1], x.shape[2]
    top = max(1, min(_TILE // _channel_block(c, has_norm)[0], next_pow2(n)))
    return [{"BLOCK_N": bn} for bn in sorted({top, max(1, top // 2), max(1, top // 4)}, reverse=True)]


def _bwd_space(x: torch.Tensor, has_norm: bool) -> List[Dict[str, int]]:
    """The backward's token tiles around the heuristic's base tile (half, base, double), and the heuristic's tile
    with the token splits that make WAVES waves (`waves`), as configurations."""
    n, c = x.shape[1], x.shape[2]
    base = max(1, min(_BWD_TILE // ((2 if has_norm else 1) * _channel_block(c, has_norm)[0]), next_pow2(n)))
    return [{"BLOCK_N": bn} for bn in sorted({max(1, base // 2), base, min(2 * base, next_pow2(n))})] + [
        {"waves": WAVES}]


def _silu_space(x: torch.Tensor) -> List[Dict[str, int]]:
    """SiLU's channel blocks below the heuristic's (more programs per row), as configurations."""
    top = min(_ROW_MAX_BLOCK_C, next_pow2(x.shape[1]))
    return alternatives({"BLOCK_C": top}, BLOCK_C=[bc for bc in (256, 512) if bc < top])


# The launchers' config spaces besides their heuristics (`config` of each launcher: the token tile BLOCK_N, whose
# warps follow from it as the heuristic's do; the backward's `waves`, token splits for that many waves; silu's
# channel block BLOCK_C), checked and timed per device and shape by `_tune` (docs/kernels.md, "Tuning"). Keyed by
# op, called with the op's tensors.
CONFIGS = {
    "layernorm_modulate": lambda x, shift, scale: _fwd_space(x, True),
    "gated_residual": lambda x, y, gate: _fwd_space(x, False),
    "gated_residual_layernorm_modulate": lambda x, *_: _fwd_space(x, True),
    "layernorm_modulate_backward": lambda g, x, scale: _bwd_space(x, True),
    "gated_residual_backward": lambda g, y, gate: _bwd_space(y, False),
    "gated_residual_layernorm_modulate_backward": lambda gr, gu, r, *_: _bwd_space(r, True),
    "silu": _silu_space,
    "silu_backward": lambda g, x: _silu_space(x),
}


def _launch_fwd(x, y, gate, shift, scale, r, u, eps: float, has_residual: bool, has_norm: bool,
                config=None) -> None:
    """Launch the forward kernel on x (B, L, C) and whichever of y, gate (HAS_RESIDUAL), shift, scale, u
    (HAS_NORM) and r the op has; absent ones are given as present ones and never read. `config`: a BLOCK_N of
    `CONFIGS` instead of the heuristic's."""
    b, n, c = x.shape
    y, gate = (y, gate) if has_residual else (x, shift)
    shift, scale, u = (shift, scale, u) if has_norm else (gate, gate, r)
    block_c, even_c = _channel_block(c, has_norm)
    c_blocks = cdiv(c, block_c)
    args = (x, y, gate, shift, scale, r, u, n, c, eps, *x.stride(), *y.stride(), *gate.stride(), *shift.stride(),
            *scale.stride(), *r.stride(), u.stride(0), u.stride(1))
    flags = dict(HAS_RESIDUAL=has_residual, HAS_NORM=has_norm, BLOCK_C=block_c, EVEN_C=even_c,
                 IDX64=not fits_int32(x, y, r, u))
    dtypes = (x.dtype, y.dtype, r.dtype, u.dtype, shift.dtype, block_c, even_c, flags["IDX64"])
    if config:                                          # a configuration of CONFIGS: its tile, no search
        block_n = config["BLOCK_N"]
        _adaln_fwd_kernel[(b * cdiv(n, block_n), c_blocks)](*args, BLOCK_N=block_n, **flags,
                                                            num_warps=_num_warps(block_n * block_c))
        return
    block_n = max(1, min(_TILE // block_c, next_pow2(n)))
    best = None                                         # (waves, block_n, num_warps)
    while True:
        num_warps = _num_warps(block_n * block_c)
        wave = _resident(("fwd", has_residual, has_norm, block_n) + dtypes, num_warps, x.device,
                         lambda: _adaln_fwd_kernel.warmup(*args, BLOCK_N=block_n, **flags, num_warps=num_warps,
                                                          grid=(1,)))
        waves = b * cdiv(n, block_n) * c_blocks / wave
        if best is None or waves > best[0]:
            best = (waves, block_n, num_warps)
        if waves >= _FWD_WAVES or block_n * block_c <= _MIN_TILE or block_n == 1:
            break
        block_n //= 2
    _, block_n, num_warps = best
    _adaln_fwd_kernel[(b * cdiv(n, block_n), c_blocks)](*args, BLOCK_N=block_n, **flags, num_warps=num_warps)


def _parts(b: int, n_splits: int, c: int, device: torch.device) -> torch.Tensor:
    return torch.empty((3, b, n_splits, c), dtype=torch.float32, device=device)


def _launch_bwd(dr, du, h, y, gate, scale, dx, dy, eps: float, has_residual: bool, has_norm: bool,
                config=None) -> torch.Tensor:
    """Launch the backward kernel; returns the fp32 partial sums over token splits, (3, B, splits, C): dgate,
    dshift, dscale (rows of the absent ones unwritten). dr, y, gate, dy are given with HAS_RESIDUAL; du, h, scale, dx
    with HAS_NORM; absent ones as present ones, never read. `config`: a BLOCK_N of `CONFIGS` instead of the
    heuristic's, or `waves`: the fewest token splits that make that many waves (`wave_split`) instead of the ones
    that finish in the fewest whole waves."""
    rows = dr if has_residual else du
    b, n, c = rows.shape
    dr, y, gate, dy = (dr, y, gate, dy) if has_residual else (du, du, scale, dx)
    du, h, scale, dx = (du, h, scale, dx) if has_norm else (dr, dr, gate, dy)
    block_c, even_c = _channel_block(c, has_norm)
    c_blocks = cdiv(c, block_c)
    live = 2 if has_norm else 1                     # row tiles loaded per step: h and du, or dr
    flags = dict(HAS_RESIDUAL=has_residual, HAS_NORM=has_norm, BLOCK_C=block_c, EVEN_C=even_c,
                 IDX64=not fits_int32(dr, du, h, y, dx, dy))
    dtypes = (dr.dtype, du.dtype, h.dtype, y.dtype, dx.dtype, dy.dtype, gate.dtype, scale.dtype, block_c, even_c,
              flags["IDX64"])

    def args(per_split, parts):
        return (dr, du, h, y, gate, scale, dx, dy, parts[0], parts[1], parts[2], n, c, per_split, eps,
                *dr.stride(), *du.stride(), *h.stride(), *y.stride(), *gate.stride(), *scale.stride(),
                dx.stride(0), dx.stride(1), dy.stride(0), dy.stride(1), parts.stride(1), parts.stride(2))

    block_n = max(1, min(_BWD_TILE // (live * block_c), next_pow2(n)))
    best = None
    tiles = (block_n, 2 * block_n) if has_norm and block_n < next_pow2(n) else (block_n,)
    config = config or {}
    for bn in (config["BLOCK_N"],) if "BLOCK_N" in config else tiles:
        num_warps = _num_warps(live * bn * block_c)
        wave = _resident(("bwd", has_residual, has_norm, bn) + dtypes, num_warps, rows.device,
                         lambda: _adaln_bwd_kernel.warmup(*args(bn, _parts(b, 1, c, rows.device)), BLOCK_N=bn,
                                                          **flags, num_warps=num_warps, grid=(1,)))
        if best is None or wave * bn > best[0] * best[1]:
            best = (wave, bn, num_warps)
    wave, block_n, num_warps = best
    n_blocks = cdiv(n, block_n)
    if config.get("waves"):
        per_split = wave_split(b * c_blocks, n_blocks, wave, config["waves"]) * block_n
    else:
        per_split = cdiv(n_blocks, _whole_wave_splits(b * c_blocks, n_blocks, wave)) * block_n
    n_splits = cdiv(n, per_split)
    parts = _parts(b, n_splits, c, rows.device)
    _adaln_bwd_kernel[(b, n_splits, c_blocks)](*args(per_split, parts), BLOCK_N=block_n, **flags,
                                               num_warps=num_warps)
    return parts


def _row_block_c(n_channels: int, config=None) -> Tuple[int, bool, int]:
    """(BLOCK_C, EVEN_C, warps) of the kernels that walk one row's channels (SiLU, the column sums): up to
    _ROW_MAX_BLOCK_C channels (or a configuration's BLOCK_C), 8 values per thread (4 warps at 1024): 16-byte vectors
    of fp16/bf16."""
    block_c = (config or {}).get("BLOCK_C") or min(_ROW_MAX_BLOCK_C, next_pow2(n_channels))
    return block_c, n_channels % block_c == 0, max(1, min(4, block_c // 256))


def _column_sum(part: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """part: (B, S, C) fp32 with unit channel stride -> (B, C) in `dtype`, summed over S in a fixed order. Channel
    blocks as SiLU's (`_row_block_c`: 16-byte stores of fp16/bf16; `cuobjdump -sass`, sm_90)."""
    b, s, c = part.shape
    out = torch.empty((b, c), dtype=dtype, device=part.device)
    block_c, even_c, num_warps = _row_block_c(c)
    block_s = max(1, min(next_pow2(s), _SUM_TILE // block_c))
    _column_sum_kernel[(b, cdiv(c, block_c))](
        part, out, s, c, part.stride(0), part.stride(1), out.stride(0), out.stride(1),
        BLOCK_S=block_s, BLOCK_C=block_c, EVEN_C=even_c, num_warps=num_warps,
    )
    return out


# ----------------------------------------------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------------------------------------------

def _check_x(x: torch.Tensor, name: str = "x") -> None:
    check_tensor(name, x, 3)
    if x.shape[2] == 0:
        raise ValueError(f"{name} must have at least one channel, got shape {tuple(x.shape)}")
    if x.shape[2] > MAX_CHANNELS:
        raise ValueError(f"{name} has {x.shape[2]} channels; the kernel holds whole rows in registers, at most "
                         f"{MAX_CHANNELS}")


def _check_modulation(name: str, t: torch.Tensor, x: torch.Tensor, x_name: str = "x") -> None:
    check_tensor(name, t, 2)
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but {x_name} is on {x.device}")
    if tuple(t.shape) != (x.shape[0], x.shape[2]):
        raise ValueError(f"{name} must have shape (B, C) = {(x.shape[0], x.shape[2])} to match {x_name} "
                         f"{tuple(x.shape)}, got {tuple(t.shape)}")


def _check_like(name: str, t: torch.Tensor, x: torch.Tensor, x_name: str = "x") -> None:
    """t is a tensor of x's rank, device and shape (a gradient or the branch output)."""
    check_tensor(name, t, x.dim())
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but {x_name} is on {x.device}")
    if t.shape != x.shape:
        raise ValueError(f"{name} must have {x_name}'s shape {tuple(x.shape)}, got {tuple(t.shape)}")


def _check_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, x_name: str = "x") -> None:
    check_tensor(x_name, x, 3)
    check_tensor("y", y, 3)
    check_tensor("gate", gate, 2)
    _check_like("y", y, x, x_name)
    _check_modulation("gate", gate, x, x_name)


def _check_eps(eps: float) -> None:
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")


def _dtype_arg(dtype, default: torch.dtype, name: str = "out_dtype") -> torch.dtype:
    """The dtype argument `name` (`default` when None), which must be a float dtype."""
    dtype = default if dtype is None else dtype
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be one of {[str(d) for d in FLOAT_DTYPES]}, got {dtype}")
    return dtype


def _check_no_overlap(x: torch.Tensor) -> None:
    if any(st == 0 and sz > 1 for st, sz in zip(x.stride(), x.shape)):
        raise ValueError(f"x is expanded (strides {x.stride()}, shape {tuple(x.shape)}): it cannot be updated in "
                         "place")


def _default_out_dtype(x: torch.Tensor) -> torch.dtype:
    """The autocast dtype of x's device when autocast is on there (the dtype the next GEMM runs in), else x's."""
    return autocast_dtype(x.device.type) or x.dtype


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------

def layernorm_modulate_fwd(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6,
                           out_dtype: Optional[torch.dtype] = None, config=None) -> torch.Tensor:
    """Launch the forward. x: (B, L, C), shift, scale: (B, C), any strides (read in place) -> (B, L, C) contiguous
    in out_dtype (x's dtype if None)."""
    _check_x(x)
    check_kernel_device("x", x)
    _check_modulation("shift", shift, x)
    _check_modulation("scale", scale, x)
    _check_eps(eps)
    out_dtype = _dtype_arg(out_dtype, x.dtype)
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    if out.numel():
        _launch_fwd(x, None, None, shift, scale, out, out, float(eps), has_residual=False, has_norm=True,
                    config=config)
    return out


def layernorm_modulate_bwd(grad_out: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6,
                           shift_dtype: Optional[torch.dtype] = None, config=None
                           ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward. grad_out, x: (B, L, C), scale: (B, C), any strides -> (dx (B, L, C) contiguous in x's
    dtype, dshift (B, C) in shift_dtype (scale's dtype if None), dscale (B, C) in scale's dtype)."""
    _check_x(x)
    check_kernel_device("x", x)
    _check_modulation("scale", scale, x)
    _check_like("grad_out", grad_out, x)
    _check_eps(eps)
    shift_dtype = _dtype_arg(shift_dtype, scale.dtype, "shift_dtype")
    b, n, c = x.shape
    dx = torch.empty((b, n, c), dtype=x.dtype, device=x.device)
    if n == 0 or b == 0:
        return (dx, torch.zeros((b, c), dtype=shift_dtype, device=x.device),
                torch.zeros((b, c), dtype=scale.dtype, device=x.device))
    parts = _launch_bwd(None, grad_out, x, None, None, scale, dx, None, float(eps), has_residual=False,
                        has_norm=True, config=config)
    return dx, _column_sum(parts[1], shift_dtype), _column_sum(parts[2], scale.dtype)


def gated_residual_fwd(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, config=None) -> torch.Tensor:
    """Launch the forward. x, y: (B, L, C), gate: (B, C), any strides -> x + gate·y, (B, L, C) contiguous in x's
    dtype."""
    _check_residual(x, y, gate)
    check_kernel_device("x", x)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if out.numel():
        _launch_fwd(x, y, gate, None, None, out, None, 0.0, has_residual=True, has_norm=False, config=config)
    return out


def gated_residual_inplace_fwd(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, config=None) -> None:
    """Launch the forward writing x + gate·y over x (any strides without overlap)."""
    _check_residual(x, y, gate)
    check_kernel_device("x", x)
    _check_no_overlap(x)
    if x.numel():
        _launch_fwd(x, y, gate, None, None, x, None, 0.0, has_residual=True, has_norm=False, config=config)


def gated_residual_bwd(grad_out: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, config=None
                       ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward. grad_out, y: (B, L, C), gate: (B, C), any strides -> (dy = gate·grad_out, (B, L, C)
    contiguous in y's dtype; dgate = sum over L of grad_out·y, (B, C) in gate's dtype). dx is grad_out itself."""
    _check_residual(grad_out, y, gate, x_name="grad_out")
    check_kernel_device("grad_out", grad_out)
    b, n, c = y.shape
    dy = torch.empty((b, n, c), dtype=y.dtype, device=y.device)
    if dy.numel() == 0:
        return dy, torch.zeros((b, c), dtype=gate.dtype, device=y.device)
    parts = _launch_bwd(grad_out, None, None, y, gate, None, None, dy, 0.0, has_residual=True, has_norm=False,
                        config=config)
    return dy, _column_sum(parts[0], gate.dtype)


def gated_residual_layernorm_modulate_fwd(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor,
                                          scale: torch.Tensor, eps: float = 1e-6,
                                          out_dtype: Optional[torch.dtype] = None, config=None
                                          ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward. x, y: (B, L, C), gate, shift, scale: (B, C), any strides -> (r in x's dtype, u in
    out_dtype (x's dtype if None)), both (B, L, C) contiguous."""
    _check_fused(x, y, gate, shift, scale)
    check_kernel_device("x", x)
    _check_eps(eps)
    out_dtype = _dtype_arg(out_dtype, x.dtype)
    r = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    u = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    if r.numel():
        _launch_fwd(x, y, gate, shift, scale, r, u, float(eps), has_residual=True, has_norm=True, config=config)
    return r, u


def gated_residual_layernorm_modulate_bwd(grad_r: torch.Tensor, grad_u: torch.Tensor, r: torch.Tensor,
                                          y: torch.Tensor, gate: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6,
                                          shift_dtype: Optional[torch.dtype] = None, config=None
                                          ) -> Tuple[torch.Tensor, ...]:
    """Launch the backward. grad_r, grad_u, r (the forward's residual output), y: (B, L, C); gate, scale: (B, C);
    any strides -> (dx in r's dtype, dy in y's dtype, both (B, L, C) contiguous; dgate, dshift, dscale (B, C) in the
    dtypes of gate, shift (shift_dtype, scale's if None) and scale)."""
    _check_residual(r, y, gate, x_name="r")
    _check_x(r, "r")
    check_kernel_device("r", r)
    _check_modulation("scale", scale, r, "r")
    _check_like("grad_r", grad_r, r, "r")
    _check_like("grad_u", grad_u, r, "r")
    _check_eps(eps)
    shift_dtype = _dtype_arg(shift_dtype, scale.dtype, "shift_dtype")
    b, n, c = r.shape
    dx = torch.empty((b, n, c), dtype=r.dtype, device=r.device)
    dy = torch.empty((b, n, c), dtype=y.dtype, device=r.device)
    if n == 0 or b == 0:
        return (dx, dy, torch.zeros((b, c), dtype=gate.dtype, device=r.device),
                torch.zeros((b, c), dtype=shift_dtype, device=r.device),
                torch.zeros((b, c), dtype=scale.dtype, device=r.device))
    parts = _launch_bwd(grad_r, grad_u, r, y, gate, scale, dx, dy, float(eps), has_residual=True, has_norm=True,
                        config=config)
    return (dx, dy, _column_sum(parts[0], gate.dtype), _column_sum(parts[1], shift_dtype),
            _column_sum(parts[2], scale.dtype))


def silu_fwd(x: torch.Tensor, out_dtype: Optional[torch.dtype] = None, config=None) -> torch.Tensor:
    """Launch the forward. x: (B, C), any strides -> SiLU(x), (B, C) contiguous in out_dtype (x's dtype if None)."""
    check_tensor("x", x, 2)
    check_kernel_device("x", x)
    out_dtype = _dtype_arg(out_dtype, x.dtype)
    b, c = x.shape
    out = torch.empty((b, c), dtype=out_dtype, device=x.device)
    if out.numel() == 0:
        return out
    block_c, even_c, num_warps = _row_block_c(c, config)
    _silu_fwd_kernel[(b, cdiv(c, block_c))](
        x, out, c, x.stride(0), x.stride(1), out.stride(0), BLOCK_C=block_c, EVEN_C=even_c, num_warps=num_warps)
    return out


def silu_bwd(grad_out: torch.Tensor, x: torch.Tensor, config=None) -> torch.Tensor:
    """Launch the backward. grad_out, x: (B, C), any strides -> dx, (B, C) contiguous in x's dtype."""
    check_tensor("x", x, 2)
    check_kernel_device("x", x)
    _check_like("grad_out", grad_out, x)
    b, c = x.shape
    dx = torch.empty((b, c), dtype=x.dtype, device=x.device)
    if dx.numel() == 0:
        return dx
    block_c, even_c, num_warps = _row_block_c(c, config)
    _silu_bwd_kernel[(b, cdiv(c, block_c))](
        grad_out, x, dx, c, grad_out.stride(0), grad_out.stride(1), x.stride(0), x.stride(1), dx.stride(0),
        BLOCK_C=block_c, EVEN_C=even_c, num_warps=num_warps)
    return dx


def _check_fused(x, y, gate, shift, scale) -> None:
    _check_residual(x, y, gate)
    _check_x(x)
    _check_modulation("shift", shift, x)
    _check_modulation("scale", scale, x)


# ----------------------------------------------------------------------------------------------------------------
# Autograd and the public ops
# ----------------------------------------------------------------------------------------------------------------
# Each op is a custom op `flexdit::<op>` (torch.compile, tracing, dispatch modes and meta tensors see one opaque
# node) with a backward custom op; plain eager calls skip the dispatcher through the op's autograd twin
# (`call_op`). Bodies run the kernel variant or the reference (`run_variant`).

# layernorm_modulate ---------------------------------------------------------------------------------------------

def _layernorm_modulate_body(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
                             out_dtype: torch.dtype) -> torch.Tensor:
    return run_variant("layernorm_modulate", x, shift, scale, params=(eps, out_dtype),
                       kernel=lambda *t, config=None: layernorm_modulate_fwd(*t, eps, out_dtype, config),
                       reference=lambda *t: layernorm_modulate_ref(*t, eps, out_dtype),
                       space=CONFIGS["layernorm_modulate"])


_layernorm_modulate_op = custom_op("flexdit::layernorm_modulate", mutates_args=())(_layernorm_modulate_body)


@_layernorm_modulate_op.register_fake
def _(x, shift, scale, eps, out_dtype):
    return x.new_empty(x.shape, dtype=out_dtype)


def _layernorm_modulate_backward_body(grad_out: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, eps: float,
                                      shift_dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return run_variant("layernorm_modulate_backward", grad_out, x, scale, params=(eps, shift_dtype),
                       kernel=lambda *t, config=None: layernorm_modulate_bwd(*t, eps, shift_dtype, config),
                       reference=lambda *t: layernorm_modulate_backward_ref(*t, eps, shift_dtype),
                       space=CONFIGS["layernorm_modulate_backward"])


_layernorm_modulate_backward_op = custom_op("flexdit::layernorm_modulate_backward", mutates_args=())(
    _layernorm_modulate_backward_body)


@_layernorm_modulate_backward_op.register_fake
def _(grad_out, x, scale, eps, shift_dtype):
    return x.new_empty(x.shape), scale.new_empty(scale.shape, dtype=shift_dtype), scale.new_empty(scale.shape)


def _layernorm_modulate_setup_context(ctx, inputs, output):
    x, shift, scale, ctx.eps, _ = inputs
    ctx.shift_dtype = shift.dtype
    ctx.save_for_backward(x, scale)


def _layernorm_modulate_backward(ctx, backward_op, grad_out):
    x, scale = ctx.saved_tensors
    # No .contiguous(): the kernel reads any strides (e.g. the stride-0 gradient of a .sum()).
    dx, dshift, dscale = backward_op(grad_out, x, scale, ctx.eps, ctx.shift_dtype)
    return dx, dshift, dscale, None, None


_LayernormModulateFunction = register_autograd(
    _layernorm_modulate_op, _layernorm_modulate_body, _layernorm_modulate_backward_op,
    _layernorm_modulate_backward_body, _layernorm_modulate_setup_context, _layernorm_modulate_backward)


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
    out_dtype = _dtype_arg(out_dtype, _default_out_dtype(x))
    return call_op(_layernorm_modulate_op, _LayernormModulateFunction, _layernorm_modulate_body, (x, shift, scale),
                   x, shift, scale, float(eps), out_dtype)


# gated_residual -------------------------------------------------------------------------------------------------

def _gated_residual_variant(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> Optional[dict]:
    return kernel_variant("gated_residual", x, y, gate, kernel=gated_residual_fwd, reference=gated_residual_ref,
                          space=CONFIGS["gated_residual"])


def _gated_residual_body(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    config = _gated_residual_variant(x, y, gate)
    if config is not None:
        return gated_residual_fwd(x, y, gate, config)
    return gated_residual_ref(x, y, gate)


_gated_residual_op = custom_op("flexdit::gated_residual", mutates_args=())(_gated_residual_body)


@_gated_residual_op.register_fake
def _(x, y, gate):
    return x.new_empty(x.shape)


def _gated_residual_inplace_body(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> None:
    # The out-of-place op's decision: its first-use check runs out of place on random copies, before this write.
    config = _gated_residual_variant(x, y, gate)
    if config is not None:
        gated_residual_inplace_fwd(x, y, gate, config)
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
    return run_variant("gated_residual_backward", grad_out, y, gate, kernel=gated_residual_bwd,
                       reference=gated_residual_backward_ref, space=CONFIGS["gated_residual_backward"])


_gated_residual_backward_op = custom_op("flexdit::gated_residual_backward",
                                        mutates_args=())(_gated_residual_backward_body)


@_gated_residual_backward_op.register_fake
def _(grad_out, y, gate):
    return y.new_empty(y.shape), gate.new_empty(gate.shape)


def _gated_residual_setup_context(ctx, inputs, output):
    x, y, gate = inputs
    ctx.save_for_backward(y, gate)       # d/dx is the identity: x itself is not kept


def _gated_residual_backward(ctx, backward_op, grad_out):
    y, gate = ctx.saved_tensors
    dy, dgate = backward_op(grad_out, y, gate)
    return grad_out, dy, dgate


_GatedResidualFunction = register_autograd(
    _gated_residual_op, _gated_residual_body, _gated_residual_backward_op, _gated_residual_backward_body,
    _gated_residual_setup_context, _gated_residual_backward)


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
    _check_residual(x, y, gate)
    if inplace and not (torch.is_grad_enabled() and (x.requires_grad or y.requires_grad or gate.requires_grad)
                        or torch._C._are_functorch_transforms_active()):      # vmap: no in-place batching fallback
        _check_no_overlap(x)
        call_op(_gated_residual_inplace_op, None, _inplace_eager, (x, y, gate), x, y, gate)
        return x
    return call_op(_gated_residual_op, _GatedResidualFunction, _gated_residual_body, (x, y, gate), x, y, gate)


# gated_residual_layernorm_modulate ------------------------------------------------------------------------------

def _gated_residual_layernorm_modulate_body(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor,
                                            scale: torch.Tensor, eps: float, out_dtype: torch.dtype
                                            ) -> Tuple[torch.Tensor, torch.Tensor]:
    return run_variant("gated_residual_layernorm_modulate", x, y, gate, shift, scale, params=(eps, out_dtype),
                       kernel=lambda *t, config=None: gated_residual_layernorm_modulate_fwd(*t, eps, out_dtype,
                                                                                            config),
                       reference=lambda *t: gated_residual_layernorm_modulate_ref(*t, eps, out_dtype),
                       space=CONFIGS["gated_residual_layernorm_modulate"])


_gated_residual_layernorm_modulate_op = custom_op("flexdit::gated_residual_layernorm_modulate", mutates_args=())(
    _gated_residual_layernorm_modulate_body)


@_gated_residual_layernorm_modulate_op.register_fake
def _(x, y, gate, shift, scale, eps, out_dtype):
    return x.new_empty(x.shape), x.new_empty(x.shape, dtype=out_dtype)


def _gated_residual_layernorm_modulate_backward_body(
        grad_r: torch.Tensor, grad_u: torch.Tensor, r: torch.Tensor, y: torch.Tensor, gate: torch.Tensor,
        scale: torch.Tensor, eps: float, shift_dtype: torch.dtype
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return run_variant(
        "gated_residual_layernorm_modulate_backward", grad_r, grad_u, r, y, gate, scale, params=(eps, shift_dtype),
        kernel=lambda *t, config=None: gated_residual_layernorm_modulate_bwd(*t, eps, shift_dtype, config),
        reference=lambda *t: gated_residual_layernorm_modulate_backward_ref(*t, eps, shift_dtype),
        space=CONFIGS["gated_residual_layernorm_modulate_backward"])


_gated_residual_layernorm_modulate_backward_op = custom_op(
    "flexdit::gated_residual_layernorm_modulate_backward", mutates_args=())(
    _gated_residual_layernorm_modulate_backward_body)


@_gated_residual_layernorm_modulate_backward_op.register_fake
def _(grad_r, grad_u, r, y, gate, scale, eps, shift_dtype):
    return (r.new_empty(r.shape), y.new_empty(y.shape), gate.new_empty(gate.shape),
            scale.new_empty(scale.shape, dtype=shift_dtype), scale.new_empty(scale.shape))


def _fused_setup_context(ctx, inputs, output):
    _, y, gate, shift, scale, ctx.eps, _ = inputs
    ctx.shift_dtype = shift.dtype
    ctx.save_for_backward(output[0], y, gate, scale)      # r, not x: the statistics are r's


def _fused_backward(ctx, backward_op, grad_r, grad_u):
    r, y, gate, scale = ctx.saved_tensors
    dx, dy, dgate, dshift, dscale = backward_op(grad_r, grad_u, r, y, gate, scale, ctx.eps, ctx.shift_dtype)
    return dx, dy, dgate, dshift, dscale, None, None


_GatedResidualLayernormModulateFunction = register_autograd(
    _gated_residual_layernorm_modulate_op, _gated_residual_layernorm_modulate_body,
    _gated_residual_layernorm_modulate_backward_op, _gated_residual_layernorm_modulate_backward_body,
    _fused_setup_context, _fused_backward)


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
    _check_fused(x, y, gate, shift, scale)
    _check_eps(eps)
    out_dtype = _dtype_arg(out_dtype, _default_out_dtype(x))
    return call_op(_gated_residual_layernorm_modulate_op, _GatedResidualLayernormModulateFunction,
                   _gated_residual_layernorm_modulate_body, (x, y, gate, shift, scale), x, y, gate, shift, scale,
                   float(eps), out_dtype)


# silu -----------------------------------------------------------------------------------------------------------

def _silu_body(x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    return run_variant("silu", x, params=(out_dtype,),
                       kernel=lambda t, config=None: silu_fwd(t, out_dtype, config),
                       reference=lambda t: silu_ref(t, out_dtype), space=CONFIGS["silu"])


_silu_op = custom_op("flexdit::silu", mutates_args=())(_silu_body)


@_silu_op.register_fake
def _(x, out_dtype):
    return x.new_empty(x.shape, dtype=out_dtype)


def _silu_backward_body(grad_out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return run_variant("silu_backward", grad_out, x, kernel=silu_bwd, reference=silu_backward_ref,
                       space=CONFIGS["silu_backward"])


_silu_backward_op = custom_op("flexdit::silu_backward", mutates_args=())(_silu_backward_body)


@_silu_backward_op.register_fake
def _(grad_out, x):
    return x.new_empty(x.shape)


def _silu_setup_context(ctx, inputs, output):
    x, _ = inputs
    ctx.save_for_backward(x)


def _silu_backward(ctx, backward_op, grad_out):
    (x,) = ctx.saved_tensors
    return backward_op(grad_out, x), None


_SiluFunction = register_autograd(_silu_op, _silu_body, _silu_backward_op, _silu_backward_body, _silu_setup_context,
                                  _silu_backward)


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
    check_tensor("x", x, 2)
    out_dtype = _dtype_arg(out_dtype, _default_out_dtype(x))
    return call_op(_silu_op, _SiluFunction, _silu_body, (x,), x, out_dtype)


# ----------------------------------------------------------------------------------------------------------------
# References
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


def gated_residual_ref(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """Pure-PyTorch gated_residual in fp32, cast to x's dtype."""
    return (x.float() + gate.float().unsqueeze(1) * y.float()).to(x.dtype)


def gated_residual_backward_ref(grad_out: torch.Tensor, y: torch.Tensor, gate: torch.Tensor
                                ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Gradients of gated_residual with respect to y (in y's dtype) and gate (in gate's dtype); dx is grad_out."""
    g = grad_out.float()
    return (gate.float().unsqueeze(1) * g).to(y.dtype), (g * y.float()).sum(1).to(gate.dtype)


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


def silu_ref(x: torch.Tensor, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Pure-PyTorch silu in fp32, cast to out_dtype (x's dtype if None)."""
    return torch.nn.functional.silu(x.float()).to(x.dtype if out_dtype is None else out_dtype)


def silu_backward_ref(grad_out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Gradient of silu with respect to x, in fp32, cast to x's dtype."""
    xf = x.float()
    s = torch.sigmoid(xf)
    return (grad_out.float() * s * (1 + xf * (1 - s))).to(x.dtype)
