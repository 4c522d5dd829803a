"""attention: multi-head softmax attention for FlexDiT's shapes (few queries, few keys, or both dense).
q: (B, Lq, H, D), k, v: (B, Lk, H, D), any strides, fp32/fp16/bf16, D a multiple of 8 up to 128 -> (B, Lq, H, D)."""
import math
from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from ._dispatch import call_op, custom_op, interpreting, register_autograd, triton_only_active, use_triton
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
# Scores live in base 2: s2 = q·k · scale · log2(e). Row offsets (token index x token stride) are int64 in the
# load/store helpers and the batch·head program id is int64 before it meets a stride, so no offset wraps at int32.
# ----------------------------------------------------------------------------------------------------------------

@triton.jit
def _load_rows(PTR, offs_r, offs_d, stride_r, stride_d, n_rows, HEAD_DIM: tl.constexpr):
    """A (rows, BLOCK_D) tile of a (L, D) head slice, zero outside the L rows and the D columns."""
    mask = (offs_r[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM)
    ptrs = PTR + offs_r[:, None].to(tl.int64) * stride_r + offs_d[None, :] * stride_d
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _load_cols(PTR, offs_r, offs_d, stride_r, stride_d, n_rows, HEAD_DIM: tl.constexpr):
    """The transpose, (BLOCK_D, rows), of `_load_rows`' tile: kᵀ / vᵀ straight from memory."""
    mask = (offs_d[:, None] < HEAD_DIM) & (offs_r[None, :] < n_rows)
    ptrs = PTR + offs_d[:, None] * stride_d + offs_r[None, :].to(tl.int64) * stride_r
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _store_rows(PTR, x, offs_r, offs_d, stride_r, stride_d, n_rows, HEAD_DIM: tl.constexpr):
    """Store a (rows, BLOCK_D) tile into the L rows and D columns of a head slice; nothing outside them."""
    mask = (offs_r[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM)
    ptrs = PTR + offs_r[:, None].to(tl.int64) * stride_r + offs_d[None, :] * stride_d
    tl.store(ptrs, x.to(PTR.dtype.element_ty), mask=mask)


@triton.jit
def _attention_fwd_few_keys_kernel(
        Q, K, V, OUT, LSE,
        stride_qb, stride_qm, stride_qh, stride_qd,
        stride_kb, stride_kn, stride_kh, stride_kd,
        stride_vb, stride_vn, stride_vh, stride_vd,
        stride_ob, stride_om, stride_oh, stride_od,
        n_heads, lq, lk, qk_scale,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        PRECISION: tl.constexpr):
    """Few keys (Lk <= BLOCK_N): K and V of one head are loaded once and stay on chip while the program walks over
    query blocks pid_m, pid_m + n_prog_m, ...; each block is one exact softmax, no online rescaling."""
    pid_m = tl.program_id(0)
    n_prog_m = tl.num_programs(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    OUT += b * stride_ob + h * stride_oh
    LSE += pid_bh * lq

    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kt = _load_cols(K, offs_n, offs_d, stride_kn, stride_kd, lk, HEAD_DIM)              # (D, N)
    v = _load_rows(V, offs_n, offs_d, stride_vn, stride_vd, lk, HEAD_DIM)               # (N, D)
    key_ok = offs_n[None, :] < lk

    for start_m in range(pid_m * BLOCK_M, lq, n_prog_m * BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = _load_rows(Q, offs_m, offs_d, stride_qm, stride_qd, lq, HEAD_DIM)           # (M, D)
        s = tl.dot(q, kt, input_precision=PRECISION)
        s = tl.where(key_ok, s * qk_scale, float("-inf"))
        m = tl.max(s, 1)
        p = tl.exp2(s - m[:, None])
        l = tl.sum(p, 1)
        out = tl.dot(p.to(V.dtype.element_ty), v, input_precision=PRECISION) * (1.0 / l)[:, None]
        _store_rows(OUT, out, offs_m, offs_d, stride_om, stride_od, lq, HEAD_DIM)
        tl.store(LSE + offs_m, (m + tl.log2(l)) / 1.4426950408889634, mask=offs_m < lq)


@triton.jit
def _attention_fwd_kernel(
        Q, K, V, OUT, LSE, WS_ACC, WS_ML,
        stride_qb, stride_qm, stride_qh, stride_qd,
        stride_kb, stride_kn, stride_kh, stride_kd,
        stride_vb, stride_vn, stride_vh, stride_vd,
        stride_ob, stride_om, stride_oh, stride_od,
        n_heads, lq, lk, keys_per_split, qk_scale,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        SPLIT: tl.constexpr, PRECISION: tl.constexpr):
    """Flash-attention loop over the keys [split · keys_per_split, +keys_per_split) ∩ [0, Lk) with online softmax.
    SPLIT=False: one split holds all keys; write the output and the log-sum-exp. SPLIT=True (split-K): write the
    partial, unnormalised accumulator to WS_ACC (BH, splits, Lq, D) and (m, l) to WS_ML (BH, splits, 2, Lq), fp32;
    an empty split writes acc = 0, m = -inf, l = 0, which the combine weighs by 0."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    pid_s = tl.program_id(2)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(Q, offs_m, offs_d, stride_qm, stride_qd, lq, HEAD_DIM)               # (M, D)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    lo = pid_s * keys_per_split
    hi = tl.minimum(lo + keys_per_split, lk)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        kt = _load_cols(K, cols, offs_d, stride_kn, stride_kd, hi, HEAD_DIM)            # (D, N)
        s = tl.dot(q, kt, input_precision=PRECISION)
        s = tl.where(cols[None, :] < hi, s * qk_scale, float("-inf"))   # the first column of a block is < hi
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_rows(V, cols, offs_d, stride_vn, stride_vd, hi, HEAD_DIM)             # (N, D)
        acc = acc * alpha[:, None] + tl.dot(p.to(V.dtype.element_ty), v, input_precision=PRECISION)
        m_i = m_new

    if SPLIT:
        part = pid_bh * tl.num_programs(2) + pid_s                         # (bh, split) slot, int64
        _store_rows(WS_ACC + part * lq * HEAD_DIM, acc, offs_m, offs_d, HEAD_DIM, 1, lq, HEAD_DIM)
        ML = WS_ML + part * 2 * lq
        tl.store(ML + offs_m, m_i, mask=offs_m < lq)
        tl.store(ML + lq + offs_m, l_i, mask=offs_m < lq)
    else:
        OUT += b * stride_ob + h * stride_oh
        _store_rows(OUT, acc * (1.0 / l_i)[:, None], offs_m, offs_d, stride_om, stride_od, lq, HEAD_DIM)
        tl.store(LSE + pid_bh * lq + offs_m, (m_i + tl.log2(l_i)) / 1.4426950408889634, mask=offs_m < lq)


@triton.jit
def _attention_fwd_combine_kernel(
        WS_ACC, WS_ML, OUT, LSE,
        stride_ob, stride_om, stride_oh, stride_od,
        n_heads, lq, n_splits,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """Split-K combine: out = Σ_s 2^(m_s − m) acc_s / Σ_s 2^(m_s − m) l_s with m = max_s m_s. Rows past Lq read
    m = 0, l = 1, acc = 0 and store nothing; the split slots are walked by pointer increments (no int32 product)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
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
        acc += w[:, None] * _load_rows(ACC, offs_m, offs_d, HEAD_DIM, 1, lq, HEAD_DIM)
        ML += 2 * lq
        ACC += lq * HEAD_DIM
    OUT += b * stride_ob + h * stride_oh
    _store_rows(OUT, acc / l[:, None], offs_m, offs_d, stride_om, stride_od, lq, HEAD_DIM)
    tl.store(LSE + pid_bh * lq + offs_m, (m + tl.log2(l)) / 1.4426950408889634, mask=row_ok)


@triton.jit
def _attention_bwd_preprocess_kernel(
        OUT, DO, DELTA,
        stride_ob, stride_om, stride_oh, stride_od,
        stride_dob, stride_dom, stride_doh, stride_dod,
        n_heads, lq,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta = rowsum(dO ⊙ O) in fp32, (BH, Lq)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_rows(OUT + b * stride_ob + h * stride_oh, offs_m, offs_d, stride_om, stride_od, lq, HEAD_DIM)
    do = _load_rows(DO + b * stride_dob + h * stride_doh, offs_m, offs_d, stride_dom, stride_dod, lq, HEAD_DIM)
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
        FUSE_DQ: tl.constexpr, PRECISION: tl.constexpr):
    """dk, dv of one key block over the queries [split · queries_per_split, +queries_per_split) ∩ [0, Lq), in
    transposed form: pᵀ = 2^(k·qᵀ·scale·log2e − lse2), dv += pᵀ dO, dsᵀ = pᵀ ⊙ (v dOᵀ − delta), dk += dsᵀ q. DK/DV
    carry a split stride (fp32 partials summed by the launcher when there are several splits). FUSE_DQ: this block
    holds every key (Lk <= BLOCK_N), so dq = ds k of each query block is complete here and is stored directly."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    pid_s = tl.program_id(2)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    DO += b * stride_dob + h * stride_doh
    DQ += b * stride_dqb + h * stride_dqh
    LSE += pid_bh * lq
    DELTA += pid_bh * lq

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_rows(K, offs_n, offs_d, stride_kn, stride_kd, lk, HEAD_DIM)               # (N, D)
    v = _load_rows(V, offs_n, offs_d, stride_vn, stride_vd, lk, HEAD_DIM)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    key_ok = offs_n[:, None] < lk

    lo = pid_s * queries_per_split
    hi = tl.minimum(lo + queries_per_split, lq)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + offs_m0
        q = _load_rows(Q, offs_m, offs_d, stride_qm, stride_qd, hi, HEAD_DIM)           # (M, D)
        do = _load_rows(DO, offs_m, offs_d, stride_dom, stride_dod, hi, HEAD_DIM)
        st = tl.dot(k, tl.trans(q), input_precision=PRECISION)                           # (N, M)
        dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        lse2 = tl.load(LSE + offs_m, mask=offs_m < hi, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + offs_m, mask=offs_m < hi, other=0.0)
        pt = tl.exp2(st * qk_scale - lse2[None, :])
        pt = tl.where(key_ok & (offs_m[None, :] < hi), pt, 0.0)
        dst = pt * (dpt - delta[None, :])
        dstc = dst.to(Q.dtype.element_ty)
        dv += tl.dot(pt.to(DO.dtype.element_ty), do, input_precision=PRECISION)
        dk += tl.dot(dstc, q, input_precision=PRECISION)
        if FUSE_DQ:
            dq = tl.dot(tl.trans(dstc), k, input_precision=PRECISION) * scale          # (M, D)
            _store_rows(DQ, dq, offs_m, offs_d, stride_dqm, stride_dqd, hi, HEAD_DIM)

    DK += pid_s.to(tl.int64) * stride_dks + b * stride_dkb + h * stride_dkh
    DV += pid_s.to(tl.int64) * stride_dks + b * stride_dkb + h * stride_dkh
    _store_rows(DK, dk * scale, offs_n, offs_d, stride_dkn, stride_dkd, lk, HEAD_DIM)
    _store_rows(DV, dv, offs_n, offs_d, stride_dkn, stride_dkd, lk, HEAD_DIM)


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
        PRECISION: tl.constexpr):
    """dq of one query block over the keys [split · keys_per_split, +keys_per_split) ∩ [0, Lk):
    ds = p ⊙ (dO vᵀ − delta), dq += ds k. DQ carries a split stride (fp32 partials summed by the launcher when there
    are several splits)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    pid_s = tl.program_id(2)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    DO += b * stride_dob + h * stride_doh

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(Q, offs_m, offs_d, stride_qm, stride_qd, lq, HEAD_DIM)               # (M, D)
    do = _load_rows(DO, offs_m, offs_d, stride_dom, stride_dod, lq, HEAD_DIM)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lse2 = tl.load(LSE + pid_bh * lq + offs_m, mask=offs_m < lq, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + pid_bh * lq + offs_m, mask=offs_m < lq, other=0.0)

    lo = pid_s * keys_per_split
    hi = tl.minimum(lo + keys_per_split, lk)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n0
        kt = _load_cols(K, cols, offs_d, stride_kn, stride_kd, hi, HEAD_DIM)            # (D, N)
        vt = _load_cols(V, cols, offs_d, stride_vn, stride_vd, hi, HEAD_DIM)
        s = tl.dot(q, kt, input_precision=PRECISION)                                     # (M, N)
        dp = tl.dot(do, vt, input_precision=PRECISION)
        p = tl.exp2(s * qk_scale - lse2[:, None])
        p = tl.where(cols[None, :] < hi, p, 0.0)
        ds = (p * (dp - delta[:, None])).to(Q.dtype.element_ty)
        dq += tl.dot(ds, tl.trans(kt), input_precision=PRECISION)

    DQ += pid_s.to(tl.int64) * stride_dqs + b * stride_dqb + h * stride_dqh
    _store_rows(DQ, dq * scale, offs_m, offs_d, stride_dqm, stride_dqd, lq, HEAD_DIM)


# ----------------------------------------------------------------------------------------------------------------
# Launchers
#
# NOTE: the head dim is one power-of-two tile, BLOCK_D = max(16, next_pow2(D)), with masked columns: D = 72 and
# D = 80 compute 128 columns in every tl.dot where a 64 + 16 split computed 80, so 1.6x the split's dot work (1.78x
# the 72 useful columns of D = 72); D = 64 and 128 are unchanged. The split gave wrong bf16/fp16 results in the key
# loop on an H100 (triton 3.6) while one tile at D = 64 and the few-keys kernel were right. Block sizes, num_warps,
# num_stages and the programs-per-GPU target are the usual flash-attention starting points (64x64 tiles, 4 warps),
# not tuned: the bench tunes them.
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
    return max(16, triton.next_power_of_2(d))


_sm_count = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 132                                     # an H100 SXM / H200, for the interpreter
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _sm_count:
        _sm_count[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _sm_count[idx]


def _splits(n_programs: int, n_blocks: int, block: int, device: torch.device) -> Tuple[int, int]:
    """Split n_blocks blocks of a reduction of length L (cdiv(L, block) = n_blocks) over programs so that about
    4 programs per SM run; returns (splits, elements per split): a multiple of block, and every split non-empty,
    since (splits - 1) · per < n_blocks."""
    want = max(1, min(n_blocks, triton.cdiv(4 * _num_sms(device), n_programs)))
    per = triton.cdiv(n_blocks, want)
    return triton.cdiv(n_blocks, per), per * block


def _fwd_config(lq: int, lk: int, bh: int, device: torch.device) -> _Config:
    """Tiles and grid for the forward. Token tiles are powers of two >= 16 (tl.dot's minimum), so few-keys pads Lk
    (36 -> 64, 100 -> 128) and few queries pad Lq (36 -> 64, 1 -> 16): Triton has no other tile shapes; masked
    rows/columns are never loaded from memory. Few-keys uses about 4 programs per SM, each walking several query
    blocks with one copy of K and V, so at B·H = 512 K/V are read from L2 twice per head."""
    path = attention_path(lq, lk, sdpa=False)
    block_m = min(64, max(16, triton.next_power_of_2(lq)))
    if path == "few_keys":
        block_n = max(16, triton.next_power_of_2(lk))
        n_qblocks = triton.cdiv(lq, block_m)
        return _Config(path, block_m, block_n, max(1, min(n_qblocks, triton.cdiv(4 * _num_sms(device), bh))), lk)
    block_n = 64
    if path == "split_k":
        splits, chunk = _splits(triton.cdiv(lq, block_m) * bh, triton.cdiv(lk, block_n), block_n, device)
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


def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Triton forward: (out (B, Lq, H, D) contiguous, lse (B, H, Lq) fp32, natural log). Not routed to SDPA."""
    _check_launch(q)
    b, lq, h, d = q.shape
    lk = k.shape[1]
    bh = b * h
    cfg = _fwd_config(lq, lk, bh, q.device)
    out = torch.empty((b, lq, h, d), device=q.device, dtype=q.dtype)
    lse = torch.empty((b, h, lq), device=q.device, dtype=torch.float32)
    strides = (*q.stride(), *k.stride(), *v.stride(), *out.stride())
    meta = dict(HEAD_DIM=d, BLOCK_D=_block_d(d), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                PRECISION=_precision(q.dtype), num_warps=4)
    qk_scale = scale * _LOG2E
    if cfg.path == "few_keys":
        _attention_fwd_few_keys_kernel[(cfg.n_splits, bh)](
            q, k, v, out, lse, *strides, h, lq, lk, qk_scale, **meta, num_stages=2)
        return out, lse
    if cfg.n_splits == 1:
        _attention_fwd_kernel[(triton.cdiv(lq, cfg.block_m), bh, 1)](
            q, k, v, out, lse, lse, lse, *strides, h, lq, lk, lk, qk_scale, **meta, SPLIT=False, num_stages=2)
        return out, lse
    ws_acc = torch.empty((bh, cfg.n_splits, lq, d), device=q.device, dtype=torch.float32)
    ws_ml = torch.empty((bh, cfg.n_splits, 2, lq), device=q.device, dtype=torch.float32)
    _attention_fwd_kernel[(triton.cdiv(lq, cfg.block_m), bh, cfg.n_splits)](
        q, k, v, out, lse, ws_acc, ws_ml, *strides, h, lq, lk, cfg.chunk, qk_scale, **meta, SPLIT=True,
        num_stages=2)
    _attention_fwd_combine_kernel[(triton.cdiv(lq, cfg.block_m), bh)](
        ws_acc, ws_ml, out, lse, *out.stride(), h, lq, cfg.n_splits,
        HEAD_DIM=d, BLOCK_D=_block_d(d), BLOCK_M=cfg.block_m, num_warps=4)
    return out, lse


def attention_bwd(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                  lse: torch.Tensor, scale: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton backward (flash-attention-2 style): delta = rowsum(dO ⊙ O); dk, dv over key blocks (queries split when
    there are few key blocks); dq over query blocks (keys split when there are few query blocks), or fused into the
    dk/dv kernel when every key fits one block. Split partials are fp32 and summed here, deterministic, no atomics."""
    _check_launch(q)
    b, lq, h, d = q.shape
    lk = k.shape[1]
    bh = b * h
    lse = lse.contiguous()                             # read as (B·H, Lq)
    meta = dict(HEAD_DIM=d, BLOCK_D=_block_d(d), PRECISION=_precision(q.dtype), num_warps=4)
    qk_scale = scale * _LOG2E

    delta = torch.empty((b, h, lq), device=q.device, dtype=torch.float32)
    _attention_bwd_preprocess_kernel[(triton.cdiv(lq, 64), bh)](
        out, grad_out, delta, *out.stride(), *grad_out.stride(), h, lq,
        HEAD_DIM=d, BLOCK_D=_block_d(d), BLOCK_M=64, num_warps=4)

    fuse_dq = lk <= MAX_KEYS_ONE_TILE
    block_n = max(16, triton.next_power_of_2(lk)) if fuse_dq else 64
    block_m = min(64, max(16, triton.next_power_of_2(lq)))
    if fuse_dq and q.element_size() == 4 and block_n * _block_d(d) >= 128 * 128:
        # NOTE: fp32 with 128 keys x 128 head-dim columns needs 262,656 B of shared memory at BLOCK_M = 64 (more than
        # the 232,448 B of an sm_90 block); BLOCK_M = 32 needs 196,864 B (sm_90 cubins from triton 3.6 and 3.9).
        block_m = min(block_m, 32)
    n_kblocks = triton.cdiv(lk, block_n)
    q_splits, q_chunk = _splits(n_kblocks * bh, triton.cdiv(lq, block_m), block_m, q.device)
    dq = torch.empty((b, lq, h, d), device=q.device, dtype=q.dtype) if fuse_dq else None
    ws_dtype = q.dtype if q_splits == 1 else torch.float32
    dk = torch.empty((q_splits, b, lk, h, d), device=q.device, dtype=ws_dtype)
    dv = torch.empty_like(dk)
    dq_arg = dq if fuse_dq else dk[0]                  # not written unless FUSE_DQ
    _attention_bwd_dkdv_kernel[(n_kblocks, bh, q_splits)](
        q, k, v, grad_out, lse, delta, dq_arg, dk, dv,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dq_arg.stride(), *dk.stride(),
        h, lq, lk, q_chunk, qk_scale, scale, **meta, BLOCK_M=block_m, BLOCK_N=block_n, FUSE_DQ=fuse_dq,
        num_stages=2)
    dk, dv = (dk[0], dv[0]) if q_splits == 1 else (dk.sum(0).to(k.dtype), dv.sum(0).to(v.dtype))
    if fuse_dq:
        return dq, dk, dv

    k_splits, k_chunk = _splits(triton.cdiv(lq, block_m) * bh, n_kblocks, block_n, q.device)
    dq = torch.empty((k_splits, b, lq, h, d), device=q.device, dtype=q.dtype if k_splits == 1 else torch.float32)
    _attention_bwd_dq_kernel[(triton.cdiv(lq, block_m), bh, k_splits)](
        q, k, v, grad_out, lse, delta, dq,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dq.stride(),
        h, lq, lk, k_chunk, qk_scale, scale, **meta, BLOCK_M=block_m, BLOCK_N=block_n, num_stages=2)
    dq = dq[0] if k_splits == 1 else dq.sum(0).to(q.dtype)
    return dq, dk, dv



# ----------------------------------------------------------------------------------------------------------------
# Autograd and the public op
# ----------------------------------------------------------------------------------------------------------------

def _attention_body(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out (B, Lq, H, D), lse (B, H, Lq) fp32): the log-sum-exp is kept for the Triton backward."""
    if use_triton(q, k, v):
        return attention_fwd(q, k, v, scale)
    return attention_ref(q, k, v, scale), attention_lse_ref(q, k, scale)


_attention_op = custom_op("flexdit::attention", mutates_args=())(_attention_body)


@_attention_op.register_fake
def _(q, k, v, scale):
    b, lq, h, d = q.shape
    return q.new_empty((b, lq, h, d)), q.new_empty((b, h, lq), dtype=torch.float32)


def _attention_backward_body(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             out: torch.Tensor, lse: torch.Tensor, scale: float
                             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if use_triton(grad_out, q, k, v):
        return attention_bwd(grad_out, q, k, v, out, lse, scale)
    return attention_backward_ref(grad_out, q, k, v, out, scale)


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
    On the Triton backend the kernel follows `attention_path(Lq, Lk)`; dense shapes go to PyTorch SDPA.
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
    if q.device.type == "meta":
        return _attention_op(q, k, v, scale)[0]        # shape-only tracing (FLOP counts) sees the op by name
    triton_path = use_triton(q, k, v) and attention_path(lq, k.shape[1], sdpa=not triton_only_active()) != "sdpa"
    if triton_path and interpreting() and q.dtype == torch.bfloat16:
        raise ValueError("q is bfloat16, which the Triton interpreter (TRITON_INTERPRET=1) cannot multiply: its bf16 "
                         "dots return wrong numbers. Use float16 or float32 on the CPU, or the reference backend")
    if not triton_path:
        # PyTorch SDPA with its own autograd (cuDNN / flash backward on GPU): dense shapes on the Triton backend,
        # every shape on the reference backend (which so skips the log-sum-exp the Triton backward needs).
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
