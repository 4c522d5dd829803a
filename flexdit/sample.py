"""`flexdit-sample`: class-conditional sampling from a DiT or FlexDiT with the temporal density schedule.

Writes latents (`latents.npz`: latents (n, 4, h, w) float32, or (n, T, 4, h, w) for a video model such as FlexLatte,
labels (n,), indices (n,)), `args.json` (the options as run, with the model's name and config) and, with `--vae`,
decoded PNGs (one GIF per clip for video) and a grid image. A checkpoint that records its model (every one that
flexdit-finetune writes) gives the model, sizes and classes; options that contradict it are refused.
Runs on several GPUs with torchrun: rank r takes samples r, r + W, ...; sample i always uses the seed (seed, i), so
the output does not depend on the number of processes or the batch size.
`--cuda-graph` replays the network from CUDA graphs (one per grid of the schedule and batch size) and reports their
memory. Exit status: 0 on success, 2 with one line `flexdit-sample: error: ...` for a bad argument, file or device.

Text-to-image: `flexdit-sample --model PIPELINE_DIR --prompt "..." [--prompt ...]` loads a local diffusers PixArt-α,
SD3 / SD3.5 or FLUX.1 pipeline folder, patches its transformer (`flexdit.apply_patch`: the plan from --model-args
'{"plan": {...}}', the density schedule from --r-min/--r-max or --grid), loads a LoRA of flexdit-finetune with --lora
(merged into the weights), and generates through the pipeline itself: one PNG per sample (`000000.png`, ...;
sample i takes prompt i mod P and the seed (seed, i)), `grid.png` and `args.json`.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from ._cli import (DistContext, add_device_args, add_model_args, add_precision_arg, add_schedule_args,
                   autocast_context, backend_context, build_model, check_out_dir, create_checked, model_config,
                   parse_model_args, sample_seed, schedule_from_args, usage_errors)
from .diffusion import CudaGraphDenoiser, create_diffusion, model_num_classes, sample_latents
from .eval import load_vae
from .plan import format_grid

# build_model, model_config, schedule_from_args, sample_seed and DistContext live in flexdit._cli (shared with
# flexdit-finetune); they stay importable from here.
__all__ = ["main", "build_model", "model_config", "schedule_from_args", "sample_seed", "DistContext",
           "parse_classes"]

DEFAULT_CLASSES = "207,360,387,974,88,979,417,279"  # DiT's sample.py classes
PROG = "flexdit-sample"


def parse_classes(text: str, num_classes: int | None = None) -> list[int]:
    """--classes: comma-separated integer labels in [0, num_classes) (any int when num_classes is None)."""
    try:
        classes = [int(c) for c in str(text).split(",") if c.strip()]
    except ValueError:
        raise ValueError(f"--classes must be comma-separated integer labels, got {text!r}") from None
    if not classes:
        raise ValueError("--classes names no label")
    top = num_classes if num_classes is not None else float("inf")
    bad = [c for c in classes if not 0 <= c < top]
    if bad:
        raise ValueError(f"--classes: label {bad[0]} is outside [0, {num_classes if bad[0] >= 0 else 'num_classes'})"
                         f" (the model's --num-classes {num_classes})")
    return classes


# ---------------------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------------------

def _save_images(latents: torch.Tensor, indices, vae, out_dir: Path) -> None:
    from PIL import Image
    from .eval import decode_latents
    for start in range(0, len(latents), 8):
        for k, arr in enumerate(decode_latents(vae, latents[start:start + 8])):
            Image.fromarray(arr).save(out_dir / f"{int(indices[start + k]):06d}.png")


def _save_clips(latents: torch.Tensor, indices, vae, out_dir: Path, fps: int = 8) -> None:
    """One GIF per clip of latents (n, T, C, h, w), frames decoded one clip at a time, and `grid.png`: one row of
    frames per clip (at most 16 clips)."""
    from PIL import Image
    from .eval import decode_latents
    rows = []
    for k, clip in enumerate(latents):
        arr = decode_latents(vae, clip)                                                      # (T, H, W, 3)
        frames = [Image.fromarray(a) for a in arr]
        frames[0].save(out_dir / f"{int(indices[k]):06d}.gif", save_all=True, append_images=frames[1:],
                       duration=int(1000 / fps), loop=0)
        if len(rows) < 16:
            rows.append(np.concatenate(list(arr), axis=1))                                  # (H, T*W, 3)
    if rows:
        Image.fromarray(np.concatenate(rows, axis=0)).save(out_dir / "grid.png")


def _save_grid(out_dir: Path, indices, max_images: int = 64) -> None:
    from PIL import Image
    files = [out_dir / f"{int(i):06d}.png" for i in sorted(indices)[:max_images]]
    imgs = [Image.open(f).convert("RGB") for f in files if f.exists()]
    if not imgs:
        return
    cols = int(np.ceil(np.sqrt(len(imgs))))
    rows = int(np.ceil(len(imgs) / cols))
    w, h = imgs[0].size
    grid = Image.new("RGB", (cols * w, rows * h))
    for k, im in enumerate(imgs):
        grid.paste(im, ((k % cols) * w, (k // cols) * h))
    grid.save(out_dir / "grid.png")


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(p, model_help="registry name: FlexDiT-XL/2, DiT-XL/2, FlexLatte, ... (default: the one --ckpt "
                                 "records, else FlexDiT-XL/2)",
                   model_args_help='JSON object of config overrides (tiny models, layer plans), e.g. \'{"depth": 6}\'')
    p.add_argument("--ckpt", default=None,
                   help="a checkpoint of flexdit-finetune or save_flexdit (FlexDiT, dense DiT, FlexLatte: its "
                        "config is used), a dense DiT state dict (.pt/.safetensors, converted for FlexDiT names) or "
                        "a diffusers Latte folder (FlexLatte); none: random weights")
    p.add_argument("--weights", choices=["ema", "model"], default="ema", help="which weights of a training checkpoint")
    p.add_argument("--classes", default=DEFAULT_CLASSES, help="comma-separated class labels, cycled")
    p.add_argument("--num-samples", type=int, default=None, help="default: one per listed class (at least 1)")
    p.add_argument("--batch-size", type=int, default=8, help="samples per forward batch, per process")
    p.add_argument("--cfg-scale", "--guidance-scale", dest="cfg_scale", type=float, default=None,
                   help="guidance scale >= 0: classifier-free (1: none; default 4.0), or the pipeline's "
                        "guidance_scale with --prompt (default: the pipeline's)")
    p.add_argument("--cfg-channels", type=int, default=3, help="eps channels guided (DiT: 3; 4 for all)")
    p.add_argument("--steps", type=int, default=None,
                   help="sampling steps (ADM respacing of the 1000; default 250, or the pipeline's with --prompt)")
    p.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddpm")
    p.add_argument("--eta", type=float, default=None, help="DDIM η (default 0; --sampler ddim only)")
    add_schedule_args(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default="samples")
    p.add_argument("--vae", default=None,
                   help="local diffusers AutoencoderKL folder, to decode PNGs (video: one GIF per clip)")
    p.add_argument("--adm-npz", default=None, metavar="PATH",
                   help="also write the decoded images in the layout of ADM's evaluator (arr_0 uint8 NHWC, arr_1 "
                        "labels) for flexdit-eval fid or ADM's own evaluator; needs --vae, images only")
    add_precision_arg(p, "fp32")
    add_device_args(p)
    speed = p.add_mutually_exclusive_group()
    speed.add_argument("--compile", action="store_true",
                       help="torch.compile the forward (one graph per density stage)")
    speed.add_argument("--cuda-graph", action="store_true",
                       help="replay the guided forward from CUDA graphs, one per (grid, batch) (CUDA only)")
    p.add_argument("--no-progress", action="store_true")
    text = p.add_argument_group("text-to-image (--model PIPELINE_DIR --prompt ...)")
    text.add_argument("--prompt", action="append", default=None,
                      help="a caption (repeat the flag for several); --model is then a local diffusers PixArt-α, "
                           "SD3 / SD3.5 or FLUX.1 pipeline folder")
    text.add_argument("--lora", default=None, metavar="PATH",
                      help="adapters + fusion weights of a LoRA run (flexdit.lora.save_adapters), merged for sampling")
    text.add_argument("--max-sequence-length", type=int, default=None,
                      help="T5 tokens per prompt (default: the pipeline's; use the shards' for a fine-tuned model)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    """Run flexdit-sample; 0 on success. Bad arguments, files or devices end it with one line and exit 2."""
    args = parse_args(argv)
    with usage_errors(PROG):
        if args.prompt:
            _refuse_class_flags(args)
        else:
            _refuse_text_flags(args)
        ctx = DistContext(args.device)
    try:
        if args.prompt:
            with usage_errors(PROG):
                setup = _prepare_text(args, ctx)
            _sample_text(args, ctx, *setup)
            return 0
        with usage_errors(PROG):
            setup = _prepare(args, ctx)
        _sample(args, ctx, *setup)
    finally:
        ctx.close()
    return 0


def _prepare(args, ctx: DistContext):
    """Every check and the model, before any sampling: (model, classes, n, schedule). Fills in `args` what the run
    uses (the model's name, image size and classes), for args.json."""
    args.cfg_scale = 4.0 if args.cfg_scale is None else args.cfg_scale
    args.steps = 250 if args.steps is None else args.steps
    if args.image_size is not None and (args.image_size < 8 or args.image_size % 8):
        raise ValueError(f"--image-size must be a positive multiple of 8, got {args.image_size}")
    for flag, value, low in (("--batch-size", args.batch_size, 1), ("--num-classes", args.num_classes, 1),
                             ("--num-samples", args.num_samples, 1)):
        if value is not None and value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
    if not 1 <= args.steps <= 1000:
        raise ValueError(f"--steps must be in 1..1000 (a respacing of the 1000 training steps), got {args.steps}")
    if not 1 <= args.cfg_channels <= 4:
        raise ValueError(f"--cfg-channels must be in 1..4, got {args.cfg_channels}")
    if not args.cfg_scale >= 0:
        raise ValueError(f"--cfg-scale must be >= 0 (1: no guidance), got {args.cfg_scale}")
    if args.eta is not None and args.sampler != "ddim":
        raise ValueError(f"--eta {args.eta} is DDIM's; it needs --sampler ddim (the sampler is {args.sampler})")
    if args.eta is not None and not args.eta >= 0:
        raise ValueError(f"--eta must be >= 0, got {args.eta}")
    args.eta = 0.0 if args.eta is None else args.eta
    if args.cuda_graph and ctx.device.type != "cuda":
        raise ValueError(f"--cuda-graph needs a CUDA GPU (device {ctx.device}; torch.cuda.is_available() is "
                         f"{torch.cuda.is_available()})")
    if args.adm_npz and not args.vae:
        raise ValueError("--adm-npz needs --vae (the images are decoded from the latents)")
    if args.adm_npz and (not args.adm_npz.endswith(".npz") or not Path(args.adm_npz).parent.is_dir()):
        raise ValueError(f"--adm-npz {args.adm_npz}: must be a .npz file in an existing folder")
    if args.vae and not Path(args.vae).is_dir():
        raise ValueError(f"--vae {args.vae}: not a folder (a diffusers AutoencoderKL saved with save_pretrained)")
    parse_classes(args.classes)
    if ctx.is_main:
        check_out_dir(args.out_dir)
    if args.model is None and args.ckpt is None:
        args.model = "FlexDiT-XL/2"
    overrides = parse_model_args(args.model_args)
    if args.image_size is not None:
        overrides["input_size"] = args.image_size // 8
    if args.num_classes is not None:
        overrides["num_classes"] = args.num_classes
    model, source, args.model = create_checked(args.model, args.ckpt, args.weights, **overrides)
    num_classes = model_num_classes(model)
    classes = parse_classes(args.classes, num_classes)
    n = args.num_samples if args.num_samples is not None else len(classes)
    args.num_classes, args.image_size = num_classes, model.input_size[0] * 8
    if args.adm_npz and getattr(model, "frames", None):
        raise ValueError(f"--adm-npz writes images; {args.model} samples clips (flexdit-eval fvd reads latents.npz)")
    model = model.to(ctx.device).eval()
    if ctx.is_main:
        print(f"model {args.model} ({source}); {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters")
    schedule = schedule_from_args(args, model)
    if ctx.is_main and schedule is not None:
        print(f"density schedule: {schedule}")
    args.model_config = model_config(model)[1]
    args.schedule = schedule.to_dict() if schedule is not None else None
    return model, classes, n, schedule


def _sample(args, ctx: DistContext, model, classes, n, schedule):
    if args.compile:
        model.forward = torch.compile(model.forward)
    graphs = CudaGraphDenoiser(model) if args.cuda_graph else False
    diffusion = create_diffusion(args.steps)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    mine = list(range(ctx.rank, n, ctx.world_size))
    frames = getattr(model, "frames", None)        # a video model samples (C, T, h, w) clips
    latent_shape = (model.in_channels, *([frames] if frames else []), *model.input_size)
    all_lat, all_lab = [], []
    with backend_context(args.backend, ctx.device):
        for start in range(0, len(mine), args.batch_size):
            idx = mine[start:start + args.batch_size]
            y = torch.tensor([classes[i % len(classes)] for i in idx], device=ctx.device)
            gens = [torch.Generator().manual_seed(sample_seed(args.seed, i)) for i in idx]
            with autocast_context(args.precision, ctx.device):
                z = sample_latents(model, diffusion, y, latent_shape, cfg_scale=args.cfg_scale, schedule=schedule,
                                   sampler=args.sampler, eta=args.eta, generator=gens, cfg_channels=args.cfg_channels,
                                   progress=not args.no_progress and ctx.is_main, cuda_graph=graphs)
            all_lat.append(z.float().cpu())
            all_lab.append(y.cpu())
    if graphs and ctx.is_main:
        print(graph_summary(graphs.info()))
    latents = torch.cat(all_lat) if all_lat else torch.zeros(0, *latent_shape)
    if frames:
        latents = latents.transpose(1, 2)          # (n, T, C, h, w): the layout of video latent shards
    labels = torch.cat(all_lab) if all_lab else torch.zeros(0, dtype=torch.long)
    part = out_dir / (f"latents_rank{ctx.rank:03d}.npz" if ctx.distributed else "latents.npz")
    np.savez(part, latents=latents.numpy(), labels=labels.numpy(), indices=np.array(mine, dtype=np.int64))

    if args.vae:
        (_save_clips if frames else _save_images)(latents, mine, load_vae(args.vae, ctx.device), out_dir)
    elif ctx.is_main:
        print("VAE missing (--vae PATH to a diffusers AutoencoderKL folder): writing latents only")
    ctx.barrier()
    if ctx.is_main:
        if ctx.distributed:
            parts = [out_dir / f"latents_rank{r:03d}.npz" for r in range(ctx.world_size)]
            arrays = []
            for p in parts:
                with np.load(p) as z:
                    arrays.append({k: z[k] for k in z.files})
            ind = np.concatenate([a["indices"] for a in arrays])
            order = np.argsort(ind)
            np.savez(out_dir / "latents.npz", latents=np.concatenate([a["latents"] for a in arrays])[order],
                     labels=np.concatenate([a["labels"] for a in arrays])[order], indices=ind[order])
            for p in parts:
                p.unlink()
        if args.vae and not frames and (out_dir / f"{0:06d}.png").exists():
            _save_grid(out_dir, range(n))
            if args.adm_npz:
                from .eval import pack_adm_npz
                with np.load(out_dir / "latents.npz") as z:
                    labels = z["labels"]
                print(f"wrote {pack_adm_npz(out_dir, args.adm_npz, labels=labels)} (ADM layout)")
        (out_dir / "args.json").write_text(json.dumps(vars(args), indent=2))
        print(f"wrote {n} samples to {out_dir}")
    ctx.barrier()
    return out_dir


# ---------------------------------------------------------------------------------------------------------------
# Text-to-image through a diffusers pipeline
# ---------------------------------------------------------------------------------------------------------------

_CLASS_FLAGS = ("ckpt", "weights", "num_classes", "classes", "cfg_channels", "sampler", "eta", "vae", "adm_npz",
                "compile", "cuda_graph")


def _refuse_class_flags(args) -> None:
    """The class-conditional flags mean nothing to a pipeline: refuse them (any value but the default) rather than
    ignore them."""
    defaults = vars(parse_args([]))
    given = [name for name in _CLASS_FLAGS if getattr(args, name) != defaults[name]]
    if given:
        raise ValueError(f"--{given[0].replace('_', '-')} is for class-conditional models; --prompt samples a "
                         "diffusers pipeline")


def _refuse_text_flags(args) -> None:
    for flag, value in (("--lora", args.lora), ("--max-sequence-length", args.max_sequence_length)):
        if value is not None:
            raise ValueError(f"{flag} needs --prompt (text-to-image through a diffusers pipeline folder)")


def _prepare_text(args, ctx: DistContext):
    """Every check, the pipeline, the patch and the LoRA, before any sampling: (pipe, n, the pipeline call's
    keyword arguments). Fills in `args` what the run uses (image size, plan, schedule), for args.json."""
    from types import SimpleNamespace
    from .data import _DTYPES, load_text_pipeline, pipeline_host
    from .patch import apply_patch
    from .plan import Plan
    if not args.model:
        raise ValueError("--prompt needs --model PIPELINE_DIR (a local diffusers pipeline folder)")
    for flag, value in (("--batch-size", args.batch_size), ("--num-samples", args.num_samples),
                        ("--steps", args.steps), ("--max-sequence-length", args.max_sequence_length)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if args.cfg_scale is not None and not args.cfg_scale >= 0:
        raise ValueError(f"--guidance-scale must be >= 0, got {args.cfg_scale}")
    if args.lora is not None and not Path(args.lora).is_file():
        raise ValueError(f"--lora {args.lora}: no such file")
    pipeline_host(args.model, "--model")
    fields = parse_model_args(args.model_args)      # {"plan": {...}}, as flexdit-finetune takes it
    plan = fields.pop("plan", None)
    if fields:
        raise ValueError(f"--model-args: a pipeline folder takes only {{\"plan\": {{...}}}}, got {sorted(fields)}")
    if plan is not None:
        try:
            Plan(**plan)
        except TypeError as e:
            raise ValueError(f"--model-args: plan takes the fields of flexdit.Plan (num_pool, num_modules, group, "
                             f"num_top, grid): {e}") from None
        except ValueError as e:
            raise ValueError(f"--model-args: plan: {e}") from None
    if ctx.is_main:
        check_out_dir(args.out_dir)
    pipe, host = load_text_pipeline(args.model, dtype=_DTYPES[args.precision], flag="--model", transformer=True,
                                    progress=not args.no_progress and ctx.is_main)
    if getattr(pipe, "transformer", None) is None:
        raise ValueError(f"--model {args.model}: the pipeline has no transformer")
    config = pipe.transformer.config
    token = pipe.vae_scale_factor * config.patch_size * (2 if host == "flux" else 1)   # FLUX packs 2x2 latents
    default_side = getattr(pipe, "default_sample_size", None) or config.sample_size
    args.image_size = args.image_size or default_side * pipe.vae_scale_factor
    if args.image_size < token or args.image_size % token:
        raise ValueError(f"--image-size must be a positive multiple of {token} (the VAE's factor times the "
                         f"transformer's 2x2 patch), got {args.image_size}")
    side = args.image_size // token
    # The schedule flags as for the FlexDiT models; whether the plan has sparse layers is checked once patched.
    stand_in = SimpleNamespace(config=SimpleNamespace(plan=SimpleNamespace(num_modules=1)), token_grid=(side, side))
    schedule = schedule_from_args(args, stand_in)
    try:
        apply_patch(pipe, plan, schedule, keep_original=False)   # sampling never unpatches: one copy of the blocks
    except ValueError as e:
        raise ValueError(f"--model-args / --model: {e}") from None
    patched_plan = pipe.transformer.transformer_blocks.plan
    if schedule is not None and patched_plan.num_modules == 0:
        raise ValueError("--r-min/--r-max/--grid need a plan with sparse layers (the plan is all dense)")
    if args.lora is not None:
        from .lora import load_adapters
        load_adapters(pipe.transformer, args.lora, merge=True)
    pipe = pipe.to(ctx.device)
    pipe.set_progress_bar_config(disable=args.no_progress or not ctx.is_main)
    n = args.num_samples if args.num_samples is not None else len(args.prompt)
    call = {"height": args.image_size, "width": args.image_size, "output_type": "pil"}
    for key, value in (("num_inference_steps", args.steps), ("guidance_scale", args.cfg_scale),
                       ("max_sequence_length", args.max_sequence_length)):
        if value is not None:
            call[key] = value
    if host == "pixart":
        call["use_resolution_binning"] = False     # the size asked for, not the nearest aspect-ratio bin
    args.model_config = {"pipeline": type(pipe).__name__, "transformer": dict(config), "plan": str(patched_plan)}
    args.schedule = schedule.to_dict() if schedule is not None else None
    if ctx.is_main:
        params = sum(p.numel() for p in pipe.transformer.parameters())
        print(f"pipeline {type(pipe).__name__} ({args.model}); transformer {params / 1e6:.2f} M parameters, "
              f"patched: {patched_plan}" + (f"; LoRA {args.lora} merged" if args.lora else ""))
        if schedule is not None:
            print(f"density schedule: {schedule}")
    return pipe, n, call


def _sample_text(args, ctx: DistContext, pipe, n, call):
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mine = list(range(ctx.rank, n, ctx.world_size))
    with backend_context(args.backend, ctx.device):
        for start in range(0, len(mine), args.batch_size):
            idx = mine[start:start + args.batch_size]
            gens = [torch.Generator().manual_seed(sample_seed(args.seed, i)) for i in idx]
            images = pipe(prompt=[args.prompt[i % len(args.prompt)] for i in idx], generator=gens, **call).images
            for i, image in zip(idx, images):
                image.save(out_dir / f"{i:06d}.png")
    ctx.barrier()
    if ctx.is_main:
        _save_grid(out_dir, range(n))
        (out_dir / "args.json").write_text(json.dumps(vars(args), indent=2, default=str))
        print(f"wrote {n} images to {out_dir}")
    ctx.barrier()
    return out_dir


def graph_summary(info: dict) -> str:
    """One line on the CUDA graphs of a run: how many, for which (grid, batch), their memory and capture time."""
    keys = ", ".join(f"{'dense' if g['grid'] is None else format_grid(g['grid'])} batch {g['batch']}"
                     for g in info["graphs"])
    return (f"CUDA graphs: {info['num_graphs']} captured ({keys}); graph memory "
            f"{info['graph_memory_bytes'] / 2**20:.1f} MiB, weight copies {info['cast_memory_bytes'] / 2**20:.1f} MiB; "
            f"capture {info['capture_s']:.2f} s")


if __name__ == "__main__":
    raise SystemExit(main())
