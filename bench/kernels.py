"""`python -m bench kernels`: every flexdit_kernels op against the PyTorch path it replaces.

token_pool   vs permute → adaptive_avg_pool2d → permute
token_mean   vs layer_norm → mean
upsample_add vs interpolate(nearest) → add
attention    vs every SDPA backend that takes the shape, fed from the fused-projection layout the model has
             (q, k, v strided views of a (B, L, 3, H, D) or q (B, Lq, H, D) + kv (B, Lk, 2, H, D) tensor), the
             transposes in and the transpose + reshape copy out INCLUDED, as `flexdit.layers.Attention` does.

Each kernel is checked against its `*_ref` before it is timed; a wrong kernel is reported FAILED and never timed.
"""
import itertools
import math
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

import flexdit_kernels as fk

from .common import Results, bench_fn, copy_bandwidth, format_table

OPS = ("token_pool", "token_mean", "upsample_add", "attention")

# DiT-XL/2 shapes (REFERENCE §6): 512² → 32×32 tokens, 256² → 16×16 tokens.
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
# Running one case
# ----------------------------------------------------------------------------------------------------------------

def _fwd_bwd(fn: Callable, leaves: List[torch.Tensor], grad_out: torch.Tensor) -> Callable:
    def run():
        fn().backward(grad_out)
    return run


class _Runner:
    def __init__(self, args, results: Results, device: torch.device, dtype: torch.dtype):
        self.args, self.results, self.device, self.dtype = args, results, device, dtype
        self.copy_gbps = None
        self.on_cpu = device.type == "cpu"
        self.flex_impl = "flexdit-ref" if self.on_cpu else "flexdit"

    def time(self, fn, grad_to_none=None):
        return bench_fn(fn, self.device, grad_to_none=grad_to_none, cpu_repeats=self.args.repeats or 5)

    def memory_bound(self, op: str, case: str, impls: Dict[str, Callable], nbytes: int, speedup_over: str,
                     bwd: Optional[Tuple[Dict[str, Callable], List[torch.Tensor]]] = None):
        """Time each impl forward (and forward+backward), add ms, GB/s, fraction of copy bandwidth, speedup."""
        res = self.results
        for impl, fn in impls.items():
            t = self.time(fn)
            res.add_timing("kernels", f"{case} fwd", impl, t)
            gbps = nbytes / (t[0] * 1e-3) / 1e9
            res.add("kernels", f"{case} fwd", impl, "GB/s", gbps, "GB/s")
            res.add("kernels", f"{case} fwd", impl, "frac_copy_bw", gbps / self.copy_gbps)
        self._speedups(f"{case} fwd", list(impls), speedup_over)
        if bwd is not None:
            fns, leaves = bwd
            for impl, fn in fns.items():
                res.add_timing("kernels", f"{case} fwd+bwd", impl, self.time(fn, grad_to_none=leaves))
            self._speedups(f"{case} fwd+bwd", list(fns), speedup_over)

    def _speedups(self, case, impls, baseline):
        base = self.results.get("kernels", case, baseline, "ms")
        for impl in impls:
            if impl in (baseline, "reference"):   # the reference's time is in the table; its ratio is not gated
                continue
            ms = self.results.get("kernels", case, impl, "ms")
            if base is not None and ms:
                self.results.add("kernels", case, impl, "speedup", base / ms, "x", note=f"over {baseline}")

    def fail(self, case: str, reason: str):
        self.results.failures.append(f"{case}: {reason}")

    # --- ops -----------------------------------------------------------------------------------------------------

    def token_pool(self, b, side, c, g):
        self.results.tags["batch"] = b   # rows of this case carry its batch
        hw, grid = (side, side), (g, g)
        case = f"token_pool B={b} N={side}x{side} C={c} G={g}"
        x = torch.randn(b, side * side, c, device=self.device, dtype=self.dtype)
        reason = check_close("token_pool", fk.token_pool(x, hw, grid), fk.token_pool_ref(x, hw, grid))
        if reason is None and self.args.backward:
            reason = check_grads("token_pool", lambda t: fk.token_pool(t, hw, grid),
                                 lambda t: fk.token_pool_ref(t, hw, grid), [x],
                                 torch.randn(b, g * g, c, device=self.device, dtype=self.dtype))
        if reason:
            return self.fail(case, reason)
        impls = {self.flex_impl: lambda: fk.token_pool(x, hw, grid), "torch": lambda: torch_token_pool(x, hw, grid)}
        if not self.on_cpu:
            impls["reference"] = lambda: fk.token_pool_ref(x, hw, grid)
        nbytes = (x.numel() + b * g * g * c) * x.element_size()
        bwd = None
        if self.args.backward:
            xl = x.detach().clone().requires_grad_(True)
            go = torch.randn(b, g * g, c, device=self.device, dtype=self.dtype)
            bwd = ({self.flex_impl: _fwd_bwd(lambda: fk.token_pool(xl, hw, grid), [xl], go),
                    "torch": _fwd_bwd(lambda: torch_token_pool(xl, hw, grid), [xl], go)}, [xl])
        self.memory_bound("token_pool", case, impls, nbytes, "torch", bwd)

    def token_mean(self, b, side, c):
        self.results.tags["batch"] = b   # rows of this case carry its batch
        case = f"token_mean B={b} N={side}x{side} C={c}"
        x = torch.randn(b, side * side, c, device=self.device, dtype=self.dtype)
        reason = check_close("token_mean", fk.token_mean(x, 1e-6), fk.token_mean_ref(x, 1e-6))
        if reason is None and self.args.backward:
            reason = check_grads("token_mean", lambda t: fk.token_mean(t, 1e-6), lambda t: fk.token_mean_ref(t, 1e-6),
                                 [x], torch.randn(b, c, device=self.device, dtype=self.dtype))
        if reason:
            return self.fail(case, reason)
        impls = {self.flex_impl: lambda: fk.token_mean(x, 1e-6), "torch": lambda: torch_token_mean(x)}
        if not self.on_cpu:
            impls["reference"] = lambda: fk.token_mean_ref(x, 1e-6)
        nbytes = (x.numel() + b * c) * x.element_size()
        bwd = None
        if self.args.backward:
            xl = x.detach().clone().requires_grad_(True)
            go = torch.randn(b, c, device=self.device, dtype=self.dtype)
            bwd = ({self.flex_impl: _fwd_bwd(lambda: fk.token_mean(xl, 1e-6), [xl], go),
                    "torch": _fwd_bwd(lambda: torch_token_mean(xl), [xl], go)}, [xl])
        self.memory_bound("token_mean", case, impls, nbytes, "torch", bwd)

    def upsample_add(self, b, side, c, g):
        self.results.tags["batch"] = b   # rows of this case carry its batch
        hw, grid = (side, side), (g, g)
        case = f"upsample_add B={b} N={side}x{side} C={c} G={g}"
        s = torch.randn(b, g * g, c, device=self.device, dtype=self.dtype)
        d = torch.randn(b, side * side, c, device=self.device, dtype=self.dtype)
        reason = check_close("upsample_add", fk.upsample_add(s, d, hw, grid), fk.upsample_add_ref(s, d, hw, grid))
        if reason is None and self.args.backward:
            reason = check_grads("upsample_add", lambda a, e: fk.upsample_add(a, e, hw, grid),
                                 lambda a, e: fk.upsample_add_ref(a, e, hw, grid), [s, d], torch.randn_like(d))
        if reason:
            return self.fail(case, reason)
        impls = {self.flex_impl: lambda: fk.upsample_add(s, d, hw, grid),
                 "torch": lambda: torch_upsample_add(s, d, hw, grid)}
        if not self.on_cpu:
            impls["reference"] = lambda: fk.upsample_add_ref(s, d, hw, grid)
        nbytes = (s.numel() + 2 * d.numel()) * d.element_size()
        bwd = None
        if self.args.backward:
            sl, dl = s.detach().clone().requires_grad_(True), d.detach().clone().requires_grad_(True)
            go = torch.randn_like(d)
            bwd = ({self.flex_impl: _fwd_bwd(lambda: fk.upsample_add(sl, dl, hw, grid), [sl, dl], go),
                    "torch": _fwd_bwd(lambda: torch_upsample_add(sl, dl, hw, grid), [sl, dl], go)}, [sl, dl])
        self.memory_bound("upsample_add", case, impls, nbytes, "torch", bwd)

    def attention(self, b, lq, lk, h, d):
        self.results.tags["batch"] = b   # rows of this case carry its batch
        case = f"attention B={b} Lq={lq} Lk={lk} H={h} D={d}"
        dev, dt = self.device, self.dtype

        def make_inputs(requires_grad=False):
            if lq == lk:   # self-attention: one fused qkv projection output
                qkv = torch.randn(b, lq, 3, h, d, device=dev, dtype=dt, requires_grad=requires_grad)
                return [qkv], (qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
            q = torch.randn(b, lq, h, d, device=dev, dtype=dt, requires_grad=requires_grad)
            kv = torch.randn(b, lk, 2, h, d, device=dev, dtype=dt, requires_grad=requires_grad)
            return [q, kv], (q, kv[:, :, 0], kv[:, :, 1])

        _, (q, k, v) = make_inputs()
        got = fk.attention(q, k, v)
        reason = check_attention(got, q, k, v)
        if reason is None and self.args.backward:
            reason = self._check_attention_grads(make_inputs, b, lq, lk, h, d)
        if reason:
            return self.fail(case, reason)
        path = fk.attention_path(lq, lk)
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
                    leaves, qkv = make_inputs(True)
                    torch_attention(*qkv, backend=backend).sum().backward()
            except RuntimeError as err:
                skipped.append(f"sdpa-{name}: refused ({str(err).splitlines()[0][:80]})")
                continue
            impls[f"sdpa-{name}"] = (lambda bk: lambda: torch_attention(q, k, v, bk))(backend)
        self.results.notes.extend(f"{case}: {s}" for s in skipped)
        res = self.results
        for impl, fn in impls.items():
            t = self.time(fn)
            res.add_timing("kernels", f"{case} fwd", impl, t, note=path if impl.startswith("flexdit") else "")
            res.add("kernels", f"{case} fwd", impl, "TFLOP/s", fwd_flops / (t[0] * 1e-3) / 1e12, "TFLOP/s")
        self._best_sdpa_speedup(f"{case} fwd", list(impls))
        if self.args.backward:
            leaves, qkv = make_inputs(True)
            go = torch.randn(b, lq, h * d, device=dev, dtype=dt)
            fns = {self.flex_impl: _fwd_bwd(lambda: fk.attention(*qkv).reshape(b, lq, h * d), leaves, go)}
            for impl in impls:
                if impl.startswith("sdpa-"):
                    backend = sdpa_backends()[impl[len("sdpa-"):]]
                    fns[impl] = (lambda bk: _fwd_bwd(lambda: torch_attention(*qkv, backend=bk), leaves, go))(backend)
            for impl, fn in fns.items():
                t = self.time(fn, grad_to_none=leaves)
                res.add_timing("kernels", f"{case} fwd+bwd", impl, t)
                res.add("kernels", f"{case} fwd+bwd", impl, "TFLOP/s", 3.5 * fwd_flops / (t[0] * 1e-3) / 1e12,
                        "TFLOP/s")
            self._best_sdpa_speedup(f"{case} fwd+bwd", list(fns))

    def _check_attention_grads(self, make_inputs, b, lq, lk, h, d, factor: float = 3.0) -> Optional[str]:
        """STYLE's rule for gradients: error vs fp32 at most 3x the error of PyTorch's SDPA in the same dtype."""
        go = torch.randn(b, lq, h, d, device=self.device, dtype=self.dtype)

        def grads(fn, dtype):
            leaves, _ = make_inputs(True)
            leaves = [t.detach().to(dtype).requires_grad_(True) for t in leaves]
            views = (leaves[0][:, :, 0], leaves[0][:, :, 1], leaves[0][:, :, 2]) if lq == lk else \
                (leaves[0], leaves[1][:, :, 0], leaves[1][:, :, 1])
            return torch.autograd.grad(fn(*views), leaves, go.to(dtype))

        torch.manual_seed(1)
        exact = grads(fk.attention_ref, torch.float32)
        torch.manual_seed(1)
        same_dtype = grads(fk.attention_ref, self.dtype)
        torch.manual_seed(1)
        got = grads(fk.attention, self.dtype)
        for i, (g, t, e) in enumerate(zip(got, same_dtype, exact)):
            err = (g.float() - e).abs().max().item()
            torch_err = (t.float() - e).abs().max().item()
            if not math.isfinite(err) or err > factor * torch_err + 1e-5:
                return f"attention grad {i}: max abs err {err:.3g} > {factor} x PyTorch's {torch_err:.3g} + 1e-5"
        return None

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


def run(args, results: Results, device: torch.device) -> None:
    """Fill `results` with the kernel suite for `args.op` (one op or all)."""
    on_cpu = device.type == "cpu"
    shapes = CPU_SHAPES if on_cpu else GPU_SHAPES
    dtype = torch.float32 if on_cpu else args.torch_dtype
    ops = OPS if args.op == "all" else (args.op,)
    runner = _Runner(args, results, device, dtype)
    runner.copy_gbps = copy_bandwidth(device, results)
    ctx = fk.backend("reference") if on_cpu else fk.backend(fk.get_backend())
    with ctx:
        for op in ops:
            if op == "attention":
                for b, (lq, lk) in itertools.product(shapes["attn_batches"], shapes["attn_lens"]):
                    runner.attention(b, lq, lk, shapes["heads"], shapes["head_dim"])
                continue
            for b, side in itertools.product(shapes["batches"], shapes["sides"]):
                if op == "token_mean":
                    runner.token_mean(b, side, shapes["channels"])
                    continue
                for g in shapes["grids"]:
                    getattr(runner, op)(b, side, shapes["channels"], g)


def table(results: Results) -> str:
    cols = ["ms", "GB/s", "frac_copy_bw", "TFLOP/s", "speedup"]
    parts = [format_table(results, "ceiling", ["ms", "GB/s", "TFLOP/s"], "measured ceilings"),
             format_table(results, "kernels", cols, "kernels (ms: median [p20, p80])")]
    return "\n\n".join(p for p in parts if p)
