"""`python -m bench sample`: the end-to-end sampling loop (flexdit.diffusion), dense vs FlexDiT, with guidance.

Classifier-free guidance doubles the batch ([cond; null] through `forward_with_cfg`), so a run of B images pushes
2·B latents through the model at every step. FlexDiT follows a `flexdit.DensitySchedule` (one grid per stage).
"""
import torch

import flexdit_kernels as fk
from flexdit import DensitySchedule
from flexdit.diffusion import create_diffusion, sample_latents

from .common import Results, bench_fn, format_table, peak_memory_mib
from .model import _autocast, build_models


def parse_grids(text: str):
    return [int(g) for g in str(text).split(",") if g.strip()]


def run(args, results: Results, device: torch.device) -> None:
    dtype = args.torch_dtype
    latent = args.image_size // 8
    token_grid = latent // int(args.model.split("/")[-1])
    if args.grids:
        schedule = DensitySchedule(parse_grids(args.grids), token_grid=token_grid)
    else:   # REFERENCE §3's rule at the paper's 256² operating point
        schedule = DensitySchedule.from_rates(0.61, 0.86, token_grid)
    grids = list(schedule.grids)
    dense, flex = build_models(args.model, args.image_size, max(grids), device)
    diffusion = create_diffusion(f"ddim{args.steps}" if args.sampler == "ddim" else str(args.steps))
    y = torch.arange(args.batch_size, device=device) % 1000
    noise = torch.randn(args.batch_size, 4, latent, latent, generator=torch.Generator().manual_seed(0)).to(device)
    case = (f"{args.model} {args.image_size}px {args.sampler}{args.steps} cfg={args.cfg_scale} "
            f"grids={','.join(map(str, grids))}")

    def loop(model, sched, backend):
        def run_once():
            with torch.no_grad(), _autocast(device, dtype), fk.backend(backend):
                return sample_latents(model, diffusion, y, (4, latent, latent), cfg_scale=args.cfg_scale,
                                      schedule=sched, sampler=args.sampler, noise=noise)
        return run_once

    variants = [("dense", loop(dense, None, fk.get_backend()))]
    if device.type == "cuda":
        variants.append(("flexdit", loop(flex, schedule, "auto")))
    variants.append(("flexdit-ref", loop(flex, schedule, "reference")))
    for impl, fn in variants:
        t = bench_fn(fn, device, wall=True, cpu_repeats=args.repeats or (3 if device.type == "cuda" else 1),
                     cpu_warmup=1 if device.type == "cuda" else 0)
        results.add_timing("sample", case, impl, t)
        results.add("sample", case, impl, "images/s", args.batch_size / (t[0] * 1e-3), "img/s")
        mem = peak_memory_mib(fn, device)
        if mem is not None:
            results.add("sample", case, impl, "peak_MiB", mem, "MiB")
    base = results.get("sample", case, "dense", "ms")
    for impl, _ in variants[1:]:
        results.add("sample", case, impl, "speedup", base / results.get("sample", case, impl, "ms"), "x",
                    note="over dense")


def table(results: Results) -> str:
    return format_table(results, "sample", ["ms", "images/s", "speedup", "peak_MiB"],
                        "sampling loop, classifier-free guidance (ms per batch: median [p20, p80])")
