"""Shared `@triton.jit` helpers of the kernel modules, by section; each section serves one family of kernels.
Helpers take and return register tiles (fp32 unless said otherwise); none launches anything."""
import triton
import triton.language as tl


# ----------------------------------------------------------------------------------------------------------------
# Rows and channels: (tokens, channels) tiles with the channels contiguous (the adaLN family)
# ----------------------------------------------------------------------------------------------------------------

@triton.jit
def channel_offsets(pid_c, n_channels, BLOCK_C: tl.constexpr, EVEN_C: tl.constexpr):
    """(offs_c, mask_c) of channel block pid_c, int32; the mask is all-true when BLOCK_C divides C (EVEN_C). The
    offsets are marked contiguous, so that with a unit channel stride loads and stores become 16-byte vectors."""
    offs_c = tl.max_contiguous(tl.multiple_of(pid_c * BLOCK_C + tl.arange(0, BLOCK_C), BLOCK_C), BLOCK_C)
    if EVEN_C:
        mask_c = tl.full([BLOCK_C], 1, tl.int1)
    else:
        mask_c = offs_c < n_channels
    return offs_c, mask_c


@triton.jit
def row_tile(ptr, offs_n, offs_c, mask, stride_n, stride_c):
    """The (BLOCK_N, BLOCK_C) tile of rows offs_n and channels offs_c at `ptr` (zeros where masked), in fp32."""
    return tl.load(ptr + offs_n[:, None] * stride_n + offs_c[None, :] * stride_c, mask=mask, other=0.0
                   ).to(tl.float32)


@triton.jit
def centered_rows(x, mask, n_channels, eps):
    """For a (BLOCK_N, BLOCK_C) fp32 tile of whole rows (zeros where masked): the centered rows (zeros where masked)
    and each row's 1/std. Two passes over registers: exact when the mean is large against the spread."""
    mean = tl.sum(x, axis=1) / n_channels
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / n_channels + eps)
    return xc, rstd


@triton.jit
def column_sum(ptr, n_rows, stride_row, offs_c, mask_c, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """The fp32 sum over rows [0, n_rows) of `ptr` (unit channel stride) for the channels offs_c, BLOCK_S rows per
    step, in a fixed order (deterministic)."""
    acc = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
    for s0 in range(0, n_rows, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        mask = (offs_s < n_rows)[:, None] & mask_c[None, :]
        acc += tl.load(ptr + offs_s[:, None] * stride_row + offs_c[None, :], mask=mask, other=0.0)
    return tl.sum(acc, axis=0)


# ----------------------------------------------------------------------------------------------------------------
# Windows: rectangles of a row-major token grid (token_pool and upsample_add)
# ----------------------------------------------------------------------------------------------------------------
# A window of the G_h x G_w sparse grid is a rectangle of the h x w token grid: AdaptiveAvgPool2d's averaging window
# (token_pool) or the dense tokens whose `nearest` parent it is (upsample_add's backward). Channels are the
# contiguous axis: with a unit channel stride (specialised by Triton) and EVEN_C (no channel tail) every access is a
# 16-byte vector. Index math is int32 inside one batch entry (IDX64 widens it) on an int64 batch base.

@triton.jit
def window_span(idx, size, n_windows, CHILDREN: tl.constexpr):
    """[start, end) of window idx along one axis of `size` tokens cut into n_windows: AdaptiveAvgPool's
    floor(i*size/G) .. ceil((i+1)*size/G) (windows may overlap), or with CHILDREN the tokens whose nearest parent
    floor(t*G/size) is i, ceil(i*size/G) .. ceil((i+1)*size/G) (a partition)."""
    if CHILDREN:
        start = (idx * size + n_windows - 1) // n_windows
    else:
        start = (idx * size) // n_windows
    end = ((idx + 1) * size + n_windows - 1) // n_windows
    return start, end


@triton.jit
def window_tile_sum(base, offs_m, mask_m, h, w, grid_h, grid_w, max_area, stride_n, stride_c, offs_c, mask_c,
                    BLOCK_W: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, CHILDREN: tl.constexpr,
                    IDX64: tl.constexpr):
    """The fp32 (BLOCK_W, BLOCK_C) sums of windows offs_m (row-major on the sparse grid) and their areas. Each
    window's rectangle is flattened row by row and read BLOCK_T tokens at a time, so a step loads a (BLOCK_W,
    BLOCK_T, BLOCK_C) tile of token rows (one or a few 16-byte vectors per thread); the BLOCK_T partial sums are
    reduced once, after the last step (no reduction across threads inside the loop). BLOCK_T = 1 adds BLOCK_W
    windows in registers without any reduction; BLOCK_W = 1 reduces one window across BLOCK_T tokens. max_area
    bounds every window's area (max_rows x max_cols)."""
    r0, r1 = window_span(offs_m // grid_w, h, grid_h, CHILDREN)
    c0, c1 = window_span(offs_m % grid_w, w, grid_w, CHILDREN)
    rect_w = (c1 - c0)[:, None]
    area = (r1 - r0) * (c1 - c0)
    ok_m = mask_m[:, None]
    first = (r0 * w + c0)[:, None]
    acc = tl.zeros([BLOCK_W, BLOCK_T, BLOCK_C], dtype=tl.float32)
    for t0 in range(0, max_area, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)[None, :]
        ok = ok_m & (t < area[:, None])                                          # (BLOCK_W, BLOCK_T)
        tok = first + (t // rect_w) * w + t % rect_w
        if IDX64:
            tok = tok.to(tl.int64)
        ptrs = base + tok[:, :, None] * stride_n + offs_c[None, None, :] * stride_c
        acc += tl.load(ptrs, mask=ok[:, :, None] & mask_c[None, None, :], other=0.0).to(tl.float32)
    return tl.sum(acc, axis=1), area


@triton.jit
def window_reduce(X, OUT, b, pid_c, pid_m, h, w, grid_h, grid_w, n_channels, windows_per_program, max_area,
                  stride_x_b, stride_x_n, stride_x_c, stride_out_b, stride_out_m, stride_out_c,
                  BLOCK_W: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, EVEN_C: tl.constexpr,
                  CHILDREN: tl.constexpr, MEAN: tl.constexpr, IDX64: tl.constexpr):
    """One program of a window reduction: windows [pid_m * windows_per_program, +windows_per_program) of batch
    entry b, channel block pid_c, BLOCK_W at a time (`window_tile_sum`), each summed over its tokens (divided by its
    area with MEAN) into OUT row m."""
    offs_c, mask_c = channel_offsets(pid_c, n_channels, BLOCK_C, EVEN_C)
    x_base = X + b * stride_x_b
    out_base = OUT + b * stride_out_b
    start = pid_m * windows_per_program
    end = tl.minimum(start + windows_per_program, grid_h * grid_w)
    for m0 in range(start, end, BLOCK_W):
        offs_m = m0 + tl.arange(0, BLOCK_W)
        mask_m = offs_m < end
        total, area = window_tile_sum(x_base, offs_m, mask_m, h, w, grid_h, grid_w, max_area, stride_x_n,
                                      stride_x_c, offs_c, mask_c, BLOCK_W, BLOCK_T, BLOCK_C, CHILDREN, IDX64)
        if MEAN:
            # Masked-off windows have a positive area too (their bounds are those of a real window's formula).
            total = total / area.to(tl.float32)[:, None]
        m = offs_m
        if IDX64:
            m = m.to(tl.int64)
        tl.store(out_base + m[:, None] * stride_out_m + offs_c[None, :] * stride_out_c,
                 total.to(OUT.dtype.element_ty), mask=mask_m[:, None] & mask_c[None, :])
