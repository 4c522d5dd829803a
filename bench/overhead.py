"""`python -m bench.overhead`: host (CPU) time that the flexdit ops add per call, for the pooling ops (token_pool,
token_mean, upsample_add), attention on a Triton path (few keys) and the adaLN ops (layernorm_modulate,
gated_residual, gated_residual_layernorm_modulate, silu), forward and forward+backward.

Tiny fp32 CPU tensors (B=2, 8x8 tokens, G=4, C=16), one intra-op thread, so the numbers are Python and dispatcher
time, not arithmetic. Each timing is the best of `--repeats` means over `--calls` calls, in CPU time of the calling
thread (so that other processes on a shared machine do not inflate it); an op and its baseline take turns within
each repeat. Two paths:
- "reference": the public op on the CPU (backend "auto" without the interpreter runs each op's `*_ref`) against
  the `*_ref` called directly (forward: the bare call; forward+backward: `ref(x).backward(g)` through autograd).
  The difference is what validation, dispatch and the autograd wrapper cost.
- "triton-stub": the Triton path with every kernel launch (`kernel[grid](...)`) replaced by a no-op, against the
  same stubbed launchers called directly (forward: `_fwd`; forward+backward: a bare `torch.autograd.Function` that
  runs `_fwd` and `_bwd` and returns a gradient for every input, `.backward(g)` through the engine, which
  accumulates them into the leaves' .grad as it does the op's). The difference is what validation,
  dispatch and the op's wrapper add on top of its launchers; Triton's own launch cost is in neither (needs a GPU).
Rows: suite "overhead", case "<op> <mode>", impl the path, metrics "us" (the op), "baseline_us", "overhead_us".
"""
import argparse
import contextlib
import sys
import time
from typing import Callable, List, Sequence

import torch

from .common import Results, Row, env_tags, format_table, write_csv, write_json

OPS = ("token_pool", "token_mean", "upsample_add", "attention", "layernorm_modulate", "gated_residual",
       "gated_residual_layernorm_modulate", "silu")
HW, GRID, B, C = (8, 8), (4, 4), 2, 16


def _best_mean_us(fns: Sequence[Callable[[], object]], calls: int, repeats: int) -> List[float]:
    """Per function, the best of `repeats` means over `calls` calls, in CPU time of the calling thread (intra-op
    threads are set to one), so other processes on a shared machine do not count. The functions take turns within
    each repeat, so that an op and its baseline see the same machine."""
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


def _bare_function(fwd, bwd):
    """The least an autograd-capable call of the launchers costs: a Function that runs them and returns one gradient
    per input (made once), so that autograd accumulates into every leaf's .grad as it does for the op."""
    grads = []

    class Bare(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            ctx.inputs = inputs
            if not grads:
                grads.extend(torch.zeros_like(t) for t in inputs)
            return fwd(*inputs)

        @staticmethod
        def backward(ctx, grad_out):
            bwd(grad_out, *ctx.inputs)
            return tuple(grads)

    return Bare.apply


class _NoLaunch:
    """Stands in for a JITFunction: `kernel[grid](*args, **kwargs)` does nothing."""

    def __getitem__(self, grid):
        return self._launch

    @staticmethod
    def _launch(*args, **kwargs):
        return None


@contextlib.contextmanager
def _stubbed_kernels():
    """Kernel launches become no-ops and every op takes its Triton path (its launchers run, nothing computes)."""
    from flexdit_kernels import _adaln, _attention, _dispatch, _token_mean, _token_pool, _upsample_add, _validate
    saved = []
    for mod in (_token_pool, _token_mean, _upsample_add, _attention, _adaln):
        for name, obj in list(vars(mod).items()):
            if name.endswith("_kernel") and hasattr(obj, "fn"):
                saved.append((mod, name, obj))
                setattr(mod, name, _NoLaunch())
    # The path choice wherever a module holds its own name for it; the launchers' device check.
    for mod in (_dispatch, _attention, _adaln):
        saved.append((mod, "use_triton", mod.use_triton))
        mod.use_triton = lambda *tensors: True
    saved.append((_validate, "interpreting", _validate.interpreting))
    _validate.interpreting = lambda: True
    try:
        yield
    finally:
        for mod, name, obj in saved:
            setattr(mod, name, obj)


def _cases():
    """Per op: (op call, reference call, stubbed-launcher forward, stubbed-launcher backward, inputs, grad_out)."""
    import flexdit_kernels as fk
    from flexdit_kernels import _adaln, _attention, _token_mean, _token_pool, _upsample_add
    n, m = HW[0] * HW[1], GRID[0] * GRID[1]
    x = torch.randn(B, n, C)
    sparse, dense = torch.randn(B, m, C), torch.randn(B, n, C)
    y, ada = torch.randn(B, n, C), torch.randn(B, 6 * C)
    gate, shift, scale = ada[:, 2 * C:3 * C], ada[:, 3 * C:4 * C], ada[:, 4 * C:5 * C]   # adaLN chunks, strided
    q, k, v = torch.randn(B, m, 2, 8), torch.randn(B, n, 2, 8), torch.randn(B, n, 2, 8)    # m queries, n keys
    att_scale = 8 ** -0.5
    out, lse = _attention._attention_body(q, k, v, att_scale)     # the reference backend's: cases are built on it
    return {
        "token_pool": (lambda x: fk.token_pool(x, HW, GRID), lambda x: fk.token_pool_ref(x, HW, GRID),
                       lambda x: _token_pool._token_pool_fwd(x, *HW, *GRID),
                       lambda g, x: _token_pool._token_pool_bwd(g, *HW, *GRID),
                       (x,), torch.randn(B, m, C)),
        "token_mean": (lambda x: fk.token_mean(x, 1e-6), lambda x: fk.token_mean_ref(x, 1e-6),
                       lambda x: _token_mean._token_mean_fwd(x, 1e-6),
                       lambda g, x: _token_mean._token_mean_bwd(g, x, 1e-6),
                       (x,), torch.randn(B, C)),
        "upsample_add": (lambda s, d: fk.upsample_add(s, d, HW, GRID), lambda s, d: fk.upsample_add_ref(s, d, HW, GRID),
                         lambda s, d: _upsample_add._upsample_add_fwd(s, d, *HW, *GRID),
                         lambda g, s, d: _upsample_add._upsample_add_bwd(g, *HW, *GRID),
                         (sparse, dense), torch.randn(B, n, C)),
        "attention": (fk.attention, fk.attention_ref, lambda q, k, v: _attention.attention_fwd(q, k, v, att_scale)[0],
                      lambda g, q, k, v: _attention.attention_bwd(g, q, k, v, out, lse, att_scale),
                      (q, k, v), torch.randn(B, m, 2, 8)),
        "layernorm_modulate": (fk.layernorm_modulate, fk.layernorm_modulate_ref,
                               _adaln.layernorm_modulate_fwd,
                               lambda g, x, shift, scale: _adaln.layernorm_modulate_bwd(g, x, scale),
                               (x, shift, scale), torch.randn(B, n, C)),
        "gated_residual": (fk.gated_residual, fk.gated_residual_ref, _adaln.gated_residual_fwd,
                           lambda g, x, y, gate: _adaln.gated_residual_bwd(g, y, gate),
                           (x, y, gate), torch.randn(B, n, C)),
        # Timed through its second output (the MLP input); the backward gets both gradients.
        "gated_residual_layernorm_modulate": (
            lambda *a: fk.gated_residual_layernorm_modulate(*a)[1],
            lambda *a: fk.gated_residual_layernorm_modulate_ref(*a)[1],
            lambda *a: _adaln.gated_residual_layernorm_modulate_fwd(*a)[1],
            lambda g, x, y, gate, shift, scale: _adaln.gated_residual_layernorm_modulate_bwd(g, g, x, y, gate, scale),
            (x, y, gate, shift, scale), torch.randn(B, n, C)),
        "silu": (fk.silu, fk.silu_ref, _adaln.silu_fwd, _adaln.silu_bwd, (shift,), torch.randn(B, C)),
    }


def _measure(results: Results, op: str, path: str, mode: str, fn, baseline, calls: int, repeats: int) -> List[Row]:
    op_us, base_us = _best_mean_us((fn, baseline), calls, repeats)
    case = f"{op} {mode}"
    return [results.add("overhead", case, path, "us", op_us, "us", mode=mode),
            results.add("overhead", case, path, "baseline_us", base_us, "us", mode=mode),
            results.add("overhead", case, path, "overhead_us", op_us - base_us, "us", mode=mode)]


def run(args, results: Results, device: torch.device = torch.device("cpu")) -> List[Row]:
    """Add the overhead rows to `results` and return them. Uses args.ops, args.calls, args.repeats when present."""
    import flexdit_kernels as fk
    ops = getattr(args, "ops", None) or OPS
    calls = getattr(args, "calls", None) or 1000
    repeats = getattr(args, "repeats", None) or 15
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows: List[Row] = []
    try:
        # Without the interpreter "auto" sends CPU tensors to the reference; under it, "reference" does.
        with torch.no_grad(), fk.backend("reference" if fk.interpreting() else "auto"):
            cases = _cases()
        for op in ops:
            call, ref, fwd, bwd, inputs, grad_out = cases[op]
            leaves = [t.clone().requires_grad_() for t in inputs]

            def op_fb():
                call(*leaves).backward(grad_out)

            def ref_fb():
                ref(*leaves).backward(grad_out)

            with fk.backend("reference" if fk.interpreting() else "auto"):
                with torch.no_grad():
                    rows += _measure(results, op, "reference", "fwd", lambda: call(*inputs), lambda: ref(*inputs),
                                     calls, repeats)
                rows += _measure(results, op, "reference", "fwd+bwd", op_fb, ref_fb, calls // 4, repeats)
            with _stubbed_kernels():
                with torch.no_grad():
                    rows += _measure(results, op, "triton-stub", "fwd", lambda: call(*inputs), lambda: fwd(*inputs),
                                     calls, repeats)
                bare = _bare_function(fwd, bwd)

                def launchers_fb():
                    bare(*leaves).backward(grad_out)

                rows += _measure(results, op, "triton-stub", "fwd+bwd", op_fb, launchers_fb, calls // 4, repeats)
    finally:
        torch.set_num_threads(threads)
    return rows


def table(results: Results) -> str:
    return format_table(results, "overhead", ["us", "baseline_us", "overhead_us"],
                        title="host overhead per call, µs (best mean; tiny CPU tensors, one thread)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", nargs="+", choices=OPS, default=None)
    parser.add_argument("--calls", type=int, default=1000,
                        help="calls per timed repeat (forward; a quarter of them forward+backward)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--csv", metavar="PATH")
    args = parser.parse_args(argv)
    device = torch.device("cpu")
    results = Results(tags={**env_tags(device), "device": "cpu", "dtype": "fp32"})
    run(args, results, device)
    print(table(results))
    if args.json:
        write_json(results, args.json, sys.argv[1:] if argv is None else list(argv))
    if args.csv:
        write_csv(results, args.csv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
