"""`python -m bench kernels`: every flexdit_kernels op against the PyTorch path it replaces.

token_pool   vs permute → adaptive_avg_pool2d → permute
token_mean   vs layer_norm → mean
upsample_add vs interpolate(nearest) → add
attention    vs every SDPA backend that takes the shape, fed from the fused-projection layout the model has
             (q, k, v strided views of a (B, L, 3, H, D) or q (B, Lq, H, D) + kv (B, Lk, 2, H, D) tensor), the
             transposes in and the transpose + reshape copy out INCLUDED, as `flexdit.layers.Attention` does.

Two phases. First every case of every op family is checked against its `*_ref` (forward, and gradients with
--backward; attention on each of its paths few_keys / split_k / flash, forcing a path the timed shapes do not reach);
then only the cases that passed are timed. A wrong kernel is reported FAILED and never timed.

On CUDA each op family runs its checks, and later its timings, in a process of its own (--isolate, the default
there): a CUDA fault such as an illegal memory access poisons the whole process, so one broken family would otherwise
turn every later measurement into an error. Workers append one JSON line per case to a file, so the cases finished
before a crash are kept and the rest are reported as failed with the worker's last words.
"""
import contextlib
import importlib
import itertools
import json
import math
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

from .common import DTYPES, Results, Row, bench_fn, copy_bandwidth, format_table, synchronize

OPS = ("token_pool", "token_mean", "upsample_add", "attention")

# DiT-XL/2 shapes: 512² images → 32×32 tokens, 256² → 16×16 tokens; C = 1152, 16 heads of 72.
GPU_SHAPES = dict(batches=(8, 32), sides=(32, 16), channels=1152, grids=(6, 8, 10), heads=16, head_dim=72,
                  attn_batches=(32, 8), attn_lens=((1024, 64), (64, 1024), (64, 64), (1024, 1024)))
# Tiny shapes for `--device cpu` (the reference ops only; seconds, not a measurement).
CPU_SHAPES = dict(batches=(2,), sides=(8,), channels=64, grids=(4,), heads=2, head_dim=16,
                  attn_batches=(2,), attn_lens=((64, 16), (16, 64)))


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


# ----------------------------------------------------------------------------------------------------------------
# Correctness before timing
# ----------------------------------------------------------------------------------------------------------------

TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}


def check_close(name: str, got: torch.Tensor, want: torch.Tensor) -> Optional[str]:
    """None when got ≈ want at the dtype's tolerance, else a one-line reason."""
    atol, rtol = TOLERANCES.get(want.dtype, (1e-5, 1e-5))
    if got.shape != want.shape:
        return f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    g, w = got.float(), want.float()
    if not torch.isfinite(g).all():
        return f"{name}: non-finite values"
    err = (g - w).abs()
    bad = err > atol + rtol * w.abs()
    if bad.any():
        return f"{name}: max abs err {err.max().item():.3g} (atol {atol}, rtol {rtol}), {int(bad.sum())} elements"
    return None


def check_attention(got: torch.Tensor, q, k, v, factor: float = 2.0) -> Optional[str]:
    """STYLE's rule: error vs an fp32 reference at most `factor` × the error of PyTorch in the same dtype."""
    exact = fk.attention_ref(q.float(), k.float(), v.float())
    same_dtype = fk.attention_ref(q, k, v).float()
    torch_err = (same_dtype - exact).abs().max().item()
    err = (got.float() - exact).abs().max().item()
    if not math.isfinite(err) or err > factor * torch_err + 1e-5:
        return f"attention: max abs err {err:.3g} > {factor} x PyTorch's {torch_err:.3g} + 1e-5"
    return None


def check_grads(name, fn, ref_fn, inputs: List[torch.Tensor], grad_out: torch.Tensor) -> Optional[str]:
    """Gradients of fn and ref_fn w.r.t. `inputs` for one shared upstream gradient (same-dtype tolerance, ×3)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    got = torch.autograd.grad(fn(*leaves), leaves, grad_out)
    leaves_ref = [t.detach().clone().requires_grad_(True) for t in inputs]
    want = torch.autograd.grad(ref_fn(*leaves_ref), leaves_ref, grad_out)
    for i, (g, w) in enumerate(zip(got, want)):
        atol, rtol = TOLERANCES.get(w.dtype, (1e-5, 1e-5))
        err = (g.float() - w.float()).abs()
        bad = err > 3 * (atol + rtol * w.float().abs())
        if not torch.isfinite(g).all() or bad.any():
            return f"{name} grad {i}: max abs err {err.max().item():.3g}"
    return None


# ----------------------------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------------------------

ATTENTION_PATHS = ("few_keys", "split_k", "flash")
# Shapes (Lq, Lk) tried, in order, for a path that the timed attention shapes do not reach (checked, never timed).
PATH_PROBES = ((64, 64), (16, 16), (64, 1024), (16, 256), (192, 192), (256, 256), (320, 320), (1024, 1024))


@contextlib.contextmanager
def triton_everywhere():
    """Keep every attention shape on the Triton kernels (no routing of dense shapes to SDPA) inside the block."""
    module = importlib.import_module("flexdit_kernels._attention")
    saved = module.ROUTES
    module.ROUTES = tuple(r for r in saved if r.path != "sdpa")
    try:
        yield
    finally:
        module.ROUTES = saved


def attention_path_of(lq: int, lk: int, forced: bool = False) -> str:
    return fk.attention_path(lq, lk, sdpa=not forced)


@dataclass
class Case:
    """One shape of one op. `timed`: False for a check-only case (an attention path the timed shapes miss)."""

    op: str
    name: str
    params: dict
    timed: bool = True

    def to_json(self) -> dict:
        return {"op": self.op, "name": self.name, "params": self.params, "timed": self.timed}


def cases(op: str, shapes: dict) -> List[Case]:
    """Every case of an op family, in run order."""
    out = []
    c = shapes["channels"]
    if op == "attention":
        h, d = shapes["heads"], shapes["head_dim"]
        reached = set()
        for b, (lq, lk) in itertools.product(shapes["attn_batches"], shapes["attn_lens"]):
            path = attention_path_of(lq, lk)
            reached.add(path)
            out.append(Case(op, f"attention B={b} Lq={lq} Lk={lk} H={h} D={d}",
                            dict(b=b, lq=lq, lk=lk, h=h, d=d, path=path, forced=False)))
        b = min(shapes["attn_batches"])
        for path in ATTENTION_PATHS:
            if path in reached:
                continue
            probe = next(((lq, lk) for lq, lk in PATH_PROBES if attention_path_of(lq, lk, True) == path), None)
            if probe is None:   # the routing has no such path any more
                continue
            lq, lk = probe
            out.append(Case(op, f"attention B={b} Lq={lq} Lk={lk} H={h} D={d} [{path} path]",
                            dict(b=b, lq=lq, lk=lk, h=h, d=d, path=path, forced=True), timed=False))
        return out
    for b, side in itertools.product(shapes["batches"], shapes["sides"]):
        if op == "token_mean":
            out.append(Case(op, f"token_mean B={b} N={side}x{side} C={c}", dict(b=b, side=side, c=c)))
            continue
        for g in shapes["grids"]:
            out.append(Case(op, f"{op} B={b} N={side}x{side} C={c} G={g}", dict(b=b, side=side, c=c, g=g)))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Checking and timing one family
# ----------------------------------------------------------------------------------------------------------------

def _fwd_bwd(fn: Callable, grad_out: torch.Tensor) -> Callable:
    def run():
        fn().backward(grad_out)
    return run


class _Runner:
    """Checks (`check_<op>`: None or a one-line reason) and timings (`time_<op>`: rows into `results`) per case."""

    def __init__(self, args, results: Results, device: torch.device, dtype: torch.dtype, copy_gbps: float):
        self.args, self.results, self.device, self.dtype = args, results, device, dtype
        self.copy_gbps = copy_gbps
        self.on_cpu = device.type == "cpu"
        self.flex_impl = "flexdit-ref" if self.on_cpu else "flexdit"

    def check(self, case: Case) -> Tuple[Optional[str], Optional[BaseException]]:
        """(None or a one-line reason, the exception if the check raised one)."""
        try:
            if case.params.get("forced"):
                with triton_everywhere():
                    return getattr(self, f"check_{case.op}")(**_args(case)), None
            return getattr(self, f"check_{case.op}")(**_args(case)), None
        except Exception as err:   # a launcher error is a failed check, not the end of the run
            return f"raised {type(err).__name__}: {_first_line(err)}", err

    def time(self, case: Case) -> None:
        self.results.tags["batch"] = case.params["b"]   # rows of this case carry its batch
        getattr(self, f"time_{case.op}")(case.name, **_args(case))

    def bench(self, fn, grad_to_none=None):
        rep = getattr(self.args, "rep_ms", None) or 100.0
        return bench_fn(fn, self.device, warmup=max(1, int(rep / 4)), rep=max(1, int(rep)),
                        grad_to_none=grad_to_none, cpu_repeats=self.args.repeats or 5)

    def memory_bound(self, case: str, impls: Dict[str, Callable], nbytes: int, speedup_over: str,
                     bwd: Optional[Tuple[Dict[str, Callable], List[torch.Tensor]]] = None):
        """Time each impl forward (and forward+backward), add ms, GB/s, fraction of copy bandwidth, speedup."""
        res = self.results
        for impl, fn in impls.items():
            t = self.bench(fn)
            res.add_timing("kernels", f"{case} fwd", impl, t)
            gbps = nbytes / (t[0] * 1e-3) / 1e9
            res.add("kernels", f"{case} fwd", impl, "GB/s", gbps, "GB/s")
            res.add("kernels", f"{case} fwd", impl, "frac_copy_bw", gbps / self.copy_gbps)
        self._speedups(f"{case} fwd", list(impls), speedup_over)
        if bwd is not None:
            fns, leaves = bwd
            for impl, fn in fns.items():
                res.add_timing("kernels", f"{case} fwd+bwd", impl, self.bench(fn, grad_to_none=leaves))
            self._speedups(f"{case} fwd+bwd", list(fns), speedup_over)

    def _speedups(self, case, impls, baseline):
        base = self.results.get("kernels", case, baseline, "ms")
        for impl in impls:
            if impl in (baseline, "reference"):   # the reference's time is in the table; its ratio is not gated
                continue
            ms = self.results.get("kernels", case, impl, "ms")
            if base is not None and ms:
                self.results.add("kernels", case, impl, "speedup", base / ms, "x", note=f"over {baseline}")

    def randn(self, *shape):
        return torch.randn(*shape, device=self.device, dtype=self.dtype)

    # --- token_pool ----------------------------------------------------------------------------------------------

    def check_token_pool(self, b, side, c, g):
        hw, grid = (side, side), (g, g)
        x = self.randn(b, side * side, c)
        reason = check_close("token_pool", fk.token_pool(x, hw, grid), fk.token_pool_ref(x, hw, grid))
        if reason is None and self.args.backward:
            reason = check_grads("token_pool", lambda t: fk.token_pool(t, hw, grid),
                                 lambda t: fk.token_pool_ref(t, hw, grid), [x], self.randn(b, g * g, c))
        return reason

    def time_token_pool(self, case, b, side, c, g):
        hw, grid = (side, side), (g, g)
        x = self.randn(b, side * side, c)
        impls = {self.flex_impl: lambda: fk.token_pool(x, hw, grid), "torch": lambda: torch_token_pool(x, hw, grid)}
        if not self.on_cpu:
            impls["reference"] = lambda: fk.token_pool_ref(x, hw, grid)
        nbytes = (x.numel() + b * g * g * c) * x.element_size()
        bwd = None
        if self.args.backward:
            xl = x.detach().clone().requires_grad_(True)
            go = self.randn(b, g * g, c)
            bwd = ({self.flex_impl: _fwd_bwd(lambda: fk.token_pool(xl, hw, grid), go),
                    "torch": _fwd_bwd(lambda: torch_token_pool(xl, hw, grid), go)}, [xl])
        self.memory_bound(case, impls, nbytes, "torch", bwd)

    # --- token_mean ----------------------------------------------------------------------------------------------

    def check_token_mean(self, b, side, c):
        x = self.randn(b, side * side, c)
        reason = check_close("token_mean", fk.token_mean(x, 1e-6), fk.token_mean_ref(x, 1e-6))
        if reason is None and self.args.backward:
            reason = check_grads("token_mean", lambda t: fk.token_mean(t, 1e-6), lambda t: fk.token_mean_ref(t, 1e-6),
                                 [x], self.randn(b, c))
        return reason

    def time_token_mean(self, case, b, side, c):
        x = self.randn(b, side * side, c)
        impls = {self.flex_impl: lambda: fk.token_mean(x, 1e-6), "torch": lambda: torch_token_mean(x)}
        if not self.on_cpu:
            impls["reference"] = lambda: fk.token_mean_ref(x, 1e-6)
        nbytes = (x.numel() + b * c) * x.element_size()
        bwd = None
        if self.args.backward:
            xl = x.detach().clone().requires_grad_(True)
            go = self.randn(b, c)
            bwd = ({self.flex_impl: _fwd_bwd(lambda: fk.token_mean(xl, 1e-6), go),
                    "torch": _fwd_bwd(lambda: torch_token_mean(xl), go)}, [xl])
        self.memory_bound(case, impls, nbytes, "torch", bwd)

    # --- upsample_add --------------------------------------------------------------------------------------------

    def check_upsample_add(self, b, side, c, g):
        hw, grid = (side, side), (g, g)
        s, d = self.randn(b, g * g, c), self.randn(b, side * side, c)
        reason = check_close("upsample_add", fk.upsample_add(s, d, hw, grid), fk.upsample_add_ref(s, d, hw, grid))
        if reason is None and self.args.backward:
            reason = check_grads("upsample_add", lambda a, e: fk.upsample_add(a, e, hw, grid),
                                 lambda a, e: fk.upsample_add_ref(a, e, hw, grid), [s, d], torch.randn_like(d))
        return reason

    def time_upsample_add(self, case, b, side, c, g):
        hw, grid = (side, side), (g, g)
        s, d = self.randn(b, g * g, c), self.randn(b, side * side, c)
        impls = {self.flex_impl: lambda: fk.upsample_add(s, d, hw, grid),
                 "torch": lambda: torch_upsample_add(s, d, hw, grid)}
        if not self.on_cpu:
            impls["reference"] = lambda: fk.upsample_add_ref(s, d, hw, grid)
        nbytes = (s.numel() + 2 * d.numel()) * d.element_size()
        bwd = None
        if self.args.backward:
            sl, dl = s.detach().clone().requires_grad_(True), d.detach().clone().requires_grad_(True)
            go = torch.randn_like(d)
            bwd = ({self.flex_impl: _fwd_bwd(lambda: fk.upsample_add(sl, dl, hw, grid), go),
                    "torch": _fwd_bwd(lambda: torch_upsample_add(sl, dl, hw, grid), go)}, [sl, dl])
        self.memory_bound(case, impls, nbytes, "torch", bwd)

    # --- attention -----------------------------------------------------------------------------------------------

    def check_attention(self, b, lq, lk, h, d, path, forced):
        make_inputs = attention_inputs(b, lq, lk, h, d, self.device, self.dtype)
        _, (q, k, v) = make_inputs()
        reason = check_attention(fk.attention(q, k, v), q, k, v)
        if reason is None and self.args.backward:
            reason = check_attention_grads(make_inputs, self.dtype)
        return None if reason is None else f"{path} path: {reason}"

    def time_attention(self, case, b, lq, lk, h, d, path, forced):
        dev, dt = self.device, self.dtype
        make_inputs = attention_inputs(b, lq, lk, h, d, dev, dt)
        _, (q, k, v) = make_inputs()
        fwd_flops = 2 * b * h * lq * lk * (d + d)
        impls = {self.flex_impl: lambda: fk.attention(q, k, v).reshape(b, lq, h * d)}
        skipped = []
        for name, backend in sdpa_backends().items():
            if name == "math" and not self._math_fits(b, h, lq, lk):
                skipped.append(f"sdpa-{name}: needs > 1/4 of free memory")
                continue
            try:
                torch_attention(q, k, v, backend)
                if self.args.backward:
                    _, qkv = make_inputs(True)
                    torch_attention(*qkv, backend=backend).sum().backward()
            except RuntimeError as err:
                skipped.append(f"sdpa-{name}: refused ({_first_line(err)[:80]})")
                continue
            impls[f"sdpa-{name}"] = (lambda bk: lambda: torch_attention(q, k, v, bk))(backend)
        self.results.notes.extend(f"{case}: {s}" for s in skipped)
        res = self.results
        for impl, fn in impls.items():
            t = self.bench(fn)
            res.add_timing("kernels", f"{case} fwd", impl, t, note=path if impl.startswith("flexdit") else "")
            res.add("kernels", f"{case} fwd", impl, "TFLOP/s", fwd_flops / (t[0] * 1e-3) / 1e12, "TFLOP/s")
        self._best_sdpa_speedup(f"{case} fwd", list(impls))
        if self.args.backward:
            leaves, qkv = make_inputs(True)
            go = torch.randn(b, lq, h * d, device=dev, dtype=dt)
            fns = {self.flex_impl: _fwd_bwd(lambda: fk.attention(*qkv).reshape(b, lq, h * d), go)}
            for impl in impls:
                if impl.startswith("sdpa-"):
                    backend = sdpa_backends()[impl[len("sdpa-"):]]
                    fns[impl] = (lambda bk: _fwd_bwd(lambda: torch_attention(*qkv, backend=bk), go))(backend)
            for impl, fn in fns.items():
                t = self.bench(fn, grad_to_none=leaves)
                res.add_timing("kernels", f"{case} fwd+bwd", impl, t)
                res.add("kernels", f"{case} fwd+bwd", impl, "TFLOP/s", 3.5 * fwd_flops / (t[0] * 1e-3) / 1e12,
                        "TFLOP/s")
            self._best_sdpa_speedup(f"{case} fwd+bwd", list(fns))

    def _math_fits(self, b, h, lq, lk):
        if self.device.type != "cuda":
            return True
        free, _ = torch.cuda.mem_get_info(self.device)
        return 3 * b * h * lq * lk * 4 < free / 4   # scores, probabilities and a temporary in fp32

    def _best_sdpa_speedup(self, case, impls):
        sdpa = [(self.results.get("kernels", case, i, "ms"), i) for i in impls if i.startswith("sdpa-")]
        sdpa = [(ms, i) for ms, i in sdpa if ms]
        flex = self.results.get("kernels", case, self.flex_impl, "ms")
        if sdpa and flex:
            best_ms, best = min(sdpa)
            self.results.add("kernels", case, self.flex_impl, "speedup", best_ms / flex, "x", note=f"over {best}")


def attention_inputs(b, lq, lk, h, d, device, dtype) -> Callable:
    """make_inputs(requires_grad) -> (leaves, (q, k, v)): strided views of the fused projections the model makes."""
    def make_inputs(requires_grad=False):
        if lq == lk:   # self-attention: one fused qkv projection output
            qkv = torch.randn(b, lq, 3, h, d, device=device, dtype=dtype, requires_grad=requires_grad)
            return [qkv], (qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
        q = torch.randn(b, lq, h, d, device=device, dtype=dtype, requires_grad=requires_grad)
        kv = torch.randn(b, lk, 2, h, d, device=device, dtype=dtype, requires_grad=requires_grad)
        return [q, kv], (q, kv[:, :, 0], kv[:, :, 1])
    return make_inputs


def check_attention_grads(make_inputs, dtype, factor: float = 3.0) -> Optional[str]:
    """STYLE's rule for gradients: error vs fp32 at most 3x the error of PyTorch's SDPA in the same dtype."""
    leaves, (q, _, _) = make_inputs(False)
    go = torch.randn(q.shape, device=q.device, dtype=dtype)
    self_attention = len(leaves) == 1

    def grads(fn, dt):
        ls = [t.detach().to(dt).requires_grad_(True) for t in leaves]
        views = (ls[0][:, :, 0], ls[0][:, :, 1], ls[0][:, :, 2]) if self_attention else \
            (ls[0], ls[1][:, :, 0], ls[1][:, :, 1])
        return torch.autograd.grad(fn(*views), ls, go.to(dt))

    exact = grads(fk.attention_ref, torch.float32)
    same_dtype = grads(fk.attention_ref, dtype)
    got = grads(fk.attention, dtype)
    for i, (g, t, e) in enumerate(zip(got, same_dtype, exact)):
        err = (g.float() - e).abs().max().item()
        torch_err = (t.float() - e).abs().max().item()
        if not math.isfinite(err) or err > factor * torch_err + 1e-5:
            return f"attention grad {i}: max abs err {err:.3g} > {factor} x PyTorch's {torch_err:.3g} + 1e-5"
    return None


def _args(case: Case) -> dict:
    return dict(case.params)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# ----------------------------------------------------------------------------------------------------------------
# Families in this process or in workers
# ----------------------------------------------------------------------------------------------------------------

def _family_context(device: torch.device):
    return fk.backend("reference") if device.type == "cpu" else fk.backend(fk.get_backend())


def _poisons(err: BaseException) -> bool:
    """Whether an error leaves the CUDA context unusable (every later launch in the process would fail too)."""
    return "CUDA error" in str(err) or type(err).__name__ == "AcceleratorError"


def check_family(runner: _Runner, family: List[Case], emit: Callable[[dict], None]) -> bool:
    """Check every case of one family; emit({"case", "reason"}) per case (reason None: passed). Returns False when
    a CUDA fault ended the family early (the cases after it are left for a fresh process)."""
    with _family_context(runner.device):
        for case in family:
            emit({"start": case.name})
            reason, err = runner.check(case)
            emit({"case": case.name, "reason": reason})
            if err is not None and _poisons(err):
                return False
    return True


def time_family(runner: _Runner, family: List[Case], emit: Callable[[dict], None]) -> bool:
    """Time the given (already checked) cases; emit({"case", "rows", "notes"}) per case. Returns False when a CUDA
    fault ended the family early."""
    with _family_context(runner.device):
        for case in family:
            emit({"start": case.name})
            sub = Results(tags=dict(runner.results.tags))
            runner.results, saved = sub, runner.results
            try:
                runner.time(case)
                emit({"case": case.name, "rows": [asdict(r) for r in sub.rows], "notes": sub.notes})
            except Exception as err:
                emit({"case": case.name, "error": f"timing raised {type(err).__name__}: {_first_line(err)}"})
                if _poisons(err):
                    return False
            finally:
                runner.results = saved
    return True


POISONED = 3   # worker exit status: a CUDA fault ended it early; the parent starts a fresh worker for the rest


def worker_main(args, device: torch.device) -> int:
    """`kernels --worker {check,time} --worker-file PATH`: one family in this process, JSON lines to PATH.out."""
    with open(args.worker_file, encoding="utf-8") as f:
        job = json.load(f)
    family = [Case(**c) for c in job["cases"]]
    runner = _Runner(args, Results(tags=job["tags"]), device, args.torch_dtype, job["copy_gbps"])
    out = open(args.worker_file + ".out", "a", encoding="utf-8")

    def emit(record):
        out.write(json.dumps(record) + "\n")
        out.flush()

    try:
        finished = (check_family if args.worker == "check" else time_family)(runner, family, emit)
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


def _one_worker(args, phase: str, op: str, family: List[Case], tags: dict, copy_gbps: float, path: str):
    """One child process over `family`: (records by case, names of cases it started, None or why it ended early)."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"cases": [c.to_json() for c in family], "tags": tags, "copy_gbps": copy_gbps}, f)
    if os.path.exists(path + ".out"):
        os.remove(path + ".out")
    timeout = args.family_timeout or None
    died = None
    try:
        proc = subprocess.run(worker_command(args, phase, path), capture_output=True, text=True, timeout=timeout)
        if proc.returncode == POISONED:
            died = f"{op} worker stopped after a CUDA fault"
        elif proc.returncode != 0:
            last = [line for line in (proc.stderr or proc.stdout).strip().splitlines() if line.strip()]
            died = f"{op} worker exited with status {proc.returncode}" + (f": {last[-1].strip()[:200]}" if last else "")
    except subprocess.TimeoutExpired:
        died = f"{op} worker did not finish within --family-timeout {args.family_timeout:g} s"
    records, started = {}, []
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
    return records, started, died


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
        got, started, died = _one_worker(args, phase, op, remaining, tags, copy_gbps, path)
        records.update(got)
        if died is None:
            break
        first_death = first_death or died
        in_flight = [name for name in started if name not in got]
        for name in in_flight:
            records[name] = ({"case": name, "reason": f"the worker died in this case: {died}"} if phase == "check"
                             else {"case": name, "error": f"the worker died in this case: {died}"})
        remaining = [c for c in remaining if c.name not in records]
        if not remaining or not started or "--family-timeout" in died:
            break
    return records, first_death


def run(args, results: Results, device: torch.device) -> None:
    """Fill `results` with the kernel suite for `args.op` (one op or all): check every case, then time the passed."""
    on_cpu = device.type == "cpu"
    shapes = CPU_SHAPES if on_cpu else GPU_SHAPES
    dtype = torch.float32 if on_cpu else args.torch_dtype
    args.torch_dtype = dtype
    args.dtype = {v: k for k, v in DTYPES.items()}[dtype]
    args.device_resolved = device.type
    ops = OPS if args.op == "all" else (args.op,)
    isolate = (not on_cpu) if getattr(args, "isolate", None) is None else args.isolate
    families = {op: cases(op, shapes) for op in ops}
    copy_gbps = copy_bandwidth(device, results)
    if device.type == "cuda" and isolate:
        torch.cuda.empty_cache()   # the workers need the memory, this process does no more work on the GPU
    runner = _Runner(args, results, device, dtype, copy_gbps)
    tmpdir = tempfile.mkdtemp(prefix="flexdit-bench-") if isolate else None
    if isolate:
        results.notes.append(f"each op family ran in a process of its own ({', '.join(ops)})")
    exported = [n for n in fk.__all__ if f"{n}_ref" in fk.__all__]
    missing = [n for n in exported if n not in OPS]
    if missing and args.op == "all":
        results.notes.append(f"not in this suite yet (no cases in bench/kernels.py): {', '.join(missing)}")

    # Phase 1: every case of every family is checked before anything is timed.
    verdicts: Dict[str, Optional[str]] = {}
    for op, family in families.items():
        if isolate:
            records, died = _in_worker(args, "check", op, family, results.tags, copy_gbps, tmpdir)
            for case in family:
                rec = records.get(case.name)
                verdicts[case.name] = rec["reason"] if rec else f"not checked: {died or 'no result from the worker'}"
        else:
            check_family(runner, family, lambda rec: "case" in rec and verdicts.__setitem__(rec["case"], rec["reason"]))
            for case in family:   # after a CUDA fault this process cannot check the rest
                verdicts.setdefault(case.name, "not checked: an earlier case left the CUDA context unusable")
        for case in family:
            reason = verdicts[case.name]
            results.add("check", case.name, runner.flex_impl, "passed", float(reason is None),
                        batch=case.params["b"], note="check only" if not case.timed else "")
            if reason is not None:
                results.failures.append(f"{case.name}: {reason}")

    # Phase 2: only the cases that passed are timed.
    def accept(rec):
        if "error" in rec:
            results.failures.append(f"{rec['case']}: {rec['error']}")
        else:
            results.rows.extend(Row(**r) for r in rec["rows"])
            results.notes.extend(rec["notes"])

    for op, family in families.items():
        todo = [c for c in family if c.timed and verdicts[c.name] is None]
        if not todo:
            continue
        if not isolate:
            if not time_family(runner, todo, lambda rec: "case" in rec and accept(rec)):
                results.failures.append(f"{op}: timing stopped after a CUDA fault left the context unusable")
            continue
        records, died = _in_worker(args, "time", op, todo, results.tags, copy_gbps, tmpdir)
        for case in todo:
            rec = records.get(case.name)
            if rec is None:
                results.failures.append(f"{case.name}: not timed: {died or 'no result from the worker'}")
            else:
                accept(rec)
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
