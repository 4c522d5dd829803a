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


def whole_wave_splits(n_programs: int, n_blocks: int, wave: int) -> int:
    """Splits of each of n_programs reductions over n_blocks blocks that finish soonest in whole waves: a program
    takes cdiv(n_blocks, splits) blocks, the grid runs cdiv(n_programs · splits, wave) waves of `wave` resident
    programs, and their product is the time. The fewest splits within 10% of the best (every split adds a row of
    partial sums to combine)."""
    limit = max(1, min(n_blocks, 8 * cdiv(wave, n_programs)))
    cost = [cdiv(n_programs * s, wave) * cdiv(n_blocks, s) for s in range(1, limit + 1)]
    best = min(cost)
    return next(s for s, t in enumerate(cost, 1) if t <= 1.1 * best)
