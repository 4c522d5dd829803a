"""`python -m bench static`: every kernel launch the bench and the model make, compiled for sm_90 and sm_80 on the
CPU (no GPU, no tensor memory) and read back from the machine code.

How: each launcher runs on meta tensors (shapes, strides and pointer offsets, no data; a meta tensor's data_ptr is
its byte offset from an aligned base, like a CUDA allocation) with its `@triton.jit` kernels replaced by recorders.
A recorder turns each `kernel[grid](...)` into the (signature, constexprs, divisibility attributes, options) that
`JITFunction.run` would build, so block sizes and flags come from the launchers' own code. Each distinct variant is
compiled with `triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))` down to a cubin (ptxas included)
and read with the tools Triton ships in `triton/backends/nvidia/bin`: `cuobjdump -res-usage` (registers, stack,
shared memory), `cuobjdump -sass` (global load/store widths, cp.async, tensor-core and local-memory instructions)
and the `ptxas -v` log of the compile (spill bytes). Occupancy comes from `flexdit_kernels._launch`.

`@triton.jit` returns interpreter objects when TRITON_INTERPRET=1 (the CPU tests set it), which `triton.compile`
cannot take, so recording and compiling run in a subprocess without it (`python -m bench.static --worker ...`).

The CI gates (`gate_fits`, `gate_attention`, `gate_memory_bound`) are functions of one reported variant; the tests
in tests/kernels/test_static.py apply them to every variant of a representative set (`--shapes ci`).

Exit status: 0 every variant compiled and fits its target, 1 one did not (its row says why), 2 bad arguments.
"""
import argparse
import contextlib
import inspect
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Dict, Iterable, List, Optional, Sequence

PROG = "python -m bench static"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHS = (90, 80)
SHAPE_SETS = ("bench", "model", "all", "ci")
DTYPE_NAMES = ("bf16", "fp16", "fp32")

# DiT-XL/2: C = 1152, 16 heads of 72 (18 heads of 64 for D = 64 in `--shapes all`); 512² and 256² images give
# 32×32 and 16×16 tokens; FlexDiT's sparse grids G in {6, 8, 10}; the model's default batch 32 and a batch of 8.
CHANNELS = 1152
SIDES = (32, 16)
GRIDS = (6, 8, 10)
BATCHES = (8, 32)
HEADS, HEAD_DIM = 16, 72
ODD_CHANNELS, ODD_SIDE, ODD_GRID = 200, 12, 5   # a masked channel tail (128 + 72) and a grid that does not divide

# Ceilings the floors are measured against, per GPU: read + write copy bandwidth (B/s), dense bf16/fp16 tensor-core
# and fp32 (CUDA-core FMA) FLOP/s. "measured" figures come from this project's runs (copy kernel; 8192³ bf16
# matmul), "datasheet" ones from NVIDIA's datasheets (H100 SXM5, H200 SXM, A100 SXM4 80GB; dense, no sparsity).
CEILINGS = {
    "H100": dict(arch=90, sm_count=132, copy=3.0e12, tensor=989e12, fp32=67e12,
                 source=dict(copy="measured (H100 80GB HBM3, triton 3.6)", tensor="datasheet", fp32="datasheet")),
    "H200": dict(arch=90, sm_count=132, copy=4.09e12, tensor=755e12, fp32=67e12,
                 source=dict(copy="measured (H200, triton 3.6)", tensor="measured (bf16 matmul 8192³)",
                             fp32="datasheet")),
    "A100": dict(arch=80, sm_count=108, copy=2.039e12, tensor=312e12, fp32=19.5e12,
                 source=dict(copy="datasheet", tensor="datasheet", fp32="datasheet")),
}

# Matrix products of Lq × Lk × D each attention kernel computes per (batch, head): the FLOP floor of one launch is
# 2 · products · B·H · Lq · Lk · D. dk/dv recomputes p and dp (q·kᵀ, dO·vᵀ) and makes dv, dk (+ dq when fused);
# dq recomputes both and makes dq.
ATTENTION_PRODUCTS = {"_attention_fwd_few_keys_kernel": 2, "_attention_fwd_kernel": 2,
                      "_attention_bwd_dkdv_kernel": 4, "_attention_bwd_dq_kernel": 3}

# Gate limits. Attention: at most this much spill per thread (bytes). Both families: at most this many 32-bit global
# accesses (static SASS instructions) that are not to a row-statistics tensor (see `_narrow`).
MAX_ATTENTION_SPILL = 128
MAX_SCALAR_ACCESSES = 8
# Occupancy targets: split-K's forward (its register-capped variants, sm_90) and the few-keys forward (sm_90, 16-bit
# inputs) keep MIN_FWD_CTAS CTAs per SM; the window reductions run at least MIN_WAVES waves of programs at the
# model's batch of 32.
MIN_FWD_CTAS = 3
MIN_WAVES = 4
WAVE_KERNELS = ("_token_pool_fwd_kernel", "_upsample_add_bwd_kernel")


# ----------------------------------------------------------------------------------------------------------------
# Recording (worker side): launchers on meta tensors, kernels replaced by recorders
# ----------------------------------------------------------------------------------------------------------------

def _mangle(arg, specialize: bool = True, align: bool = True):
    """(type, divisible_by_16) as `JITFunction.run` specializes an argument; ("constexpr", v) for an int equal to 1.
    specialize=False (a `do_not_specialize` parameter): an int is never a constexpr nor known divisible by 16;
    align=False (`do_not_specialize_on_alignment`): a pointer is not known 16-byte aligned."""
    import torch
    if isinstance(arg, torch.Tensor):
        names = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int32: "i32",
                 torch.int64: "i64"}
        return "*" + names[arg.dtype], align and arg.data_ptr() % 16 == 0
    if isinstance(arg, bool):
        return "u1", False
    if isinstance(arg, int):
        if arg == 1 and specialize:
            return "constexpr", False
        kind = "i32" if -2**31 <= arg < 2**31 else "i64" if -2**63 <= arg < 2**63 else "u64"
        return kind, specialize and align and arg % 16 == 0
    if isinstance(arg, float):
        return "fp32", False
    raise TypeError(f"cannot specialize {type(arg).__name__}")


def _tensor_bytes(tensors) -> int:
    """Bytes a launch touches at least once: per storage, the smaller of the union of the views' byte spans and the
    sum of their sizes (a q view of a fused qkv counts a third; dk[0] inside dk counts once)."""
    by_storage = {}
    for t in tensors:
        if t.numel() == 0:
            continue
        es = t.element_size()
        lo = t.storage_offset() * es
        hi = lo + es * (1 + sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride())))
        view = (lo, tuple(t.shape), tuple(t.stride()))
        by_storage.setdefault(t.untyped_storage()._cdata, {})[view] = (lo, hi, t.numel() * es)
    total = 0
    for views in by_storage.values():
        spans = sorted((lo, hi) for lo, hi, _ in views.values())
        union, end = 0, None
        for lo, hi in spans:
            if end is None or lo >= end:
                union += hi - lo
                end = hi
            elif hi > end:
                union += hi - end
                end = hi
        total += min(union, sum(n for _, _, n in views.values()))
    return total


class _Context:
    """What the driver is launching now: op, shape label, shape set and the attention sizes (for FLOP floors)."""
    now: Dict = {}


class _Recorder:
    """Stands in for a JITFunction: `kernel[grid](*args, **kwargs)` records the compile request instead of running."""

    OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")

    def __init__(self, jit, sink, launches, arch):
        self.jit, self.sink, self.launches, self.arch = jit, sink, launches, arch

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self._record(grid, *args, **kwargs)

    def _record(self, grid, *args, **kwargs):
        import torch
        jit = self.jit
        options = {k: kwargs.pop(k) for k in self.OPTIONS if k in kwargs}
        names = [p.name for p in jit.params]
        values = dict(zip(names, args))
        values.update(kwargs)
        missing = [n for n in names if n not in values]
        if missing:
            raise TypeError(f"{jit.__name__}: launcher passed no value for {missing}")
        signature, constexprs, attrs = {}, {}, {}
        for i, p in enumerate(jit.params):
            v = values[p.name]
            if p.is_constexpr:
                signature[p.name] = "constexpr"
                constexprs[(i,)] = v
                continue
            kind, div16 = _mangle(v, not p.do_not_specialize, not p.do_not_specialize_on_alignment)
            signature[p.name] = kind
            if kind == "constexpr":
                constexprs[(i,)] = v
            elif div16:
                attrs[(i,)] = [["tt.divisibility", 16]]
        key = json.dumps([self.arch, jit.__name__, signature, sorted((k[0], repr(v)) for k, v in constexprs.items()),
                          sorted(k[0] for k in attrs), sorted(options.items())])
        self.sink.setdefault(key, dict(arch=self.arch, jit=jit, signature=signature, constexprs=constexprs,
                                       attrs=attrs, options=options))
        if callable(grid):
            grid = grid(values)
        grid = tuple(int(g) for g in grid) + (1,) * (3 - len(grid))
        ctx = dict(_Context.now)
        products = ATTENTION_PRODUCTS.get(jit.__name__, 0) + (1 if values.get("FUSE_DQ") else 0)
        flops = 2 * products * ctx.get("bh", 0) * ctx.get("lq", 0) * ctx.get("lk", 0) * ctx.get("d", 0)
        tensors = [v for v in values.values() if isinstance(v, torch.Tensor)]
        self.launches.append(dict(key=key, op=ctx.get("op", ""), shape=ctx.get("shape", ""), set=ctx.get("set", ""),
                                  grid=list(grid), bytes=_tensor_bytes(tensors), flops=flops,
                                  dtype=str(tensors[0].dtype).replace("torch.", "") if tensors else ""))


@contextlib.contextmanager
def _op(op: str, shape: str, shape_set: str, **sizes):
    _Context.now = dict(op=op, shape=shape, set=shape_set, **sizes)
    try:
        yield
    finally:
        _Context.now = {}


def _kernel_modules():
    import flexdit_kernels  # noqa: F401 - the package imports the op modules
    return [m for name, m in sorted(sys.modules.items())
            if name.startswith("flexdit_kernels._") and m is not None]


def kernel_names() -> List[str]:
    """Every `@triton.jit` kernel (module-level name ending in `_kernel`) of flexdit_kernels."""
    return sorted({name for m in _kernel_modules() for name, obj in vars(m).items()
                   if name.endswith("_kernel") and hasattr(obj, "params") and hasattr(obj, "fn")})


@contextlib.contextmanager
def _recording(sink, launches, arch):
    """Kernels replaced by recorders, launchers accepting meta tensors, device facts those of `arch`."""
    import torch
    from flexdit_kernels import _launch, _validate
    mods = _kernel_modules()
    saved = []

    def patch(mod, name, value):
        saved.append((mod, name, getattr(mod, name)))
        setattr(mod, name, value)

    real_check = _validate.check_kernel_device

    def check_kernel_device(name, t):
        if t.device.type != "meta":
            real_check(name, t)

    for mod in mods:
        for name, obj in list(vars(mod).items()):
            if name.endswith("_kernel") and hasattr(obj, "params") and hasattr(obj, "fn"):
                patch(mod, name, _Recorder(obj, sink, launches, arch))
            elif obj is real_check:
                patch(mod, name, check_kernel_device)
    patch(_launch, "DEFAULT_TARGET", arch)                     # device_limits() of a non-CUDA device
    try:
        with torch.device("meta"):
            yield
    finally:
        for mod, name, value in reversed(saved):
            setattr(mod, name, value)


# ----------------------------------------------------------------------------------------------------------------
# The launches: what the model and the bench run
# ----------------------------------------------------------------------------------------------------------------

def _pool_ops(side, g, b, c, dt, shape_set):
    import torch
    import flexdit_kernels._token_pool as tp
    import flexdit_kernels._upsample_add as ua
    n, m, e = side * side, g * g, torch.empty
    shape = f"B={b} N={side}x{side} G={g} C={c}"
    with _op("token_pool", shape, shape_set):
        tp.token_pool_fwd(e(b, n, c, dtype=dt), side, g)
        tp.token_pool_bwd(e(b, m, c, dtype=dt), side, g)
    with _op("upsample_add", shape, shape_set):
        ua.upsample_add_fwd(e(b, m, c, dtype=dt), e(b, n, c, dtype=dt), side, g)
        ua.upsample_add_bwd(e(b, n, c, dtype=dt), side, g)


def _mean_ops(n, b, c, dt, shape_set):
    import torch
    import flexdit_kernels._token_mean as tm
    with _op("token_mean", f"B={b} N={n} C={c}", shape_set):
        tm.token_mean_fwd(torch.empty(b, n, c, dtype=dt))
        tm.token_mean_bwd(torch.empty(b, c, dtype=dt), torch.empty(b, n, c, dtype=dt))


def _adaln_ops(n, b, dt, shape_set):
    """The adaLN ops as the model calls them: fp32 residual stream, `dt` branch output, gate/shift/scale chunks of
    one (B, 6C) projection, LayerNorm-modulate output in `dt` (autocast); SiLU of the (B, C) conditioning."""
    import torch
    import flexdit_kernels._adaln as ad
    c, e = CHANNELS, torch.empty
    x32, ada, y = e(b, n, c), e(b, 6 * c, dtype=dt), e(b, n, c, dtype=dt)
    gate, shift, scale = (ada[:, i * c:(i + 1) * c] for i in (2, 3, 4))
    shape = f"B={b} N={n} C={c}"
    with _op("layernorm_modulate", shape, shape_set):
        ad.layernorm_modulate_fwd(x32, shift, scale, 1e-6, dt)
        ad.layernorm_modulate_bwd(y, x32, scale, 1e-6, dt)
    with _op("gated_residual", shape, shape_set):
        ad.gated_residual_fwd(x32, y, gate)
        ad.gated_residual_inplace_fwd(x32, y, gate)
        ad.gated_residual_bwd(x32, y, gate)
    with _op("gated_residual_layernorm_modulate", shape, shape_set):
        ad.gated_residual_layernorm_modulate_fwd(x32, y, gate, shift, scale, 1e-6, dt)
        ad.gated_residual_layernorm_modulate_bwd(x32, y, x32, y, gate, scale, 1e-6, dt)
    _silu_ops(b, dt, shape_set)


def _silu_ops(b, dt, shape_set):
    import torch
    import flexdit_kernels._adaln as ad
    c, e = CHANNELS, torch.empty
    with _op("silu", f"B={b} C={c}", shape_set):
        ad.silu_fwd(e(b, c), dt)
        ad.silu_bwd(e(b, c, dtype=dt), e(b, c))


def _attention_ops(b, lq, lk, h, d, dt, shape_set, fused=True, forced=False):
    """Forward and backward of one attention shape. fused: q, k, v are views of one (B, L, 3, H, D) projection
    (self-attention, Lq = Lk) or q of its own and k, v of one (B, Lk, 2, H, D) (cross-attention), as in the model.
    Shapes that the op sends to SDPA are skipped unless `forced` (the bench forces each path once)."""
    import torch
    import flexdit_kernels._attention as att
    if not forced and att.attention_path(lq, lk) == "sdpa":
        return
    e = torch.empty
    if fused and lq == lk:
        q, k, v = e(b, lq, 3, h, d, dtype=dt).unbind(2)
    elif fused:
        q = e(b, lq, h, d, dtype=dt)
        k, v = e(b, lk, 2, h, d, dtype=dt).unbind(2)
    else:
        q, k, v = (e(b, n, h, d, dtype=dt) for n in (lq, lk, lk))
    with _op("attention", f"B={b} Lq={lq} Lk={lk} H={h} D={d}", shape_set, bh=b * h, lq=lq, lk=lk, d=d):
        out, lse = att.attention_fwd(q, k, v, d ** -0.5)
        att.attention_bwd(e(b, lq, h, d, dtype=dt), q, k, v, out, lse, d ** -0.5)


def _model_launches(dt, sides, grids, batches, head_dims=(HEAD_DIM,)):
    """FlexDiT-XL/2: pooling and upsampling between the dense and sparse token grids, the token mean of the
    Poolingformer layers, the adaLN ops on both token counts, and attention: sparse self-attention (M, M), sparse
    generation (M queries over the N dense tokens) and recovery (N queries over M keys)."""
    for side in sides:
        n = side * side
        for g in grids:
            m = g * g
            for b in batches:
                _pool_ops(side, g, b, CHANNELS, dt, "model")
                for d in head_dims:
                    for lq, lk in ((m, m), (m, n), (n, m)):
                        _attention_ops(b, lq, lk, CHANNELS // d, d, dt, "model")
        for n_tok in {n} | {g * g for g in grids}:
            for b in batches:
                _mean_ops(n_tok, b, CHANNELS, dt, "model")
                _adaln_ops(n_tok, b, dt, "model")


def _bench_launches(dt):
    """`python -m bench kernels` at its GPU shapes: every case of every op family, forward and backward."""
    from .kernels import GPU_SHAPES, OPS, cases
    for op in OPS:
        for case in cases(op, GPU_SHAPES):
            p = case.params
            if op == "attention":
                _attention_ops(p["b"], p["lq"], p["lk"], p["h"], p["d"], dt, "bench", fused=False,
                               forced=p.get("forced", False))
            elif op == "token_mean":
                _mean_ops(p["side"] ** 2, p["b"], p["c"], dt, "bench")
            elif op in ("token_pool", "upsample_add"):
                _pool_ops(p["side"], p["g"], p["b"], p["c"], dt, "bench")
            elif op in ("layernorm_modulate", "gated_residual", "gated_residual_layernorm_modulate"):
                _adaln_ops(p["side"] ** 2, p["b"], dt, "bench")
            elif op == "silu":
                _silu_ops(p["b"], dt, "bench")
            else:
                raise ValueError(f"bench kernels has an op this report does not drive: {op!r}")


def _odd_launches(dt, wide):
    """Masked channel tails and a grid that does not divide the token grid; with `wide`, the int64-index variants
    (forced at a small shape: a batch entry of 2**31 elements or more selects them)."""
    import flexdit_kernels._grid_ops as go
    import flexdit_kernels._token_mean as tm
    import flexdit_kernels._token_pool as tp
    import flexdit_kernels._upsample_add as ua
    _pool_ops(ODD_SIDE, ODD_GRID, 1, ODD_CHANNELS, dt, "odd")
    _mean_ops(ODD_SIDE ** 2, 1, ODD_CHANNELS, dt, "odd")
    if not wide:
        return
    mods = [m for m in (go, tm, tp, ua) if hasattr(m, "fits_int32")]
    real = [m.fits_int32 for m in mods]
    for m in mods:
        m.fits_int32 = lambda *tensors: False
    try:
        _pool_ops(32, 8, 1, CHANNELS, dt, "odd")
        _mean_ops(1024, 1, CHANNELS, dt, "odd")
    finally:
        for m, fn in zip(mods, real):
            m.fits_int32 = fn


def _drive(shapes: str, dtypes: Sequence[str], arch: int):
    import torch
    names = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    for dt in (names[d] for d in dtypes):
        if shapes == "ci":
            # The CI gates' representative set: one sparse grid, both token grids for the pooling ops, the masked
            # channel tails on sm_90 only (they compile slowly and are gated only on compiling and fitting).
            # B = 8 (not 32) so that split-K splits the keys and launches its combine kernel; the window reductions
            # also at B = 32 (the waves gate), on the grid with the fewest windows.
            _model_launches(dt, sides=(32,), grids=(10,), batches=(8,))
            _pool_ops(16, 8, 8, CHANNELS, dt, "model")
            _pool_ops(32, 6, 32, CHANNELS, dt, "model")
            if arch == 90:
                _odd_launches(dt, wide=False)
            continue
        if shapes in ("model", "all"):
            _model_launches(dt, SIDES, GRIDS, BATCHES, head_dims=(HEAD_DIM, 64) if shapes == "all" else (HEAD_DIM,))
        if shapes in ("bench", "all"):
            _bench_launches(dt)
        if shapes == "all":
            _odd_launches(dt, wide=True)


def _broken(requests: dict) -> List[dict]:
    """Deliberately broken sm_90 variants, each of which a gate must report: a memory-bound kernel without its
    alignment facts (no pointer or stride known to be a multiple of 16 bytes, as when a hint is removed), a
    memory-bound and an attention kernel held to fewer registers than they need (`maxnreg`: they spill), and the
    few-keys forward over 64 keys with a 64-row query tile prefetched (`num_stages=2`: 2 CTAs per SM)."""
    wanted = {"_adaln_fwd_kernel": ("no-hint", dict(attrs={})),
              "_adaln_bwd_kernel": ("spill", dict(options=dict(maxnreg=32))),
              "_attention_fwd_kernel": ("attention-spill", dict(options=dict(maxnreg=96))),
              "_attention_fwd_few_keys_kernel": ("few-keys-tile", dict(constexprs=dict(BLOCK_M=64),
                                                                       options=dict(num_stages=2)))}
    out = {}
    for req in requests.values():
        name = req["jit"].__name__
        if req["arch"] != 90 or name not in wanted or wanted[name][0] in out:
            continue
        params = [p.name for p in req["jit"].params]
        consts = {params[k[0]]: v for k, v in req["constexprs"].items()}
        if name == "_attention_fwd_few_keys_kernel" and (consts["BLOCK_N"] <= 64 or consts["PRECISION"] == "ieee"):
            continue                                      # over 64 keys, 16-bit: where its tile is the smaller one
        label, change = wanted[name]
        out[label] = dict(req, attrs=change.get("attrs", req["attrs"]),
                          options=dict(req["options"], **change.get("options", {})),
                          constexprs={**req["constexprs"],
                                      **{(params.index(n),): v for n, v in change.get("constexprs", {}).items()}},
                          broken=label)
    return list(out.values())


# ----------------------------------------------------------------------------------------------------------------
# Compiling and reading the cubin (worker side)
# ----------------------------------------------------------------------------------------------------------------

_REQUESTS: List[dict] = []


def _tool(name: str) -> str:
    import triton
    try:
        from triton import knobs
        path = getattr(knobs.nvidia, name).path
        if path and os.path.exists(path):
            return path
    except Exception:   # noqa: BLE001 - fall back to the bundled copy
        pass
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


_ACCESS = re.compile(r"^\s*(?:@!?U?P\w+\s+)?(LDGSTS|LDG|STG|LDL|STL|HGMMA|HMMA)(\.[\w.]*)?\b")
_LINE_INFO = re.compile(r'^\s*//## File "([^"]+)", line (\d+)')
_UPPER = re.compile(r"\b[A-Z][A-Z0-9_]*\b")

# Tensors of one fp32 value per row (attention's log-sum-exp, delta, split-K m and l): their accesses may be scalar.
ROW_STATS = ("LSE", "DELTA", "WS_ML", "ML")


def _tensor_of(path: str, line: int, constexprs: Sequence[str], sources: dict, body=None) -> Optional[str]:
    """The tensor a load/store at `path:line` (the call in the kernel body) names: the first UPPER identifier of
    that source line that is not a constexpr (pointers are UPPER: `q = _load_rows(Q, ...)`, `tl.store(LSE + ...)`).
    None when the line is outside `body` (path, first line, last line of the kernel): ptxas kept only the line of
    an inlined helper, whose parameter names say nothing of the caller's tensor."""
    if body is not None and (os.path.realpath(path) != os.path.realpath(body[0])
                             or not body[1] <= line <= body[2]):
        return None
    if path not in sources:
        try:
            with open(path) as f:
                sources[path] = f.read().splitlines()
        except OSError:
            sources[path] = []
    lines = sources[path]
    if not 0 < line <= len(lines):
        return None
    names = [t for t in _UPPER.findall(lines[line - 1]) if t not in constexprs]
    return names[0] if names else None


def read_sass(sass: str, constexprs: Sequence[str] = (), body=None) -> dict:
    """Counts of static instructions in SASS text (`cuobjdump -sass`, or `nvdisasm -gi` with line info): global
    loads/stores and cp.async by width in bits ("ldg": {"16": n, "128": n, ...}), tensor-core instructions (HGMMA
    on sm_90, HMMA mma.sync on either target) and local-memory loads/stores (LDL/STL: spills and stack arrays).
    With line info, "by_tensor" counts global accesses per tensor and width: {"Q": {"16": n}, ...}; the tensor is
    read from the kernel's source line of the access (the outermost call site of an inlined helper; "?" when the
    line info names no line of `body`, the kernel's (path, first line, last line))."""
    out = {"ldg": {}, "stg": {}, "ldgsts": {}, "hgmma": 0, "hmma": 0, "ldl": 0, "stl": 0, "by_tensor": {}}
    where, sources = None, {}
    for line in sass.splitlines():
        info = _LINE_INFO.match(line)
        if info:
            outer = re.findall(r'"([^"]+)", line (\d+)', line)[-1]     # the last "inlined at" is the kernel body
            where = (outer[0], int(outer[1]))
            continue
        code = line.split("*/", 1)[-1] if "*/" in line else line
        m = _ACCESS.match(code)
        if not m:
            continue
        op, mods = m.group(1), [x for x in (m.group(2) or "").split(".") if x]
        if op in ("HGMMA", "HMMA", "LDL", "STL"):
            out[op.lower()] += 1
            continue
        width = 32
        for mod in mods:
            if mod in ("U8", "S8"):
                width = 8
            elif mod in ("U16", "S16"):
                width = 16
            elif mod in ("64", "128"):
                width = int(mod)
        counts = out[op.lower()]
        counts[str(width)] = counts.get(str(width), 0) + 1
        tensor = _tensor_of(where[0], where[1], constexprs, sources, body) if where else None
        per = out["by_tensor"].setdefault(tensor or "?", {})
        per[str(width)] = per.get(str(width), 0) + 1
    return out


def read_res_usage(text: str) -> dict:
    """REG, STACK, SHARED, LOCAL of the (one) function in `cuobjdump -res-usage` text."""
    found = {k.lower(): int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text)}
    return {"regs": found.get("reg"), "stack": found.get("stack"), "shared_static": found.get("shared"),
            "local": found.get("local")}


def read_ptxas_log(text: str) -> dict:
    """Spill store/load bytes and the stack frame from a `ptxas -v` log."""
    def grab(pattern):
        m = re.search(pattern, text)
        return int(m.group(1)) if m else None
    return {"spill_stores": grab(r"(\d+) bytes spill stores"), "spill_loads": grab(r"(\d+) bytes spill loads"),
            "stack_frame": grab(r"(\d+) bytes stack frame")}


def _run_tool(args: List[str]) -> str:
    return subprocess.run(args, capture_output=True, text=True, check=True).stdout


def _compile_one(index: int) -> dict:
    """Compile _REQUESTS[index] (an index, so a forked worker needs no pickled JITFunction) and read its cubin."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    req = _REQUESTS[index]
    arch = req["arch"]
    t0 = time.perf_counter()
    row = {"error": None}
    log = io.StringIO()
    try:
        knobs.nvidia.dump_ptxas_log = True                  # the ptxas -v log of the compile is printed
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(req["jit"], req["signature"], req["constexprs"], req["attrs"]),
                                      target=GPUTarget("cuda", arch, 32), options=req["options"])
        row["shared"] = compiled.metadata.shared
        row["num_warps"] = compiled.metadata.num_warps
        row["num_stages"] = compiled.metadata.num_stages
        spills = read_ptxas_log(log.getvalue())
        with tempfile.TemporaryDirectory() as tmp:
            cubin = os.path.join(tmp, "k.cubin")
            with open(cubin, "wb") as f:
                f.write(compiled.asm["cubin"])
            if spills["spill_stores"] is None:             # no log printed: run ptxas -v on the PTX again
                ptx = os.path.join(tmp, "k.ptx")
                with open(ptx, "w") as f:
                    f.write(compiled.asm["ptx"])
                gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
                extra = [f"--maxrregcount={req['options']['maxnreg']}"] if req["options"].get("maxnreg") else []
                from triton.backends.nvidia.compiler import get_ptxas   # the ptxas this triton uses for arch
                spills = read_ptxas_log(subprocess.run([get_ptxas(arch).path, "-v", *extra, f"--gpu-name={gpu}", ptx,
                                                        "-o", cubin + ".2"], capture_output=True, text=True).stderr)
            row.update(spills)
            row.update(read_res_usage(_run_tool([_tool("cuobjdump"), "-res-usage", cubin])))
            consts = [p.name for p in req["jit"].params if p.is_constexpr]
            lines, first = inspect.getsourcelines(req["jit"].fn)
            body = (inspect.getsourcefile(req["jit"].fn), first, first + len(lines) - 1)
            row.update(read_sass(_run_tool([_tool("nvdisasm"), "-gi", "-c", cubin]), consts, body))
    except Exception as exc:   # noqa: BLE001 - every failure is reported, not raised
        row["error"] = f"{type(exc).__name__}: {exc}"[-3000:]
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


def _skip_reason() -> Optional[str]:
    """Why this environment cannot compile for CUDA (None when it can)."""
    try:
        from triton.backends import backends
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except Exception as exc:   # noqa: BLE001
        return f"triton lacks the AOT compiler API: {exc}"
    if "nvidia" not in backends:
        return "triton has no CUDA backend"
    for tool in ("ptxas", "cuobjdump", "nvdisasm"):
        if not os.path.exists(_tool(tool)):
            return f"triton ships no {tool}"
    return None


def _occupancy(row: dict, arch: int) -> None:
    """CTAs per SM and the limiting resource; a launch that cannot fit gets an error saying why."""
    from flexdit_kernels._launch import ctas_per_sm, TARGETS
    limits = TARGETS[arch]
    if row["error"] or row.get("regs") is None:
        row["ctas_per_sm"], row["limiter"] = 0, "error"
        return
    row["ctas_per_sm"], row["limiter"] = ctas_per_sm(row["regs"], row["num_warps"], row["shared"], limits)
    if row["shared"] > limits.smem_per_block:
        # ptxas accepts it; the launch would fail with "out of resources".
        row["error"] = (f"needs {row['shared']} B of shared memory, sm_{arch} allows {limits.smem_per_block} B "
                        "per block")
    elif row["ctas_per_sm"] == 0:
        row["error"] = f"does not fit one SM of sm_{arch} ({row['limiter']})"


def _floors(launch: dict, row: dict, arch: int) -> dict:
    """Byte and FLOP floors of one launch on each GPU of the row's target: µs at the ceiling, and waves."""
    out = {}
    tensor_cores = row.get("hgmma", 0) + row.get("hmma", 0) > 0
    for gpu, c in CEILINGS.items():
        if c["arch"] != arch:
            continue
        byte_us = launch["bytes"] / c["copy"] * 1e6
        flop_us = launch["flops"] / (c["tensor"] if tensor_cores else c["fp32"]) * 1e6
        per_wave = max(row.get("ctas_per_sm") or 0, 1) * c["sm_count"]
        programs = launch["grid"][0] * launch["grid"][1] * launch["grid"][2]
        out[gpu] = dict(byte_us=round(byte_us, 2), flop_us=round(flop_us, 2), floor_us=round(max(byte_us, flop_us), 2),
                        bound="flops" if flop_us > byte_us else "bytes", waves=round(programs / per_wave, 2))
    return out


def _describe(req: dict) -> dict:
    jit = req["jit"]
    names = [p.name for p in jit.params]
    consts = {names[k[0]]: v for k, v in req["constexprs"].items() if jit.params[k[0]].is_constexpr}
    dtypes = sorted({t[1:] for t in req["signature"].values() if t.startswith("*")})
    return {"kernel": jit.__name__, "dtypes": dtypes, "constexprs": consts,
            "aligned_args": [names[k[0]] for k in sorted(req["attrs"])], "options": dict(req["options"])}


def worker_main(argv: List[str]) -> int:
    """Record, compile and read every variant; print the report as one JSON line."""
    p = argparse.ArgumentParser(prog="python -m bench.static --worker")
    p.add_argument("--worker", action="store_true")
    p.add_argument("--arch", required=True)
    p.add_argument("--shapes", required=True)
    p.add_argument("--dtypes", required=True)
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--broken", action="store_true")
    args = p.parse_args(argv)
    reason = _skip_reason()
    if reason:
        print(json.dumps({"skip": reason}))
        return 0
    import triton
    import flexdit_kernels
    t0 = time.perf_counter()
    requests, launches = {}, []
    for arch in (int(a) for a in args.arch.split(",")):
        with _recording(requests, launches, arch):
            _drive(args.shapes, args.dtypes.split(","), arch)
    for req in requests.values():
        req["broken"] = None
    _REQUESTS[:] = list(requests.values()) + (_broken(requests) if args.broken else [])
    if args.jobs > 1:
        # fork after recording: the workers inherit the JITFunctions and the recorded requests.
        import multiprocessing
        with multiprocessing.get_context("fork").Pool(args.jobs) as pool:
            rows = pool.map(_compile_one, range(len(_REQUESTS)), chunksize=1)
    else:
        rows = [_compile_one(i) for i in range(len(_REQUESTS))]
    keys = list(requests) + [None] * (len(_REQUESTS) - len(requests))
    variants = []
    for key, req, row in zip(keys, _REQUESTS, rows):
        row.update(_describe(req), arch=req["arch"], broken=req["broken"])
        row.setdefault("num_warps", req["options"].get("num_warps"))
        row.setdefault("num_stages", req["options"].get("num_stages"))
        _occupancy(row, req["arch"])
        row["launches"] = [dict({k: v for k, v in l.items() if k != "key"}, ceilings=_floors(l, row, req["arch"]))
                           for l in launches if key is not None and l["key"] == key]
        variants.append(row)
    print(json.dumps({"variants": variants, "seconds": round(time.perf_counter() - t0, 1),
                      "triton": triton.__version__, "archs": [int(a) for a in args.arch.split(",")],
                      "shapes": args.shapes, "dtypes": args.dtypes.split(","),
                      "kernels": kernel_names(), "ceilings": CEILINGS,
                      "kernels_from": os.path.dirname(os.path.abspath(flexdit_kernels.__file__))}))
    return 0


# ----------------------------------------------------------------------------------------------------------------
# Driver side: run the worker, gates, table
# ----------------------------------------------------------------------------------------------------------------

class StaticError(RuntimeError):
    """The worker failed (not a variant: those are reported in their rows)."""


def collect(archs: Iterable[int] = ARCHS, shapes: str = "model", dtypes: Sequence[str] = ("bf16",), jobs: int = 1,
            broken: bool = False, cache_dir: Optional[str] = None, python: Optional[str] = None,
            timeout: float = 3600) -> dict:
    """Run the worker in a subprocess without TRITON_INTERPRET and return its report ({"skip": reason} when this
    triton cannot compile for CUDA). cache_dir: the TRITON_CACHE_DIR (default: a fresh temporary one, so every
    variant is compiled for real and its ptxas log read, not taken from a warm cache); python: another interpreter
    (a venv with another triton)."""
    archs = [int(a) for a in archs]
    for a in archs:
        if a not in ARCHS:
            raise ValueError(f"archs: {a} is not a target this report knows ({', '.join(map(str, ARCHS))})")
    if shapes not in SHAPE_SETS:
        raise ValueError(f"shapes: {shapes!r} is not one of {', '.join(SHAPE_SETS)}")
    bad = [d for d in dtypes if d not in DTYPE_NAMES]
    if bad or not dtypes:
        raise ValueError(f"dtypes: {list(dtypes)} must be a non-empty subset of {', '.join(DTYPE_NAMES)}")
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [python or sys.executable, "-m", "bench.static", "--worker", "--arch", ",".join(map(str, archs)),
           "--shapes", shapes, "--dtypes", ",".join(dtypes), "--jobs", str(jobs)] + (["--broken"] if broken else [])
    with tempfile.TemporaryDirectory(prefix="flexdit-static-") as fresh:
        env["TRITON_CACHE_DIR"] = cache_dir or fresh
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise StaticError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-5000:]}")
    return json.loads(lines[-1])


def _narrow(v: dict, strict: bool) -> List[str]:
    """The width rule of both gates. Every global access (LDG, STG, LDGSTS) is 128-bit, except those to the row
    statistics (ROW_STATS, one fp32 per row) and at most MAX_SCALAR_ACCESSES 32-bit ones to a tensor the line info
    does not name ("?"), or, unless `strict`, to any tensor. So an 8-, 16- or 64-bit access to a named data tensor
    always fails, and with `strict` (attention) a 32-bit one does too: in a 16-bit kernel it moves 2 elements."""
    by_tensor = v.get("by_tensor")
    if not by_tensor:
        by_tensor = {"?": {}}
        for kind in ("ldg", "stg", "ldgsts"):
            for w, n in v.get(kind, {}).items():
                by_tensor["?"][w] = by_tensor["?"].get(w, 0) + n
    out, scalar = [], 0
    for tensor, widths in sorted(by_tensor.items()):
        if tensor in ROW_STATS:
            continue
        for width, n in sorted(((int(w), n) for w, n in widths.items())):
            if width == 128 or not n:
                continue
            if width == 32 and (tensor == "?" or not strict):
                scalar += n
                continue
            out.append(f"{n} {width}-bit global accesses to {tensor} (want 128-bit)")
    if scalar > MAX_SCALAR_ACCESSES:
        out.append(f"{scalar} 32-bit global accesses (at most {MAX_SCALAR_ACCESSES} scalar ones allowed)")
    return out


def _spill(v: dict) -> int:
    return max(v.get("spill_stores") or 0, v.get("spill_loads") or 0)


def gate_fits(v: dict) -> List[str]:
    """Compiles, and fits its target (registers, shared memory, threads): [] or the reasons it does not."""
    if v.get("error"):
        return [v["error"].splitlines()[0][:300]]
    if not v.get("ctas_per_sm"):
        return [f"no CTA fits one SM ({v.get('limiter')})"]
    return []


def gate_attention(v: dict) -> List[str]:
    """Attention: tensor-core instructions in every kernel that multiplies matrices, 16-byte global accesses (the
    width rule), at most MAX_ATTENTION_SPILL bytes of spill per thread."""
    out = []
    if v["kernel"] in ATTENTION_PRODUCTS and not (v.get("hgmma", 0) + v.get("hmma", 0)):
        out.append("no tensor-core instruction (HGMMA/HMMA)")
    out += _narrow(v, strict=True)
    if _spill(v) > MAX_ATTENTION_SPILL:
        out.append(f"{_spill(v)} B spill per thread (at most {MAX_ATTENTION_SPILL})")
    return out


def gate_memory_bound(v: dict) -> List[str]:
    """Memory-bound kernels: 16-byte global accesses (the width rule) and no spill."""
    out = _narrow(v, strict=False)
    if _spill(v):
        out.append(f"{_spill(v)} B spill per thread (want none)")
    return out


def gate_occupancy(v: dict) -> List[str]:
    """The occupancy targets: MIN_FWD_CTAS CTAs per SM for an attention forward held to a register budget
    (`maxnreg`: split-K) and for the few-keys forward on sm_90 (16-bit inputs: fp32 goes to SDPA), MIN_WAVES waves
    for every B = 32 launch of a window reduction (WAVE_KERNELS)."""
    out = []
    capped = v["kernel"] == "_attention_fwd_kernel" and (v.get("options") or {}).get("maxnreg")
    few_keys = (v["kernel"] == "_attention_fwd_few_keys_kernel" and v.get("arch") == 90
                and (v.get("constexprs") or {}).get("PRECISION") != "ieee")
    if (capped or few_keys) and (v.get("ctas_per_sm") or 0) < MIN_FWD_CTAS:
        out.append(f"{v.get('ctas_per_sm')} CTAs per SM (want {MIN_FWD_CTAS})")
    if v["kernel"] in WAVE_KERNELS:
        for launch in v.get("launches", []):
            waves = min((c["waves"] for c in launch.get("ceilings", {}).values()), default=MIN_WAVES)
            if launch["shape"].startswith("B=32 ") and waves < MIN_WAVES:
                out.append(f"{waves} waves at {launch['shape']} (want {MIN_WAVES})")
    return out


def is_attention(v: dict) -> bool:
    return v["kernel"].startswith("_attention")


def gate(v: dict) -> List[str]:
    """Every gate that applies to a variant: fits always; the width/spill gates for the model's and the bench's
    shapes (not the masked-tail and int64 shapes of `--shapes all`, whose channel count Triton cannot prove to be a
    multiple of 8)."""
    out = gate_fits(v)
    if out:
        return out
    if v.get("broken") or any(l["set"] in ("model", "bench") for l in v.get("launches", [])):
        out += (gate_attention(v) if is_attention(v) else gate_memory_bound(v)) + gate_occupancy(v)
    return out


def _widths(counts: Dict[str, int]) -> str:
    return " ".join(f"{w}:{n}" for w, n in sorted(((int(w), n) for w, n in counts.items()), reverse=True)) or "-"


def _narrow_by_tensor(v: dict) -> str:
    """Accesses narrower than 128 bits per tensor: "Q:16x64 LSE:32x1" ("?": no line info)."""
    parts = [f"{t}:{w}x{n}" for t, widths in sorted((v.get("by_tensor") or {}).items())
             for w, n in sorted(((int(w), n) for w, n in widths.items())) if w != 128 and n]
    return " ".join(parts) or "-"


def _short_consts(consts: dict) -> str:
    abbrev = {"HEAD_DIM": "D", "BLOCK_D": "BD", "BLOCK_M": "BM", "BLOCK_N": "BN", "BLOCK_C": "BC",
              "PRECISION": "prec"}
    return " ".join(f"{abbrev.get(k, k)}={v}" for k, v in consts.items())


def table(report: dict) -> str:
    """One line per variant: the columns of docs/static-report.md."""
    head = ("sm", "kernel", "dtype", "constexprs", "w", "st", "regs", "spill", "stack", "smem", "CTA/SM",
            "LDG bits:n", "STG bits:n", "LDGSTS", "narrow tensor:bits x n", "MMA", "LDL/STL", "floor µs", "waves",
            "gates")
    rows = []
    for v in report["variants"]:
        floors = [(g, c["floor_us"], c["bound"], c["waves"]) for l in v["launches"] for g, c in l["ceilings"].items()]
        gpus = sorted({g for g, *_ in floors})
        floor = "; ".join(
            f"{g} {min(f for h, f, _, _ in floors if h == g):g}–{max(f for h, f, _, _ in floors if h == g):g}"
            + ("F" if any(b == "flops" for h, _, b, _ in floors if h == g) else "") for g in gpus) or "-"
        waves = [w for *_, w in floors]
        mma = v.get("hgmma", 0) and f"HGMMA:{v['hgmma']}" or v.get("hmma", 0) and f"HMMA:{v['hmma']}" or "-"
        fails = gate(v)
        kernel = v["kernel"].lstrip("_").replace("_kernel", "") + (f" [broken: {v['broken']}]" if v.get("broken")
                                                                    else "")
        if v.get("error"):
            rows.append((f"{v['arch']}", kernel, ",".join(v["dtypes"]), _short_consts(v["constexprs"]),
                         str(v.get("num_warps")), str(v.get("num_stages")), *["-"] * 13,
                         "FAIL: " + v["error"].splitlines()[0][:160]))
            continue
        rows.append((f"{v['arch']}", kernel, ",".join(v["dtypes"]), _short_consts(v["constexprs"]),
                     str(v["num_warps"]), str(v["num_stages"]), str(v["regs"]), str(_spill(v)), str(v["stack"]),
                     str(v["shared"]), f"{v['ctas_per_sm']} {v['limiter']}", _widths(v["ldg"]), _widths(v["stg"]),
                     _widths(v["ldgsts"]), _narrow_by_tensor(v), mma, f"{v['ldl']}/{v['stl']}", floor,
                     f"{min(waves):g}–{max(waves):g}" if waves else "-", "ok" if not fails else "FAIL: " +
                     "; ".join(fails)))
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head] + rows]
    return "\n".join([lines[0], "-" * len(lines[0])] + lines[1:])


def summary(report: dict) -> str:
    gpus = "; ".join(f"{g} (sm_{c['arch']}, {c['sm_count']} SMs): copy {c['copy'] / 1e12:g} TB/s "
                     f"{c['source']['copy']}, tensor {c['tensor'] / 1e12:g} TFLOP/s {c['source']['tensor']}, fp32 "
                     f"{c['fp32'] / 1e12:g} TFLOP/s {c['source']['fp32']}" for g, c in report["ceilings"].items())
    fails = sum(1 for v in report["variants"] if gate(v))
    errors = sum(1 for v in report["variants"] if gate_fits(v))
    return (f"triton {report['triton']}, targets {', '.join(f'sm_{a}' for a in report['archs'])}, shapes "
            f"{report['shapes']}, dtypes {','.join(report['dtypes'])}: {len(report['variants'])} variants, "
            f"{errors} fail to compile or fit, {fails} fail a gate ({report['seconds']} s)\nceilings: {gpus}\n"
            "floor µs: bytes / copy bandwidth or FLOPs / peak, whichever is larger (F: some launch FLOP-bound), "
            "min–max over the launches that use the variant; waves: programs / (CTAs per SM × SMs)")


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------

def _archs(text: str) -> List[int]:
    try:
        archs = [int(a) for a in text.split(",") if a.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected compute capabilities like 80,90, got {text!r}") from None
    bad = [a for a in archs if a not in ARCHS]
    if not archs or bad:
        raise argparse.ArgumentTypeError(f"choose from {','.join(map(str, ARCHS))}, got {text!r}")
    return archs


def _dtypes(text: str) -> List[str]:
    names = [d.strip() for d in text.split(",") if d.strip()]
    if not names or any(d not in DTYPE_NAMES for d in names):
        raise argparse.ArgumentTypeError(f"choose from {','.join(DTYPE_NAMES)}, got {text!r}")
    return names


def add_parser(subparsers) -> argparse.ArgumentParser:
    """The `static` sub-command of `python -m bench`."""
    from .common import positive_int
    s = subparsers.add_parser("static", help="compile every kernel launch for sm_90/sm_80 on the CPU and report "
                                             "registers, spills, shared memory, occupancy, access widths, floors")
    s.add_argument("--arch", type=_archs, default=list(ARCHS), metavar="LIST",
                   help="compute capabilities to compile for (default 90,80: H100/H200 and A100)")
    s.add_argument("--shapes", choices=SHAPE_SETS, default="model",
                   help="model: FlexDiT-XL/2's launches (default); bench: `bench kernels` at its GPU shapes; all: "
                        "both plus D=64, masked channel tails and the int64-index variants; ci: the gates' "
                        "representative set")
    s.add_argument("--dtypes", type=_dtypes, default=None, metavar="LIST",
                   help="bf16,fp16,fp32 (default bf16; all three with --shapes all)")
    s.add_argument("--jobs", type=positive_int, default=os.cpu_count() or 1,
                   help="parallel compiles (default: the CPU count)")
    s.add_argument("--json", metavar="PATH", help="write the full report (every variant and launch) as JSON")
    s.add_argument("--broken", action="store_true", help="also compile the deliberately broken variants the "
                                                         "gates must catch")
    return s


def run(args) -> int:
    prog = f"{args.prog} static" if hasattr(args, "prog") else PROG     # the harness's name, as typed
    dtypes = args.dtypes or (list(DTYPE_NAMES) if args.shapes == "all" else ["bf16"])
    try:
        report = collect(args.arch, args.shapes, dtypes, args.jobs, broken=args.broken)
    except StaticError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    if "skip" in report:
        print(f"{prog}: error: cannot compile for CUDA here: {report['skip']}", file=sys.stderr)
        return 2
    print(summary(report))
    print(table(report))
    if args.json:
        try:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1)
        except OSError as err:
            print(f"{prog}: error: cannot write {args.json}: {err}", file=sys.stderr)
            return 2
    return 1 if any(gate_fits(v) for v in report["variants"] if not v.get("broken")) else 0


if __name__ == "__main__":
    if "--worker" in sys.argv[1:]:
        sys.exit(worker_main(sys.argv[1:]))
    parser = argparse.ArgumentParser(prog=PROG.rsplit(" ", 1)[0])    # its sub-parser adds " static"
    add_parser(parser.add_subparsers(dest="command", required=True))
    sys.exit(run(parser.parse_args(["static", *sys.argv[1:]])))
