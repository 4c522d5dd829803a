"""`python -m bench sanitize`: one tiny launch of every flexdit_kernels kernel, forward and backward, each checked
against its reference; meant to run under `compute-sanitizer --tool memcheck`, which then sees every kernel once.

Shapes are small and awkward on purpose (token grids that the sparse grid does not divide, head dim 72, inputs as
strided views of fused projections), so masked tails and strides are exercised while memcheck stays fast.

Every op of `flexdit_kernels.__all__` that has a `<op>_ref` must have at least one entry in LAUNCHES; an op without
one is reported UNCOVERED and fails the run, so a new kernel cannot slip past the sanitizer. To cover a new op, add a
function decorated with `@launch("<op>")` (or `@launch("<op>", "<variant>")` for several paths) that runs the op
forward and backward once and returns `None` or a one-line reason. An entry whose op this `flexdit_kernels` does not
export is listed as absent and skipped.

Exit status: 0 every launch matched its reference, 1 a launch failed or an op is uncovered, 2 bad arguments.
"""
import argparse
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch

PROG = "python -m bench sanitize"


@dataclass
class Launch:
    op: str                                                   # the flexdit_kernels attribute it launches
    variant: str                                              # "" or the path / flavour ("split_k", ...)
    fn: Callable[[torch.device, torch.dtype], Optional[str]]  # one forward + backward; None or why it failed

    @property
    def name(self) -> str:
        return f"{self.op}[{self.variant}]" if self.variant else self.op


LAUNCHES: List[Launch] = []


def launch(op: str, variant: str = ""):
    """Register `fn(device, dtype) -> None | reason` as the sanitizer launch of `op` (one per variant)."""
    def register(fn):
        LAUNCHES.append(Launch(op, variant, fn))
        return fn
    return register


# ----------------------------------------------------------------------------------------------------------------
# Shared checks
# ----------------------------------------------------------------------------------------------------------------

def _fk():
    import flexdit_kernels
    return flexdit_kernels


def _randn(*shape, device, dtype):
    return torch.randn(*shape, device=device, dtype=dtype)


def fwd_bwd(name: str, fn: Callable, ref: Callable, inputs: List[torch.Tensor]) -> Optional[str]:
    """fn(*inputs) and ref(*inputs) forward, then their gradients w.r.t. every input for one shared upstream
    gradient; None when they agree at the dtype's tolerance (the bench's own checks)."""
    from .kernels import check_close, check_grads
    out = fn(*inputs)
    reason = check_close(name, out, ref(*inputs))
    if reason is None:
        reason = check_grads(name, fn, ref, inputs, torch.randn_like(out))
    return reason


# ----------------------------------------------------------------------------------------------------------------
# Launches: one function per kernel (or per path of a kernel)
# ----------------------------------------------------------------------------------------------------------------

HW, GRID, C = (7, 9), (3, 4), 72          # 63 tokens pooled to 12: windows of unequal size, C not a power of two


@launch("token_pool")
def _token_pool(device, dtype):
    fk = _fk()
    x = _randn(2, HW[0] * HW[1], C, device=device, dtype=dtype)
    return fwd_bwd("token_pool", lambda t: fk.token_pool(t, HW, GRID), lambda t: fk.token_pool_ref(t, HW, GRID), [x])


@launch("token_mean")
def _token_mean(device, dtype):
    fk = _fk()
    x = _randn(2, HW[0] * HW[1], C, device=device, dtype=dtype)
    return fwd_bwd("token_mean", lambda t: fk.token_mean(t, 1e-6), lambda t: fk.token_mean_ref(t, 1e-6), [x])


@launch("upsample_add")
def _upsample_add(device, dtype):
    fk = _fk()
    s = _randn(2, GRID[0] * GRID[1], C, device=device, dtype=dtype)
    d = _randn(2, HW[0] * HW[1], C, device=device, dtype=dtype)
    return fwd_bwd("upsample_add", lambda a, b: fk.upsample_add(a, b, HW, GRID),
                   lambda a, b: fk.upsample_add_ref(a, b, HW, GRID), [s, d])


def _attention(path: str, device, dtype, heads: int = 2, head_dim: int = 72) -> Optional[str]:
    """Attention forced onto one Triton path (dense shapes kept off SDPA), inputs as views of fused projections."""
    from .kernels import PATH_PROBES, attention_inputs, attention_path_of, check_attention, check_attention_grads
    from .kernels import triton_everywhere
    fk = _fk()
    probe = next(((lq, lk) for lq, lk in PATH_PROBES if attention_path_of(lq, lk, True) == path), None)
    if probe is None:
        return f"no shape in {PATH_PROBES} takes the {path} path any more: update bench/sanitize.py"
    lq, lk = probe
    make_inputs = attention_inputs(1, lq, lk, heads, head_dim, device, dtype)
    with triton_everywhere():
        _, (q, k, v) = make_inputs()
        reason = check_attention(fk.attention(q, k, v), q, k, v)
        if reason is None:
            reason = check_attention_grads(make_inputs, dtype)
    return None if reason is None else f"Lq={lq} Lk={lk} D={head_dim}: {reason}"


for _path in ("few_keys", "split_k", "flash"):
    launch("attention", _path)(lambda device, dtype, p=_path: _attention(p, device, dtype))


@launch("layernorm_modulate")
def _layernorm_modulate(device, dtype):
    fk = _fk()
    x = _randn(2, HW[0] * HW[1], C, device=device, dtype=dtype)
    ada = _randn(2, 6 * C, device=device, dtype=dtype)                  # adaLN projection: shift, scale = chunks
    shift, scale = ada[:, :C], ada[:, C:2 * C]
    return fwd_bwd("layernorm_modulate", lambda a, b, c: fk.layernorm_modulate(a, b, c, 1e-6),
                   lambda a, b, c: fk.layernorm_modulate_ref(a, b, c, 1e-6), [x, shift, scale])


@launch("gated_residual")
def _gated_residual(device, dtype):
    fk = _fk()
    x = _randn(2, HW[0] * HW[1], C, device=device, dtype=torch.float32)    # the fp32 residual stream
    y = _randn(2, HW[0] * HW[1], C, device=device, dtype=dtype)
    gate = _randn(2, 6 * C, device=device, dtype=dtype)[:, 2 * C:3 * C]
    return fwd_bwd("gated_residual", fk.gated_residual, fk.gated_residual_ref, [x, y, gate])


@launch("gated_residual_layernorm_modulate")
def _gated_residual_layernorm_modulate(device, dtype):
    fk = _fk()
    x = _randn(2, HW[0] * HW[1], C, device=device, dtype=torch.float32)
    y = _randn(2, HW[0] * HW[1], C, device=device, dtype=dtype)
    ada = _randn(2, 6 * C, device=device, dtype=dtype)
    gate, shift, scale = ada[:, 2 * C:3 * C], ada[:, 3 * C:4 * C], ada[:, 4 * C:5 * C]

    def fused(*args):
        return torch.cat([t.float() for t in fk.gated_residual_layernorm_modulate(*args, 1e-6)], dim=-1)

    def ref(*args):
        return torch.cat([t.float() for t in fk.gated_residual_layernorm_modulate_ref(*args, 1e-6)], dim=-1)

    return fwd_bwd("gated_residual_layernorm_modulate", fused, ref, [x, y, gate, shift, scale])


@launch("silu")
def _silu(device, dtype):
    fk = _fk()
    c = _randn(2, 2 * C, device=device, dtype=torch.float32)[:, C:]      # the fp32 conditioning, strided
    return fwd_bwd("silu", lambda a: fk.silu(a, dtype), lambda a: fk.silu_ref(a, dtype), [c])


# ----------------------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------------------

def exported_ops() -> List[str]:
    """The ops of flexdit_kernels: names of `__all__` that have a `<name>_ref` beside them."""
    names = set(_fk().__all__)
    return [n for n in _fk().__all__ if f"{n}_ref" in names]


def run_launches(device: torch.device, dtype: torch.dtype, only: Optional[List[str]] = None,
                 emit: Callable[[str], None] = print) -> dict:
    """Run every registered launch (or those of the ops in `only`); a report dict with one record per launch."""
    fk = _fk()
    ops = exported_ops()
    records = []
    for item in LAUNCHES:
        if only and item.op not in only:
            continue
        if not hasattr(fk, item.op):
            records.append(dict(launch=item.name, op=item.op, status="absent", reason="not in this flexdit_kernels"))
            continue
        torch.manual_seed(0)
        start = time.perf_counter()
        try:
            reason = item.fn(device, dtype)
            if device.type == "cuda":
                torch.cuda.synchronize(device)    # a fault inside the kernel surfaces here, under its own name
        except Exception as err:
            frames = traceback.extract_tb(err.__traceback__)
            where = f" at {os.path.basename(frames[-1].filename)}:{frames[-1].lineno}" if frames else ""
            text = str(err).strip().splitlines()
            reason = f"raised {type(err).__name__}{where}: {text[0] if text else ''}"
        records.append(dict(launch=item.name, op=item.op, status="ok" if reason is None else "FAILED",
                            reason=reason or "", seconds=round(time.perf_counter() - start, 3)))
        emit(f"{item.name:28s} {'ok' if reason is None else 'FAILED: ' + reason}")
    covered = {item.op for item in LAUNCHES}
    uncovered = [op for op in ops if op not in covered and (not only or op in only)]
    for op in uncovered:
        records.append(dict(launch=op, op=op, status="UNCOVERED",
                            reason="no launch registered in bench/sanitize.py (add one with @launch)"))
        emit(f"{op:28s} UNCOVERED: no launch registered in bench/sanitize.py (add one with @launch)")
    for rec in records:
        if rec["status"] == "absent":
            emit(f"{rec['launch']:28s} absent (not exported by this flexdit_kernels), skipped")
    ok = all(r["status"] in ("ok", "absent") for r in records)
    return dict(device=str(device), dtype=str(dtype).replace("torch.", ""), ok=ok, launches=records)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = __doc__
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="auto: the GPU when present; cpu: the Triton interpreter (needs TRITON_INTERPRET=1)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None,
                   help="default bf16 on a GPU, fp32 under the interpreter (which cannot do bf16 dots)")
    p.add_argument("--op", action="append", default=None, metavar="OP",
                   help="only this op (repeatable); default: every registered launch")
    p.add_argument("--list", action="store_true", help="list the registered launches and the uncovered ops, run none")
    p.add_argument("--json", metavar="PATH", help="write the report as JSON")


def run_cli(args, parser) -> int:
    from .common import DTYPES, has_gpu
    if args.list:
        ops = exported_ops()
        for item in LAUNCHES:
            print(f"{item.name:28s} {'registered' if item.op in ops else 'registered, op absent here'}")
        for op in ops:
            if op not in {item.op for item in LAUNCHES}:
                print(f"{op:28s} UNCOVERED")
        return 0
    if args.op:
        unknown = [op for op in args.op if op not in {item.op for item in LAUNCHES} | set(exported_ops())]
        if unknown:
            parser.error(f"--op {unknown[0]!r}: not an op of flexdit_kernels nor a registered launch")
    on_cpu = args.device == "cpu" or (args.device == "auto" and not has_gpu())
    if on_cpu and args.device == "auto":
        print("no GPU: torch.cuda.is_available() is False on this machine, so `sanitize` has no kernel to launch. "
              "Pass --device cpu with TRITON_INTERPRET=1 to run the launches through the Triton interpreter.")
        return 0
    if on_cpu and os.environ.get("TRITON_INTERPRET") != "1":
        parser.error("sanitize --device cpu needs TRITON_INTERPRET=1 (the Triton interpreter); without it the ops "
                     "would run their references")
    dtype = DTYPES[args.dtype or ("fp32" if on_cpu else "bf16")]
    if on_cpu and dtype == torch.bfloat16:
        parser.error("--dtype bf16 on the CPU: the Triton interpreter cannot compute bf16 dots")
    device = torch.device("cpu" if on_cpu else "cuda")
    import flexdit_kernels as fk
    with fk.backend("triton"):
        report = run_launches(device, dtype, args.op)
    n_ok = sum(r["status"] == "ok" for r in report["launches"])
    print(f"sanitize: {n_ok} of {len(report['launches'])} launches ok on {report['device']} ({report['dtype']})")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
    return 0 if report["ok"] else 1


if __name__ == "__main__":   # pragma: no cover
    sys.exit(__import__("bench.__main__", fromlist=["main"]).main(["sanitize"] + sys.argv[1:]))
