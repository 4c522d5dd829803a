"""`python -m bench kernels`: every flexdit_kernels op against the PyTorch path it replaces, forward and backward.

Each op is timed against the PyTorch lines it replaces (`torch_<op>` below; attention: every SDPA backend that
takes the shape), fed as the model feeds it: q, k, v strided views of a fused projection, the transposes in and the
copy out included; shift, scale and gate chunks of one (B, 6C) adaLN projection; an fp32 residual stream; the cast
autocast makes before the next GEMM included.

One case table (`make_inputs`, `baselines`) serves this suite, `bench sanitize` and `bench overhead`. Two phases:
first every case of every op family is checked against its `*_ref` (forward, and gradients with --backward;
attention on each of its paths few_keys / split_k / flash, forcing with `flexdit_kernels.triton_only` a path the
timed shapes do not reach); then only the cases that passed are timed. A wrong kernel is reported FAILED and never
timed.

On CUDA each op family runs its checks, and later its timings, in a process of its own (--isolate, the default
there): a CUDA fault such as an illegal memory access poisons the whole process, so one broken family would otherwise
turn every later measurement into an error. Workers append one JSON line per case to a file, so the cases finished
before a crash are kept and the rest are reported as failed with the worker's last words.
"""
import argparse
import contextlib
import functools
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

import flexdit_kernels as fk

from .common import (Results, Row, bench_fn, copy_bandwidth, fill_defaults, first_line, format_table, positive_float,
                     synchronize)

OPS = ("token_pool", "token_mean", "upsample_add", "attention", "layernorm_modulate", "gated_residual",
       "gated_residual_layernorm_modulate", "silu")

# DiT-XL/2 shapes: 512² images → 32×32 tokens, 256² → 16×16 tokens; C = 1152, 16 heads of 72.
GPU_SHAPES = dict(batches=(8, 32), sides=(32, 16), channels=1152, grids=(6, 8, 10), heads=16, head_dim=72,
                  attn_batches=(32, 8), attn_lens=((1024, 64), (64, 1024), (64, 64), (1024, 1024)))
# Tiny shapes for `--device cpu` (the reference ops only; seconds, not a measurement).
CPU_SHAPES = dict(batches=(2,), sides=(8,), channels=64, grids=(4,), heads=2, head_dim=16,
                  attn_batches=(2,), attn_lens=((64, 16), (16, 64)))


def add_arguments(p) -> None:
    """The sub-command's own options (the shared ones come from the parent parsers)."""
    p.add_argument("--op", choices=OPS + ("all",), default="all")
    p.add_argument("--backward", action="store_true", help="also check gradients and time forward+backward")
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                   help="run each op family's checks and timings in a process of its own, so that a CUDA fault in "
                        "one family cannot hide the others (default: on CUDA yes, on the CPU no)")
    p.add_argument("--family-timeout", type=positive_float, default=None, metavar="SECONDS",
                   help="with --isolate: stop a family's process after this long and report its unfinished cases "
                        "as failed")
    p.add_argument("--rep-ms", type=positive_float, default=100.0, metavar="MS",
                   help="CUDA: time window of each measurement (triton.testing.do_bench rep; warm-up a quarter of "
                        "it; default %(default)g)")
    p.add_argument("--worker", choices=("check", "time"), help=argparse.SUPPRESS)
    p.add_argument("--worker-file", help=argparse.SUPPRESS)


def validate(parser, args, device: torch.device) -> None:
    fill_defaults(args, {"dtype": ("bf16", "fp32")}, device.type == "cpu")
    if args.worker and not args.worker_file:
        parser.error("--worker needs --worker-file")


def cpu_banner(args) -> str:
    return (f"{'the selected op' if args.op != 'all' else f'all {len(OPS)} ops'} on the PyTorch reference path "
            f"(the Triton kernels need a GPU) at tiny shapes, in {args.dtype}, checked and then timed")


def exported_ops() -> List[str]:
    """The ops of flexdit_kernels: names of `__all__` that have a `<name>_ref` beside them."""
    return [n for n in fk.__all__ if f"{n}_ref" in fk.__all__]


def route(op: str, backward: bool = False) -> str:
    """How flexdit_kernels routed the latest call of `op` (and of its backward): `flexdit_kernels.last_route`."""
    fwd = fk.last_route(op) or ""
    bwd = fk.last_route(f"{op}_backward") if backward else None
    return f"{fwd or '-'}; backward {bwd}" if bwd and bwd != fwd else fwd


def route_summary(ops=OPS) -> str:
    """The routes of those `ops` that recorded one, compacted: "reference (backend)" when they agree, else
    "triton (tune=on): token_pool, silu; reference (tune=on): token_mean"."""
    by_route: Dict[str, List[str]] = {}
    for op in ops:
        if fk.last_route(op):
            by_route.setdefault(fk.last_route(op), []).append(op)
    return "; ".join(r if len(by_route) == 1 else f"{r}: {', '.join(names)}" for r, names in by_route.items())


# ----------------------------------------------------------------------------------------------------------------
# The PyTorch paths the kernels replace
# ----------------------------------------------------------------------------------------------------------------

def torch_token_pool(x, hw, grid):
    b, n, c = x.shape
    img = x.view(b, hw[0], hw[1], c).permute(0, 3, 1, 2)                  # (B, C, h, w), channels-last view
    return F.adaptive_avg_pool2d(img, grid).flatten(2).transpose(1, 2)     # (B, M, C)


def torch_token_mean(x, eps=1e-6):
    return F.layer_norm(x, x.shape[-1:], eps=eps).mean(1)                  # (B, C)


def torch_upsample_add(sparse, dense, hw, grid):
    b, m, c = sparse.shape
    img = sparse.view(b, grid[0], grid[1], c).permute(0, 3, 1, 2)          # (B, C, G, G)
    up = F.interpolate(img, size=tuple(hw), mode="nearest")                # (B, C, h, w)
    return up.permute(0, 2, 3, 1).reshape(b, -1, c) + dense                # (B, N, C)


def sdpa_backends() -> Dict[str, object]:
    from torch.nn.attention import SDPBackend
    names = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
             "math": "MATH"}
    return {k: getattr(SDPBackend, v) for k, v in names.items() if hasattr(SDPBackend, v)}


def torch_attention(q, k, v, backend=None):
    """SDPA as the model calls it: (B, L, H, D) views → (B, H, L, D) transposes → SDPA → (B, Lq, H·D) copy."""
    b, lq, h, d = q.shape
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if backend is None:
        out = F.scaled_dot_product_attention(qt, kt, vt)
    else:
        from torch.nn.attention import sdpa_kernel
        with sdpa_kernel([backend]):
            out = F.scaled_dot_product_attention(qt, kt, vt)
    return out.transpose(1, 2).reshape(b, lq, h * d)


def torch_layernorm_modulate(x, shift, scale, eps=1e-6, out_dtype=None):
    out = F.layer_norm(x, x.shape[-1:], eps=eps) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)
    return out.to(out_dtype or x.dtype)                                    # autocast's cast for the next GEMM


def torch_gated_residual(x, y, gate):
    return x + gate.unsqueeze(1) * y


def torch_gated_residual_layernorm_modulate(x, y, gate, shift, scale, eps=1e-6, out_dtype=None):
    r = torch_gated_residual(x, y, gate)
    return r, torch_layernorm_modulate(r, shift, scale, eps, out_dtype)


def torch_silu(x, out_dtype=None):
    return F.silu(x).to(out_dtype or x.dtype)


# ----------------------------------------------------------------------------------------------------------------
# The case table: inputs of one case, the paths it is timed against
# ----------------------------------------------------------------------------------------------------------------

def make_inputs(op: str, p: dict, device, dtype: torch.dtype):
    """(leaves, views) of one case: `views(*leaves)` are the op's arguments, made as the model makes them (q, k, v
    views of a fused projection; shift, scale, gate chunks of one (B, 6C) adaLN projection; the residual stream in
    fp32). Gradients are taken with respect to the leaves. `p`: b, c and the token grid as `side` (square) or `hw`,
    the sparse grid as `g` or `grid`; attention: b, lq, lk, h, d."""
    def r(*shape, dt=dtype):
        return torch.randn(*shape, device=device, dtype=dt)

    b = p["b"]
    if op == "attention":
        h, d = p["h"], p["d"]
        if p["lq"] == p["lk"]:   # self-attention: one fused qkv projection output
            return [r(b, p["lq"], 3, h, d)], lambda qkv: (qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
        return [r(b, p["lq"], h, d), r(b, p["lk"], 2, h, d)], lambda q, kv: (q, kv[:, :, 0], kv[:, :, 1])
    c = p["c"]
    hw = tuple(p["hw"]) if "hw" in p else (p.get("side", 1),) * 2
    grid = tuple(p["grid"]) if "grid" in p else (p.get("g", 1),) * 2
    n, m = hw[0] * hw[1], grid[0] * grid[1]
    x32 = torch.float32
    inputs = {
        "token_pool": lambda: ([r(b, n, c)], lambda x: (x, hw, grid)),
        "token_mean": lambda: ([r(b, n, c)], lambda x: (x, 1e-6)),
        "upsample_add": lambda: ([r(b, m, c), r(b, n, c)], lambda s, x: (s, x, hw, grid)),
        "layernorm_modulate": lambda: ([r(b, n, c), r(b, 6 * c)],
                                       lambda x, ada: (x, ada[:, :c], ada[:, c:2 * c], 1e-6, dtype)),
        "gated_residual": lambda: ([r(b, n, c, dt=x32), r(b, n, c), r(b, 6 * c)],
                                   lambda x, y, ada: (x, y, ada[:, 2 * c:3 * c])),
        "gated_residual_layernorm_modulate": lambda: (
            [r(b, n, c, dt=x32), r(b, n, c), r(b, 6 * c)],
            lambda x, y, ada: (x, y, ada[:, 2 * c:3 * c], ada[:, 3 * c:4 * c], ada[:, 4 * c:5 * c], 1e-6, dtype)),
        "silu": lambda: ([r(b, 2 * c, dt=x32)], lambda cond: (cond[:, c:], dtype)),   # fp32 conditioning, strided
    }
    if op not in inputs:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    return inputs[op]()


def baselines(op: str, p: dict, device) -> Tuple[Dict[str, Callable], List[str]]:
    """({impl: PyTorch path called with the op's arguments}, why some were left out): attention against every SDPA
    backend, every other op against `torch_<op>`."""
    if op != "attention":
        return {"torch": globals()[f"torch_{op}"]}, []
    out, skipped = {}, []
    for name, backend in sdpa_backends().items():
        if name == "math" and device.type == "cuda":   # scores, probabilities and a temporary in fp32
            if 3 * p["b"] * p["h"] * p["lq"] * p["lk"] * 4 >= torch.cuda.mem_get_info(device)[0] / 4:
                skipped.append("sdpa-math: needs > 1/4 of free memory")
                continue
        out[f"sdpa-{name}"] = functools.partial(torch_attention, backend=backend)
    return out, skipped


def _outputs(out) -> tuple:
    return out if isinstance(out, tuple) else (out,)


# ----------------------------------------------------------------------------------------------------------------
# Correctness before timing
# ----------------------------------------------------------------------------------------------------------------

TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}


def check_close(name: str, got: torch.Tensor, want: torch.Tensor, factor: float = 1.0) -> Optional[str]:
    """None when got ≈ want at `factor` × the dtype's tolerance, else a one-line reason."""
    atol, rtol = TOLERANCES.get(want.dtype, (1e-5, 1e-5))
    atol, rtol = factor * atol, factor * rtol
    if got.shape != want.shape:
        return f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    g, w = got.float(), want.float()
    if not torch.isfinite(g).all():
        return f"{name}: non-finite values"
    err = (g - w).abs()
    bad = err > atol + rtol * w.abs()
    if bad.any():
        return f"{name}: max abs err {err.max().item():.3g} (atol {atol:g}, rtol {rtol:g}), {int(bad.sum())} elements"
    return None


def check_case(op: str, leaves: List[torch.Tensor], views: Callable, backward: bool) -> Optional[str]:
    """None when `flexdit_kernels.<op>` agrees with `<op>_ref` on `views(*leaves)` forward and, with `backward`, in
    the gradients w.r.t. the leaves for one shared upstream gradient; else a one-line reason. Attention (a long
    reduction): its error against an fp32 reference at most 2x (forward) and 3x (gradients) PyTorch's in the same
    dtype. The other ops: the dtype's tolerance, 3x for gradients."""
    fn, ref = getattr(fk, op), getattr(fk, f"{op}_ref")
    upstream = [torch.randn_like(o) for o in _outputs(ref(*views(*leaves)))]

    def run(f, dtype=None):
        ls = [t.detach().to(dtype or t.dtype).requires_grad_(backward) for t in leaves]
        outs = _outputs(f(*views(*ls)))
        grads = torch.autograd.grad(outs, ls, [g.to(o.dtype) for g, o in zip(upstream, outs)]) if backward else ()
        return list(outs), list(grads)

    (outs, grads), (want, want_grads) = run(fn), run(ref)
    names = [op if len(outs) == 1 else f"{op} output {i}" for i in range(len(outs))]
    pairs = list(zip(names + [f"{op} grad {i}" for i in range(len(grads))], outs + grads, want + want_grads))
    if op != "attention":
        reasons = (check_close(name, g, w, 1.0 if i < len(outs) else 3.0) for i, (name, g, w) in enumerate(pairs))
        return next((reason for reason in reasons if reason), None)
    exact, exact_grads = run(ref, torch.float32)
    for i, ((name, g, w), e) in enumerate(zip(pairs, exact + exact_grads)):
        factor = 2.0 if i < len(outs) else 3.0
        err, torch_err = ((t.float() - e).abs().max().item() for t in (g, w))
        if not err <= factor * torch_err + 1e-5:   # also a NaN
            return f"{name}: max abs err {err:.3g} > {factor:g} x PyTorch's {torch_err:.3g} + 1e-5"
    return None


# ----------------------------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------------------------

ATTENTION_PATHS = ("few_keys", "split_k", "flash")
# Shapes (Lq, Lk) tried, in order, for a path that the timed attention shapes do not reach (checked, never timed).
PATH_PROBES = ((64, 64), (16, 16), (64, 1024), (16, 256), (192, 192), (256, 256), (320, 320), (1024, 1024))


def path_probe(path: str) -> Optional[Tuple[int, int]]:
    """The first (Lq, Lk) of PATH_PROBES that attention runs on `path` inside `triton_only()`, or None."""
    return next(((lq, lk) for lq, lk in PATH_PROBES if fk.attention_path(lq, lk, sdpa=False) == path), None)


@dataclass
class Case:
    """One shape of one op. `timed`: False for a check-only case (an attention path the timed shapes miss)."""

    op: str
    name: str
    params: dict
    timed: bool = True


def cases(op: str, shapes: dict) -> List[Case]:
    """Every case of an op family, in run order."""
    c = shapes["channels"]
    if op == "attention":
        h, d = shapes["heads"], shapes["head_dim"]
        out = [Case(op, f"attention B={b} Lq={lq} Lk={lk} H={h} D={d}",
                    dict(b=b, lq=lq, lk=lk, h=h, d=d, path=fk.attention_path(lq, lk), forced=False))
               for b, (lq, lk) in itertools.product(shapes["attn_batches"], shapes["attn_lens"])]
        reached, b = {case.params["path"] for case in out}, min(shapes["attn_batches"])
        for path in ATTENTION_PATHS:
            probe = None if path in reached else path_probe(path)
            if probe is not None:
                lq, lk = probe
                out.append(Case(op, f"attention B={b} Lq={lq} Lk={lk} H={h} D={d} [{path} path]",
                                dict(b=b, lq=lq, lk=lk, h=h, d=d, path=path, forced=True), timed=False))
        return out
    if op == "silu":
        return [Case(op, f"silu B={b} C={c}", dict(b=b, c=c)) for b in shapes["batches"]]
    grids = shapes["grids"] if op in ("token_pool", "upsample_add") else (None,)
    return [Case(op, f"{op} B={b} N={side}x{side} C={c}" + (f" G={g}" if g else ""),
                 dict(b=b, side=side, c=c, **({"g": g} if g else {})))
            for b, side, g in itertools.product(shapes["batches"], shapes["sides"], grids)]


# ----------------------------------------------------------------------------------------------------------------
# Checking and timing one case
# ----------------------------------------------------------------------------------------------------------------

class _Runner:
    """Checks (`check`: None or a one-line reason) and timings (`time`: the rows of one case) per case."""

    def __init__(self, args, tags: dict, device: torch.device, dtype: torch.dtype, copy_gbps: float):
        self.args, self.tags, self.device, self.dtype, self.copy_gbps = args, tags, device, dtype, copy_gbps
        self.on_cpu = device.type == "cpu"
        self.flex_impl = "flexdit-ref" if self.on_cpu else "flexdit"

    def check(self, case: Case) -> Tuple[Optional[str], Optional[BaseException]]:
        """(None or a one-line reason, the exception if the check raised one)."""
        try:
            leaves, views = make_inputs(case.op, case.params, self.device, self.dtype)
            with fk.triton_only() if case.params.get("forced") else contextlib.nullcontext():
                reason = check_case(case.op, leaves, views, self.args.backward)
            return (f"{case.params['path']} path: {reason}" if reason and "path" in case.params else reason), None
        except Exception as err:   # a launcher error is a failed check, not the end of the run
            return f"raised {type(err).__name__}: {first_line(err)}", err

    def bench(self, fn, grad_to_none=None):
        rep = getattr(self.args, "rep_ms", None) or 100.0
        return bench_fn(fn, self.device, warmup=max(1, int(rep / 4)), rep=max(1, int(rep)),
                        grad_to_none=grad_to_none, cpu_repeats=self.args.repeats or 5)

    def time(self, case: Case) -> Results:
        """Time the op and the PyTorch paths it replaces (and, on CUDA, its reference): forward, then forward +
        backward with --backward; ms, GB/s and the fraction of the copy bandwidth (attention: TFLOP/s), and the
        speedup over the fastest PyTorch path."""
        p = case.params
        res = Results(tags=dict(self.tags, batch=p["b"]))   # rows of this case carry its batch
        leaves, views = make_inputs(case.op, p, self.device, self.dtype)
        args = views(*leaves)
        torch_paths, skipped = baselines(case.op, p, self.device)
        fns = {self.flex_impl: getattr(fk, case.op)}
        for impl, fn in torch_paths.items():
            try:   # a backend that refuses the shape is left out with its reason
                fn(*args)
                if self.args.backward:
                    outs = _outputs(fn(*views(*[t.detach().requires_grad_(True) for t in leaves])))
                    torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
            except RuntimeError as err:
                skipped.append(f"{impl}: refused ({first_line(err)[:80]})")
                continue
            fns[impl] = fn
        if not self.on_cpu and case.op != "attention":
            fns["reference"] = getattr(fk, f"{case.op}_ref")
        res.notes.extend(f"{case.name}: {s}" for s in skipped)
        flops = 4 * p["b"] * p["h"] * p["lq"] * p["lk"] * p["d"] if case.op == "attention" else None
        nbytes = sum(t.numel() * t.element_size() for t in (*args, *_outputs(fns[self.flex_impl](*args)))
                     if isinstance(t, torch.Tensor))
        for mode in ("fwd", "fwd+bwd") if self.args.backward else ("fwd",):
            name = f"{case.name} {mode}"
            for impl, fn in fns.items():
                flex = impl == self.flex_impl
                if mode == "fwd":
                    t = self.bench(lambda: fn(*args))
                elif impl == "reference":
                    continue
                else:
                    ls = [t.detach().clone().requires_grad_(True) for t in leaves]
                    grads = [torch.randn_like(o) for o in _outputs(fn(*views(*ls)))]
                    t = self.bench(lambda: torch.autograd.backward(_outputs(fn(*views(*ls))), grads), grad_to_none=ls)
                res.add_timing("kernels", name, impl, t, note=p.get("path", "") if flex and mode == "fwd" else "",
                               route=route(case.op, backward=mode != "fwd") if flex else "")
                if flops:   # backward: 2.5x the forward's matmul FLOPs
                    tflops = (1 if mode == "fwd" else 3.5) * flops / (t[0] * 1e-3) / 1e12
                    res.add("kernels", name, impl, "TFLOP/s", tflops, "TFLOP/s")
                elif mode == "fwd":
                    gbps = nbytes / (t[0] * 1e-3) / 1e9
                    res.add("kernels", name, impl, "GB/s", gbps, "GB/s")
                    res.add("kernels", name, impl, "frac_copy_bw", gbps / self.copy_gbps)
            # The speedup over the fastest PyTorch path (the reference's time is in the table, not gated).
            times = [(res.get("kernels", name, i, "ms"), i) for i in fns if i not in (self.flex_impl, "reference")]
            flex_ms = res.get("kernels", name, self.flex_impl, "ms")
            if times and flex_ms:
                best_ms, best = min(times)
                res.add("kernels", name, self.flex_impl, "speedup", best_ms / flex_ms, "x", note=f"over {best}")
        return res


# ----------------------------------------------------------------------------------------------------------------
# Families in this process or in workers
# ----------------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _family_context(device: torch.device):
    """The reference backend on the CPU, the current one on a GPU; first-use tuning off either way, so that each op
    runs (and is checked and timed as) its kernel, never a PyTorch path a tuning decision picked."""
    with (fk.backend("reference") if device.type == "cpu" else fk.backend(fk.get_backend())), fk.tuning("off"):
        yield


def _poisons(err: BaseException) -> bool:
    """Whether an error leaves the CUDA context unusable (every later launch in the process would fail too)."""
    return "CUDA error" in str(err) or type(err).__name__ == "AcceleratorError"


def run_family(runner: _Runner, phase: str, family: List[Case], emit: Callable[[dict], None]) -> bool:
    """Check (`phase` "check") or time ("time": cases already checked) every case of one family, emitting
    {"start": name} before each case and after it {"case", "reason"} (reason None: passed), {"case", "rows",
    "notes"} or {"case", "error"}. Returns False when a CUDA fault ended the family early (the cases after it are
    left for a fresh process)."""
    with _family_context(runner.device):
        for case in family:
            emit({"start": case.name})
            if phase == "check":
                reason, err = runner.check(case)
                emit({"case": case.name, "reason": reason})
            else:
                try:
                    sub, err = runner.time(case), None
                    emit({"case": case.name, "rows": [asdict(r) for r in sub.rows], "notes": sub.notes})
                except Exception as e:
                    err = e
                    emit({"case": case.name, "error": f"timing raised {type(err).__name__}: {first_line(err)}"})
            if err is not None and _poisons(err):
                return False
    return True


POISONED = 3   # worker exit status: a CUDA fault ended it early; the parent starts a fresh worker for the rest


def worker_main(args, device: torch.device) -> int:
    """`kernels --worker {check,time} --worker-file PATH`: one family in this process, JSON lines to PATH.out."""
    with open(args.worker_file, encoding="utf-8") as f:
        job = json.load(f)
    family = [Case(**c) for c in job["cases"]]
    runner = _Runner(args, job["tags"], device, args.torch_dtype, job["copy_gbps"])
    out = open(args.worker_file + ".out", "a", encoding="utf-8")

    def emit(record):
        out.write(json.dumps(record) + "\n")
        out.flush()

    try:
        finished = run_family(runner, args.worker, family, emit)
        if finished:
            synchronize(device)
    finally:
        out.close()
    return 0 if finished else POISONED


def worker_command(args, phase: str, path: str) -> List[str]:
    """The command line of a worker for one family (same interpreter, flags and environment)."""
    cmd = [sys.executable, "-m", "bench", "kernels", "--device", args.device_resolved, "--dtype", args.dtype,
           "--worker", phase, "--worker-file", path]
    if args.backward:
        cmd.append("--backward")
    if args.repeats:
        cmd += ["--repeats", str(args.repeats)]
    if getattr(args, "rep_ms", None):
        cmd += ["--rep-ms", f"{args.rep_ms:g}"]
    return cmd


def _in_worker(args, phase: str, op: str, family: List[Case], tags: dict, copy_gbps: float,
               tmpdir: str) -> Tuple[Dict[str, dict], Optional[str]]:
    """Run one family's phase in child processes: ({case name: record}, None or why a worker ended early).

    When a worker dies inside a case (a crash, or a CUDA fault that leaves its context unusable), that case is failed
    with the reason and a fresh worker takes the cases after it, so one faulting shape does not hide the others. A
    worker that dies before starting any case (an import error, a timeout) ends the family: its cases are left
    without a record."""
    records, first_death = {}, None
    remaining = list(family)
    for attempt in range(len(family)):
        path = os.path.join(tmpdir, f"{phase}-{op}-{attempt}.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"cases": [asdict(c) for c in remaining], "tags": tags, "copy_gbps": copy_gbps}, f)
        died, started = None, []
        try:
            proc = subprocess.run(worker_command(args, phase, path), capture_output=True, text=True,
                                  timeout=args.family_timeout or None)
            if proc.returncode == POISONED:
                died = f"{op} worker stopped after a CUDA fault"
            elif proc.returncode != 0:
                last = [line for line in (proc.stderr or proc.stdout).strip().splitlines() if line.strip()]
                died = f"{op} worker exited with status {proc.returncode}" + (f": {last[-1].strip()[:200]}"
                                                                              if last else "")
        except subprocess.TimeoutExpired:
            died = f"{op} worker did not finish within --family-timeout {args.family_timeout:g} s"
        if os.path.exists(path + ".out"):
            with open(path + ".out", encoding="utf-8") as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        continue   # a line cut short by the crash
                    if "start" in rec:
                        started.append(rec["start"])
                    else:
                        records[rec["case"]] = rec
        if died is None:
            break
        first_death = first_death or died
        for name in started:
            if name not in records:   # the case it died in
                records[name] = {"case": name, "reason" if phase == "check" else "error":
                                 f"the worker died in this case: {died}"}
        remaining = [c for c in remaining if c.name not in records]
        if not remaining or not started or "--family-timeout" in died:
            break
    return records, first_death


def _in_process(runner: _Runner, phase: str, family: List[Case], records: Dict[str, dict]) -> Optional[str]:
    """Run one family's phase in this process, filling `records` ({case name: record}); None or why it ended early."""
    finished = run_family(runner, phase, family, lambda rec: "case" in rec and records.__setitem__(rec["case"], rec))
    return None if finished else "an earlier case left the CUDA context unusable"


def run(args, results: Results, device: torch.device) -> None:
    """Fill `results` with the kernel suite for `args.op` (one op or all): check every case, then time the passed."""
    on_cpu = device.type == "cpu"
    shapes = CPU_SHAPES if on_cpu else GPU_SHAPES
    dtype = args.torch_dtype
    args.device_resolved = device.type
    ops = OPS if args.op == "all" else (args.op,)
    isolate = (not on_cpu) if getattr(args, "isolate", None) is None else args.isolate
    families = {op: cases(op, shapes) for op in ops}
    copy_gbps = copy_bandwidth(device, results)
    if device.type == "cuda" and isolate:
        torch.cuda.empty_cache()   # the workers need the memory, this process does no more work on the GPU
    runner = _Runner(args, results.tags, device, dtype, copy_gbps)
    tmpdir = tempfile.mkdtemp(prefix="flexdit-bench-") if isolate else None
    if isolate:
        results.notes.append(f"each op family ran in a process of its own ({', '.join(ops)})")

    def family_records(phase, op, family, records) -> Optional[str]:
        if not isolate:
            return _in_process(runner, phase, family, records)
        got, died = _in_worker(args, phase, op, family, results.tags, copy_gbps, tmpdir)
        records.update(got)
        return died

    # Phase 1: every case of every family is checked before anything is timed.
    verdicts: Dict[str, Optional[str]] = {}
    for op, family in families.items():
        records: Dict[str, dict] = {}
        died = family_records("check", op, family, records)
        for case in family:
            rec = records.get(case.name)
            reason = rec["reason"] if rec else f"not checked: {died or 'no result from the worker'}"
            verdicts[case.name] = reason
            results.add("check", case.name, runner.flex_impl, "passed", float(reason is None),
                        batch=case.params["b"], note="check only" if not case.timed else "")
            if reason is not None:
                results.failures.append(f"{case.name}: {reason}")

    # Phase 2: only the cases that passed are timed.
    for op, family in families.items():
        todo, records, died = [c for c in family if c.timed and verdicts[c.name] is None], {}, None
        try:
            died = family_records("time", op, todo, records) if todo else None
        finally:   # also when the run is stopped (SIGTERM): the rows timed until then are kept
            for case in todo:
                rec = records.get(case.name, {"error": f"not timed: {died or 'no result from the worker'}"})
                if "error" in rec:
                    results.failures.append(f"{case.name}: {rec['error']}")
                else:
                    results.rows.extend(Row(**r) for r in rec["rows"])
                    results.notes.extend(rec["notes"])
    if tmpdir:
        shutil.rmtree(tmpdir, ignore_errors=True)


def check_table(results: Results) -> str:
    """One line per checked case: passed, or FAILED with the reason."""
    rows = [r for r in results.rows if r.suite == "check"]
    if not rows:
        return ""
    reasons = {}
    for failure in results.failures:
        name, _, reason = failure.partition(": ")
        reasons.setdefault(name, reason)
    width = max(len(r.case) for r in rows)
    lines = [f"correctness checks against the references ({sum(r.value == 1 for r in rows)}/{len(rows)} passed)"]
    for r in rows:
        verdict = "ok" if r.value == 1 else f"FAILED: {reasons.get(r.case, '')}"
        lines.append(f"  {r.case.ljust(width)}  {verdict}" + (" (check only)" if r.note else ""))
    return "\n".join(lines)


def table(results: Results) -> str:
    cols = ["ms", "GB/s", "frac_copy_bw", "TFLOP/s", "speedup"]
    parts = [check_table(results),
             format_table(results, "ceiling", ["ms", "GB/s", "TFLOP/s"], "measured ceilings"),
             format_table(results, "kernels", cols, "kernels (ms: median [p20, p80])")]
    return "\n\n".join(p for p in parts if p)
