"""`flexdit-sample`: class-conditional sampling from a DiT or FlexDiT with the temporal density schedule.

Writes latents (`latents.npz`: latents (n, 4, h, w) float32, labels (n,), indices (n,)) and, with `--vae`, decoded
PNGs and a grid image. Runs on several GPUs with torchrun: rank r takes samples r, r + W, ...; sample i always uses
the seed (seed, i), so the output does not depend on the number of processes or the batch size.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from .diffusion import create_diffusion, sample_latents
from .schedule import DensitySchedule

__all__ = ["main", "build_model", "model_config", "schedule_from_args", "sample_seed", "DistContext"]

DEFAULT_CLASSES = "207,360,387,974,88,979,417,279"  # DiT's sample.py classes


# ---------------------------------------------------------------------------------------------------------------
# Model loading (shared with flexdit-finetune)
# ---------------------------------------------------------------------------------------------------------------

def build_model(name: str, ckpt=None, weights: str = "ema", **overrides):
    """A DiT ("DiT-XL/2") or FlexDiT ("FlexDiT-XL/2") from a registry name, with weights from `ckpt`:

    - None: random initialisation (smoke tests);
    - a FlexDiT checkpoint with a "config" entry (`save_flexdit`, or a `flexdit-finetune` checkpoint; `weights`
      picks its "ema" or "model" weights): the config comes from the file and `overrides` are ignored;
    - a plain state dict (`.pt` / `.safetensors`) of a dense DiT: loaded into the DiT, or, for a FlexDiT name,
      converted by the REFERENCE mapping (`from_dit`); a plain FlexDiT state dict is loaded as is.
    Returns (model, source) where source says which case applied.
    """
    from . import checkpoint
    from .convert import from_dit
    from .models import FlexDiT, FlexDiTConfig, create_model, flexdit_config

    flex = name.startswith("FlexDiT")
    if ckpt is None:
        return create_model(name, **overrides), "random initialisation"
    obj = checkpoint.read_checkpoint(ckpt)
    what = os.fspath(ckpt)
    if isinstance(obj, Mapping) and "config" in obj:
        key = weights if weights in obj else "model"
        if key not in obj:
            raise ValueError(f"ckpt {what!r} has no {weights!r} or 'model' weights")
        if obj.get("arch", "FlexDiT") == "FlexDiT":
            if not flex:
                raise ValueError(f"ckpt {what!r} is a FlexDiT checkpoint; use a FlexDiT-* model name")
            model = FlexDiT(FlexDiTConfig.from_dict(obj["config"]))
            checkpoint.load_state_dict_strict(model, obj[key], what=what)
            return model, f"FlexDiT checkpoint ({key} weights)"
        # a dense training checkpoint of flexdit-finetune: its config gives the DiT's size
        overrides = {**obj["config"], **overrides}
        state_dict = obj[key]
        source = f"dense DiT training checkpoint ({key} weights)"
    else:
        state_dict = checkpoint.load_dit_checkpoint(ckpt)
        source = "dense DiT checkpoint"
    if not flex:
        model = create_model(name, **overrides)
        checkpoint.load_state_dict_strict(model, state_dict, what=what)
        return model, source
    config = flexdit_config(name, **overrides)
    try:
        return from_dit(state_dict, config), source + " converted to FlexDiT"
    except ValueError as dense_err:
        model = FlexDiT(config)
        try:
            checkpoint.load_state_dict_strict(model, state_dict, what=what)
        except ValueError as flex_err:
            raise ValueError(f"ckpt {what!r} fits neither as a dense DiT ({dense_err}) nor as a "
                             f"FlexDiT state dict ({flex_err})") from None
        return model, "FlexDiT state dict"


def model_config(model) -> tuple[str, dict]:
    """("FlexDiT", config dict) or ("DiT", constructor kwargs): enough to rebuild the model."""
    model = getattr(model, "module", model)
    if hasattr(model, "config"):
        return "FlexDiT", model.config.to_dict()
    blk = model.blocks[0]
    hidden = model.pos_embed.shape[-1]
    return "DiT", dict(input_size=model.input_size if model.input_size[0] != model.input_size[1]
                       else model.input_size[0],
                       patch_size=model.patch_size, in_channels=model.in_channels, hidden_size=hidden,
                       depth=len(model.blocks), num_heads=model.num_heads,
                       mlp_ratio=blk.mlp.fc1.out_features / hidden,
                       class_dropout_prob=model.y_embedder.dropout_prob, num_classes=model.y_embedder.num_classes,
                       learn_sigma=model.learn_sigma)


def parse_model_args(text: str | None) -> dict:
    """--model-args: a JSON object of config overrides, e.g. '{"depth": 6, "hidden_size": 64, "num_heads": 2}'."""
    if not text:
        return {}
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--model-args must be a JSON object: {e}") from None
    if not isinstance(d, dict):
        raise ValueError(f"--model-args must be a JSON object, got {text!r}")
    return d


def schedule_from_args(args, model):
    """The density schedule asked for on the command line: --r-min/--r-max, --grid, or None (model default)."""
    plan = getattr(getattr(model, "config", None), "plan", None)
    is_flex = plan is not None and plan.num_modules > 0
    rates = (args.r_min, args.r_max)
    if (rates[0] is None) != (rates[1] is None):
        raise ValueError("--r-min and --r-max go together")
    if rates[0] is not None and args.grid is not None:
        raise ValueError("give either --r-min/--r-max or --grid, not both")
    if not is_flex:
        if rates[0] is not None or args.grid is not None:
            raise ValueError("--r-min/--r-max/--grid need a FlexDiT model")
        return None
    if rates[0] is not None:
        return DensitySchedule.from_rates(args.r_min, args.r_max, model.token_grid)
    if args.grid is not None:
        return DensitySchedule.fixed(args.grid, token_grid=model.token_grid)
    return None


def add_schedule_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("token density (FlexDiT)")
    g.add_argument("--r-min", type=float, default=None, help="pruning rate at the least noisy stage (e.g. 0.61)")
    g.add_argument("--r-max", type=float, default=None, help="pruning rate at the noisiest stage (e.g. 0.86)")
    g.add_argument("--grid", type=int, default=None, help="one fixed sparse grid side G (G×G tokens)")


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample `index`: distinct for every (seed, index) pair, independent of batching and ranks."""
    return (int(seed) * 1_000_003 + int(index)) % (2 ** 63)


# ---------------------------------------------------------------------------------------------------------------
# torchrun
# ---------------------------------------------------------------------------------------------------------------

class DistContext:
    """Rank, world size and device; a process group only when WORLD_SIZE > 1 (nccl on CUDA, gloo on the CPU)."""

    def __init__(self, device: str | None = None):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device is None:
            device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.distributed = self.world_size > 1
        if self.distributed:
            import torch.distributed as dist
            if not dist.is_initialized():
                dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.distributed:
            import torch.distributed as dist
            dist.barrier()

    def close(self):
        if self.distributed:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()


def backend_context(name: str, device: torch.device):
    """flexdit_kernels' backend: "auto" means Triton on CUDA and the PyTorch reference on the CPU for the CLIs
    (the Triton interpreter is for kernel tests, far too slow for a model)."""
    import flexdit_kernels
    if name == "auto" and device.type != "cuda":
        name = "reference"
    return flexdit_kernels.backend(name)


def autocast_context(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device_type=device.type, dtype=dtype)


# ---------------------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------------------

def _save_images(latents: torch.Tensor, indices, vae, out_dir: Path, device) -> None:
    from PIL import Image
    from .data import VAE_SCALE
    with torch.no_grad():
        for start in range(0, len(latents), 8):
            z = latents[start:start + 8].to(device=device, dtype=vae.dtype)
            img = vae.decode(z / VAE_SCALE).sample
            img = ((img.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
            for k, arr in enumerate(img):
                Image.fromarray(arr).save(out_dir / f"{int(indices[start + k]):06d}.png")


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


def _load_vae(path, device):
    try:
        from diffusers.models import AutoencoderKL
    except ImportError:
        print("VAE: diffusers is not installed; writing latents only")
        return None
    return AutoencoderKL.from_pretrained(path).to(device).eval()


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="flexdit-sample", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="FlexDiT-XL/2", help="registry name: FlexDiT-XL/2, DiT-XL/2, ...")
    p.add_argument("--ckpt", default=None,
                   help="dense DiT state dict (.pt/.safetensors, converted for FlexDiT names) or a FlexDiT "
                        "checkpoint; none: random weights")
    p.add_argument("--model-args", default=None,
                   help='JSON object of config overrides (tiny models, layer plans), e.g. \'{"depth": 6}\'')
    p.add_argument("--weights", choices=["ema", "model"], default="ema", help="which weights of a training checkpoint")
    p.add_argument("--image-size", type=int, default=256, help="image side; the latent side is image-size / 8")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--classes", default=DEFAULT_CLASSES, help="comma-separated class labels, cycled")
    p.add_argument("--num-samples", type=int, default=None, help="default: one per listed class")
    p.add_argument("--batch-size", type=int, default=8, help="samples per forward batch, per process")
    p.add_argument("--cfg-scale", type=float, default=4.0, help="classifier-free guidance scale (1: none)")
    p.add_argument("--cfg-channels", type=int, default=3, help="eps channels guided (DiT: 3; 4 for all)")
    p.add_argument("--steps", type=int, default=250, help="sampling steps (ADM respacing of the 1000)")
    p.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddpm")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM η")
    add_schedule_args(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default="samples")
    p.add_argument("--vae", default=None, help="local diffusers AutoencoderKL folder, to decode PNGs")
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK when available, else cpu")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--backend", choices=["auto", "triton", "reference"], default="auto",
                   help="flexdit_kernels backend (auto: Triton on CUDA, the PyTorch reference on the CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the forward (one graph per density stage)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    ctx = DistContext(args.device)
    try:
        return _run(args, ctx)
    finally:
        ctx.close()


def _run(args, ctx: DistContext):
    if args.image_size % 8:
        raise ValueError(f"--image-size must be a multiple of 8, got {args.image_size}")
    classes = [int(c) for c in args.classes.split(",") if c.strip()]
    if not classes or min(classes) < 0 or max(classes) >= args.num_classes:
        raise ValueError(f"--classes must be labels in [0, {args.num_classes}), got {args.classes!r}")
    n = args.num_samples if args.num_samples is not None else len(classes)
    model, source = build_model(args.model, args.ckpt, weights=args.weights, input_size=args.image_size // 8,
                                num_classes=args.num_classes, **parse_model_args(args.model_args))
    model = model.to(ctx.device).eval()
    if ctx.is_main:
        print(f"model {args.model} ({source}); {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters")
    schedule = schedule_from_args(args, model)
    if ctx.is_main and schedule is not None:
        print(f"density schedule: {schedule}")
    if args.compile:
        model.forward = torch.compile(model.forward)
    diffusion = create_diffusion(args.steps)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    mine = list(range(ctx.rank, n, ctx.world_size))
    latent_shape = (model.in_channels, *model.input_size)
    all_lat, all_lab = [], []
    with backend_context(args.backend, ctx.device):
        for start in range(0, len(mine), args.batch_size):
            idx = mine[start:start + args.batch_size]
            y = torch.tensor([classes[i % len(classes)] for i in idx], device=ctx.device)
            gens = [torch.Generator().manual_seed(sample_seed(args.seed, i)) for i in idx]
            with autocast_context(args.precision, ctx.device):
                z = sample_latents(model, diffusion, y, latent_shape, cfg_scale=args.cfg_scale, schedule=schedule,
                                   sampler=args.sampler, eta=args.eta, generator=gens, cfg_channels=args.cfg_channels,
                                   progress=not args.no_progress and ctx.is_main)
            all_lat.append(z.float().cpu())
            all_lab.append(y.cpu())
    latents = torch.cat(all_lat) if all_lat else torch.zeros(0, *latent_shape)
    labels = torch.cat(all_lab) if all_lab else torch.zeros(0, dtype=torch.long)
    part = out_dir / (f"latents_rank{ctx.rank:03d}.npz" if ctx.distributed else "latents.npz")
    np.savez(part, latents=latents.numpy(), labels=labels.numpy(), indices=np.array(mine, dtype=np.int64))

    if args.vae:
        vae = _load_vae(args.vae, ctx.device)
        if vae is not None:
            _save_images(latents, mine, vae, out_dir, ctx.device)
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
        if args.vae and (out_dir / f"{0:06d}.png").exists():
            _save_grid(out_dir, range(n))
        (out_dir / "args.json").write_text(json.dumps(vars(args), indent=2))
        print(f"wrote {n} samples to {out_dir}")
    ctx.barrier()
    return out_dir


if __name__ == "__main__":
    main()
