"""Device facts and launch arithmetic shared by every kernel launcher.

Launch sizes (split counts, reduction grids, tiles) come from the device's SM count and per-SM limits and from the
compiled kernel's registers and shared memory, never from constants tuned for one GPU. Off the GPU (the Triton
interpreter, the static report) the facts of a named target stand in, an H100's by default.
"""
from typing import NamedTuple, Optional, Tuple

import torch


# Plain-int forms of triton.cdiv / triton.next_power_of_2, which are far slower to call from Python (they unwrap
# constexprs) and run on every launch.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 1 else 1


class DeviceLimits(NamedTuple):
    """Per-SM resources of a CUDA compute capability (CUDA programming guide, "Technical Specifications per Compute
    Capability"). smem_per_block is what one block may opt into with cudaFuncAttributeMaxDynamicSharedMemorySize."""
    capability: Tuple[int, int]
    sm_count: int
    regs_per_sm: int = 65536
    max_threads_per_sm: int = 2048
    max_ctas_per_sm: int = 32
    smem_per_sm: int = 233472
    smem_per_block: int = 232448
    reg_alloc_unit: int = 256          # registers are allocated per warp in units of 256


# The targets the static report compiles for, with the SM counts of the boards named (datasheets).
TARGETS = {
    90: DeviceLimits((9, 0), sm_count=132),                                        # H100 SXM / H200
    80: DeviceLimits((8, 0), sm_count=108, smem_per_sm=167936, smem_per_block=166912),   # A100
    86: DeviceLimits((8, 6), sm_count=84, max_threads_per_sm=1536, max_ctas_per_sm=16,
                     smem_per_sm=102400, smem_per_block=101376),                   # RTX A6000 / 3090 class
    89: DeviceLimits((8, 9), sm_count=142, max_threads_per_sm=1536, max_ctas_per_sm=24,
                     smem_per_sm=102400, smem_per_block=101376),                   # L40S
}
DEFAULT_TARGET = 90

_LIMITS = {}


def device_limits(device: Optional[torch.device] = None) -> DeviceLimits:
    """The limits of a CUDA device (cached per index), read from torch where it reports them; the default target's
    (an H100's) for any other device, so grids come out the same shape under the interpreter as on the GPU."""
    if device is None or device.type != "cuda":
        return TARGETS[DEFAULT_TARGET]
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _LIMITS:
        props = torch.cuda.get_device_properties(index)
        cc = props.major * 10 + props.minor
        base = TARGETS.get(cc, TARGETS[80] if props.major == 8 else TARGETS[DEFAULT_TARGET])
        smem_sm = getattr(props, "shared_memory_per_multiprocessor", base.smem_per_sm)
        smem_block = getattr(props, "shared_memory_per_block_optin", base.smem_per_block)
        _LIMITS[index] = base._replace(
            capability=(props.major, props.minor), sm_count=props.multi_processor_count,
            regs_per_sm=getattr(props, "regs_per_multiprocessor", base.regs_per_sm),
            max_threads_per_sm=getattr(props, "max_threads_per_multi_processor", base.max_threads_per_sm),
            smem_per_sm=smem_sm, smem_per_block=smem_block)
    return _LIMITS[index]


def sm_count(device: Optional[torch.device] = None) -> int:
    """Streaming multiprocessors of a CUDA device; the default target's (132) elsewhere."""
    return device_limits(device).sm_count


def ctas_per_sm(n_regs: int, num_warps: int, shared: int, limits: DeviceLimits) -> Tuple[int, str]:
    """How many blocks of a compiled kernel fit on one SM at once, and which resource limits it ("registers",
    "shared", "threads" or "blocks"). 0 means the kernel cannot launch on that target."""
    threads = 32 * num_warps
    regs_per_warp = cdiv(max(n_regs, 1) * 32, limits.reg_alloc_unit) * limits.reg_alloc_unit
    fits = {
        "registers": limits.regs_per_sm // (regs_per_warp * num_warps),
        "threads": limits.max_threads_per_sm // threads,
        "blocks": limits.max_ctas_per_sm,
        "shared": (limits.smem_per_sm // shared if shared <= limits.smem_per_block else 0) if shared else 1 << 30,
    }
    limiter = min(fits, key=fits.get)
    return fits[limiter], limiter


def register_budget(ctas: int, num_warps: int, limits: DeviceLimits) -> int:
    """The most registers per thread (ptxas's `maxnreg`) that let `ctas` blocks of num_warps warps share one SM:
    each warp's registers are allocated in units of reg_alloc_unit."""
    per_warp = limits.regs_per_sm // (ctas * num_warps) // limits.reg_alloc_unit * limits.reg_alloc_unit
    return per_warp // 32


def resident_programs(device: Optional[torch.device], per_sm: int) -> int:
    """Programs that run at once on the whole device when `per_sm` fit on each SM: one wave."""
    return max(1, per_sm) * sm_count(device)


def split_count(n_programs: int, n_blocks: int, block: int, wave: int) -> Tuple[int, int]:
    """Split a reduction of n_blocks blocks of `block` elements over programs so that n_programs · splits fills
    about one wave of `wave` resident programs (no more: every extra split costs a workspace round trip and a
    combine). Returns (splits, elements per split): a multiple of block, every split non-empty."""
    want = max(1, min(n_blocks, cdiv(wave, n_programs)))
    per = cdiv(n_blocks, want)
    return cdiv(n_blocks, per), per * block


_OCCUPANCY = {}


def compiled_ctas_per_sm(kernel, device: Optional[torch.device], default: int, *args, **meta) -> int:
    """CTAs per SM of the variant that `kernel[grid](*args, **meta)` runs on `device`, from the compiled kernel's
    registers and shared memory (`warmup` compiles it if no launch has), cached per kernel, device, argument dtypes
    and meta-parameters; 0 when it needs more shared memory than a block may have there. Off a CUDA device (the
    interpreter, recording launchers) `default`: the caller's figure for the default target, from its compile report."""
    if device is None or device.type != "cuda":
        return default
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = (kernel, index, tuple(a.dtype if isinstance(a, torch.Tensor) else a if isinstance(a, torch.dtype) else None
                                for a in args), tuple(sorted(meta.items())))
    if key not in _OCCUPANCY:
        limits = device_limits(device)
        with torch.cuda.device(index):
            compiled = kernel.warmup(*args, grid=(1,), **meta)
            shared = compiled.metadata.shared
            if shared > limits.smem_per_block:
                _OCCUPANCY[key] = 0
            else:
                compiled._init_handles()               # loads the module, which fills n_regs
                _OCCUPANCY[key] = ctas_per_sm(compiled.n_regs, compiled.metadata.num_warps, shared, limits)[0]
    return _OCCUPANCY[key]


# ----------------------------------------------------------------------------------------------------------------
# Token tiles and grids of the pooling ops (token_pool, upsample_add, token_mean)
# ----------------------------------------------------------------------------------------------------------------

# The occupancy target of the memory-bound kernels: at least this many waves of programs, so that a short last wave
# leaves few SMs idle. The config spaces of the reductions that keep fewer to save partial-sum traffic offer a
# variant that reaches it (`wave_split`).
WAVES = 4


def wave_programs(device: Optional[torch.device], num_warps: int, waves: int = WAVES) -> int:
    """Programs that make at least `waves` waves of a num_warps kernel on the device, whatever registers and shared
    memory the compiler gives it: the threads and blocks limits bound the resident programs from above."""
    limits = device_limits(device)
    return waves * ctas_per_sm(1, num_warps, 0, limits)[0] * limits.sm_count


def run_length(n_tiles: int, programs_per_run: int, target: int, max_run: int) -> int:
    """Tiles per program: the largest power of two up to max_run whose grid (programs_per_run programs per run of
    tiles) keeps `target` programs; 1 when even single tiles fall short."""
    run = 1
    while run * 2 <= max_run and programs_per_run * cdiv(n_tiles, run * 2) >= target:
        run *= 2
    return run


def channel_tile(n_channels: int, element_size: int, num_warps: int, vectors: int = 1) -> Tuple[int, int, bool]:
    """(rows, BLOCK_C, EVEN_C) of a (rows, BLOCK_C) tile of token rows in which each of the kernel's threads holds
    `vectors` 16-byte vectors: BLOCK_C is 256 when it divides C, else 128 (C >= 128), else C rounded up to a power
    of two; EVEN_C when BLOCK_C divides C (no channel mask)."""
    if n_channels % 256 == 0:
        block_c = 256
    elif n_channels >= 128:
        block_c = 128
    else:
        block_c = max(16, next_pow2(n_channels))
    rows = max(1, 32 * num_warps * vectors * (16 // element_size) // block_c)
    return rows, block_c, n_channels % block_c == 0


class WindowPlan(NamedTuple):
    """Launch of a window reduction (token_pool's forward, upsample_add's backward): grid, windows per program,
    the longest window along each axis, and the kernel's constexprs."""
    grid: Tuple[int, int, int]
    run: int
    max_rows: int
    max_cols: int
    meta: dict


# Windows of at most this many tokens (FlexDiT's grids G >= 5 on a 32 x 32 or 16 x 16 token grid) are read in
# tiles of one 16-byte vector per thread (more where the grid stays short of its waves even so); larger ones (G = 1
# or 2) in tiles of 4 vectors per thread.
_MAX_TILED_AREA = 64
_WINDOW_RUN = 16


_MAX_WINDOW = {}


def max_window(size: int, n_windows: int, children: bool) -> int:
    """The longest window along an axis of `size` tokens (cached): AdaptiveAvgPool's floor(i*size/G) ..
    ceil((i+1)*size/G), or (children) the nearest rule's ceil(i*size/G) .. ceil((i+1)*size/G)."""
    key = (size, n_windows, children)
    if key not in _MAX_WINDOW:
        _MAX_WINDOW[key] = max(cdiv((i + 1) * size, n_windows) - (cdiv(i * size, n_windows) if children
                                                                   else i * size // n_windows)
                               for i in range(n_windows))
    return _MAX_WINDOW[key]


def window_plan(src: torch.Tensor, h: int, w: int, gh: int, gw: int, children: bool, num_warps: int) -> WindowPlan:
    """How to reduce src (B, h*w, C) over the windows of the G_h x G_w grid with num_warps warps, in (BLOCK_W
    windows, BLOCK_T tokens of each, BLOCK_C channels) tiles. Every window is read once, by one program; a program's
    BLOCK_T partial sums of a window are added across threads once, after its last step.
    - BLOCK_T is the fewest tokens per window (a power of two up to the window's area) that give the grid 4 waves
      of programs: more programs share a batch entry's windows, nothing more crosses memory.
    - BLOCK_W is at least the windows whose (BLOCK_W, BLOCK_C) sums give each thread 4 bytes to store: Triton
      spreads a stored tile over every thread, so a finer split would store 2 bytes at a time (bf16).
    - Where even the finest split leaves the grid short of its waves, a thread holds 2, then 4 16-byte vectors per
      step (as many loads in flight) instead of one, as long as that keeps as many programs.
    Runs of tiles per program then grow only while the grid keeps the waves."""
    b, _, c = src.shape
    m = gh * gw
    max_rows, max_cols = max_window(h, gh, children), max_window(w, gw, children)
    area = max_rows * max_cols
    small = area <= _MAX_TILED_AREA
    rows, block_c, even_c = channel_tile(c, src.element_size(), num_warps)
    c_blocks = cdiv(c, block_c)
    target = wave_programs(src.device, num_warps)
    min_w = min(next_pow2(m), max(1, 4 * 32 * num_warps // (block_c * src.element_size())))

    def tokens_per_step(vectors: int) -> int:
        most = max(1, min(rows * vectors // min_w, next_pow2(area)))
        t = 1 if small else most
        while t < most and (c_blocks * b * cdiv(m, rows * vectors // t) < target
                            or min_w < rows * vectors // t < 4 * min_w):    # 8-byte stores: not one vector
            t *= 2
        return t

    best = None                                         # (programs, vectors, BLOCK_T)
    for vectors in (1, 2, 4) if small else (4,):
        t = tokens_per_step(vectors)
        programs = c_blocks * b * cdiv(m, rows * vectors // t)
        if best is None or programs >= best[0]:
            best = (programs, vectors, t)
        if programs >= target:
            break
    _, vectors, block_t = best
    block_w = min(max(1, rows * vectors // block_t), next_pow2(m))
    run = block_w * run_length(cdiv(m, block_w), c_blocks * b, target, _WINDOW_RUN)
    meta = dict(BLOCK_W=block_w, BLOCK_T=block_t, BLOCK_C=block_c, EVEN_C=even_c)
    return WindowPlan((c_blocks, cdiv(m, run), b), run, max_rows, max_cols, meta)


def token_plan(t: torch.Tensor, num_warps: int, max_run: int = _WINDOW_RUN) -> Tuple[Tuple[int, int, int], int, dict]:
    """How to cover the dense tokens of t (B, N, C) with (BLOCK_N, BLOCK_C) tiles of one 16-byte vector per thread:
    grid (channel blocks, runs, B), tokens per program (a run of up to max_run tiles, while the grid keeps 4 waves)
    and the constexprs BLOCK_N, BLOCK_C, EVEN_C."""
    b, n, c = t.shape
    rows, block_c, even_c = channel_tile(c, t.element_size(), num_warps)
    block_n = min(rows, next_pow2(n))
    c_blocks = cdiv(c, block_c)
    run = block_n * run_length(cdiv(n, block_n), b * c_blocks, wave_programs(t.device, num_warps), max_run)
    return (c_blocks, cdiv(n, run), b), run, dict(BLOCK_N=block_n, BLOCK_C=block_c, EVEN_C=even_c)


def wave_split(n_programs: int, n_blocks: int, wave: int, waves: int) -> int:
    """Blocks per split of each of n_programs reductions over n_blocks blocks: the most whose grid, n_programs ·
    ceil(n_blocks / blocks per split) programs, makes at least `waves` waves of `wave` resident programs; 1 (each
    block a program of its own) when none does."""
    want = cdiv(waves * wave, n_programs)
    if want <= 1:
        return n_blocks
    return max(1, (n_blocks - 1) // (want - 1))         # the most blocks per split that leave `want` splits


def whole_wave_splits(n_programs: int, n_blocks: int, wave: int) -> int:
    """Splits of each of n_programs reductions over n_blocks blocks that finish soonest in whole waves: a program
    takes cdiv(n_blocks, splits) blocks, the grid runs cdiv(n_programs · splits, wave) waves of `wave` resident
    programs, and their product is the time. The fewest splits within 10% of the best (every split adds a row of
    partial sums to combine)."""
    limit = max(1, min(n_blocks, 8 * cdiv(wave, n_programs)))
    cost = [cdiv(n_programs * s, wave) * cdiv(n_blocks, s) for s in range(1, limit + 1)]
    best = min(cost)
    return next(s for s, t in enumerate(cost, 1) if t <= 1.1 * best)
