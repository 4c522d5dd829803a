"""`python -m bench model`: dense DiT (plain and with the fused adaLN kernels) vs FlexDiT forward (kernels and
reference path), MACs, ceilings, profile by kernel family and by layer kind."""
import contextlib
import copy
import time
from collections import Counter
from typing import Dict

import torch

import flexdit_kernels as fk
from flexdit import FlexDiT, create_model, flexdit_config, from_dit, set_fused
from flexdit.diffusion import with_linear_casts

from .common import Results, bench_fn, format_table, matmul_tflops, peak_memory_mib, synchronize

# Names of the per-kind ranges in the profile, in model order.
KIND_NAMES = {"embed": "embedding", "pool": "Poolingformer", "gen": "generation", "sparse": "sparse",
              "recover": "recovery", "dense": "dense", "final": "final"}


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------

def build_models(name: str, image_size: int, grid: int, device: torch.device, seed: int = 0):
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


# What `--impls` may name: the dense DiT, the dense DiT with the fused adaLN kernels (CUDA only: what fusion alone
# gives), FlexDiT on the kernels (CUDA only) and FlexDiT on its PyTorch reference path (token density alone).
IMPLS = ("dense", "dense-fused", "flexdit", "flexdit-ref")

# Hosts patched in place by `flexdit.apply_patch` (diffusers models at real size, random weights).
PATCH_TARGETS = ("pixart-alpha", "diffusers-dit", "latte")
FRAMES = 16   # latte: frames per clip
PATCH_OVERRIDES: Dict[str, object] = {}   # diffusers config fields replaced in every build (tests: tiny models)


def build_patched_models(name: str, image_size: int, grid: int, device: torch.device):
    """(dense, patched, inputs kwargs builder) for a patch target; the patched model uses the decided plan."""
    from .fixtures import build_patched_pair
    return build_patched_pair(name, image_size, device=device, plan={"grid": grid},
                              config_overrides=dict(PATCH_OVERRIDES), frames=FRAMES)


def model_inputs(batch: int, image_size: int, device: torch.device, num_classes: int = 1000, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    latent = image_size // 8
    x = torch.randn(batch, 4, latent, latent, generator=g).to(device)
    t = torch.randint(0, 1000, (batch,), generator=g).to(device)
    y = torch.randint(0, num_classes, (batch,), generator=g).to(device)
    return x, t, y


def per_image_macs(name: str, image_size: int, grids) -> Dict:
    """MACs of one image: {"dense": the dense model, G: FlexDiT at grid G for each G in `grids`}, counted on the
    meta device."""
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

def _autocast(device, dtype, cache_enabled=True):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    # CUDA-graph capture needs the autocast weight-cast cache off (the casts become part of the graph).
    return torch.autocast(device.type, dtype=dtype, cache_enabled=cache_enabled)


def sampling_region(mode: str, device, dtype):
    """One autocast region around the timed calls of eager and compile forwards (each opens a nested one), as a
    sampling loop runs: autocast casts each fp32 weight to the low-precision dtype once per outermost region, so the
    timed forwards find them cast, for the dense model and FlexDiT alike. (CUDA-graph capture runs with the cache off
    and the weights cast once beforehand: see `make_forward`.)"""
    return contextlib.nullcontext() if mode == "cuda-graph" else _autocast(device, dtype)


def make_forward(model, inputs, kwargs, mode: str, device, dtype, backend: str):
    """A zero-argument callable running one forward `model(*inputs, **kwargs)` in `mode`, and the compile / capture
    time in seconds. A CUDA graph is captured with autocast's cache off and the model's linear weights cast once,
    before the capture (`with_linear_casts`, as `CudaGraphDenoiser` does): a replay casts no weight."""
    cache = mode != "cuda-graph"
    call = with_linear_casts(model, dtype)[0] if mode == "cuda-graph" and dtype != torch.float32 else model

    def eager():
        with torch.no_grad(), _autocast(device, dtype, cache), fk.backend(backend):
            return call(*inputs, **kwargs)

    if mode == "eager":
        return eager, None
    if mode == "compile":
        compiled = torch.compile(model)

        def run():
            with torch.no_grad(), _autocast(device, dtype), fk.backend(backend):
                return compiled(*inputs, **kwargs)

        start = time.perf_counter()
        run()
        synchronize(device)
        return run, time.perf_counter() - start
    if mode == "cuda-graph":
        start = time.perf_counter()
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(3):       # warm up allocations and Triton autotuning outside the capture
                eager()
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            eager()                  # static inputs: the replay reads them in place
        synchronize(device)
        # The replay reads the weight copies `call` holds: the returned callable keeps them alive.
        return (lambda graph=graph, keep=call: graph.replay()), time.perf_counter() - start
    raise ValueError(f"unknown mode {mode!r}")


# ----------------------------------------------------------------------------------------------------------------
# Per-layer-kind profile
# ----------------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def kind_ranges(model: FlexDiT):
    """Wrap each block (and the embedders and final layer) in a `record_function("kind:<name>")` range via hooks."""
    handles, stack = [], []

    def pre(name):
        def hook(module, args):
            rf = torch.profiler.record_function(f"kind:{name}")
            rf.__enter__()
            stack.append(rf)
        return hook

    def post(module, args, output):
        stack.pop().__exit__(None, None, None)

    targets = [(m, "embed") for m in (model.x_embedder, model.t_embedder, model.y_embedder)]
    targets += [(b, k) for b, k in zip(model.blocks, model.kinds)]
    targets.append((model.final_layer, "final"))
    for module, kind in targets:
        handles.append(module.register_forward_pre_hook(pre(KIND_NAMES[kind])))
        handles.append(module.register_forward_hook(post))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def profile_kinds(model: FlexDiT, forward, device, iters: int = 3) -> Dict[str, float]:
    """ms per forward spent in each layer kind (device time on CUDA, CPU time otherwise), plus "forward"."""
    from torch.profiler import ProfilerActivity, profile, record_function
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with kind_ranges(model):
        forward()
        synchronize(device)
        with profile(activities=activities) as prof:
            for _ in range(iters):
                with record_function("kind:forward"):
                    forward()
            synchronize(device)
    out = {}
    for evt in prof.key_averages():
        # key_averages keeps the CPU-side range and its GPU-side annotation apart (device_type is part of the
        # key): read only the CPU-side one, whose device time sums the kernels launched inside it.
        if not evt.key.startswith("kind:") or evt.device_type != torch.autograd.DeviceType.CPU:
            continue
        if device.type == "cuda":
            us = getattr(evt, "device_time_total", None)
            if us is None:  # older PyTorch
                us = evt.cuda_time_total
        else:
            us = evt.cpu_time_total
        out[evt.key[len("kind:"):]] = out.get(evt.key[len("kind:"):], 0.0) + us / 1e3 / iters
    return out


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
    from torch.profiler import ProfilerActivity, profile
    on_cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    forward()
    synchronize(device)
    with profile(activities=activities) as prof:
        for _ in range(iters):
            forward()
        synchronize(device)
    times, count = Counter(), 0
    for evt in prof.events():
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

def run(args, results: Results, device: torch.device) -> None:
    dtype = args.torch_dtype
    on_cpu = device.type == "cpu"
    case = f"{args.model} {args.image_size}px grid={args.grid}"
    reps = dict(cpu_repeats=args.repeats or 3, cpu_warmup=1)

    ceiling = matmul_tflops(device, dtype, results)   # the matmul ceiling in the run's dtype
    if args.model in PATCH_TARGETS:
        dense, flex, make_inputs = build_patched_models(args.model, args.image_size, args.grid, device)
        inputs, dense_kw = (), make_inputs(args.batch_size)
        flex_kw = dense_kw
        from .fixtures import patched_pair_macs   # counted by dispatch: fvcore cannot trace keyword-only forwards
        macs = patched_pair_macs(args.model, args.image_size, plan={"grid": args.grid},
                                 config_overrides=dict(PATCH_OVERRIDES), frames=FRAMES)
        macs["flexdit-ref"] = macs["flexdit"]
    else:
        dense, flex = build_models(args.model, args.image_size, args.grid, device)
        inputs, dense_kw, flex_kw = model_inputs(args.batch_size, args.image_size, device), {}, {"grid": args.grid}
        try:
            counts = per_image_macs(args.model, args.image_size, [args.grid])
            macs = {"dense": counts["dense"], "flexdit": counts[args.grid], "flexdit-ref": counts[args.grid]}
        except ImportError as err:   # fvcore is optional: the times stand without the MAC columns
            macs = None
            results.notes.append(f"no GMACs / TFLOP/s columns: {_first_line(err)}")

    unit = "clip" if args.model == "latte" else "img"
    variants = [("dense", dense, dense_kw, fk.get_backend()),
                ("flexdit-ref", flex, flex_kw, "reference")]
    if not on_cpu:   # on the CPU "auto" would be the reference (or the Triton interpreter): not a measurement
        variants.insert(1, ("flexdit", flex, flex_kw, "auto"))
        if args.model not in PATCH_TARGETS:   # the diffusers hosts' own blocks have no fused form
            variants.insert(1, ("dense-fused", set_fused(copy.deepcopy(dense)), dense_kw, "auto"))
            if macs is not None:
                macs["dense-fused"] = macs["dense"]
    if getattr(args, "impls", None):
        wanted = {"dense"} | {i.strip() for i in args.impls.split(",")}
        dropped = [v[0] for v in variants if v[0] not in wanted]
        variants = [v for v in variants if v[0] in wanted]
        if dropped:
            results.notes.append(f"not timed (--impls): {', '.join(dropped)}")

    # The kernels are checked against the reference before anything is timed (same model, same inputs).
    if any(v[0] == "flexdit" for v in variants):
        fwd_k, _ = make_forward(flex, inputs, flex_kw, "eager", device, dtype, "auto")
        fwd_r, _ = make_forward(flex, inputs, flex_kw, "eager", device, dtype, "reference")
        got, want = _prediction(fwd_k()).float(), _prediction(fwd_r()).float()
        err = (got - want).abs().max().item()
        scale = want.abs().max().item() + 1e-6
        if not torch.isfinite(got).all() or err > (1e-4 if dtype == torch.float32 else 5e-2) * scale:
            results.failures.append(f"{case}: FlexDiT with kernels differs from the reference path "
                                    f"(max abs err {err:.3g}, output scale {scale:.3g})")
            variants = [v for v in variants if v[0] != "flexdit"]

    for impl, model, kwargs, backend in variants:
        fwd, setup_s = make_forward(model, inputs, kwargs, args.mode, device, dtype, backend)
        with sampling_region(args.mode, device, dtype):
            t = bench_fn(fwd, device, warmup=25, rep=200, min_reps=20, **reps)
        results.add_timing("model", case, impl, t)
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
            fwd, _ = make_forward(model, inputs, kwargs, "eager", device, dtype, backend)
            with sampling_region("eager", device, dtype):
                families, launches = profile_families(fwd, device)
            total = sum(families.values())
            for name, ms in sorted(families.items(), key=lambda kv: -kv[1]):
                results.add("families", f"{case} {impl}", name, "ms", ms, "ms")
                results.add("families", f"{case} {impl}", name, "share", ms / total)
            results.add("families", f"{case} {impl}", "launches", "count", launches, "per forward",
                        note="CUDA kernels" if device.type == "cuda" else "aten/flexdit ops")
        for impl, _, kwargs, backend in variants[1:]:
            if impl == "dense-fused":
                continue
            fwd, _ = make_forward(flex, inputs, kwargs, "eager", device, dtype, backend)
            shares = profile_kinds(flex, fwd, device)
            total = shares.pop("forward", None) or sum(shares.values())
            counts = {KIND_NAMES[k]: flex.kinds.count(k) for k in set(flex.kinds)}
            for name in KIND_NAMES.values():
                if name not in shares:
                    continue
                ms = shares[name]
                note = f"{counts[name]} layers" if name in counts else ""
                results.add("profile", f"{case} {impl}", name, "ms", ms, "ms", note=note)
                results.add("profile", f"{case} {impl}", name, "share", ms / total)
            other = total - sum(shares.values())
            results.add("profile", f"{case} {impl}", "other", "ms", other, "ms", note="outside the layer ranges")
            results.add("profile", f"{case} {impl}", "other", "share", other / total)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


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
