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
