"""`python -m bench sample`: whole sampling runs (flexdit.diffusion), dense DiT vs FlexDiT with the temporal density
schedule, eager / torch.compile / CUDA graphs, with classifier-free guidance.

Guidance doubles the batch ([cond; null] through `forward_with_cfg`), so a run of B images pushes 2·B latents through
the model at every step. FlexDiT follows a `flexdit.DensitySchedule` (one grid per stage; by default the paper's
operating point, grids 10, 9, 8, 6 for a 32×32 or 16×16 token grid). Reported per run: ms per batch, images/s,
speedup over dense eager on the same chain, and MACs per image averaged over the run (each grid's count weighted by
the steps spent at it; fvcore counts them, "n/a" without it).
"""
import argparse
import functools
import time
from typing import Dict, List, Optional, Tuple

import torch

import flexdit_kernels as fk
from flexdit import DensitySchedule
from flexdit.diffusion import CudaGraphDenoiser, create_diffusion, grid_steps, sample_latents
from flexdit.plan import format_grid

from .common import Results, bench_fn, fill_defaults, format_table, parse_list, positive_int, synchronize
from .model import (MODES, autocast, build_models, dense_name, kernels_differ, model_inputs, per_image_macs,
                    registry_names)

IMPLS = ("dense", "flexdit", "flexdit-ref")    # flexdit: Triton kernels (CUDA); flexdit-ref: the PyTorch reference
CHAIN_STEPS = {"ddim": 50, "ddpm": 250}        # the paper's chains: 50-step DDIM and 250-step DDPM
CPU_STEPS = 3
# Defaults that depend on where the run happens: (GPU, CPU); `validate` fills the ones left unset.
DEFAULTS = {"model": ("DiT-XL/2", "DiT-S/4"), "image_size": (512, 256), "batch_size": (8, 1),
            "dtype": ("bf16", "fp32")}
# Pruning rates of the paper's operating points: grids 10, 9, 8, 6 at 512² (32×32 tokens) and at 256² (16×16).
PAPER_RATES = {512: (0.90, 0.96), 256: (0.61, 0.86)}


# ----------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `sample` sub-command's own options (the shared --device/--dtype/--repeats/--json ... come from the
    parent parser)."""
    parser.add_argument("--model", default=None, help="dense registry name (default DiT-XL/2; DiT-S/4 on the CPU)")
    parser.add_argument("--image-size", type=int, choices=(256, 512), default=None,
                        help="pixels; latent = image/8 (default 512; 256 on the CPU)")
    parser.add_argument("--batch-size", type=positive_int, default=None,
                        help="images per run (the model sees 2x: guidance); default 8, 1 on the CPU")
    parser.add_argument("--sampler", choices=("ddim", "ddpm", "both"), default=None,
                        help="chain(s) to time: ddim (50 steps), ddpm (250 steps) or both (the GPU default; "
                             f"the CPU runs ddim with {CPU_STEPS} steps)")
    parser.add_argument("--steps", type=positive_int, default=None,
                        help="steps of every chain timed (default: 50 DDIM, 250 DDPM; 3 on the CPU)")
    parser.add_argument("--modes", default=None,
                        help=f"comma-separated execution modes out of {', '.join(MODES)}: eager; compile "
                             "(torch.compile of the forward, one graph per grid); cuda-graph (one CUDA graph per "
                             "(grid, batch), replayed every step; CUDA only). Default: all three on a GPU, eager "
                             "on the CPU")
    parser.add_argument("--impls", default=None,
                        help=f"comma-separated models out of {', '.join(IMPLS)} (default: dense,flexdit on a GPU; "
                             "dense,flexdit-ref on the CPU)")
    parser.add_argument("--cfg-scale", type=float, default=4.0, help="guidance scale (1: no guidance, batch not "
                                                                      "doubled)")
    parser.add_argument("--grids", default=None,
                        help="FlexDiT grid side per stage, least noisy first, e.g. 10,9,8,6 (default: the 4-stage "
                             "rule at the paper's rates: r in [0.90, 0.96] at 512², [0.61, 0.86] at 256²)")


def parse_grids(text: str) -> List[int]:
    return [int(g) for g in str(text).split(",") if g.strip()]


def resolve(args, device: torch.device) -> None:
    """Fill modes, impls and the chains (args.runs: [(sampler, steps)]) from the options and the device."""
    on_cpu = device.type != "cuda"
    modes = parse_list(getattr(args, "modes", None), MODES, "modes")
    impls = parse_list(getattr(args, "impls", None), IMPLS, "impls")
    args.mode_list = modes or (["eager"] if on_cpu else list(MODES))
    args.impl_list = impls or (["dense", "flexdit-ref"] if on_cpu else ["dense", "flexdit"])
    sampler, steps = getattr(args, "sampler", None), getattr(args, "steps", None)
    if on_cpu and sampler is None:
        sampler = "ddim"
    samplers = ["ddim", "ddpm"] if sampler in (None, "both") else [sampler]
    args.runs = [(s, steps or (CPU_STEPS if on_cpu else CHAIN_STEPS[s])) for s in samplers]


def validate(parser: argparse.ArgumentParser, args, device: torch.device) -> None:
    """Fill the device's defaults; every bad argument is `parser.error` (one line, exit 2)."""
    fill_defaults(args, DEFAULTS, device.type == "cpu")
    args.model = dense_name(args.model, parser, registry_names())
    try:
        resolve(args, device)
    except ValueError as err:
        parser.error(str(err))
    if "cuda-graph" in args.mode_list and device.type != "cuda":
        parser.error("--modes cuda-graph needs a CUDA GPU")
    if "flexdit" in args.impl_list and device.type != "cuda":
        parser.error("--impls flexdit runs the Triton kernels and needs a CUDA GPU (flexdit-ref runs on the CPU)")
    try:
        grids = parse_grids(args.grids) if args.grids else None
    except ValueError:
        parser.error(f"--grids must be comma-separated integers, got {args.grids!r}")
    side = args.image_size // 8 // int(args.model.split("/")[-1])
    if grids is not None and (not grids or min(grids) < 1 or max(grids) > side):
        parser.error(f"--grids {args.grids}: every side must be in 1..{side} (the token grid)")


def cpu_banner(args) -> str:
    return (f"a short sampling run of {args.model} at {args.image_size}x{args.image_size}, batch {args.batch_size}, "
            f"{args.dtype}, {', '.join(f'{s} {n} steps' for s, n in args.runs)}, dense DiT vs FlexDiT on its "
            f"PyTorch reference path (no kernels)")


def default_schedule(image_size: int, token_grid: int) -> DensitySchedule:
    """The paper's operating point for this resolution, by the 4-stage rule."""
    r_min, r_max = PAPER_RATES.get(image_size, PAPER_RATES[256])
    return DensitySchedule.from_rates(r_min, r_max, token_grid)


# ----------------------------------------------------------------------------------------------------------------
# MACs per image over a run
# ----------------------------------------------------------------------------------------------------------------

def macs_per_image(macs_by_grid: Dict, steps_by_grid: Dict, guidance: bool) -> Tuple[float, float]:
    """(MACs of one network evaluation per latent, averaged over the run's steps; MACs per generated image for the
    whole run). Each grid's per-latent count is weighted by the steps run at that grid; guidance evaluates the
    network on two latents (conditional and unconditional) per image and step."""
    missing = set(steps_by_grid) - set(macs_by_grid)
    if missing:
        raise ValueError(f"macs_by_grid has no count for grids {sorted(missing, key=str)}")
    steps = sum(steps_by_grid.values())
    if steps <= 0:
        raise ValueError("steps_by_grid must hold at least one step")
    total = sum(n * macs_by_grid[g] for g, n in steps_by_grid.items())
    return total / steps, total * (2 if guidance else 1)


def count_macs_by_grid(name: str, image_size: int, grids) -> Optional[Dict]:
    """{None: dense DiT MACs, (G_h, G_w): FlexDiT MACs at that grid} per latent (meta device); None when fvcore is
    missing."""
    try:
        import fvcore  # noqa: F401
    except ImportError:
        return None
    macs = per_image_macs(name, image_size, sorted(set(grids)))
    return {None: macs.pop("dense"), **macs}


# ----------------------------------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------------------------------

def _check_kernels(flex, schedule, args, device, results) -> bool:
    """FlexDiT with the kernels against its reference path, one guided forward per grid, before any timing."""
    x, t, y = model_inputs(2 * args.batch_size, args.image_size, device, seed=1)   # the batch guidance runs

    def forward(grid, backend):
        with torch.no_grad(), autocast(device, args.torch_dtype), fk.backend(backend):
            return flex(x, t, y, grid=grid)

    for grid in sorted(set(schedule.grids)):
        reason = kernels_differ(functools.partial(forward, grid), args.torch_dtype)
        if reason:
            results.failures.append(f"{reason} at grid {format_grid(grid)}: flexdit not timed")
            return False
    return True


def run(args, results: Results, device: torch.device) -> None:
    if not hasattr(args, "runs"):
        resolve(args, device)
    latent = args.image_size // 8
    token_grid = latent // int(args.model.split("/")[-1])
    schedule = (DensitySchedule(parse_grids(args.grids), token_grid=token_grid) if args.grids
                else default_schedule(args.image_size, token_grid))
    grids = list(schedule.grids)
    dense, flex = build_models(args.model, args.image_size, max(grids), device)
    guidance = args.cfg_scale != 1.0
    y = torch.arange(args.batch_size, device=device) % 1000
    noise = torch.randn(args.batch_size, 4, latent, latent, generator=torch.Generator().manual_seed(0)).to(device)
    repeats = args.repeats or (2 if device.type == "cuda" else 1)

    macs = count_macs_by_grid(args.model, args.image_size, grids)
    if macs is None:
        results.notes.append("MACs per image: n/a (fvcore is not installed: pip install fvcore)")
    impls = list(args.impl_list)
    if "flexdit" in impls and not _check_kernels(flex, schedule, args, device, results):
        impls.remove("flexdit")
    models = {"dense": (dense, None, "reference"), "flexdit": (flex, schedule, "auto"),
              "flexdit-ref": (flex, schedule, "reference")}

    for sampler, steps in args.runs:
        diffusion = create_diffusion(str(steps))     # ADM respacing, as flexdit-sample (DDIM and DDPM)
        chain = f"{args.model} {args.image_size}px {sampler}{steps} b{args.batch_size} cfg={args.cfg_scale:g}"
        for mode in args.mode_list:
            case = f"{chain} {mode}"
            for impl in impls:
                model, sched, backend = models[impl]
                _time_run(results, case, impl, mode, model, sched, backend, diffusion, y, noise, sampler,
                          args, device, repeats)
                if macs is not None:
                    per_fwd, per_img = macs_per_image(macs, grid_steps(diffusion, sched), guidance)
                    results.add("sample", case, impl, "GMACs/fwd", per_fwd / 1e9, "GMAC", mode=mode)
                    results.add("sample", case, impl, "TMACs/img", per_img / 1e12, "TMAC", mode=mode)
        base = results.get("sample", f"{chain} eager", "dense", "ms")
        if base is None:
            results.notes.append(f"{chain}: no dense eager run, so no speedup column (add eager to --modes and "
                                 "dense to --impls)")
            continue
        for mode in args.mode_list:
            for impl in impls:
                ms = results.get("sample", f"{chain} {mode}", impl, "ms")
                if ms is not None and not (impl == "dense" and mode == "eager"):
                    results.add("sample", f"{chain} {mode}", impl, "speedup", base / ms, "x", mode=mode,
                                note="over dense eager")


def _time_run(results, case, impl, mode, model, schedule, backend, diffusion, y, noise, sampler, args, device,
              repeats):
    """Time whole sampling runs of one (model, mode): a first run (compiling or capturing) apart, then `repeats`."""
    graphs = CudaGraphDenoiser(model) if mode == "cuda-graph" else False
    if mode == "compile":
        torch._dynamo.reset()
        model.forward = torch.compile(model.forward)   # forward_with_cfg calls self.forward: patch the instance

    def run_once():
        with torch.no_grad(), autocast(device, args.torch_dtype), fk.backend(backend):
            return sample_latents(model, diffusion, y, (4, *noise.shape[2:]), cfg_scale=args.cfg_scale,
                                  schedule=schedule, sampler=sampler, noise=noise, cuda_graph=graphs)

    try:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        synchronize(device)
        start = time.perf_counter()
        run_once()
        synchronize(device)
        first_s = time.perf_counter() - start
        t = bench_fn(run_once, device, wall=True, cpu_repeats=repeats, cpu_warmup=0)
        results.add_timing("sample", case, impl, t, mode=mode)
        results.add("sample", case, impl, "images/s", args.batch_size / (t[0] * 1e-3), "img/s", mode=mode)
        if mode != "eager":
            results.add("sample", case, impl, "setup_s", max(0.0, first_s - t[0] * 1e-3), "s", mode=mode)
        if graphs:
            info = graphs.info()
            results.add("sample", case, impl, "graph_MiB", info["graph_memory_bytes"] / 2**20, "MiB", mode=mode)
            results.add("sample", case, impl, "copies_MiB", info["cast_memory_bytes"] / 2**20, "MiB", mode=mode)
            results.add("sample", case, impl, "graphs", info["num_graphs"], "", mode=mode)
        if device.type == "cuda":
            results.add("sample", case, impl, "peak_MiB", torch.cuda.max_memory_allocated(device) / 2**20, "MiB",
                        mode=mode)
    finally:
        if graphs:
            graphs.reset()
        if mode == "compile":
            del model.forward
            torch._dynamo.reset()


def table(results: Results) -> str:
    return format_table(results, "sample", ["ms", "images/s", "speedup", "GMACs/fwd", "TMACs/img", "setup_s",
                                            "graphs", "graph_MiB", "copies_MiB", "peak_MiB"],
                        "whole sampling runs with classifier-free guidance (ms per batch: median [p20, p80])")
