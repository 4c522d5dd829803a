"""`python -m bench overhead`: host (CPU) time that each flexdit op adds per call over its reference, forward and
forward+backward.

Tiny fp32 CPU tensors (the cases of `bench kernels` at SHAPE / ATTENTION below) on one intra-op thread, so the numbers
are Python and dispatcher time, not arithmetic: the public op on its reference path (backend "auto" without the
interpreter, "reference" under it) against its `*_ref` called directly, so the difference is what validation,
dispatch and the autograd wrapper cost. The Triton path's host cost needs a GPU, where its launches run.
Rows: suite "overhead", case "<op> <mode>", impl "reference", metrics "us" (the op), "baseline_us", "overhead_us".
"""
import time
from typing import Callable, List, Sequence

import torch

import flexdit_kernels as fk

from .common import Results, format_table, positive_int
from .kernels import OPS, _outputs, make_inputs

SHAPE = dict(b=2, side=8, g=4, c=16)
ATTENTION = dict(b=2, lq=16, lk=64, h=2, d=8)


def add_arguments(p) -> None:
    """The sub-command's own options (the shared ones come from the parent parsers)."""
    p.add_argument("--ops", nargs="+", choices=OPS, default=None, help="only these ops (default: all)")
    p.add_argument("--calls", type=positive_int, default=1000,
                   help="calls per timed repeat (forward; a quarter of them forward+backward; default %(default)s)")


def validate(parser, args, device: torch.device) -> None:
    if args.device == "cuda":
        parser.error("--device cuda: overhead measures host time on CPU tensors (use --device cpu or auto)")
    if args.dtype not in (None, "fp32"):
        parser.error(f"--dtype {args.dtype}: overhead runs fp32 CPU tensors")
    args.dtype = "fp32"


def _best_mean_us(fns: Sequence[Callable[[], object]], calls: int, repeats: int) -> List[float]:
    """Per function, the best of `repeats` means over `calls` calls, in CPU time of the calling thread, so other
    processes on a shared machine do not count. The functions take turns within each repeat, so that an op and its
    baseline see the same machine."""
    for fn in fns:
        for _ in range(max(10, calls // 10)):
            fn()
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for k, fn in enumerate(fns):
            t0 = time.thread_time_ns()
            for _ in range(calls):
                fn()
            best[k] = min(best[k], (time.thread_time_ns() - t0) / calls / 1e3)
    return best


def run(args, results: Results, device: torch.device) -> None:
    """Add the overhead rows of `args.ops` (default all) to `results`."""
    calls, repeats = args.calls, args.repeats or 15
    cpu = torch.device("cpu")
    for op in args.ops or OPS:
        leaves, views = make_inputs(op, ATTENTION if op == "attention" else SHAPE, cpu, torch.float32)
        fn, ref = getattr(fk, op), getattr(fk, f"{op}_ref")
        inputs = views(*leaves)
        grad_leaves = [t.clone().requires_grad_() for t in leaves]
        grad_inputs = views(*grad_leaves)
        grads = [torch.randn_like(o) for o in _outputs(ref(*inputs))]

        def fwd_bwd(f):
            return lambda: torch.autograd.backward(_outputs(f(*grad_inputs)), grads)

        # Without the interpreter "auto" sends CPU tensors to the reference; under it, "reference" does.
        with fk.backend("reference" if fk.interpreting() else "auto"):
            for mode, pair, n in (("fwd", (lambda: fn(*inputs), lambda: ref(*inputs)), calls),
                                  ("fwd+bwd", (fwd_bwd(fn), fwd_bwd(ref)), max(1, calls // 4))):
                with torch.no_grad() if mode == "fwd" else torch.enable_grad():
                    op_us, base_us = _best_mean_us(pair, n, repeats)
                for metric, value in (("us", op_us), ("baseline_us", base_us), ("overhead_us", op_us - base_us)):
                    results.add("overhead", f"{op} {mode}", "reference", metric, value, "us", mode=mode)


def table(results: Results) -> str:
    return format_table(results, "overhead", ["us", "baseline_us", "overhead_us"],
                        title="host overhead per call, µs (best mean; tiny CPU tensors, one thread)")
