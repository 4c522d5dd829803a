"""Static CI gates: every kernel launch compiled for sm_90 (H100/H200) and sm_80 (A100) on the CPU, no GPU.

The interpreter (what the other kernel tests run on the CPU) accepts code that the real compiler rejects and says
nothing about registers, spills or access widths, so `bench.static` drives each launcher at DiT-XL/2 shapes with
recorders in place of the kernels, compiles every distinct variant down to a cubin and reads its machine code
(`python -m bench static` prints the same report). The gates:

- every variant compiles and fits its target (registers, shared memory, threads);
- attention: tensor-core instructions in every kernel with a matrix product; every global access to q, k, v, out,
  dO, dq, dk, dv (and the fp32 workspaces) 16 bytes wide, each access charged to the tensor that its source line
  names (`nvdisasm -gi` line info); the row statistics (log-sum-exp, delta, split-K m and l) may be scalar; at most
  `MAX_ATTENTION_SPILL` B of spill per thread;
- memory-bound kernels: every global access 16 bytes wide except at most `MAX_SCALAR_ACCESSES` 32-bit ones, no
  spill;
- occupancy: split-K's register-capped forward and the few-keys forward (sm_90) keep 3 CTAs per SM; token_pool's
  forward and upsample_add's backward run 4 waves of programs at B = 32;
- each gate reports a deliberately broken variant (alignment facts removed; registers capped so that it spills; the
  few-keys forward over 64 keys with its former 64-row, prefetched query tile).

The representative set (`--shapes ci`: bf16, 32x32 tokens, G = 10, B = 8, D = 72; token pooling also on 16x16 and
at B = 32; masked channel tails on sm_90; about 85 variants, 3 CPU-minutes) compiles in one subprocess.
FLEXDIT_STATIC_FULL=1 compiles every shape set instead (`--shapes all`, three dtypes, about 650 variants; an fp32
attention variant takes minutes on its own).
"""
import os

import pytest

from bench import static

FULL = os.environ.get("FLEXDIT_STATIC_FULL") == "1" or os.environ.get("FLEXDIT_COMPILE_ALL") == "1"
ARCHS = (90, 80)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("triton-cache"))       # compile for real, not from a warm cache
    rep = static.collect(ARCHS, "all" if FULL else "ci", static.DTYPE_NAMES if FULL else ("bf16",), jobs=2,
                         broken=True, cache_dir=cache)
    if "skip" in rep:
        pytest.skip(rep["skip"])
    # the kernels of this checkout, not those of another install of the package
    assert rep["kernels_from"] == os.path.join(static.ROOT, "flexdit_kernels"), rep["kernels_from"]
    return rep


def _variants(report, arch):
    return [v for v in report["variants"] if v["arch"] == arch and not v["broken"]]


def _name(v):
    return f"sm_{v['arch']} {v['kernel']} {','.join(v['dtypes'])} {v['constexprs']} {v['options']}"


def _failures(variants, gate):
    fails = [f"{_name(v)}\n    " + "; ".join(reasons) for v in variants for reasons in [gate(v)] if reasons]
    return f"{len(fails)} of {len(variants)} variants fail:\n" + "\n".join(fails)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_kernel_compiled(report, arch):
    """Each `@triton.jit` kernel of flexdit_kernels is launched at least once by the shapes driven."""
    assert {v["kernel"] for v in _variants(report, arch)} == set(report["kernels"])
    # attention holds the head dim 72 as one 128-column tile in every kernel
    for v in _variants(report, arch):
        if v["kernel"].startswith("_attention") and v["constexprs"].get("HEAD_DIM") != 64:
            assert v["constexprs"]["HEAD_DIM"] == 72 and v["constexprs"]["BLOCK_D"] == 128, _name(v)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_variant_compiles_and_fits(report, arch):
    variants = _variants(report, arch)
    assert not any(static.gate_fits(v) for v in variants), _failures(variants, static.gate_fits)


@pytest.mark.parametrize("arch", ARCHS)
def test_attention_gates(report, arch):
    variants = [v for v in _variants(report, arch) if static.is_attention(v) and not static.gate_fits(v)
                and any(l["set"] in ("model", "bench") for l in v["launches"])]
    assert variants
    assert not any(static.gate_attention(v) for v in variants), _failures(variants, static.gate_attention)


@pytest.mark.parametrize("arch", ARCHS)
def test_memory_bound_gates(report, arch):
    variants = [v for v in _variants(report, arch) if not static.is_attention(v) and not static.gate_fits(v)
                and any(l["set"] in ("model", "bench") for l in v["launches"])]
    assert variants
    assert not any(static.gate_memory_bound(v) for v in variants), _failures(variants, static.gate_memory_bound)


@pytest.mark.parametrize("arch", ARCHS)
def test_occupancy_gates(report, arch):
    """Split-K's forward keeps 3 CTAs per SM (its registers are capped on sm_90 only), and so does the few-keys
    forward on sm_90, over 64 keys (G = 10: 100) too; the window reductions run 4 waves of programs at B = 32."""
    variants = [v for v in _variants(report, arch) if not static.gate_fits(v)]
    capped = any(v["kernel"] == "_attention_fwd_kernel" and v["options"].get("maxnreg") for v in variants)
    assert capped == (arch == 90)
    assert any(v["kernel"] == "_attention_fwd_few_keys_kernel" and v["constexprs"]["BLOCK_N"] == 128
               for v in variants)
    assert any(l["shape"].startswith("B=32 ") for v in variants if v["kernel"] in static.WAVE_KERNELS
               for l in v["launches"])
    assert not any(static.gate_occupancy(v) for v in variants), _failures(variants, static.gate_occupancy)


def test_gates_catch_broken_variants(report):
    """Compiled for real: the width gate sees the lost alignment, the spill gates see the register cap."""
    broken = {v["broken"]: v for v in report["variants"] if v["broken"]}
    assert set(broken) == {"no-hint", "spill", "attention-spill", "few-keys-tile"}, sorted(broken)
    assert not any(static.gate_fits(v) for v in broken.values())
    assert any("bit wide" in r or "32-bit" in r for r in static.gate_memory_bound(broken["no-hint"]))
    assert any("spill" in r for r in static.gate_memory_bound(broken["spill"]))
    assert any("spill" in r for r in static.gate_attention(broken["attention-spill"]))
    tile = broken["few-keys-tile"]
    assert tile["constexprs"]["BLOCK_N"] == 128 and tile["constexprs"]["BLOCK_M"] == 64 and tile["num_stages"] == 2
    assert any("CTAs per SM" in r for r in static.gate_occupancy(tile))


# ----------------------------------------------------------------------------------------------------------------
# The gate rules and the SASS reader on hand-made rows (no compile)
# ----------------------------------------------------------------------------------------------------------------

def _row(**kw):
    row = dict(kernel="_attention_fwd_kernel", arch=90, error=None, regs=128, num_warps=4, shared=32768,
               ctas_per_sm=3, limiter="registers", spill_stores=0, spill_loads=0, ldg={"128": 40, "32": 2},
               stg={"128": 8}, ldgsts={"128": 16}, hgmma=8, hmma=0, ldl=0, stl=0, broken=None, launches=[])
    row.update(kw)
    return row


def test_gate_rules():
    assert static.gate_fits(_row()) == [] and static.gate_attention(_row()) == []
    assert static.gate_fits(_row(error="needs 196608 B of shared memory, sm_80 allows 166912 B per block"))
    assert static.gate_fits(_row(ctas_per_sm=0, limiter="shared"))
    assert any("tensor-core" in r for r in static.gate_attention(_row(hgmma=0)))
    assert static.gate_attention(_row(kernel="_attention_fwd_combine_kernel", hgmma=0)) == []
    assert any("16-bit" in r for r in static.gate_attention(_row(ldg={"128": 40, "16": 1})))
    assert any("64-bit" in r for r in static.gate_memory_bound(_row(stg={"64": 1})))
    many = static.MAX_SCALAR_ACCESSES + 1
    assert static.gate_memory_bound(_row(ldg={"128": 4, "32": many - 1})) == []
    assert any("32-bit" in r for r in static.gate_memory_bound(_row(ldg={"128": 4, "32": many})))
    limit = static.MAX_ATTENTION_SPILL
    assert static.gate_attention(_row(spill_stores=limit)) == []
    assert any("spill" in r for r in static.gate_attention(_row(spill_stores=limit + 4)))
    assert any("spill" in r for r in static.gate_memory_bound(_row(spill_loads=4)))
    # occupancy: a register-capped forward at 2 CTAs per SM, a window reduction at 3.9 waves
    assert static.gate_occupancy(_row(options={"maxnreg": 168})) == []
    assert any("CTAs per SM" in r for r in static.gate_occupancy(_row(options={"maxnreg": 168}, ctas_per_sm=2)))
    assert static.gate_occupancy(_row(ctas_per_sm=2)) == []                 # the uncapped (flash) forward
    few_keys = _row(kernel="_attention_fwd_few_keys_kernel", ctas_per_sm=2, constexprs={"PRECISION": "tf32"})
    assert any("CTAs per SM" in r for r in static.gate_occupancy(few_keys))
    assert static.gate_occupancy(dict(few_keys, ctas_per_sm=3)) == []
    assert static.gate_occupancy(dict(few_keys, arch=80)) == []             # the target is sm_90's
    assert static.gate_occupancy(dict(few_keys, constexprs={"PRECISION": "ieee"})) == []   # fp32 goes to SDPA
    launch = dict(set="model", shape="B=32 N=32x32 G=6 C=1152", ceilings={"H100": {"waves": 3.9}})
    pool = _row(kernel="_token_pool_fwd_kernel", launches=[launch])
    assert any("waves" in r for r in static.gate_occupancy(pool))
    assert static.gate_occupancy(dict(pool, launches=[dict(launch, shape="B=8 N=32x32 G=6 C=1152")])) == []


def test_read_sass_and_logs(tmp_path):
    sass = """
        /*0100*/                   LDG.E.U16 R4, desc[UR4][R2.64] ;
        /*0110*/              @!P0 LDG.E.128.CONSTANT R8, desc[UR4][R6.64] ;
        /*0120*/               @P1 LDGSTS.E.BYPASS.LTC128B.128 [R3], desc[UR4][R4.64] ;
        /*0130*/                   STG.E.64 desc[UR4][R2.64], R10 ;
        /*0140*/                   STG.E desc[UR4][R2.64], R12 ;
        /*0150*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24 ;
        /*0160*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0170*/                   LDL.LU R5, [R1+0x8] ;
        /*0180*/                   STL [R1+0x8], R5 ;
        /*0190*/                   LDS.128 R4, [R2] ;
    """
    got = static.read_sass(sass)
    assert got == {"ldg": {"16": 1, "128": 1}, "stg": {"64": 1, "32": 1}, "ldgsts": {"128": 1}, "hgmma": 1,
                   "hmma": 1, "ldl": 1, "stl": 1, "by_tensor": {"?": {"16": 1, "128": 2, "64": 1, "32": 1}}}
    # nvdisasm -gi: each access is charged to the tensor its kernel-body source line names
    src = tmp_path / "k.py"
    src.write_text("def k(Q, LSE, HEAD_DIM):\n    q = _load_rows(Q, offs, HEAD_DIM)\n    tl.store(LSE + offs, m)\n")
    lines = f"""
        //## File "{src}", line 9 inlined at "{src}", line 2
        /*0100*/                   LDG.E.U16 R4, desc[UR4][R2.64] ;
        //## File "{src}", line 3
        /*0110*/                   STG.E desc[UR4][R2.64], R12 ;
    """
    got = static.read_sass(lines, ["HEAD_DIM"])
    assert got["by_tensor"] == {"Q": {"16": 1}, "LSE": {"32": 1}}
    # a line outside the kernel's body (an inlined helper's own line) names no tensor
    assert static.read_sass(lines, ["HEAD_DIM"], (str(src), 1, 2))["by_tensor"] == {"Q": {"16": 1}, "?": {"32": 1}}
    assert static.gate_attention(_row(**dict(got, hgmma=1))) == ["1 16-bit global accesses to Q (want 128-bit)"]
    assert static.read_res_usage(" Function _k:\n  REG:126 STACK:8 SHARED:0 LOCAL:16 CONSTANT[0]:600") == \
        {"regs": 126, "stack": 8, "shared_static": 0, "local": 16}
    assert static.read_ptxas_log("ptxas info    : Used 255 registers\n    8 bytes stack frame, 1356 bytes spill "
                                 "stores, 1356 bytes spill loads") == \
        {"spill_stores": 1356, "spill_loads": 1356, "stack_frame": 8}


def test_cli_speaks_under_the_programs_name(monkeypatch, capsys):
    """Errors name the program as typed (the console script, or `python -m bench`), not a fixed string."""
    from bench.__main__ import main
    monkeypatch.setattr(static, "collect", lambda *a, **k: {"skip": "no CUDA backend"})
    monkeypatch.setattr("sys.argv", ["/usr/local/bin/flexdit-bench", "static", "--arch", "90"])
    assert main() == 2
    assert capsys.readouterr().err.startswith("flexdit-bench static: error: cannot compile for CUDA here")


def test_recorder_honours_do_not_specialize():
    """A `do_not_specialize` integer is neither a constexpr 1 nor known divisible by 16, as JITFunction.run does."""
    assert static._mangle(1) == ("constexpr", False) and static._mangle(32) == ("i32", True)
    assert static._mangle(1, specialize=False) == ("i32", False)
    assert static._mangle(32, specialize=False) == ("i32", False)
    assert static._mangle(32, align=False) == ("i32", False)


def test_cli_rejects_bad_arguments(capsys):
    from bench.__main__ import main
    for argv in (["static", "--arch", "70"], ["static", "--dtypes", "fp8"], ["static", "--jobs", "0"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
    with pytest.raises(ValueError, match="shapes"):
        static.collect(shapes="tiny")
