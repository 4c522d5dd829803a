"""attention: multi-head softmax attention for FlexDiT's shapes (few queries, few keys, or both dense).
q: (B, Lq, H, D), k, v: (B, Lk, H, D), any strides, fp32/fp16/bf16, D a multiple of 8 up to 128 -> (B, Lq, H, D)."""
import math
from typing import List, NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from ._dispatch import (call_op, custom_op, interpreting, kernel_variant, register_autograd, triton_only_active,
                        use_triton)
from ._tune import Unfit, alternatives
from ._launch import (cdiv, compiled_ctas_per_sm, device_limits, next_pow2, register_budget, resident_programs,
                      split_count, whole_wave_splits)
from ._validate import check_same, check_tensor

MAX_HEAD_DIM = 128
# The few-keys kernel and the fused-dq backward hold every key of a head in one tile of at most this many rows.
MAX_KEYS_ONE_TILE = 128
# CUDA limits the second and third grid axes to 65535 programs; the second one is batch x heads.
MAX_GRID_YZ = 65535

_LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------------------------------------------
# Kernels
#
# Every kernel holds the head dim as ONE power-of-two tile of BLOCK_D = max(16, next_pow2(D)) columns: loads are
# masked to the D real columns with other=0 (so the padded columns add 0 to every dot) and stores are masked to them.
# Scores live in base 2: s2 = q·k · scale · log2(e). Row offsets (token index x token stride) are int64 and the
# batch·head program id is int64 before it meets a stride, so no offset wraps at int32.
#
# ALIGNED: the launcher has checked that every stride of q, k, v, out and the gradients (but the head dim's) is a
# multiple of 8 elements and every data pointer 16-byte aligned (true for D = 72 and for views of a fused qkv
# projection). The head and row offsets then carry tl.multiple_of(·, 8), so that Triton issues 16-byte loads and
# stores (and cp.async copies) where it would otherwise, the head stride 72 being a multiple of 8 but not of 16, move
# one element at a time. The hint must wrap an offset computed in the same function: on a function's argument (a
# kernel's or a helper's) it is dropped.
# ----------------------------------------------------------------------------------------------------------------

@triton.jit
def _program_head(n_heads):
    """The prologue of every kernel: grid axis 1 is batch x heads; (pid_bh, b, h) as int64."""
    pid_bh = tl.program_id(1).to(tl.int64)
    return pid_bh, pid_bh // n_heads, pid_bh % n_heads


@triton.jit
def _head(PTR, b, h, stride_b, stride_h, ALIGNED: tl.constexpr):
    """The (L, D) slice of batch b, head h of a (B, L, H, D) tensor."""
    offset = b * stride_b + h * stride_h
    if ALIGNED:
        offset = tl.multiple_of(offset, 8)
    return PTR + offset


@triton.jit
def _split_head(PTR, s, b, h, stride_s, stride_b, stride_h, ALIGNED: tl.constexpr):
    """The (L, D) slice of split s, batch b, head h of a (splits, B, L, H, D) workspace."""
    offset = s.to(tl.int64) * stride_s + b * stride_b + h * stride_h
    if ALIGNED:
        offset = tl.multiple_of(offset, 8)
    return PTR + offset


@triton.jit
def _tile(PTR, offs_r, offs_d, stride_r, stride_d, n_rows, HEAD_DIM: tl.constexpr, ALIGNED: tl.constexpr):
    """Pointers and mask of a (rows, BLOCK_D) tile of an (L, D) head slice: the L rows and the D columns."""
    rows = offs_r.to(tl.int64) * stride_r
    if ALIGNED:
        rows = tl.multiple_of(rows, 8)
    mask = (offs_r[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM)
    return PTR + rows[:, None] + offs_d[None, :] * stride_d, mask


@triton.jit
def _load_rows(PTR, offs_r, offs_d, stride_r, stride_d, n_rows, HEAD_DIM: tl.constexpr, ALIGNED: tl.constexpr):
    """A (rows, BLOCK_D) tile of an (L, D) head slice, zero outside the L rows and the D columns."""
    ptrs, mask = _tile(PTR, offs_r, offs_d, stride_r, stride_d, n_rows, HEAD_DIM, ALIGNED)
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _store_rows(PTR, x, offs_r, offs_d, stride_r, stride_d, n_rows, HEAD_DIM: tl.constexpr, ALIGNED: tl.constexpr):
    """Store a (rows, BLOCK_D) tile into the L rows and D columns of a head slice; nothing outside them."""
    ptrs, mask = _tile(PTR, offs_r, offs_d, stride_r, stride_d, n_rows, HEAD_DIM, ALIGNED)
    tl.store(ptrs, x.to(PTR.dtype.element_ty), mask=mask)


@triton.jit
def _lse(m, l):
    """The natural-log log-sum-exp (m + log2 l) · ln 2 of rows with base-2 maxima m and row sums l."""
    return (m + tl.log2(l)) * 0.6931471805599453


@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, K, V, lo, hi, offs_d, stride_kn, stride_kd, stride_vn, stride_vd, qk_scale,
                    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, ALIGNED: tl.constexpr, PRECISION: tl.constexpr):
    """The flash-attention key loop (Triton tutorial 06's `_attn_fwd_inner`): online softmax of q over the keys
    [lo, hi), in BLOCK_N blocks; returns the unnormalised accumulator, the row sums and the row maxima (base 2)."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k = _load_rows(K, cols, offs_d, stride_kn, stride_kd, hi, HEAD_DIM, ALIGNED)          # (N, D)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        s = tl.where(cols[None, :] < hi, s * qk_scale, float("-inf"))   # the first column of a block is < hi
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_rows(V, cols, offs_d, stride_vn, stride_vd, hi, HEAD_DIM, ALIGNED)          # (N, D)
        acc = acc * alpha[:, None] + tl.dot(p.to(V.dtype.element_ty), v, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attention_fwd_few_keys_kernel(
        Q, K, V, OUT, LSE,
        stride_qb, stride_qm, stride_qh, stride_qd,
        stride_kb, stride_kn, stride_kh, stride_kd,
        stride_vb, stride_vn, stride_vh, stride_vd,
        stride_ob, stride_om, stride_oh, stride_od,
        n_heads, lq, lk, qk_scale,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        ALIGNED: tl.constexpr, PRECISION: tl.constexpr):
    """Few keys (Lk <= BLOCK_N): K and V of one head are loaded once and stay on chip while the program walks over
    query blocks pid_m, pid_m + n_prog_m, ...; each block is one exact softmax, no online rescaling."""
    pid_m = tl.program_id(0)
    n_prog_m = tl.num_programs(0)
    pid_bh, b, h = _program_head(n_heads)
    Q = _head(Q, b, h, stride_qb, stride_qh, ALIGNED)
    OUT = _head(OUT, b, h, stride_ob, stride_oh, ALIGNED)
    LSE += pid_bh * lq

    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_rows(_head(K, b, h, stride_kb, stride_kh, ALIGNED), offs_n, offs_d, stride_kn, stride_kd, lk,
                   HEAD_DIM, ALIGNED)                                                        # (N, D)
    v = _load_rows(_head(V, b, h, stride_vb, stride_vh, ALIGNED), offs_n, offs_d, stride_vn, stride_vd, lk,
                   HEAD_DIM, ALIGNED)
    kt = tl.trans(k)
    key_ok = offs_n[None, :] < lk

    for start_m in range(pid_m * BLOCK_M, lq, n_prog_m * BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = _load_rows(Q, offs_m, offs_d, stride_qm, stride_qd, lq, HEAD_DIM, ALIGNED)     # (M, D)
        s = tl.dot(q, kt, input_precision=PRECISION)
        s = tl.where(key_ok, s * qk_scale, float("-inf"))
        m = tl.max(s, 1)
        p = tl.exp2(s - m[:, None])
        acc = tl.dot(p.to(V.dtype.element_ty), v, input_precision=PRECISION)
        l = tl.sum(p, 1)
        _store_rows(OUT, acc * (1.0 / l)[:, None], offs_m, offs_d, stride_om, stride_od, lq, HEAD_DIM, ALIGNED)
        tl.store(LSE + offs_m, _lse(m, l), mask=offs_m < lq)


@triton.jit
def _attention_fwd_kernel(
        Q, K, V, OUT, LSE, WS_ACC, WS_ML,
        stride_qb, stride_qm, stride_qh, stride_qd,
        stride_kb, stride_kn, stride_kh, stride_kd,
        stride_vb, stride_vn, stride_vh, stride_vd,
        stride_ob, stride_om, stride_oh, stride_od,
        n_heads, lq, lk, keys_per_split, qk_scale,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        SPLIT: tl.constexpr, ALIGNED: tl.constexpr, PRECISION: tl.constexpr):
    """Flash-attention loop over the keys [split · keys_per_split, +keys_per_split) ∩ [0, Lk) with online softmax.
    SPLIT=False: one split holds all keys; write the output and the log-sum-exp. SPLIT=True (split-K): write the
    partial, unnormalised accumulator to WS_ACC (BH, splits, Lq, D) and (m, l) to WS_ML (BH, splits, 2, Lq), fp32;
    an empty split writes acc = 0, m = -inf, l = 0, which the combine weighs by 0."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(2)
    pid_bh, b, h = _program_head(n_heads)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(_head(Q, b, h, stride_qb, stride_qh, ALIGNED), offs_m, offs_d, stride_qm, stride_qd, lq,
                   HEAD_DIM, ALIGNED)                                                        # (M, D)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    lo = pid_s * keys_per_split
    hi = tl.minimum(lo + keys_per_split, lk)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, _head(K, b, h, stride_kb, stride_kh, ALIGNED),
                                    _head(V, b, h, stride_vb, stride_vh, ALIGNED), lo, hi, offs_d,
                                    stride_kn, stride_kd, stride_vn, stride_vd, qk_scale,
                                    HEAD_DIM, BLOCK_N, ALIGNED, PRECISION)

    if SPLIT:
        part = pid_bh * tl.num_programs(2) + pid_s                         # (bh, split) slot, int64
        _store_rows(WS_ACC + part * lq * HEAD_DIM, acc, offs_m, offs_d, HEAD_DIM, 1, lq, HEAD_DIM, ALIGNED)
        ML = WS_ML + part * 2 * lq
        tl.store(ML + offs_m, m_i, mask=offs_m < lq)
        tl.store(ML + lq + offs_m, l_i, mask=offs_m < lq)
    else:
        _store_rows(_head(OUT, b, h, stride_ob, stride_oh, ALIGNED), acc * (1.0 / l_i)[:, None], offs_m, offs_d,
                    stride_om, stride_od, lq, HEAD_DIM, ALIGNED)
        tl.store(LSE + pid_bh * lq + offs_m, _lse(m_i, l_i), mask=offs_m < lq)


@triton.jit
def _attention_fwd_combine_kernel(
        WS_ACC, WS_ML, OUT, LSE,
        stride_ob, stride_om, stride_oh, stride_od,
        n_heads, lq, n_splits,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, ALIGNED: tl.constexpr):
    """Split-K combine: out = Σ_s 2^(m_s − m) acc_s / Σ_s 2^(m_s − m) l_s with m = max_s m_s. Rows past Lq read
    m = 0, l = 1, acc = 0 and store nothing; the split slots are walked by pointer increments (no int32 product)."""
    pid_m = tl.program_id(0)
    pid_bh, b, h = _program_head(n_heads)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < lq

    ML = WS_ML + pid_bh * n_splits * 2 * lq
    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for s in range(0, n_splits):
        m = tl.maximum(m, tl.load(ML + offs_m, mask=row_ok, other=0.0))
        ML += 2 * lq
    ML = WS_ML + pid_bh * n_splits * 2 * lq
    ACC = WS_ACC + pid_bh * n_splits * lq * HEAD_DIM
    l = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for s in range(0, n_splits):
        w = tl.exp2(tl.load(ML + offs_m, mask=row_ok, other=0.0) - m)
        l += w * tl.load(ML + lq + offs_m, mask=row_ok, other=1.0)
        acc += w[:, None] * _load_rows(ACC, offs_m, offs_d, HEAD_DIM, 1, lq, HEAD_DIM, ALIGNED)
        ML += 2 * lq
        ACC += lq * HEAD_DIM
    _store_rows(_head(OUT, b, h, stride_ob, stride_oh, ALIGNED), acc * (1.0 / l)[:, None], offs_m, offs_d,
                stride_om, stride_od, lq, HEAD_DIM, ALIGNED)
    tl.store(LSE + pid_bh * lq + offs_m, _lse(m, l), mask=row_ok)


@triton.jit
def _attention_bwd_preprocess_kernel(
        OUT, DO, DELTA,
        stride_ob, stride_om, stride_oh, stride_od,
        stride_dob, stride_dom, stride_doh, stride_dod,
        n_heads, lq,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, ALIGNED: tl.constexpr):
    """delta = rowsum(dO ⊙ O) in fp32, (BH, Lq)."""
    pid_m = tl.program_id(0)
    pid_bh, b, h = _program_head(n_heads)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_rows(_head(OUT, b, h, stride_ob, stride_oh, ALIGNED), offs_m, offs_d, stride_om, stride_od, lq,
                   HEAD_DIM, ALIGNED)
    do = _load_rows(_head(DO, b, h, stride_dob, stride_doh, ALIGNED), offs_m, offs_d, stride_dom, stride_dod, lq,
                    HEAD_DIM, ALIGNED)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + pid_bh * lq + offs_m, delta, mask=offs_m < lq)


@triton.jit
def _attention_bwd_dkdv_kernel(
        Q, K, V, DO, LSE, DELTA, DQ, DK, DV,
        stride_qb, stride_qm, stride_qh, stride_qd,
        stride_kb, stride_kn, stride_kh, stride_kd,
        stride_vb, stride_vn, stride_vh, stride_vd,
        stride_dob, stride_dom, stride_doh, stride_dod,
        stride_dqb, stride_dqm, stride_dqh, stride_dqd,
        stride_dks, stride_dkb, stride_dkn, stride_dkh, stride_dkd,
        n_heads, lq, lk, queries_per_split, qk_scale, scale,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        FUSE_DQ: tl.constexpr, ALIGNED: tl.constexpr, PRECISION: tl.constexpr):
    """dk, dv of one key block over the queries [split · queries_per_split, +queries_per_split) ∩ [0, Lq), in
    transposed form: pᵀ = 2^(k·qᵀ·scale·log2e − lse2), dv += pᵀ dO, dsᵀ = pᵀ ⊙ (v dOᵀ − delta), dk += dsᵀ q. DK/DV
    carry a split stride (fp32 partials summed by the launcher when there are several splits). FUSE_DQ: this block
    holds every key (Lk <= BLOCK_N), so dq = ds k of each query block is complete here and is stored directly."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(2)
    pid_bh, b, h = _program_head(n_heads)
    Q = _head(Q, b, h, stride_qb, stride_qh, ALIGNED)
    DO = _head(DO, b, h, stride_dob, stride_doh, ALIGNED)
    DQ = _head(DQ, b, h, stride_dqb, stride_dqh, ALIGNED)
    LSE += pid_bh * lq
    DELTA += pid_bh * lq

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_rows(_head(K, b, h, stride_kb, stride_kh, ALIGNED), offs_n, offs_d, stride_kn, stride_kd, lk,
                   HEAD_DIM, ALIGNED)                                                        # (N, D)
    v = _load_rows(_head(V, b, h, stride_vb, stride_vh, ALIGNED), offs_n, offs_d, stride_vn, stride_vd, lk,
                   HEAD_DIM, ALIGNED)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    key_ok = offs_n[:, None] < lk

    lo = pid_s * queries_per_split
    hi = tl.minimum(lo + queries_per_split, lq)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + offs_m0
        q = _load_rows(Q, offs_m, offs_d, stride_qm, stride_qd, hi, HEAD_DIM, ALIGNED)     # (M, D)
        do = _load_rows(DO, offs_m, offs_d, stride_dom, stride_dod, hi, HEAD_DIM, ALIGNED)
        st = tl.dot(k, tl.trans(q), input_precision=PRECISION)                           # (N, M)
        dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        lse2 = tl.load(LSE + offs_m, mask=offs_m < hi, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + offs_m, mask=offs_m < hi, other=0.0)
        pt = tl.exp2(st * qk_scale - lse2[None, :])
        pt = tl.where(key_ok & (offs_m[None, :] < hi), pt, 0.0)
        dstc = (pt * (dpt - delta[None, :])).to(Q.dtype.element_ty)
        dv += tl.dot(pt.to(DO.dtype.element_ty), do, input_precision=PRECISION)
        dk += tl.dot(dstc, q, input_precision=PRECISION)
        if FUSE_DQ:
            dq = tl.dot(tl.trans(dstc), k, input_precision=PRECISION) * scale          # (M, D)
            _store_rows(DQ, dq, offs_m, offs_d, stride_dqm, stride_dqd, hi, HEAD_DIM, ALIGNED)

    DK = _split_head(DK, pid_s, b, h, stride_dks, stride_dkb, stride_dkh, ALIGNED)
    DV = _split_head(DV, pid_s, b, h, stride_dks, stride_dkb, stride_dkh, ALIGNED)
    _store_rows(DK, dk * scale, offs_n, offs_d, stride_dkn, stride_dkd, lk, HEAD_DIM, ALIGNED)
    _store_rows(DV, dv, offs_n, offs_d, stride_dkn, stride_dkd, lk, HEAD_DIM, ALIGNED)


@triton.jit
def _attention_bwd_dq_kernel(
        Q, K, V, DO, LSE, DELTA, DQ,
        stride_qb, stride_qm, stride_qh, stride_qd,
        stride_kb, stride_kn, stride_kh, stride_kd,
        stride_vb, stride_vn, stride_vh, stride_vd,
        stride_dob, stride_dom, stride_doh, stride_dod,
        stride_dqs, stride_dqb, stride_dqm, stride_dqh, stride_dqd,
        n_heads, lq, lk, keys_per_split, qk_scale, scale,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        ALIGNED: tl.constexpr, PRECISION: tl.constexpr):
    """dq of one query block over the keys [split · keys_per_split, +keys_per_split) ∩ [0, Lk):
    ds = p ⊙ (dO vᵀ − delta), dq += ds k. DQ carries a split stride (fp32 partials summed by the launcher when there
    are several splits)."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(2)
    pid_bh, b, h = _program_head(n_heads)
    K = _head(K, b, h, stride_kb, stride_kh, ALIGNED)
    V = _head(V, b, h, stride_vb, stride_vh, ALIGNED)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(_head(Q, b, h, stride_qb, stride_qh, ALIGNED), offs_m, offs_d, stride_qm, stride_qd, lq,
                   HEAD_DIM, ALIGNED)                                                        # (M, D)
    do = _load_rows(_head(DO, b, h, stride_dob, stride_doh, ALIGNED), offs_m, offs_d, stride_dom, stride_dod, lq,
                    HEAD_DIM, ALIGNED)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lse2 = tl.load(LSE + pid_bh * lq + offs_m, mask=offs_m < lq, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + pid_bh * lq + offs_m, mask=offs_m < lq, other=0.0)

    lo = pid_s * keys_per_split
    hi = tl.minimum(lo + keys_per_split, lk)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n0
        k = _load_rows(K, cols, offs_d, stride_kn, stride_kd, hi, HEAD_DIM, ALIGNED)       # (N, D)
        v = _load_rows(V, cols, offs_d, stride_vn, stride_vd, hi, HEAD_DIM, ALIGNED)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)                            # (M, N)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        p = tl.exp2(s * qk_scale - lse2[:, None])
        p = tl.where(cols[None, :] < hi, p, 0.0)
        ds = (p * (dp - delta[:, None])).to(Q.dtype.element_ty)
        dq += tl.dot(ds, k, input_precision=PRECISION)

    DQ = _split_head(DQ, pid_s, b, h, stride_dqs, stride_dqb, stride_dqh, ALIGNED)
    _store_rows(DQ, dq * scale, offs_m, offs_d, stride_dqm, stride_dqd, lq, HEAD_DIM, ALIGNED)


# ----------------------------------------------------------------------------------------------------------------
# Launchers
#
# NOTE: the head dim is one power-of-two tile, BLOCK_D = max(16, next_pow2(D)), with masked columns: D = 72 and
# D = 80 compute 128 columns in every tl.dot where a 64 + 16 split computed 80, so 1.6x the split's dot work (1.78x
# the 72 useful columns of D = 72); D = 64 and 128 are unchanged. The split gave wrong bf16/fp16 results in the key
# loop on an H100 (triton 3.6) while one tile at D = 64 and the few-keys kernel were right. Tiles, num_warps and
# num_stages are chosen from the compile report (registers, spill, CTAs per SM on sm_90 and sm_80, the NOTEs below),
# not from GPU timings: the bench tunes them. Grids fill one wave: the device's SM count x the compiled kernel's CTAs
# per SM.
# ----------------------------------------------------------------------------------------------------------------


class Route(NamedTuple):
    """Send (Lq, Lk) to `path` when min_lq <= Lq <= max_lq and min_lk <= Lk <= max_lk (None: no upper bound)."""
    path: str          # "few_keys", "split_k", "flash" (Triton) or "sdpa" (PyTorch SDPA)
    max_lq: Optional[int] = None
    max_lk: Optional[int] = None
    min_lq: int = 1
    min_lk: int = 1

    def holds(self, lq: int, lk: int) -> bool:
        return (self.min_lq <= lq and self.min_lk <= lk and (self.max_lq is None or lq <= self.max_lq)
                and (self.max_lk is None or lk <= self.max_lk))


# NOTE: every routing decision lives in this table; the first row that holds for (Lq, Lk) decides. The decisions
# come from the bench (`python -m bench kernels`, which prints each shape's path beside its time). Measured so far
# on an H100 (bf16, the kernels before the one-tile head dim, B = 32, H = 16, D = 72): few-keys 1024q x 64k ran at
# 0.82x of cuDNN SDPA (0.88x at B = 8) and 64 x 64 at 0.4-0.7x; dense 1024 x 1024 goes to SDPA (1.0x: it is SDPA).
# Dense shapes stay on SDPA because a Triton loop is not expected to beat cuDNN there; the other rows are kept until a
# bench run of the current kernels moves them. A "few_keys" row may not admit more than MAX_KEYS_ONE_TILE keys.
ROUTES: Tuple[Route, ...] = (
    Route("few_keys", max_lk=128),            # every key of a head on chip, one pass, no online softmax
    Route("split_k", max_lq=128),             # few queries, many keys: keys split over programs, then combined
    Route("sdpa", min_lq=256, min_lk=256),    # dense self-attention: PyTorch SDPA (cuDNN / flash)
    Route("flash"),                           # everything else: the flash-attention loop
)

# NOTE: dtypes that go to PyTorch SDPA at every shape on the Triton backend. fp32 inputs get true fp32 products
# (`ieee` dots), which have no tensor-core instruction: compiled for sm_90 (triton 3.9, D = 72) the fp32 kernels spill
# 4-65 KB per thread (ptxas leaves most of them 32 registers), and few-keys at 128 keys needs 196,608 B of shared
# memory, the fused backward 196,864 B (over an A100 block's 166,912 B: `_fitted` halves their query tile there).
# The fp32 kernels stay for `_dispatch.triton_only()` (inside it nothing goes to SDPA) and the tests.
SDPA_DTYPES: Tuple[torch.dtype, ...] = (torch.float32,)


def attention_path(lq: int, lk: int, sdpa: bool = True) -> str:
    """Which implementation `attention` runs for Lq queries over Lk keys on the Triton backend: the path of the first
    row of `ROUTES` that holds. sdpa=False skips the "sdpa" rows (what the Triton launcher runs for such a shape)."""
    for route in ROUTES:
        if (sdpa or route.path != "sdpa") and route.holds(lq, lk):
            if route.path == "few_keys" and lk > MAX_KEYS_ONE_TILE:
                raise ValueError(f"ROUTES sends Lk={lk} to few_keys, which holds at most {MAX_KEYS_ONE_TILE} keys")
            return route.path
    return "flash"


class _Config(NamedTuple):
    path: str          # "few_keys", "split_k" or "flash"
    block_m: int
    block_n: int
    n_splits: int      # split-K: key splits; few_keys: programs per head along the queries; flash: 1
    chunk: int         # keys per split (a multiple of block_n)


def _block_d(d: int) -> int:
    """The head-dim tile: one power of two >= 16 (tl.dot's K), its columns past D masked."""
    return max(16, next_pow2(d))


def _is_aligned(*tensors: torch.Tensor) -> bool:
    """The kernels' ALIGNED flag: every data pointer 16-byte aligned and every stride but the last (of dims longer
    than 1: their index is always 0) a multiple of 8 elements, so every head and row offset is a multiple of 8."""
    for t in tensors:
        if t.data_ptr() % 16 != 0:
            return False
        if any(s % 8 != 0 for n, s in zip(t.shape[:-1], t.stride()[:-1]) if n > 1):
            return False
    return True


# NOTE: CTAs per SM of each kernel at the DiT-XL/2 shapes (bf16, D = 72, aligned views, the tiles below) compiled for
# sm_90 with triton 3.9: few-keys 3 (at 65-128 keys with its smaller query tile: `_few_keys_fitted`), split-K 3,
# dk/dv 1 and dq 1 (8 warps each). Off the GPU they size the grids; on a GPU the compiled kernel's own registers and
# shared memory do (`compiled_ctas_per_sm`).
_SM90_CTAS = {"few_keys": 3, "split_k": 3, "flash": 2, "dkdv": 1, "dq": 1}


def _fitted(kernel, device: torch.device, default: int, args: tuple, meta: dict, fixed: bool = False
            ) -> Tuple[dict, int]:
    """(meta, CTAs per SM): `meta` with BLOCK_M halved, down to 16, until the compiled kernel fits the shared memory
    a block may have on `device` (`_launch.device_limits`; fp32 tiles can need more than an A100 block's 166,912 B).
    Off the GPU the tiles are those of the default target, where every variant fits. `fixed`: a configuration's
    BLOCK_M, never halved: `Unfit` where it does not fit (the tuner prunes it)."""
    while True:
        ctas = compiled_ctas_per_sm(kernel, device, default, *args, **meta)
        if ctas > 0:
            return meta, ctas
        if fixed:
            raise Unfit(f"{kernel.__name__} with BLOCK_M={meta['BLOCK_M']}, num_warps={meta.get('num_warps')} "
                        f"needs more shared memory than a block may have on {device}")
        if meta["BLOCK_M"] <= 16:
            raise ValueError(f"q: no {kernel.__name__} tile fits the shared memory of a block on {device} "
                             f"({device_limits(device).smem_per_block} B) at head dim {meta['HEAD_DIM']}")
        meta = dict(meta, BLOCK_M=meta["BLOCK_M"] // 2)


# NOTE: the few-keys forward's query tile, from the compile report (bf16, D = 72, aligned; triton 3.6 and 3.9). At
# 65-128 keys K and V are 128 x 128 tiles, 65,536 B of shared memory, held across the program's walk over the query
# blocks; the staged q rows come on top. BLOCK_M 64 with q prefetched (num_stages=2): 106,496 B, 168-233 registers,
# 2 CTAs per SM on sm_90 (wgmma) and 1 on sm_80. BLOCK_M 32 staged once (num_stages=1): 73,728 B, 112-122 registers,
# 3 CTAs per SM on sm_90 (77,824 B each) and 2 on sm_80; Triton compiles its 32-row products to mma.sync (HMMA),
# wgmma needing 64 rows per warpgroup. Up to 64 keys BLOCK_M 64 at num_stages=2 keeps 3 on sm_90 (73,728 B, 126
# registers). Streaming K and V in two 64-key halves saves nothing while both halves stay on chip for every query
# block; the flash loop (BLOCK_N 64) would re-read them from L2 for every query block.
FEW_KEYS_CTAS = 3           # CTAs per SM the few-keys forward's tile aims at


def _few_keys_tiles(block_m: int, fixed: bool = False) -> List[Tuple[int, int]]:
    """(BLOCK_M, num_stages) the few-keys forward tries, in order: the query tile with the next q block prefetched,
    then at most 32 rows (BLOCK_M itself when `fixed`: a configuration's) staged once."""
    return [(block_m, 2), (block_m if fixed else min(block_m, 32), 1)]


def _sm90_few_keys_ctas(block_n: int, block_m: int, num_stages: int) -> int:
    """CTAs per SM of the few-keys forward compiled for sm_90 (the default target's figure off the GPU): 2 where K
    and V of more than 64 keys and more than 32 staged query rows pass the 77,824 B of shared memory 3 CTAs may have
    each, else 3."""
    return 2 if block_n > 64 and block_m * num_stages > 32 else 3


def _few_keys_fitted(device: torch.device, args: tuple, meta: dict, fixed: bool = False) -> Tuple[dict, int]:
    """(meta, CTAs per SM) of the few-keys forward: the first tile of `_few_keys_tiles` whose compiled kernel keeps
    FEW_KEYS_CTAS CTAs per SM on `device` (registers, shared memory and the device's limits, `_fitted`), else the
    one with the most CTAs (the first of equals)."""
    best, unfit = None, None
    for block_m, stages in _few_keys_tiles(meta["BLOCK_M"], fixed):
        trial = dict(meta, BLOCK_M=block_m, num_stages=stages)
        try:
            trial, ctas = _fitted(_attention_fwd_few_keys_kernel, device,
                                  _sm90_few_keys_ctas(meta["BLOCK_N"], block_m, stages), args, trial, fixed)
        except Unfit as err:
            unfit = err
            continue
        if best is None or ctas > best[1]:
            best = (trial, ctas)
        if ctas >= FEW_KEYS_CTAS:
            break
    if best is None:
        raise unfit
    return best


def _fwd_tiles(lq: int, lk: int, block_m: int = 64, path: Optional[str] = None) -> Tuple[str, int, int]:
    """(path, BLOCK_M, BLOCK_N) of the forward. Token tiles are powers of two >= 16 (tl.dot's minimum), so few-keys
    pads Lk (36 -> 64, 100 -> 128) and few queries pad Lq (36 -> 64, 1 -> 16): Triton has no other tile shapes;
    masked rows/columns are never loaded from memory. block_m caps the query tile; `path` (a configuration's)
    overrides `attention_path`."""
    path = path or attention_path(lq, lk, sdpa=False)
    block_n = max(16, next_pow2(lk)) if path == "few_keys" else 64
    return path, min(block_m, max(16, next_pow2(lq))), block_n


def _fwd_config(lq: int, lk: int, bh: int, device: torch.device, ctas: int = 0, block_m: int = 64,
                path: Optional[str] = None) -> _Config:
    """Tiles (`_fwd_tiles`) and grid for the forward. Split-K fills one wave of the device, `ctas` CTAs per SM (the
    default target's figure when 0). Few-keys programs each walk several query blocks with one copy of K and V; the
    programs per head are the count that finishes soonest in whole waves (`whole_wave_splits`: at B = 32, 16 heads
    and 3 CTAs on 132 SMs, 512 one-per-head programs would run 1.29 waves, two rounds of whole heads)."""
    path, block_m, block_n = _fwd_tiles(lq, lk, block_m, path)
    n_qblocks = cdiv(lq, block_m)
    wave = resident_programs(device, ctas or _SM90_CTAS[path])
    if path == "few_keys":
        return _Config(path, block_m, block_n, whole_wave_splits(bh, n_qblocks, wave), lk)
    if path == "split_k":
        splits, chunk = split_count(n_qblocks * bh, cdiv(lk, block_n), block_n, wave)
        return _Config(path, block_m, block_n, splits, chunk)
    return _Config(path, block_m, block_n, 1, lk)


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs get true fp32 products, as PyTorch's fp32 attention does; fp16/bf16 ignore the setting.
    return "ieee" if dtype == torch.float32 else "tf32"


def _check_launch(q: torch.Tensor) -> None:
    b, lq, h, d = q.shape
    if d % 8 != 0 or d > MAX_HEAD_DIM:
        raise ValueError(f"head dim (q.shape[3]) must be a multiple of 8 and at most {MAX_HEAD_DIM}, got {d}")
    if b * h > MAX_GRID_YZ:
        raise ValueError(f"q: batch x heads = {b} x {h} = {b * h} is more than the {MAX_GRID_YZ} programs a CUDA "
                         "grid axis other than the first can hold")


# NOTE: split-K runs its key loop with num_stages=1: compiled for sm_90 (triton 3.9, bf16, D = 72, aligned) that is
# 168 registers and 3 CTAs per SM with plain 16-byte loads, against 180 registers, 2 CTAs per SM and cp.async at
# num_stages=2; the flash loop, which walks every key, keeps num_stages=2. On sm_90 split-K's kernels are also held
# to the registers of 3 CTAs per SM (`maxnreg`, `_launch.register_budget`: 168 at 4 warps): uncapped, the unsplit
# variant at Lq = 36 or 100 (not a multiple of 16) took 174 registers and 2 CTAs per SM (triton 3.6), and with
# triton 3.9 both variants 172; capped, 0-12 B of spill per thread. Not on sm_80, whose mma.sync loop takes 212-255
# registers: capped at 168 it spilled 68-172 B per thread (static report, triton 3.6).
_FWD_STAGES = {"few_keys": 2, "split_k": 1, "flash": 2}
_SPLIT_CTAS = {9: 3}          # compute capability major -> CTAs of 4 warps per SM that split-K's registers allow


def _fwd_space(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> List[dict]:
    """The forward's other kernel paths at this shape, a query tile of 32 (and of 64 where few-keys holds over 64
    keys, whose heuristic may take either: `_few_keys_fitted`) and 8 warps, as configurations."""
    lq, lk = q.shape[1], k.shape[1]
    path = attention_path(lq, lk, sdpa=False)
    paths = [p for p in ("few_keys", "split_k", "flash") if p != path and (p != "few_keys" or lk <= MAX_KEYS_ONE_TILE)]
    tiles = (32, 64) if path == "few_keys" and lk > 64 else (32,)
    return ([{"path": p} for p in paths] + (alternatives({}, BLOCK_M=tiles) if lq > 32 else [])
            + alternatives({"num_warps": 4}, num_warps=(8,)))


def _bwd_space(grad_out, q, k, v, out, lse) -> List[dict]:
    """The backward's half query tile and 4 warps, as configurations."""
    block_m = _bwd_tiles(q.shape[1], k.shape[1])[0]
    return (alternatives({}, BLOCK_M=(block_m // 2,)) if block_m > 16 else []) + alternatives(
        {"num_warps": BWD_WARPS}, num_warps=(4,))


# The launchers' config spaces besides their heuristics (`config` of attention_fwd: path, BLOCK_M, num_warps; of
# attention_bwd: BLOCK_M, num_warps), checked and timed per device and shape against PyTorch SDPA by `_tune`
# (docs/kernels.md, "Tuning"). Keyed by op, called with the op's tensors.
CONFIGS = {
    "attention": _fwd_space,
    "attention_backward": _bwd_space,
}


def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, config=None
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Triton forward: (out (B, Lq, H, D) contiguous, lse (B, H, Lq) fp32, natural log). Not routed to SDPA.
    `config`: a configuration of `CONFIGS["attention"]` instead of the heuristic's path and tiles."""
    _check_launch(q)
    b, lq, h, d = q.shape
    lk = k.shape[1]
    bh = b * h
    config = config or {}
    path = config.get("path") or attention_path(lq, lk, sdpa=False)
    if path == "few_keys" and lk > MAX_KEYS_ONE_TILE:
        raise Unfit(f"k: few_keys holds at most {MAX_KEYS_ONE_TILE} keys, got Lk={lk}")
    out = torch.empty((b, lq, h, d), device=q.device, dtype=q.dtype)
    lse = torch.empty((b, h, lq), device=q.device, dtype=torch.float32)
    strides = (*q.stride(), *k.stride(), *v.stride(), *out.stride())
    path, block_m, block_n = _fwd_tiles(lq, lk, path=path)
    meta = dict(HEAD_DIM=d, BLOCK_D=_block_d(d), BLOCK_M=block_m, BLOCK_N=block_n, ALIGNED=_is_aligned(q, k, v, out),
                PRECISION=_precision(q.dtype), num_warps=4, num_stages=_FWD_STAGES[path])
    meta.update((key, config[key]) for key in ("BLOCK_M", "num_warps") if key in config)
    fixed = "BLOCK_M" in config
    qk_scale = scale * _LOG2E
    if path == "few_keys":
        args = (q, k, v, out, lse, *strides, h, lq, lk, qk_scale)
        meta, ctas = _few_keys_fitted(q.device, args, meta, fixed)
        cfg = _fwd_config(lq, lk, bh, q.device, ctas, meta["BLOCK_M"], path)
        _attention_fwd_few_keys_kernel[(cfg.n_splits, bh)](*args, **meta)
        return out, lse
    limits = device_limits(q.device)
    if path == "split_k" and meta["num_warps"] == 4 and limits.capability[0] in _SPLIT_CTAS:
        meta["maxnreg"] = register_budget(_SPLIT_CTAS[limits.capability[0]], meta["num_warps"], limits)
    # The split count comes from the unsplit variant's occupancy (the variant launched whenever the queries fill the
    # device; the split one runs the same key loop under the same register cap), so a launch that does not split
    # compiles nothing it does not run.
    args = (q, k, v, out, lse, lse, lse, *strides, h, lq, lk, lk, qk_scale)
    meta, ctas = _fitted(_attention_fwd_kernel, q.device, _SM90_CTAS[path], args, dict(meta, SPLIT=False), fixed)
    cfg = _fwd_config(lq, lk, bh, q.device, ctas, meta["BLOCK_M"], path)
    grid_m = cdiv(lq, cfg.block_m)
    if cfg.n_splits == 1:
        _attention_fwd_kernel[(grid_m, bh, 1)](*args, **meta)
        return out, lse
    ws_acc = torch.empty((bh, cfg.n_splits, lq, d), device=q.device, dtype=torch.float32)
    ws_ml = torch.empty((bh, cfg.n_splits, 2, lq), device=q.device, dtype=torch.float32)
    _attention_fwd_kernel[(grid_m, bh, cfg.n_splits)](
        q, k, v, out, lse, ws_acc, ws_ml, *strides, h, lq, lk, cfg.chunk, qk_scale, **dict(meta, SPLIT=True))
    _attention_fwd_combine_kernel[(grid_m, bh)](
        ws_acc, ws_ml, out, lse, *out.stride(), h, lq, cfg.n_splits,
        HEAD_DIM=d, BLOCK_D=meta["BLOCK_D"], BLOCK_M=cfg.block_m, ALIGNED=meta["ALIGNED"], num_warps=4)
    return out, lse


# NOTE: the backward's tiles, from the compile report (triton 3.9, bf16, D = 72, aligned). The dk/dv kernel holds
# two fp32 (BLOCK_N, 128) accumulators across its query loop, and with dq fused a (BLOCK_M, 128) product per step:
# at 4 warps it spilled 1,804 B per thread (BLOCK_N 64) and 6,012 B (BLOCK_N 128) on sm_90, and at BLOCK_N 128 ptxas
# for sm_80 fell back to 32 registers with a 14.8 KB stack. 8 warps with BLOCK_M 32 at 128 keys: 0 B spill on sm_90
# (238 registers), 4 B on sm_80; at 64 keys 0 B. Fusing dq at 128 keys rather than running the dq kernel (also 0 B:
# BLOCK_N 64, 207 + 164 registers) saves recomputing q kᵀ and dO vᵀ, a launch and a second read of K and V.
BWD_WARPS = 8


def _bwd_tiles(lq: int, lk: int) -> Tuple[int, int, bool]:
    """(BLOCK_M, BLOCK_N, FUSE_DQ) of the backward: dq is fused into the dk/dv kernel when one key block holds
    every key (Lk <= MAX_KEYS_ONE_TILE)."""
    fuse_dq = lk <= MAX_KEYS_ONE_TILE
    block_n = max(16, next_pow2(lk)) if fuse_dq else 64
    return min(32 if block_n > 64 else 64, max(16, next_pow2(lq))), block_n, fuse_dq


def attention_bwd(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                  lse: torch.Tensor, scale: float, config=None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton backward (flash-attention-2 style): delta = rowsum(dO ⊙ O); dk, dv over key blocks (queries split when
    there are few key blocks); dq over query blocks (keys split when there are few query blocks), or fused into the
    dk/dv kernel when every key fits one block. Split partials are fp32 and summed here, deterministic, no atomics.
    `config`: a configuration of `CONFIGS["attention_backward"]` instead of the heuristic's tiles."""
    _check_launch(q)
    b, lq, h, d = q.shape
    lk = k.shape[1]
    bh = b * h
    lse = lse.contiguous()                             # read as (B·H, Lq)
    block_m, block_n, fuse_dq = _bwd_tiles(lq, lk)
    config = config or {}
    block_m, fixed = config.get("BLOCK_M", block_m), "BLOCK_M" in config
    dq = torch.empty((b, lq, h, d), device=q.device, dtype=q.dtype)
    aligned = _is_aligned(q, k, v, grad_out, out, dq)  # dk, dv and the workspaces: contiguous, D a multiple of 8
    meta = dict(HEAD_DIM=d, BLOCK_D=_block_d(d), BLOCK_M=block_m, BLOCK_N=block_n, ALIGNED=aligned,
                PRECISION=_precision(q.dtype), num_warps=config.get("num_warps", BWD_WARPS), num_stages=2)
    qk_scale = scale * _LOG2E

    delta = torch.empty((b, h, lq), device=q.device, dtype=torch.float32)
    _attention_bwd_preprocess_kernel[(cdiv(lq, 64), bh)](
        out, grad_out, delta, *out.stride(), *grad_out.stride(), h, lq,
        HEAD_DIM=d, BLOCK_D=meta["BLOCK_D"], BLOCK_M=64, ALIGNED=aligned, num_warps=4)

    # dk/dv: one program per key block and query split; the splits fill one wave of the device.
    n_kblocks = cdiv(lk, block_n)
    common = (q, k, v, grad_out, lse, delta, dq)
    strides = (*q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dq.stride())
    ws_strides = (b * lk * h * d, lk * h * d, h * d, d, 1)             # (splits, B, Lk, H, D)
    args = (*common, k.dtype, k.dtype, *strides, *ws_strides, h, lq, lk, lq, qk_scale, scale)
    dkdv_meta, ctas = _fitted(_attention_bwd_dkdv_kernel, q.device, _SM90_CTAS["dkdv"], args,
                              dict(meta, FUSE_DQ=fuse_dq), fixed)
    q_splits, q_chunk = split_count(n_kblocks * bh, cdiv(lq, dkdv_meta["BLOCK_M"]), dkdv_meta["BLOCK_M"],
                                    resident_programs(q.device, ctas))
    dk = torch.empty((q_splits, b, lk, h, d), device=q.device, dtype=q.dtype if q_splits == 1 else torch.float32)
    dv = torch.empty_like(dk)
    _attention_bwd_dkdv_kernel[(n_kblocks, bh, q_splits)](
        *common, dk, dv, *strides, *dk.stride(), h, lq, lk, q_chunk, qk_scale, scale, **dkdv_meta)
    dk, dv = (dk[0], dv[0]) if q_splits == 1 else (dk.sum(0).to(k.dtype), dv.sum(0).to(v.dtype))
    if fuse_dq:
        return dq, dk, dv

    # dq: one program per query block and key split.
    args = (*common[:6], q.dtype, *strides[:16], b * lq * h * d, *dq.stride(), h, lq, lk, lk, qk_scale, scale)
    meta, ctas = _fitted(_attention_bwd_dq_kernel, q.device, _SM90_CTAS["dq"], args, meta, fixed)
    grid_m = cdiv(lq, meta["BLOCK_M"])
    k_splits, k_chunk = split_count(grid_m * bh, n_kblocks, block_n, resident_programs(q.device, ctas))
    dq = dq[None] if k_splits == 1 else torch.empty((k_splits, b, lq, h, d), device=q.device, dtype=torch.float32)
    _attention_bwd_dq_kernel[(grid_m, bh, k_splits)](
        *common[:6], dq, *strides[:16], *dq.stride(), h, lq, lk, k_chunk, qk_scale, scale, **meta)
    dq = dq[0] if k_splits == 1 else dq.sum(0).to(q.dtype)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------------------------
# Autograd and the public op
# ----------------------------------------------------------------------------------------------------------------

def _variant(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> Optional[dict]:
    """The forward's route: None for PyTorch SDPA, else the Triton configuration ({}: the heuristic's path and
    tiles). Where nothing is measured, and on the "triton" backend, `attention_path`'s rule: dense shapes and the
    dtypes of `SDPA_DTYPES` go to SDPA, except inside `triton_only()`; on "auto" on a GPU the first-use check and
    timing of every configuration against SDPA decide (`_tune`)."""
    sdpa = not triton_only_active()
    default = attention_path(q.shape[1], k.shape[1], sdpa=sdpa) != "sdpa" and not (sdpa and q.dtype in SDPA_DTYPES)
    if default and interpreting() and q.dtype == torch.bfloat16 and use_triton(q, k, v):
        raise ValueError("q is bfloat16, which the Triton interpreter (TRITON_INTERPRET=1) cannot multiply: its bf16 "
                         "dots return wrong numbers. Use float16 or float32 on the CPU, or the reference backend")
    return kernel_variant("attention", q, k, v, params=(scale,), default=default, space=CONFIGS["attention"],
                          kernel=lambda *t, config=None: attention_fwd(*t, scale, config)[0],
                          reference=lambda *t: attention_ref(*t, scale))


def _attention_body(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out (B, Lq, H, D), lse (B, H, Lq) fp32): the log-sum-exp is kept for the Triton backward."""
    if use_triton(q, k, v):
        return attention_fwd(q, k, v, scale, _variant(q, k, v, scale) or None)
    return attention_ref(q, k, v, scale), attention_lse_ref(q, k, scale)


_attention_op = custom_op("flexdit::attention", mutates_args=())(_attention_body)


@_attention_op.register_fake
def _(q, k, v, scale):
    b, lq, h, d = q.shape
    return q.new_empty((b, lq, h, d)), q.new_empty((b, h, lq), dtype=torch.float32)


def _attention_backward_body(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             out: torch.Tensor, lse: torch.Tensor, scale: float
                             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if not use_triton(grad_out, q, k, v):
        return attention_backward_ref(grad_out, q, k, v, out, scale)
    config = kernel_variant("attention_backward", grad_out, q, k, v, out, lse, params=(scale,),
                            space=CONFIGS["attention_backward"], derive=lambda t: _forward_of(t, scale),
                            kernel=lambda *t, config=None: attention_bwd(*t, scale, config),
                            reference=lambda *t: _sdpa_backward(*t, scale))
    if config is None:
        return _sdpa_backward(grad_out, q, k, v, out, lse, scale)
    return attention_bwd(grad_out, q, k, v, out, lse, scale, config)


def _forward_of(inputs: list, scale: float) -> list:
    """The backward's random inputs (grad_out, q, k, v, out, lse) with out and lse those of q, k, v."""
    grad_out, q, k, v = inputs[:4]
    return [grad_out, q, k, v, attention_ref(q, k, v, scale), attention_lse_ref(q, k, scale)]


def _sdpa_backward(grad_out, q, k, v, out, lse, scale: float):
    """The backward's PyTorch path: SDPA's own backward (its forward recomputed), (dq, dk, dv) in the inputs'
    dtypes."""
    with torch.enable_grad():
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        return torch.autograd.grad(attention_ref(q, k, v, scale), (q, k, v), grad_out)


_attention_backward_op = custom_op("flexdit::attention_backward", mutates_args=())(_attention_backward_body)


@_attention_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, scale):
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape))


def _setup_context(ctx, inputs, output):
    q, k, v, ctx.scale = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse)


def _op_backward(ctx, backward_op, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = backward_op(grad_out.contiguous(), q, k, v, out, lse, ctx.scale)
    return dq, dk, dv, None


_Function = register_autograd(_attention_op, _attention_body, _attention_backward_op,
                              _attention_backward_body, _setup_context, _op_backward)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None) -> torch.Tensor:
    """softmax(q kᵀ · scale) v per batch and head.

    Args:
        q: (B, Lq, H, D); k, v: (B, Lk, H, D). Any strides: views of a fused qkv / kv projection work without copies.
        scale: softmax scale, 1/sqrt(D) by default. D must be a multiple of 8, at most 128.
    Returns:
        (B, Lq, H, D) contiguous in q's dtype, so `.reshape(B, Lq, H * D)` is free.
    On the Triton backend the kernel follows `attention_path(Lq, Lk)`; dense shapes and the dtypes of `SDPA_DTYPES`
    (fp32) go to PyTorch SDPA, except inside `flexdit_kernels._dispatch.triton_only()`. On "auto" on a GPU each
    shape's kernel paths and tiles are checked and timed against SDPA on first use, and the fastest runs there.
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
    if q.device.type == "meta":   # shape-only tracing (FLOP counts) sees the op the run takes at this shape
        return attention_ref(q, k, v, scale) if attention_path(lq, k.shape[1]) == "sdpa" else \
            _attention_op(q, k, v, scale)[0]
    if _variant(q, k, v, scale) is None:
        # PyTorch SDPA with its own autograd (cuDNN / flash backward on GPU): dense shapes and fp32 on the Triton
        # backend, every shape on the reference backend (which so skips the log-sum-exp the Triton backward needs).
        return attention_ref(q, k, v, scale)
    return call_op(_attention_op, _Function, _attention_body, (q, k, v), q, k, v, scale)[0]


# ----------------------------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------------------------

def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None) -> torch.Tensor:
    """Pure-PyTorch attention through `scaled_dot_product_attention` on (B, H, L, D) transposes."""
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return out.transpose(1, 2).contiguous()


def attention_lse_ref(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """log Σ_j exp(q·k_j · scale) in fp32, (B, H, Lq): the second output of the forward op."""
    s = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * scale
    return torch.logsumexp(s, dim=-1)


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
