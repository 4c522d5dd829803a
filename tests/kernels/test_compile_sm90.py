"""Ahead-of-time compilation of every Triton kernel for an H100/H200 (sm_90), no GPU needed.

The interpreter (what the other kernel tests run on the CPU) accepts code that the real compiler rejects, so this
test drives each launcher at the DiT-XL/2 shapes with its kernels replaced by recorders, turns every recorded call
into the (signature, constexprs, divisibility attributes, options) that `JITFunction.run` would build, and compiles
it for GPUTarget("cuda", 90, 32) down to a cubin (ptxas included). Block sizes and flags thus come from the
launchers' own code, whatever it is.

`tests/conftest.py` sets TRITON_INTERPRET=1 before kernel modules are imported, which makes `@triton.jit` return
interpreter objects that `triton.compile` cannot take, so the compilation runs in one subprocess without it (this
file run as a script), which reports each variant as JSON.

Run directly: `python tests/kernels/test_compile_sm90.py [--all] [--jobs N]` prints the JSON report.
"""
import json
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# DiT-XL/2: C = 1152, 16 heads of 72 (and 18 heads of 64 for D = 64); token grids 32x32 (512 px) and 16x16 (256 px);
# FlexDiT sparse grids G in {6, 8, 10}.
CHANNELS = 1152
HW = (32, 16)
GRIDS = (6, 8, 10)
HEAD_DIMS = (72, 64)
BATCHES = (1, 32)
ODD_CHANNELS = 200      # pool / mean / upsample-add: one block of 128 and a masked tail of 72


# ----------------------------------------------------------------------------------------------------------------
# Subprocess side: record launches, compile them
# ----------------------------------------------------------------------------------------------------------------

def _mangle(arg):
    """(type, divisible_by_16) as `JITFunction.run` specializes an argument; ("constexpr", v) for an int equal to 1."""
    import torch
    if isinstance(arg, torch.Tensor):
        names = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int32: "i32",
                 torch.int64: "i64"}
        return "*" + names[arg.dtype], arg.data_ptr() % 16 == 0
    if isinstance(arg, bool):
        return "u1", False
    if isinstance(arg, int):
        if arg == 1:
            return "constexpr", False
        kind = "i32" if -2**31 <= arg < 2**31 else "i64" if -2**63 <= arg < 2**63 else "u64"
        return kind, arg % 16 == 0
    if isinstance(arg, float):
        return "fp32", False
    raise TypeError(f"cannot specialize {type(arg).__name__}")


class _Recorder:
    """Stands in for a JITFunction: `kernel[grid](*args, **kwargs)` records the compile request instead of running."""

    OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")

    def __init__(self, jit, sink):
        self.jit, self.sink = jit, sink

    def __getitem__(self, grid):
        return self._record

    def _record(self, *args, **kwargs):
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
            kind, div16 = _mangle(v)
            signature[p.name] = kind
            if kind == "constexpr":
                constexprs[(i,)] = v
            elif div16:
                attrs[(i,)] = [["tt.divisibility", 16]]
        key = json.dumps([jit.__name__, signature, sorted((k[0], repr(v)) for k, v in constexprs.items()),
                          sorted(k[0] for k in attrs), sorted(options.items())])
        self.sink.setdefault(key, (jit, signature, constexprs, attrs, options))


def _record_all(full):
    """Drive every launcher at the DiT-XL/2 shapes; returns {key: compile request}, deduplicated."""
    import torch
    import flexdit_kernels  # noqa: F401 - the package imports the op modules

    sink = {}
    mods = [sys.modules[f"flexdit_kernels._{m}"] for m in ("attention", "token_mean", "token_pool", "upsample_add",
                                                           "adaln")]
    for mod in mods:
        for name, obj in list(vars(mod).items()):
            if hasattr(obj, "params") and hasattr(obj, "fn") and name.endswith("_kernel"):
                setattr(mod, name, _Recorder(obj, sink))
    # The launchers accept CPU tensors only when the interpreter runs; they launch nothing here (recorders).
    os.environ["TRITON_INTERPRET"] = "1"
    att, tm, tp, ua, ad = mods

    dtypes = (torch.float32, torch.float16, torch.bfloat16) if full else (torch.bfloat16,)
    hws = HW if full else (32,)
    grids = GRIDS if full else (10,)
    batches = BATCHES if full else (1,)
    e = torch.empty
    for dt in dtypes:
        for s in hws:
            n = s * s
            for g in grids:
                m = g * g
                for b in batches:
                    tp.token_pool_fwd(e(b, n, CHANNELS, dtype=dt), s, g)
                    tp.token_pool_bwd(e(b, m, CHANNELS, dtype=dt), s, g)
                    ua.upsample_add_fwd(e(b, m, CHANNELS, dtype=dt), e(b, n, CHANNELS, dtype=dt), s, g)
                    ua.upsample_add_bwd(e(b, n, CHANNELS, dtype=dt), s, g)
        for n in {s * s for s in hws} | {g * g for g in grids}:
            for b in batches + ((8,) if full else ()):
                tm.token_mean_fwd(e(b, n, CHANNELS, dtype=dt))
                tm.token_mean_bwd(e(b, CHANNELS, dtype=dt), e(b, n, CHANNELS, dtype=dt))
        # adaLN ops: fp32 residual stream, `dt` branch output, adaLN chunks and LayerNorm-modulate output (autocast).
        for n in {s * s for s in hws} | {g * g for g in grids}:
            for b in batches:
                x32, ada = e(b, n, CHANNELS), e(b, 6 * CHANNELS, dtype=dt)
                gate, shift, scale = (ada[:, i * CHANNELS:(i + 1) * CHANNELS] for i in (2, 3, 4))
                y = e(b, n, CHANNELS, dtype=dt)
                ad.layernorm_modulate_fwd(x32, shift, scale, 1e-6, dt)
                ad.layernorm_modulate_bwd(y, x32, scale, 1e-6, dt)
                ad.gated_residual_fwd(x32, y, gate)
                ad.gated_residual_inplace_fwd(x32, y, gate)
                ad.gated_residual_bwd(x32, y, gate)
                ad.gated_residual_layernorm_modulate_fwd(x32, y, gate, shift, scale, 1e-6, dt)
                ad.gated_residual_layernorm_modulate_bwd(x32, y, x32, y, gate, scale, 1e-6, dt)
            ad.silu_fwd(e(b, CHANNELS), dt)
            ad.silu_bwd(e(b, CHANNELS, dtype=dt), e(b, CHANNELS))
        # A channel count with a tail (masked last channel block; token_mean rows of 256 lanes) and an odd grid.
        c, s, g = ODD_CHANNELS, 12, 5
        tp.token_pool_fwd(e(1, s * s, c, dtype=dt), s, g)
        tp.token_pool_bwd(e(1, g * g, c, dtype=dt), s, g)
        ua.upsample_add_fwd(e(1, g * g, c, dtype=dt), e(1, s * s, c, dtype=dt), s, g)
        ua.upsample_add_bwd(e(1, s * s, c, dtype=dt), s, g)
        tm.token_mean_fwd(e(1, s * s, c, dtype=dt))
        tm.token_mean_bwd(e(1, c, dtype=dt), e(1, s * s, c, dtype=dt))
        if full:
            # The int64 index variants (a batch entry spanning 2**31 elements or more), forced at a small shape.
            wide = [(m, "fits_int32", m.fits_int32) for m in (tm, tp, ua)]
            for m, name, _ in wide:
                setattr(m, name, lambda *tensors: False)
            tp.token_pool_fwd(e(1, 1024, CHANNELS, dtype=dt), 32, 8)
            tp.token_pool_bwd(e(1, 64, CHANNELS, dtype=dt), 32, 8)
            ua.upsample_add_fwd(e(1, 64, CHANNELS, dtype=dt), e(1, 1024, CHANNELS, dtype=dt), 32, 8)
            ua.upsample_add_bwd(e(1, 1024, CHANNELS, dtype=dt), 32, 8)
            tm.token_mean_fwd(e(1, 1024, CHANNELS, dtype=dt))
            tm.token_mean_bwd(e(1, CHANNELS, dtype=dt), e(1, 1024, CHANNELS, dtype=dt))
            for m, name, real in wide:
                setattr(m, name, real)
        for d in HEAD_DIMS if full else (72,):
            h = CHANNELS // d
            for s in hws:
                n = s * s
                # (Lq, Lk): sparse self-attention and dense->sparse (few_keys), sparse->dense (split_k), dense (flash).
                shapes = [(g * g, g * g) for g in grids] + [(n, g * g) for g in grids] + [(g * g, n) for g in grids]
                shapes.append((n, n))
                for lq, lk in shapes:
                    for b in batches:
                        q, k, v = (e(b, l, h, d, dtype=dt) for l in (lq, lk, lk))
                        out, lse = att.attention_fwd(q, k, v, d ** -0.5)
                        att.attention_bwd(e(b, lq, h, d, dtype=dt), q, k, v, out, lse, d ** -0.5)
    return sink


_REQUESTS = []
SM90_MAX_SHARED = 232448   # 227 KiB: the opt-in shared memory per block of an H100/H200


def _compile_one(index):
    """Compile _REQUESTS[index] (an index, so a forked worker needs no pickled JITFunction): (error or None, s)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    import triton
    jit, signature, constexprs, attrs, options = _REQUESTS[index]
    t0 = time.perf_counter()
    shared = None
    try:
        compiled = triton.compile(ASTSource(jit, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                                  options=options)
        shared = compiled.metadata.shared
        error = None
        if shared > SM90_MAX_SHARED:
            # ptxas accepts it; the launch would fail with "out of resources".
            error = f"needs {shared} B of shared memory, sm_90 allows {SM90_MAX_SHARED} B per block"
    except Exception as exc:   # noqa: BLE001 - every failure is reported, not raised
        error = f"{type(exc).__name__}: {exc}"[-3000:]
    return error, time.perf_counter() - t0, shared


def _skip_reason():
    try:
        from triton.backends import backends
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except Exception as exc:   # noqa: BLE001
        return f"triton lacks the AOT compiler API: {exc}"
    if "nvidia" not in backends:
        return "triton has no CUDA backend"
    try:
        from triton import knobs
        path = knobs.nvidia.ptxas.path
    except Exception as exc:   # noqa: BLE001
        return f"no ptxas: {exc}"
    if not path or not os.path.exists(path):
        return "no ptxas"
    return None


def _describe(signature, constexprs, jit, options):
    names = [p.name for p in jit.params]
    consts = {names[k[0]]: v for k, v in constexprs.items() if signature[names[k[0]]] == "constexpr"
              and jit.params[k[0]].is_constexpr}
    ptrs = sorted({t for t in signature.values() if t.startswith("*")})
    return f"{jit.__name__}[{','.join(ptrs)}] {consts} {options}"


def main(argv):
    full = "--all" in argv
    jobs = int(argv[argv.index("--jobs") + 1]) if "--jobs" in argv else 1
    reason = _skip_reason()
    if reason:
        print(json.dumps({"skip": reason}))
        return 0
    t0 = time.perf_counter()
    requests = _REQUESTS
    requests[:] = _record_all(full).values()
    if jobs > 1:
        # fork after recording: the workers inherit the JITFunctions and the recorded requests.
        import multiprocessing
        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            results = pool.map(_compile_one, range(len(requests)), chunksize=1)
    else:
        results = [_compile_one(i) for i in range(len(requests))]
    report = [{"variant": _describe(r[1], r[2], r[0], r[4]), "kernel": r[0].__name__, "error": err,
               "seconds": round(sec, 2), "shared": shared} for r, (err, sec, shared) in zip(requests, results)]
    import flexdit_kernels
    print(json.dumps({"variants": report, "seconds": round(time.perf_counter() - t0, 1),
                      "kernels_from": os.path.dirname(os.path.abspath(flexdit_kernels.__file__))}))
    return 0


# ----------------------------------------------------------------------------------------------------------------
# Test side
# ----------------------------------------------------------------------------------------------------------------

ALL_KERNELS = {
    "_token_pool_fwd_kernel", "_token_pool_bwd_kernel", "_upsample_add_fwd_kernel", "_upsample_add_bwd_kernel",
    "_token_mean_fwd_kernel", "_token_mean_combine_kernel", "_token_mean_bwd_kernel",
    "_attention_fwd_few_keys_kernel", "_attention_fwd_kernel", "_attention_fwd_combine_kernel",
    "_attention_bwd_preprocess_kernel", "_attention_bwd_dkdv_kernel", "_attention_bwd_dq_kernel",
    "_adaln_fwd_kernel", "_adaln_bwd_kernel", "_column_sum_kernel", "_silu_fwd_kernel", "_silu_bwd_kernel",
}


def _run(tmp_path, *args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")      # compile for real, not from a warm cache
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-5000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    if "skip" in report:
        pytest.skip(report["skip"])
    # the kernels of this checkout, not those of another install of the package
    assert report["kernels_from"] == os.path.join(ROOT, "flexdit_kernels"), report["kernels_from"]
    failed = [f"{v['variant']}\n    {v['error']}" for v in report["variants"] if v["error"]]
    assert not failed, f"{len(failed)} of {len(report['variants'])} variants fail to compile for sm_90:\n" + \
        "\n".join(failed)
    return report


def test_compile_sm90_representative(tmp_path):
    """bf16, 32x32 tokens, G = 10, D = 72, B = 1 (plus C = 200 on 12x12 -> 5x5 for the pool, mean and upsample-add
    kernels): every kernel, each attention path (about a minute on 2 cores). fp32 is left to the opt-in test: its
    ieee-precision dots take minutes to compile."""
    report = _run(tmp_path, "--jobs", "2")
    assert {v["kernel"] for v in report["variants"]} == ALL_KERNELS
    # attention holds the head dim 72 as one 128-column tile in every kernel
    for v in report["variants"]:
        if v["kernel"].startswith("_attention"):
            assert "'HEAD_DIM': 72" in v["variant"] and "'BLOCK_D': 128" in v["variant"], v["variant"]


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("FLEXDIT_COMPILE_ALL") != "1",
                    reason="281 variants take about 7 min on 2 cores: set FLEXDIT_COMPILE_ALL=1")
def test_compile_sm90_all(tmp_path):
    """Every dtype, token grid, G, head dim and batch the launchers see at DiT-XL/2 shapes."""
    report = _run(tmp_path, "--all", "--jobs", "2")
    assert {v["kernel"] for v in report["variants"]} == ALL_KERNELS


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
