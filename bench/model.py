"""`python -m bench model`: dense DiT (the published computation, and on the kernels backend with the fused adaLN
kernels) vs FlexDiT forward (kernels and reference path), MACs, ceilings, profile by kernel family and by layer kind."""
import contextlib
import functools
import importlib.util
import time
from collections import Counter
from typing import Callable, Dict, List, Optional

import torch

import flexdit_kernels as fk
from flexdit import DensitySchedule, DiT_models, FlexDiT, FlexDiT_models, create_model, flexdit_config, from_dit
from flexdit.diffusion import CudaGraphDenoiser

from .common import (Results, bench_fn, fill_defaults, first_line, format_table, matmul_tflops, parse_list,
                     peak_memory_mib, positive_int, synchronize)
from .fixtures import TARGETS as PATCH_TARGETS   # hosts patched in place by `flexdit.apply_patch` (diffusers)
from .kernels import OPS, route_summary

# Names of the per-kind ranges in the profile, in model order.
KIND_NAMES = {"embed": "embedding", "pool": "Poolingformer", "gen": "generation", "sparse": "sparse",
              "recover": "recovery", "dense": "dense", "final": "final"}


# ----------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------

# What `--impls` may name: the dense DiT (the "reference" backend: SDPA, no flexdit kernel), the same model on the
# kernels backend, i.e. with the fused adaLN kernels (CUDA only: what fusion alone gives), FlexDiT on the kernels
# (CUDA only) and FlexDiT on its PyTorch reference path (token density alone).
IMPLS = ("dense", "dense-fused", "flexdit", "flexdit-ref")
MODES = ("eager", "compile", "cuda-graph")
# Defaults that depend on where the run happens: (GPU, CPU).
DEFAULTS = {"model": ("DiT-XL/2", "DiT-S/2"), "image_size": (512, 256), "batch_size": (32, 1),
            "dtype": ("bf16", "fp32"), "grid": (8, 8)}


def registry_names() -> List[str]:
    """Every registry name a FlexDiT is built from: the dense DiTs and their FlexDiT names."""
    return sorted(DiT_models) + sorted(FlexDiT_models)


def dense_name(name: str, parser, known: List[str]) -> str:
    """The dense registry name of `name` ("FlexDiT-XL/2" → "DiT-XL/2"); parser.error listing `known` otherwise."""
    if name not in known:
        parser.error(f"--model {name!r} is not a known model; known: {', '.join(known)}")
    return name[len("Flex"):] if name in FlexDiT_models else name


def add_arguments(m) -> None:
    """The sub-command's own options (the shared ones come from the parent parsers)."""
    m.add_argument("--model", default=None,
                   help="registry name, e.g. DiT-XL/2 or FlexDiT-XL/2 (default DiT-XL/2; DiT-S/2 on the CPU), or a "
                        f"diffusers model patched in place: {', '.join(PATCH_TARGETS)} (latte: 16-frame clips; "
                        "needs diffusers)")
    m.add_argument("--image-size", type=int, choices=(256, 512, 1024), default=None,
                   help="pixels; latent = image/8")
    m.add_argument("--batch-size", type=positive_int, default=None)
    m.add_argument("--grid", type=positive_int, default=None, help="FlexDiT sparse grid side G (default 8)")
    m.add_argument("--mode", choices=MODES, default="eager",
                   help="compile: torch.compile (compile time reported apart); cuda-graph: replay of flexdit's "
                        "CudaGraphDenoiser, registry models on CUDA only")
    m.add_argument("--profile", action="store_true",
                   help="per forward: kernel time by family (GEMM, attention, norm, pooling, elementwise) and launch "
                        "count of every variant, and FlexDiT's time by layer kind (PyTorch profiler)")
    m.add_argument("--impls", default=None, metavar="LIST",
                   help=f"comma-separated subset of {','.join(IMPLS)} to time (default: all that run here; dense is "
                        "always timed, as the speedups are over it)")


def validate(parser, args, device: torch.device) -> None:
    """Fill the device's defaults; every bad argument is `parser.error` (one line, exit 2)."""
    fill_defaults(args, DEFAULTS, device.type == "cpu")
    args.model = dense_name(args.model, parser, registry_names() + list(PATCH_TARGETS))
    try:
        args.impl_list = parse_list(args.impls, IMPLS, "impls")
    except ValueError as err:
        parser.error(str(err))
    if args.mode == "cuda-graph" and device.type != "cuda":
        parser.error("--mode cuda-graph needs a CUDA GPU")
    if args.model in PATCH_TARGETS:
        if args.profile or args.mode == "cuda-graph":
            parser.error(f"--{'profile' if args.profile else 'mode cuda-graph'} needs a registry model, not "
                         f"{args.model!r}")
        if importlib.util.find_spec("diffusers") is None:
            parser.error(f"--model {args.model} needs diffusers: pip install 'flexdit[diffusers]'")
        side = args.image_size // 8 // 2
        if args.grid > side:
            parser.error(f"--grid {args.grid}: larger than the token grid {side}x{side}")
        return
    try:
        flexdit_config(args.model, input_size=args.image_size // 8, grid=args.grid)
    except ValueError as err:
        parser.error(f"--grid {args.grid}: {err}")


def cpu_banner(args) -> str:
    return (f"a small run of {args.model} at {args.image_size}x{args.image_size}, batch {args.batch_size}, "
            f"{args.dtype}, {args.mode}, dense DiT vs FlexDiT on its PyTorch reference path (no kernels)")


def kernels_differ(forward: Callable[[str], torch.Tensor], dtype: torch.dtype) -> Optional[str]:
    """None when `forward(backend)` gives the same prediction on the kernels ("auto") as on the reference path, else
    why not: the check every FlexDiT timing waits for."""
    got, want = (_prediction(forward(backend)).float() for backend in ("auto", "reference"))
    err = (got - want).abs().max().item()
    scale = want.abs().max().item() + 1e-6
    if torch.isfinite(got).all() and err <= (1e-4 if dtype == torch.float32 else 5e-2) * scale:
        return None
    return f"FlexDiT with kernels differs from the reference path (max abs err {err:.3g}, output scale {scale:.3g})"


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------

def build_models(name: str, image_size: int, grid, device: torch.device, seed: int = 0):
    """Dense DiT (DiT init + small random perturbation, so no block is the identity) and FlexDiT from it."""
    latent = image_size // 8
    torch.manual_seed(seed)
    with torch.device(device):   # built in place: initialising 675M parameters on the CPU takes tens of seconds
        dense = create_model(name, input_size=latent)
    with torch.no_grad():
        for p in dense.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p), alpha=0.02)
    flex = from_dit(dense, flexdit_config(name, input_size=latent, grid=grid))   # same device as `dense`
    return dense.eval(), flex.eval()


FRAMES = 16   # latte: frames per clip
PATCH_OVERRIDES: Dict[str, object] = {}   # diffusers config fields replaced in every build (tests: tiny models)


def model_inputs(batch: int, image_size: int, device: torch.device, num_classes: int = 1000, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    latent = image_size // 8
    x = torch.randn(batch, 4, latent, latent, generator=g).to(device)
    t = torch.randint(0, 1000, (batch,), generator=g).to(device)
    y = torch.randint(0, num_classes, (batch,), generator=g).to(device)
    return x, t, y


def per_image_macs(name: str, image_size: int, grids) -> Dict:
    """MACs of one image: {"dense": the dense model, g: FlexDiT at grid g for each g (a side or a pair) in `grids`},
    counted on the meta device."""
    from flexdit.flops import count_macs
    latent = image_size // 8
    with torch.device("meta"):
        dense = create_model(name, input_size=latent)
        flex = FlexDiT(flexdit_config(name, input_size=latent, grid=max(grids)))
        x, t = torch.empty(1, 4, latent, latent), torch.zeros(1)
        y = torch.zeros(1, dtype=torch.long)
    return {"dense": count_macs(dense, x, t, y).total, **{g: count_macs(flex, x, t, y, grid=g).total for g in grids}}


# ----------------------------------------------------------------------------------------------------------------
# Modes
# ----------------------------------------------------------------------------------------------------------------

def autocast(device, dtype):
    """Autocast to `dtype` on the device (nothing for fp32). As a region around the timed calls (each forward opens
    a nested one), as a sampling loop runs: autocast casts each fp32 weight once per outermost region, so the timed
    forwards find them cast, for the dense model and FlexDiT alike."""
    return contextlib.nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)


def make_forward(model, inputs, kwargs, mode: str, device, dtype, backend: str):
    """A zero-argument callable running one forward `model(*inputs, **kwargs)` in `mode`, and the compile / capture
    time in seconds. cuda-graph: flexdit's `CudaGraphDenoiser` (registry models), as sampling replays it: the inputs
    copied into the graph's buffers, the replay, the output copied out; no weight cast in the replay."""
    def eager(call=model):
        with torch.no_grad(), autocast(device, dtype), fk.backend(backend):
            return call(*inputs, **kwargs)

    if mode == "eager":
        return eager, None
    start = time.perf_counter()
    if mode == "compile":
        run = functools.partial(eager, torch.compile(model))
    elif mode == "cuda-graph":
        x, t, y = inputs
        schedule = DensitySchedule([kwargs["grid"]]) if "grid" in kwargs else None   # FlexDiT: its grid every step
        graphed = CudaGraphDenoiser(model, warmup=3).model_fn(y, schedule=schedule)   # no guidance: one forward
        run = functools.partial(eager, lambda *a, **k: graphed(x, t))
    else:
        raise ValueError(f"mode must be eager, compile or cuda-graph, got {mode!r}")
    run()   # compile, or capture
    synchronize(device)
    return run, time.perf_counter() - start


# ----------------------------------------------------------------------------------------------------------------
# Per-layer-kind profile
# ----------------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def kind_ranges(model: FlexDiT):
    """Wrap each block (and the embedders and final layer) in a `record_function("kind:<name>")` range via hooks."""
    stack, handles = [], []
    targets = [(m, "embed") for m in (model.x_embedder, model.t_embedder, model.y_embedder)]
    for module, kind in [*targets, *zip(model.blocks, model.kinds), (model.final_layer, "final")]:
        rf = functools.partial(torch.profiler.record_function, f"kind:{KIND_NAMES[kind]}")
        handles.append(module.register_forward_pre_hook(lambda m, args, rf=rf: stack.append(rf().__enter__())))
        handles.append(module.register_forward_hook(lambda m, args, out: stack.pop().__exit__(None, None, None)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _profiled(forward, device, iters: int, wrap=contextlib.nullcontext):
    """The profiler over `iters` calls of forward() (each inside `wrap()`), after one call outside it."""
    from torch.profiler import ProfilerActivity, profile
    forward()
    synchronize(device)
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])) as p:
        for _ in range(iters):
            with wrap():
                forward()
        synchronize(device)
    return p


def profile_kinds(model: FlexDiT, forward, device, iters: int = 3) -> Dict[str, float]:
    """ms per forward spent in each layer kind (device time on CUDA, CPU time otherwise), plus "forward"."""
    with kind_ranges(model):
        prof = _profiled(forward, device, iters, lambda: torch.profiler.record_function("kind:forward"))
    out = Counter()
    for evt in prof.key_averages():
        # key_averages keeps the CPU-side range and its GPU-side annotation apart (device_type is part of the
        # key): read only the CPU-side one, whose device time sums the kernels launched inside it.
        if evt.key.startswith("kind:") and evt.device_type == torch.autograd.DeviceType.CPU:
            us = evt.cpu_time_total
            if device.type == "cuda":
                us = evt.device_time_total if hasattr(evt, "device_time_total") else evt.cuda_time_total
            out[evt.key[len("kind:"):]] += us / 1e3 / iters
    return dict(out)


FAMILIES = (("attention", ("attention", "attn", "fmha", "flash", "sdpa", "softmax")),
            ("GEMM", ("gemm", "matmul", "addmm", "mm", "bmm", "cutlass", "xmma", "linear", "convolution")),
            ("norm", ("layer_norm", "layernorm", "token_mean", "adaln")),     # adaln: the adaLN family's kernels
            ("pooling", ("token_pool", "upsample_add")))


def kernel_family(name: str) -> str:
    """GEMM, attention, norm, pooling or elementwise (everything else: adds, casts, copies, GELU ...) from a CUDA
    kernel's or an aten op's name."""
    low = name.lower()
    tokens = set(low.replace("::", "_").replace(".", "_").split("_"))
    for family, keys in FAMILIES:
        if any(k in tokens or (len(k) > 3 and k in low) for k in keys):
            return family
    return "elementwise"


def profile_families(forward, device, iters: int = 3):
    """({family: ms per forward}, launches per forward): CUDA kernel time and count on a GPU; on the CPU the self
    time of the aten/flexdit ops and their count (one op is about one launch)."""
    on_cuda = device.type == "cuda"
    times, count = Counter(), 0
    for evt in _profiled(forward, device, iters).events():
        if on_cuda:
            if evt.device_type != torch.autograd.DeviceType.CUDA:
                continue
            us = evt.device_time if hasattr(evt, "device_time") else evt.cuda_time
        else:
            if evt.device_type != torch.autograd.DeviceType.CPU or not evt.name.startswith(("aten::", "flexdit::")) \
                    or evt.cpu_parent is not None and evt.cpu_parent.name.startswith(("aten::", "flexdit::")):
                continue   # top-level ops only
            us = evt.cpu_time_total
        times[kernel_family(evt.name)] += us / 1e3 / iters
        count += 1
    return dict(times), count / iters


# ----------------------------------------------------------------------------------------------------------------
# The suite
# ----------------------------------------------------------------------------------------------------------------

def forward_routes(forward: Callable[[str], object], backend: str, device) -> str:
    """How the flexdit_kernels ops that `forward(backend)` calls are routed (`bench.kernels.route_summary`; "" when
    it calls none). On a GPU a forward under another backend comes first, so that every op the forward calls records
    a route other than the one it had and the ops it does not call are left out. On the CPU every call records
    "reference (backend)": the ops the forward changed, and those that hold that route, are listed."""
    if device.type == "cuda":
        forward("triton" if backend == "reference" else "reference")
    before = {op: fk.last_route(op) for op in OPS}
    forward(backend)
    return route_summary([op for op in OPS if fk.last_route(op) != before[op]
                          or device.type != "cuda" and fk.last_route(op) == "reference (backend)"])


def _build(args, device, results: Results):
    """(dense, flexdit, positional inputs, dense kwargs, flexdit kwargs, MACs per image by impl or None)."""
    if args.model in PATCH_TARGETS:
        overrides = dict(PATCH_OVERRIDES)
        if device.type == "cpu" and not overrides and args.model in ("flux", "sd3"):   # 12B / 2.5B parameters
            from flexdit.mmdit import TINY_CONFIGS
            overrides = dict(TINY_CONFIGS[args.model])
            results.notes.append(f"--model {args.model} on the CPU: a tiny random configuration {overrides}")
        from .fixtures import build_patched_pair, patched_pair_macs   # MACs by dispatch: fvcore cannot trace these
        pair = dict(plan={"grid": args.grid}, config_overrides=overrides, frames=FRAMES)
        dense, flex, make_inputs = build_patched_pair(args.model, args.image_size, device=device, **pair)
        macs = patched_pair_macs(args.model, args.image_size, **pair)
        kwargs = make_inputs(args.batch_size)
        return dense, flex, (), kwargs, kwargs, {**macs, "flexdit-ref": macs["flexdit"]}
    dense, flex = build_models(args.model, args.image_size, args.grid, device)
    inputs = model_inputs(args.batch_size, args.image_size, device)
    try:
        counts = per_image_macs(args.model, args.image_size, [args.grid])
        macs = {"dense": counts["dense"], "dense-fused": counts["dense"], "flexdit": counts[args.grid],
                "flexdit-ref": counts[args.grid]}
    except ImportError as err:   # fvcore is optional: the times stand without the MAC columns
        macs = None
        results.notes.append(f"no GMACs / TFLOP/s columns: {first_line(err)}")
    return dense, flex, inputs, {}, {"grid": args.grid}, macs


def run(args, results: Results, device: torch.device) -> None:
    dtype = args.torch_dtype
    case = f"{args.model} {args.image_size}px grid={args.grid}"
    ceiling = matmul_tflops(device, dtype, results)   # the matmul ceiling in the run's dtype
    dense, flex, inputs, dense_kw, flex_kw, macs = _build(args, device, results)
    unit = "clip" if args.model == "latte" else "img"
    variants = [("dense", dense, dense_kw, "reference"), ("flexdit-ref", flex, flex_kw, "reference")]
    if device.type == "cuda":   # on the CPU "auto" would be the reference (or the interpreter): not a measurement
        variants.insert(1, ("flexdit", flex, flex_kw, "auto"))
        if args.model not in PATCH_TARGETS:   # the diffusers hosts' own blocks have no fused form
            variants.insert(1, ("dense-fused", dense, dense_kw, "auto"))
    if getattr(args, "impl_list", None):
        wanted = {"dense", *args.impl_list}
        dropped = [v[0] for v in variants if v[0] not in wanted]
        variants = [v for v in variants if v[0] in wanted]
        if dropped:
            results.notes.append(f"not timed (--impls): {', '.join(dropped)}")

    def eager(model, kwargs, backend):
        return make_forward(model, inputs, kwargs, "eager", device, dtype, backend)[0]

    # The kernels are checked against the reference before anything is timed (same model, same inputs).
    reason = any(v[0] == "flexdit" for v in variants) and kernels_differ(lambda b: eager(flex, flex_kw, b)(), dtype)
    if reason:
        results.failures.append(f"{case}: {reason}")
        variants = [v for v in variants if v[0] != "flexdit"]

    for impl, model, kwargs, backend in variants:
        route = forward_routes(lambda b: eager(model, kwargs, b)(), backend, device)
        fwd, setup_s = make_forward(model, inputs, kwargs, args.mode, device, dtype, backend)
        with autocast(device, dtype):
            t = bench_fn(fwd, device, warmup=25, rep=200, min_reps=20, cpu_repeats=args.repeats or 3, cpu_warmup=1)
        results.add_timing("model", case, impl, t, route=route)
        results.add("model", case, impl, f"{'clips' if unit == 'clip' else 'images'}/s",
                    args.batch_size / (t[0] * 1e-3), f"{unit}/s")
        if macs is not None:
            results.add("model", case, impl, "GMACs", macs[impl] / 1e9, f"GMAC/{unit}")
            tflops = 2 * macs[impl] * args.batch_size / (t[0] * 1e-3) / 1e12
            results.add("model", case, impl, "TFLOP/s", tflops, "TFLOP/s")
            results.add("model", case, impl, "frac_matmul", tflops / ceiling)
        if setup_s is not None:
            results.add("model", case, impl, "compile_s" if args.mode == "compile" else "capture_s", setup_s, "s")
        mem = peak_memory_mib(fwd, device)
        if mem is not None:
            results.add("model", case, impl, "peak_MiB", mem, "MiB")
        del fwd
    base = results.get("model", case, "dense", "ms")
    for impl, *_ in variants[1:]:
        results.add("model", case, impl, "speedup", base / results.get("model", case, impl, "ms"), "x",
                    note="over dense")
    if args.profile:
        for impl, model, kwargs, backend in variants:
            _profile(results, f"{case} {impl}", eager(model, kwargs, backend), device, dtype,
                     flex if model is flex else None)


def _profile(results: Results, name: str, fwd, device, dtype, flex: Optional[FlexDiT]) -> None:
    """Rows of one variant's profile: kernel time by family and launches; for a FlexDiT, time by layer kind."""
    with autocast(device, dtype):
        families, launches = profile_families(fwd, device)
    total = sum(families.values())
    for family, ms in sorted(families.items(), key=lambda kv: -kv[1]):
        results.add("families", name, family, "ms", ms, "ms")
        results.add("families", name, family, "share", ms / total)
    results.add("families", name, "launches", "count", launches, "per forward",
                note="CUDA kernels" if device.type == "cuda" else "aten/flexdit ops")
    if flex is None:
        return
    shares = profile_kinds(flex, fwd, device)
    total = shares.pop("forward", None) or sum(shares.values())
    shares["other"] = total - sum(shares.values())
    layers = Counter(KIND_NAMES[k] for k in flex.kinds)
    for kind in (*KIND_NAMES.values(), "other"):
        if kind in shares:
            note = "outside the layer ranges" if kind == "other" else f"{layers[kind]} layers" if layers[kind] else ""
            results.add("profile", name, kind, "ms", shares[kind], "ms", note=note)
            results.add("profile", name, kind, "share", shares[kind] / total)


def _prediction(out):
    """The predicted tensor of a forward: diffusers models return a tuple with return_dict=False."""
    return out[0] if isinstance(out, tuple) else out


def table(results: Results) -> str:
    parts = [format_table(results, "ceiling", ["ms", "TFLOP/s"], "measured ceiling"),
             format_table(results, "model", ["ms", "images/s", "clips/s", "speedup", "GMACs", "TFLOP/s",
                                             "frac_matmul", "peak_MiB", "compile_s", "capture_s"],
                          "model forward (ms: median [p20, p80])"),
             format_table(results, "families", ["ms", "share", "count"],
                          "per forward, eager (profiler): kernel time by family, and launches"),
             format_table(results, "profile", ["ms", "share"], "FlexDiT time by layer kind (eager, profiler)")]
    return "\n\n".join(p for p in parts if p)
