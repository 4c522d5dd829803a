"""`flexdit-finetune`: fine-tune a FlexDiT (converted from a dense DiT, or resumed) on pre-extracted latents.

DiT's recipe, which the paper's fine-tuning follows: AdamW (lr 1e-4, weight decay 0), EMA, mixed precision, the
hybrid diffusion loss.
Density-stage bucketing: every step, each process draws one stage of the density schedule and t uniformly inside
that stage, so a batch runs one grid. Checkpoints (atomic) hold model, EMA, optimizer, scaler, step, config and RNG
states; a resumed run reproduces an uninterrupted one exactly. With torchrun, DDP over the processes, each drawing
its stages and timesteps from its own seed. A dense model name (DiT-S/2 ...) trains a dense DiT the same way.
A progress bar (tqdm: step, last logged loss, ETA) runs on a terminal unless --no-progress. Ctrl-C (SIGINT) ends
the step in progress (under torchrun, the next multiple of 10 steps), writes a checkpoint and exits with status 130;
`--resume auto` (the default) goes on from the newest readable checkpoint, and log.jsonl keeps each step once.
`args.json` in the run folder records the options as run.

Text-to-image hosts (`--model`: a local diffusers PixArt-α / SD3 / FLUX transformer or pipeline folder, or a tiny
host) are patched into FlexDiT and trained on text shards with their own objective (`flexdit.objectives`): all
weights, or with `--lora-rank` LoRA adapters plus the fusion weights W1/W2 (`flexdit.lora`); under torchrun with DDP
or, with `--fsdp`, FSDP2 (one unit per layer); checkpoints are `torch.distributed.checkpoint` folders of the trained
weights and the optimiser. `--grad-accum` splits a process's batch into micro-batches that draw as the ranks of a
larger run would, so one process with --grad-accum N equals N processes.
`--caption-dropout P` trains each sample on the empty caption's encoding (stored with the shards) with probability
P, drawn with the step's other randomness, so the host keeps the unconditional prediction classifier-free guidance
needs.
Exit status: 0 on success, 2 with one line `flexdit-finetune: error: ...` for a bad argument, file, data or device,
130 after Ctrl-C.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

import torch

from . import checkpoint
from .checkpoint import arch_of_name, is_registry_name
from ._cli import (DistContext, add_device_args, add_model_args, add_precision_arg, add_schedule_args,
                   autocast_context, backend_context, check_out_dir, create_checked, model_config, parse_model_args,
                   schedule_from_args, usage_errors)
from .data import LatentShards
from .mmdit import TINY_CONFIGS
from .objectives import WEIGHTINGS, DiffusionObjective
from .plan import format_grid
from .schedule import DensitySchedule

PROG = "flexdit-finetune"
DEFAULT_RATES = (0.61, 0.86)   # the paper's 256² operating point, used when neither --r-min/--r-max nor --grid

__all__ = ["main", "update_ema", "train_step", "heldout_loss", "save_checkpoint", "find_latest_checkpoint",
           "newest_readable_checkpoint"]


# ---------------------------------------------------------------------------------------------------------------
# Pieces
# ---------------------------------------------------------------------------------------------------------------

def _mix(*values: int) -> int:
    """A 63-bit seed from several ints (seed, rank, step ...), distinct for distinct tuples in practice."""
    h = 0x243F6A8885A308D3
    for v in values:
        h = (h ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0x100000001B3 % (1 << 64)
        h ^= h >> 29
    return h % (1 << 63)


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema ← decay·ema + (1 − decay)·model, over all parameters (as DiT)."""
    ema_p = [p for _, p in sorted(ema.named_parameters())]
    model_p = [p for _, p in sorted(model.named_parameters())]
    torch._foreach_lerp_(ema_p, model_p, 1.0 - decay)


class EpochSampler:
    """Sample indices for (step, rank): the global stream of epoch permutations, cut into global batches.

    Stateless — the indices of a step depend only on (seed, step, rank) — so resuming needs no sampler state.
    """

    def __init__(self, n: int, batch_size: int, world_size: int, seed: int):
        self.n, self.batch_size, self.world_size, self.seed = n, batch_size, world_size, seed
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = torch.randperm(self.n, generator=torch.Generator().manual_seed(_mix(self.seed, epoch)))
        return self._perms[epoch]

    def indices(self, step: int, rank: int) -> torch.Tensor:
        start = (step * self.world_size + rank) * self.batch_size
        pos = torch.arange(start, start + self.batch_size)
        out = torch.empty_like(pos)
        for e in torch.unique(pos // self.n).tolist():
            sel = pos // self.n == e
            out[sel] = self._perm(e)[pos[sel] % self.n]
        return out


def train_step(model, objective, optimizer, scaler, micro, precision, device):
    """One optimisation step over the micro-batches `micro` [(batch, t, noise, grid), ...] (gradients
    accumulated, each loss weighted 1 / len(micro)); returns each micro-batch's mean loss (detached)."""
    optimizer.zero_grad(set_to_none=True)
    losses = []
    for batch, t, noise, grid in micro:
        with autocast_context(precision, device):
            loss = objective.losses(model, batch, t, noise, grid)["loss"].mean()
        scaler.scale(loss / len(micro)).backward()
        losses.append(loss.detach())
    scaler.step(optimizer)
    scaler.update()
    return losses


@torch.no_grad()
def heldout_loss(model, diffusion, latents, labels, schedule: DensitySchedule | None = None, seed: int = 0,
                 batch_size: int = 256, term: str = "mse") -> float:
    """Mean denoising loss (`term` of training_losses: "mse", "vb" or "loss") on held-out latents, in eval mode.

    t is stratified over [0, T) (sample i gets t = (i·T/n + u) with a seeded offset), noise is seeded, and each
    stage's samples run at that stage's grid, so two models see exactly the same (x_0, t, ε).
    """
    was_training = model.training
    model.eval()
    n, n_t = len(latents), diffusion.num_timesteps
    g = torch.Generator().manual_seed(seed)
    t = ((torch.arange(n, dtype=torch.float64) + torch.rand(n, generator=g, dtype=torch.float64)) * n_t / n).long()
    t = t.clamp(max=n_t - 1)
    noise = torch.randn(latents.shape, generator=g)
    device = next(model.parameters()).device
    total = 0.0
    groups = [(k, *schedule.stage_interval(k)) for k in schedule.stages] if schedule else [(None, 0, n_t)]
    for k, lo, hi in groups:
        sel = torch.nonzero((t >= lo) & (t < hi)).flatten()
        kwargs = {} if k is None else {"grid": schedule.grids[k]}
        for start in range(0, len(sel), batch_size):
            idx = sel[start:start + batch_size]
            x, y = latents[idx].float().to(device), labels[idx].to(device)
            losses = diffusion.training_losses(lambda xt, tt: model(xt, tt, y, **kwargs), x, t[idx].to(device),
                                               noise[idx].to(device))
            total += losses[term].double().sum().item()
    model.train(was_training)
    return total / n


def check_resumed_grids(saved: dict, schedule: DensitySchedule) -> None:
    """A resumed run keeps the grids it trained with: `saved` is the checkpoint's `DensitySchedule.to_dict()`."""
    trained = DensitySchedule.from_dict(saved).grids
    if trained != schedule.grids:
        raise ValueError(f"--resume: the checkpoint trained with grids {', '.join(map(format_grid, trained))}, "
                         f"this run asks for {', '.join(map(format_grid, schedule.grids))}")


def save_checkpoint(path: Path, state: dict) -> None:
    """torch.save to a temporary file in the same folder, then os.replace: a crash never leaves half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def find_latest_checkpoint(out_dir) -> Path | None:
    ckpts = sorted(Path(out_dir, "checkpoints").glob("[0-9]*.pt"))
    return ckpts[-1] if ckpts else None


def newest_readable_checkpoint(out_dir, say=print) -> tuple[Path | None, dict | None]:
    """(path, state) of the newest checkpoint in out_dir/checkpoints that reads as a flexdit-finetune checkpoint;
    each newer one that does not (truncated, corrupt) is skipped with a line through `say`. (None, None) if none."""
    for path in sorted(Path(out_dir, "checkpoints").glob("[0-9]*.pt"), reverse=True):
        try:
            return path, read_resume_state(path)
        except ValueError as err:
            say(f"skipping unreadable checkpoint {path}: {err}")
    return None, None


def trim_log(path: Path, step: int) -> None:
    """Drop the records of log.jsonl after `step` (written after the checkpoint a run resumes from), atomically."""
    path = Path(path)
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines(keepends=True):
        try:
            record = json.loads(line)
        except ValueError:                 # the half-written last line of a run killed while appending
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            keep.append(line if line.endswith("\n") else line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(keep))
    os.replace(tmp, path)


class StopOnSigint:
    """While active, Ctrl-C (SIGINT) sets `requested` instead of raising, so the loop can end its step and write a
    checkpoint; a second Ctrl-C raises KeyboardInterrupt at once. Only in the main thread (signals go there)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state.get("cuda"):
        torch.cuda.set_rng_state_all(state["cuda"])


def read_resume_state(path) -> dict:
    """A flexdit-finetune checkpoint, checked for what a resumed run needs; ValueError naming the file."""
    state = checkpoint.read_checkpoint(path)
    need = {"arch", "config", "model", "ema", "opt", "step", "rng"}
    if not isinstance(state, dict) or not need <= set(state):
        have = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"--resume: checkpoint {str(path)!r} is not a flexdit-finetune checkpoint (it needs "
                         f"{sorted(need)}; it has {have})")
    return state


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="flexdit-finetune", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(p, model_help="registry name (FlexDiT-XL/2; DiT-* trains a dense DiT), FlexLatte "
                                 "(class-conditional video on diffusers' Latte, needs diffusers), or a text-to-image "
                                 "host: a local diffusers PixArt-α / SD3 / FLUX transformer or pipeline folder, or "
                                 "tiny-pixart / tiny-sd3 / tiny-flux (random toy hosts), patched into FlexDiT and "
                                 "trained on text shards. Default: the resumed run's, else the one --init records, "
                                 "else FlexDiT-XL/2",
                   model_args_help="JSON object of config overrides (tiny models, layer plans); text-to-image "
                                   'hosts: {"plan": {Plan fields}} as flexdit-sample takes it and, for the tiny '
                                   "hosts, diffusers config fields")
    p.add_argument("--init", default=None,
                   help="dense DiT checkpoint (converted by the mapping) or FlexDiT checkpoint; none: random")
    p.add_argument("--init-weights", choices=["ema", "model"], default="ema",
                   help="which weights of a training checkpoint given to --init")
    p.add_argument("--data", required=True, help="folder of .npz latent shards, or text shards (meta.json) for a "
                                                 "text-to-image host (see flexdit.data)")
    p.add_argument("--out-dir", default="runs/finetune")
    p.add_argument("--steps", type=int, default=400_000, help="total steps (a resumed run counts its past steps)")
    p.add_argument("--global-batch-size", type=int, default=256)
    p.add_argument("--grad-accum", type=int, default=1,
                   help="micro-batches per step and process (global batch = micro-batch x processes x this)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--ema-decay", type=float, default=None,
                   help="EMA decay (default 0.9999); text-to-image hosts train without EMA")
    add_precision_arg(p, "bf16")
    add_schedule_args(p)
    t = p.add_argument_group("text-to-image hosts (PixArt-α, SD3, FLUX)")
    t.add_argument("--lora-rank", type=int, default=None,
                   help="train LoRA adapters of this rank (peft) and the fusion weights W1/W2; default: all weights")
    t.add_argument("--lora-alpha", type=float, default=None, help="LoRA scale numerator (default: the rank)")
    t.add_argument("--lora-targets", default=None,
                   help="comma-separated module name suffixes to adapt (default: flexdit.lora.DEFAULT_TARGETS)")
    t.add_argument("--fsdp", action="store_true",
                   help="FSDP2 (fully_shard per block and the root, bf16 compute with --precision bf16, sharded "
                        "checkpoints) instead of DDP; under torchrun")
    t.add_argument("--grad-checkpointing", action="store_true",
                   help="activation checkpointing per block (the host's enable_gradient_checkpointing)")
    t.add_argument("--dry-run", action="store_true",
                   help="print parameters, trainable parameters and the per-GPU memory estimate, then exit")
    t.add_argument("--world-size", type=int, default=None,
                   help="with --dry-run: the number of GPUs to plan for (default: torchrun's world size)")
    t.add_argument("--weighting-scheme", choices=WEIGHTINGS, default="logit_normal",
                   help="SD3/FLUX: timestep density and loss weighting (diffusers' training scripts)")
    t.add_argument("--logit-mean", type=float, default=0.0)
    t.add_argument("--logit-std", type=float, default=1.0)
    t.add_argument("--mode-scale", type=float, default=1.29)
    t.add_argument("--guidance-scale", type=float, default=3.5, help="FLUX's guidance embedding input")
    t.add_argument("--caption-dropout", type=float, default=0.0,
                   help="probability in [0, 1) that a sample trains on the empty caption's encoding (stored in "
                        "the text shards) instead of its own, so classifier-free guidance keeps an unconditional "
                        "prediction (PixArt-α trained with 0.1)")
    t.add_argument("--flow-shift", type=float, default=None,
                   help="SD3/FLUX scheduler shift when --model has no scheduler folder (default: 3 for SD3, 1 for "
                        "FLUX, whose pipelines shift per resolution at sampling)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--ckpt-every", type=int, default=10_000)
    p.add_argument("--resume", default="auto",
                   help="'auto' (newest readable checkpoint in out-dir, if any), a checkpoint path, or 'none'")
    add_device_args(p)
    p.add_argument("--quiet", action="store_true", help="no banner, no log lines, no progress bar")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (there is none when stderr is not a "
                                                               "terminal)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    """Run flexdit-finetune; 0 on success. Bad arguments, files, data or devices end it with one line and exit 2."""
    args = parse_args(argv)
    with usage_errors(PROG):
        ctx = DistContext(args.device)
    try:
        with backend_context(args.backend, ctx.device):
            _train(args, ctx)
    finally:
        ctx.close()
    return 0


class _Run:
    """What the training loop needs, built by `_setup_registry` or `_setup_text`: the module and its wrapper, the
    optimiser, EMA (or None), data, objective, schedule, the step to start from, how to fetch a batch and save."""

    def __init__(self, **kw):
        self.ema = None
        self.pass_grid = False       # registry FlexDiTs take grid=; a patched host picks it from t itself
        self.autocast = None         # precision for autocast (None: --precision)
        self.finish = None           # called after the last step (exports)
        self.drop = None             # drop(batch, generator) -> batch: caption dropout of a text-to-image host
        self.suffix = ".pt"          # of a checkpoint's name (text-to-image hosts: a folder, none)
        self.__dict__.update(kw)


def _check_flags(args, ctx: DistContext) -> int:
    """The numeric flags; returns the micro-batch per process."""
    for flag, value, low in (("--global-batch-size", args.global_batch_size, 1), ("--steps", args.steps, 1),
                             ("--log-every", args.log_every, 1), ("--ckpt-every", args.ckpt_every, 1),
                             ("--num-classes", args.num_classes, 1), ("--grad-accum", args.grad_accum, 1),
                             ("--lora-rank", args.lora_rank, 1)):
        if value is not None and value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
    if not args.lr > 0:
        raise ValueError(f"--lr must be > 0, got {args.lr}")
    if not args.weight_decay >= 0:
        raise ValueError(f"--weight-decay must be >= 0, got {args.weight_decay}")
    if args.ema_decay is not None and not 0.0 <= args.ema_decay <= 1.0:
        raise ValueError(f"--ema-decay must be in [0, 1], got {args.ema_decay}")
    if not 0.0 <= args.caption_dropout < 1.0:
        raise ValueError(f"--caption-dropout must be in [0, 1), got {args.caption_dropout}")
    if args.lora_alpha is not None and not args.lora_alpha > 0:
        raise ValueError(f"--lora-alpha must be > 0, got {args.lora_alpha}")
    if args.world_size is not None and not args.dry_run:
        raise ValueError("--world-size is for --dry-run (torchrun sets the world size of a run)")
    if args.world_size is None:
        args.world_size = ctx.world_size
    elif args.world_size < 1:
        raise ValueError(f"--world-size must be >= 1, got {args.world_size}")
    parts = args.world_size * args.grad_accum
    if args.global_batch_size % parts:
        raise ValueError(f"--global-batch-size {args.global_batch_size} is not divisible by the {args.world_size} "
                         f"processes x --grad-accum {args.grad_accum}")
    return args.global_batch_size // parts


def _train(args, ctx: DistContext):
    with usage_errors(PROG):   # every check before anything trains
        batch = _check_flags(args, ctx)
        text = is_text_model(args.model)
        if not text and (Path(args.data) / "meta.json").is_file():
            raise ValueError(f"--data {args.data} holds text shards: give --model a diffusers PixArt-α, SD3 or FLUX "
                             f"folder (or tiny-pixart / tiny-sd3 / tiny-flux)")
        if not text:
            for flag, value in (("--lora-rank", args.lora_rank), ("--lora-targets", args.lora_targets),
                                ("--fsdp", args.fsdp), ("--grad-checkpointing", args.grad_checkpointing),
                                ("--dry-run", args.dry_run), ("--caption-dropout", args.caption_dropout)):
                if value:
                    raise ValueError(f"{flag} is for text-to-image hosts (--model: a diffusers PixArt-α, SD3 or "
                                     f"FLUX folder, or tiny-pixart / tiny-sd3 / tiny-flux)")
        out_dir = Path(args.out_dir)
        if ctx.is_main and not args.dry_run:
            check_out_dir(out_dir)
        run = (_setup_text if text else _setup_registry)(args, ctx, out_dir, batch)
    if run is not None:
        _loop(run, args, ctx, out_dir, batch)


def _setup_registry(args, ctx: DistContext, out_dir: Path, batch: int) -> _Run:
    """A registry model (FlexDiT, DiT, FlexLatte) on class-conditional latent shards, checkpointed in one file."""
    if args.ema_decay is None:
        args.ema_decay = 0.9999
    resume, state = None, None
    if args.resume == "auto":
        resume, state = newest_readable_checkpoint(out_dir, say=print if ctx.is_main else lambda _: None)
    elif args.resume not in ("none", "", None):
        resume = Path(args.resume)
        if not resume.is_file():
            raise ValueError(f"--resume {args.resume}: no such checkpoint")
        state = read_resume_state(resume)

    # --- model (a resumed run rebuilds it from the checkpoint's config, which the options must agree with) ---
    overrides = parse_model_args(args.model_args)
    if args.image_size is not None:
        if args.image_size < 8 or args.image_size % 8:
            raise ValueError(f"--image-size must be a positive multiple of 8, got {args.image_size}")
        overrides["input_size"] = args.image_size // 8
    if args.num_classes is not None:
        overrides["num_classes"] = args.num_classes
    torch.manual_seed(args.seed)    # a random initialisation (no --init) is seeded too
    if state is not None:
        ran = state.get("name") or (state.get("args") or {}).get("model")
        if args.model is not None and (state["arch"] != arch_of_name(args.model)
                                       or is_registry_name(ran) and ran != args.model):
            raise ValueError(f"--model {args.model} conflicts with the run being resumed ({resume}), which "
                             f"trains {ran}; use another --out-dir or --resume none")
        model, source, args.model = create_checked(args.model, resume, "model", **overrides)
        source = f"resumed from {resume} (step {state['step']})"
    else:
        if args.model is None and args.init is None:
            args.model = "FlexDiT-XL/2"
        model, source, args.model = create_checked(args.model, args.init, args.init_weights, **overrides)
    arch, config = model_config(model)
    args.num_classes, args.image_size = config["num_classes"], model.input_size[0] * 8

    # --- data, checked before anything trains ---
    data = LatentShards(args.data, channels=model.in_channels, input_size=model.input_size,
                        num_classes=config["num_classes"], frames=getattr(model, "frames", None))
    if args.global_batch_size > len(data):
        raise ValueError(f"--global-batch-size {args.global_batch_size} is larger than the data "
                         f"({len(data)} latents in {args.data})")
    schedule = schedule_from_args(args, model, default_rates=DEFAULT_RATES)
    if state is not None and state.get("schedule") and schedule is not None:
        check_resumed_grids(state["schedule"], schedule)

    model = model.to(ctx.device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=args.precision == "fp16")
    step = 0
    if state is not None:
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["opt"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        step = int(state["step"])
        _set_rng_state(state["rng"])
        del state
    net = model
    if ctx.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP
        net = DDP(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)

    def fetch(indices):
        x, y = data.batch(indices, device=ctx.device)
        return {"latents": x, "y": y}

    def save(step):
        if ctx.is_main:
            save_checkpoint(out_dir / "checkpoints" / f"{step:07d}.pt", {
                "arch": arch, "name": args.model, "config": config, "model": model.state_dict(),
                "ema": ema.state_dict(), "opt": optimizer.state_dict(), "scaler": scaler.state_dict(), "step": step,
                "schedule": schedule.to_dict() if schedule else None, "args": vars(args), "rng": _rng_state(),
            })
        ctx.barrier()

    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    return _Run(model=model, net=net, ema=ema, optimizer=optimizer, scaler=scaler, schedule=schedule,
                objective=DiffusionObjective(), n_items=len(data), fetch=fetch, save=save, step=step,
                pass_grid=True, resume=resume,
                banner=f"{arch} {args.model}: {source}; {n_params:.2f} M parameters; {len(data)} latents",
                record={"arch": arch, "model_config": config})


def _loop(run: _Run, args, ctx: DistContext, out_dir: Path, batch: int):
    """The training loop shared by every model: bucketed draws from (seed, rank, step), logging, checkpoints,
    Ctrl-C."""
    accum, schedule, step = args.grad_accum, run.schedule, run.step
    sampler = EpochSampler(run.n_items, batch, ctx.world_size * accum, args.seed)
    n_stages = schedule.num_stages if schedule is not None else 1
    if ctx.is_main and not args.quiet:
        print(f"{run.banner}; batch {batch} x {ctx.world_size} processes"
              + (f" x {accum} micro-batches" if accum > 1 else "") + f"; schedule {schedule}")
    (out_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    if ctx.is_main:
        trim_log(out_dir / "log.jsonl", step)
        record = {**vars(args), **run.record, "resumed_from": str(run.resume) if run.resume else None,
                  "start_step": step, "schedule": schedule.to_dict() if schedule else None}
        (out_dir / "args.json").write_text(json.dumps(record, indent=2, default=str))
    if step >= args.steps and ctx.is_main:
        print(f"{run.resume} is at step {step}; --steps {args.steps}: nothing to train")

    bar = _progress_bar(args, step) if ctx.is_main else None
    loss_sum = torch.zeros(n_stages, dtype=torch.float64, device=ctx.device)
    loss_cnt = torch.zeros(n_stages, dtype=torch.float64, device=ctx.device)
    t0 = time.time()
    with StopOnSigint() as stop:
        while step < args.steps:
            # everything random in this step derives from (seed, rank, step): stage, t, noise, label and caption
            # dropout; a micro-batch j of process r draws as rank r·accum + j of a run with that many more processes
            micro, stages = [], []
            for j in range(accum):
                vrank = ctx.rank * accum + j
                g = torch.Generator().manual_seed(_mix(args.seed, vrank, step))
                stage, t = run.objective.sample_timesteps(batch, schedule, g)
                grid = schedule.grids[stage] if run.pass_grid and schedule is not None else None
                data = run.fetch(sampler.indices(step, vrank))
                noise = torch.randn(data["latents"].shape, generator=g).to(ctx.device)
                if run.drop is not None:
                    data = run.drop(data, g)
                micro.append((data, t.to(ctx.device), noise, grid))
                stages.append(stage)
            torch.manual_seed(_mix(args.seed, ctx.rank, step, 1))
            losses = train_step(run.net, run.objective, run.optimizer, run.scaler, micro,
                                run.autocast or args.precision, ctx.device)
            if run.ema is not None:
                update_ema(run.ema, run.model, args.ema_decay)
            step += 1
            for stage, loss in zip(stages, losses):
                loss_sum[stage] += loss.double()
                loss_cnt[stage] += 1
            if bar is not None:
                bar.update(1)

            if step % args.log_every == 0 or step == args.steps:
                if ctx.distributed:
                    import torch.distributed as dist
                    dist.all_reduce(loss_sum)
                    dist.all_reduce(loss_cnt)
                per_stage = [(s / c).item() if c > 0 else None for s, c in zip(loss_sum, loss_cnt)]
                mean = (loss_sum.sum() / loss_cnt.sum().clamp(min=1)).item()
                if not math.isfinite(mean):
                    raise FloatingPointError(f"step {step}: the loss is {mean}")
                if bar is not None:                        # the logged mean: no host sync on the other steps
                    bar.set_postfix(loss=f"{mean:.4f}", refresh=False)
                rate = args.log_every / max(time.time() - t0, 1e-9)
                if ctx.is_main:
                    rec = {"step": step, "loss": mean, "loss_per_stage": per_stage,
                           "grids": schedule.to_dict()["grids"] if schedule else None, "steps_per_s": rate}
                    with open(out_dir / "log.jsonl", "a") as f:
                        f.write(json.dumps(rec) + "\n")
                    if not args.quiet:
                        stages_text = " ".join(f"s{k}/G{format_grid(schedule.grids[k])}:"
                                               + (f"{v:.4f}" if v is not None else "-")
                                               for k, v in enumerate(per_stage)) if schedule else ""
                        line = f"step {step:7d}  loss {mean:.4f}  {stages_text}  {rate:.2f} steps/s"
                        print(line, flush=True) if bar is None else bar.write(line)
                loss_sum.zero_()
                loss_cnt.zero_()
                t0 = time.time()

            stopping = _stop_requested(stop, ctx, step) and step < args.steps
            if step % args.ckpt_every == 0 or step == args.steps or stopping:
                run.save(step)
            if stopping:
                if bar is not None:
                    bar.close()
                if ctx.is_main:
                    print(f"interrupted: wrote checkpoint {out_dir / 'checkpoints' / f'{step:07d}{run.suffix}'} "
                          f"(step {step}); run again to resume", file=sys.stderr, flush=True)
                raise SystemExit(130)
    if bar is not None:
        bar.close()
    if run.finish is not None:
        run.finish()
    return out_dir


# ---------------------------------------------------------------------------------------------------------------
# Text-to-image hosts (PixArt-α, SD3, FLUX): patched diffusers transformers on text shards
# ---------------------------------------------------------------------------------------------------------------

TEXT_HOSTS = {"PixArtTransformer2DModel": "pixart", "SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}
# Toy hosts of depth 12 (the decided plan for 12 applies) with 4 latent channels, for CPU runs and tests.
TINY_HOSTS = {
    "tiny-pixart": ("PixArtTransformer2DModel", dict(num_attention_heads=2, attention_head_dim=32, in_channels=4,
                                                     out_channels=8, num_layers=12, cross_attention_dim=64,
                                                     caption_channels=64, sample_size=16, patch_size=2)),
    "tiny-sd3": ("SD3Transformer2DModel", {**{k: v for k, v in TINY_CONFIGS["sd3"].items() if k != "text_tokens"},
                                           "sample_size": 16, "patch_size": 2, "in_channels": 4, "out_channels": 4,
                                           "pos_embed_max_size": 16}),
    "tiny-flux": ("FluxTransformer2DModel", {**{k: v for k, v in TINY_CONFIGS["flux"].items() if k != "text_tokens"},
                                             "in_channels": 16, "guidance_embeds": True}),
}
DCP_INFO = "flexdit.json"     # written last into a sharded checkpoint folder: the folder is complete


def is_text_model(name) -> bool:
    """Whether --model names a text-to-image host: a tiny host's name or a folder."""
    return name is not None and (name in TINY_HOSTS or Path(name).is_dir())


def _host_class(name: str):
    """(diffusers class, config overrides, folder, subfolder) of --model."""
    import diffusers
    if name in TINY_HOSTS:
        cls, config = TINY_HOSTS[name]
        return getattr(diffusers, cls), config, None, None
    path = Path(name)
    sub = "transformer" if (path / "transformer" / "config.json").is_file() else None
    config_file = path / (sub or "") / "config.json"
    if not config_file.is_file():
        raise ValueError(f"--model {name}: neither a diffusers transformer folder (config.json) nor a pipeline "
                         f"folder (transformer/config.json)")
    try:
        cls = json.loads(config_file.read_text()).get("_class_name")
    except (OSError, ValueError) as e:
        raise ValueError(f"--model {name}: cannot read {config_file} ({e})") from None
    if cls not in TEXT_HOSTS:
        raise ValueError(f"--model {name}: {config_file} is a {cls}, expected one of {sorted(TEXT_HOSTS)}")
    return getattr(diffusers, cls), {}, path, sub


def load_text_host(name: str, overrides: dict | None = None, device=None, dtype=torch.float32):
    """(transformer, host name, scheduler folder or None) for --model: a tiny host built at random (seeded by the
    caller), or a local diffusers folder, in `dtype`; on `device="meta"` built from its config, holding no memory
    (--dry-run)."""
    import inspect
    cls, config, path, sub = _host_class(name)
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(inspect.signature(cls.__init__).parameters))
    if unknown:       # diffusers' from_config would drop them with a warning
        raise ValueError(f"--model-args: {unknown} are not {cls.__name__} config fields (the plan goes in "
                         f'{{"plan": {{...}}}})')
    on_meta = device is not None and torch.device(device).type == "meta"
    try:
        if path is None or on_meta:
            if path is not None:
                config = {**cls.load_config(str(path), subfolder=sub), **overrides}
            else:
                config = {**config, **overrides}
            with torch.device(device or "cpu"):
                model = cls.from_config(config)
        else:
            if overrides:
                raise ValueError(f"--model-args: a diffusers folder takes only {{\"plan\": {{...}}}}, got "
                                 f"{sorted(overrides)} (config fields apply to the tiny hosts)")
            model = cls.from_pretrained(str(path), subfolder=sub, torch_dtype=dtype)
    except TypeError as e:
        raise ValueError(f"--model-args: {e}") from None
    if path is None or on_meta:
        torch.nn.Module.to(model, dtype)      # (diffusers' own `to` warns about modules kept in fp32: none here)
    scheduler = path / "scheduler" if sub and (path / "scheduler").is_dir() else None
    return model, TEXT_HOSTS[cls.__name__], scheduler


def _flow_scheduler(args, host: str, folder):
    from diffusers import FlowMatchEulerDiscreteScheduler
    if folder is not None and args.flow_shift is None:
        return FlowMatchEulerDiscreteScheduler.from_pretrained(str(folder))
    shift = args.flow_shift if args.flow_shift is not None else (3.0 if host == "sd3" else 1.0)
    if not shift > 0:
        raise ValueError(f"--flow-shift must be > 0, got {shift}")
    return FlowMatchEulerDiscreteScheduler(shift=shift)


def _host_plan(model, fields):
    """The plan `apply_patch(model, fields)` would use (`Plan.coerce` with the host's depth, token grid and, for
    SD3 / FLUX, default grid)."""
    from .layers import to_pair
    from .mmdit import host_of
    from .plan import Plan
    host = host_of(model)
    if host is not None:
        return host.coerce_plan(fields, sum(map(len, host.block_lists(model).values())), host.token_grid(model))
    h, w = to_pair(model.config.sample_size)
    p = model.config.patch_size
    return Plan.coerce(fields, len(model.transformer_blocks), (h // p, w // p))


def _text_schedule(args, plan, token_grid):
    """--r-min/--r-max or --grid (default rates DEFAULT_RATES) on the data's token grid, as for registry models."""
    from types import SimpleNamespace
    shim = SimpleNamespace(config=SimpleNamespace(plan=plan), token_grid=token_grid)
    return schedule_from_args(args, shim, default_rates=DEFAULT_RATES)


def find_text_checkpoints(out_dir) -> list[Path]:
    """The complete sharded checkpoint folders of a run, oldest first."""
    return sorted(p for p in Path(out_dir, "checkpoints").glob("[0-9]*") if p.is_dir() and (p / DCP_INFO).is_file())


def _dcp_state(model, optimizer) -> dict:
    """The trainable part of the model and the optimiser, as (sharded) state dicts for torch.distributed.checkpoint."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    msd, osd = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    return {"model": msd, "optim": osd}


@contextlib.contextmanager
def _one_process_dcp():
    """torch.distributed.checkpoint in one process without a process group warns on every call that it assumes
    one process: that is the intent here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _load_dcp(path: Path, model, optimizer) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
    state = _dcp_state(model, optimizer)
    with _one_process_dcp():
        dcp.load({"model": state["model"]}, checkpoint_id=str(path))     # every trainable weight must be there
        # AdamW keeps no state for a parameter that never had a gradient (a Poolingformer's unused q/k norms in full
        # fine-tuning), while a fresh optimiser's state dict lists one for every parameter: those stay initial
        dcp.load({"optim": state["optim"]}, checkpoint_id=str(path),
                 planner=dcp.DefaultLoadPlanner(allow_partial_load=True))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))


def _full_trainable(model, fsdp: bool) -> dict:
    """The trainable weights, gathered on CPU (every process must call this under FSDP; rank 0 gets them)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    if not fsdp:
        return {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                ignore_frozen_params=True))


def _shard(model, precision: str, ctx: DistContext):
    """FSDP2 over the processes on --device: one unit per FlexDiT layer (every block list of the patched host), then
    the root; bf16 compute and fp32 gradient reduction with --precision bf16."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from .lora import BLOCK_LISTS
    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if precision == "bf16" else MixedPrecisionPolicy()
    for attr in BLOCK_LISTS:
        for layer in getattr(model, attr, None) or []:
            fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def _setup_text(args, ctx: DistContext, out_dir: Path, batch: int) -> _Run | None:
    """A text-to-image host patched into FlexDiT on text shards: LoRA or full fine-tuning, DDP or FSDP2, sharded
    checkpoints (torch.distributed.checkpoint) of the trained weights and the optimiser."""
    from .data import TextShards
    from .lora import add_lora, lora_info, parse_targets, save_adapters, trainable_state_dict
    from .objectives import FlowMatchingObjective, PixArtObjective
    from .patch import apply_patch
    for flag, value in (("--init", args.init), ("--num-classes", args.num_classes), ("--ema-decay", args.ema_decay)):
        if value is not None:
            raise ValueError(f"{flag} does not apply to a text-to-image host (--model {args.model}: its weights are "
                             f"the folder's; it trains without EMA)")
    if args.fsdp and not ctx.distributed and not args.dry_run:
        raise ValueError("--fsdp needs torchrun (WORLD_SIZE > 1)")
    if args.fsdp and args.precision == "fp16":
        raise ValueError("--fsdp trains in bf16 or fp32 (--precision fp16 needs a sharded gradient scaler)")
    if args.lora_rank is None and (args.lora_targets or args.lora_alpha is not None):
        raise ValueError("--lora-targets and --lora-alpha need --lora-rank")
    data = TextShards(args.data)
    meta = data.meta
    if args.caption_dropout > 0 and data.null_text is None:
        raise ValueError(f"--caption-dropout {args.caption_dropout}: --data {args.data} has no encoding of the empty "
                         f"caption (written before caption dropout); re-run `python -m flexdit.data ... --pipeline` "
                         f"to encode it again")
    if args.image_size is not None and args.image_size != meta["image_size"]:
        raise ValueError(f"--image-size {args.image_size}: the data {args.data} holds {meta['image_size']}² images")
    args.image_size = meta["image_size"]
    if args.global_batch_size > len(data) and not args.dry_run:
        raise ValueError(f"--global-batch-size {args.global_batch_size} is larger than the data ({len(data)} "
                         f"samples in {args.data})")
    resume = None
    if args.resume == "auto":
        found = find_text_checkpoints(out_dir)
        resume = found[-1] if found else None
    elif args.resume not in ("none", "", None):
        resume = Path(args.resume)
        if not (resume / DCP_INFO).is_file():
            raise ValueError(f"--resume {args.resume}: not a complete flexdit-finetune checkpoint folder (no "
                             f"{DCP_INFO})")
    info = json.loads((resume / DCP_INFO).read_text()) if resume else None
    if info is not None:
        ran = info.get("lora") or {}
        asked = {"rank": args.lora_rank, "targets": parse_targets(args.lora_targets)}
        for what, given, recorded in (("--model", args.model, info.get("model")),
                                      ("--lora-rank", asked["rank"], ran.get("rank")),
                                      ("--lora-targets", asked["targets"], ran.get("targets")),
                                      ("--caption-dropout", args.caption_dropout,
                                       info.get("args", {}).get("caption_dropout", 0.0))):
            if given != recorded:
                raise ValueError(f"{what} {given} conflicts with the run being resumed ({resume}), which has "
                                 f"{recorded}; use another --out-dir or --resume none")

    overrides = parse_model_args(args.model_args)
    plan_fields = overrides.pop("plan", None)      # {"plan": {...}}, as flexdit-sample takes it
    torch.manual_seed(args.seed)
    # a LoRA's frozen base is stored in the compute dtype, what it trains in fp32 (as diffusers' LoRA scripts)
    base_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision, torch.float32) \
        if args.lora_rank is not None else torch.float32
    model, host, scheduler_dir = load_text_host(args.model, overrides, "meta" if args.dry_run else None, base_dtype)
    if meta["host"] != host:
        raise ValueError(f"--data {args.data} holds {meta['host']} inputs, --model {args.model} is a {host} host")
    latent = meta["image_size"] // 8
    patch = getattr(model.config, "patch_size", 2) if host != "flux" else 2     # FLUX packs 2x2 latent pixels
    if meta["latent_channels"] * (4 if host == "flux" else 1) != model.config.in_channels:
        raise ValueError(f"--data {args.data}: {meta['latent_channels']} latent channels, --model {args.model} "
                         f"takes {model.config.in_channels}" + (" (4 per packed FLUX token)" if host == "flux" else ""))
    token_grid = (latent // patch, latent // patch)
    try:
        plan = _host_plan(model, plan_fields)
        schedule = _text_schedule(args, plan, token_grid)
        # --dry-run measures the forward on the meta device at the densest grid (the largest activations)
        fixed = max(schedule.grids, key=lambda g: g[0] * g[1]) if schedule is not None and args.dry_run else plan.grid
        # only a full fine-tuning without FSDP exports through save_patched, which writes the dense blocks too
        apply_patch(model, plan, schedule if schedule is not None and not args.dry_run else fixed,
                    keep_original=args.lora_rank is None and not args.fsdp)
    except ValueError as e:
        raise ValueError(f"--model-args / --r-min/--r-max/--grid: {e}") from None
    if info is not None and schedule is not None:
        check_resumed_grids(info["schedule"], schedule)
    objective = PixArtObjective() if host == "pixart" else FlowMatchingObjective(
        host, _flow_scheduler(args, host, scheduler_dir), args.weighting_scheme, args.logit_mean, args.logit_std,
        args.mode_scale, args.guidance_scale)
    targets = parse_targets(args.lora_targets)
    if args.lora_rank is not None:
        add_lora(model, args.lora_rank, targets, args.lora_alpha)
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    if args.grad_checkpointing:
        model.enable_gradient_checkpointing()
    if args.dry_run:      # the model as it would train: stored dtypes, adapters
        _print_memory_plan(args, model, objective, data, batch, targets)
        return None

    model.train()
    net = model
    if args.fsdp:     # fully_shard moves each layer to the device as it shards it: no whole copy on one GPU
        _shard(model, args.precision, ctx)
    model.to(ctx.device)
    if ctx.distributed and not args.fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        net = DDP(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
                  # full fine-tuning: a Poolingformer copy of an MMDiT block leaves its q/k weights unused (a LoRA
                  # adapts none of them)
                  find_unused_parameters=args.lora_rank is None)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=args.precision == "fp16")
    step = 0
    if resume is not None:
        _load_dcp(resume, model, optimizer)
        step = int(info["step"])
    lora = lora_info(model)

    def export():
        """adapters.safetensors (LoRA) or the patched model (save_patched) in out-dir, from rank 0."""
        if lora is not None:
            full = _full_trainable(model, args.fsdp)
            if ctx.is_main:
                save_adapters(model, out_dir / "adapters.safetensors", trainable_state_dict(model, full))
        elif not args.fsdp and ctx.is_main:
            from .save import save_patched
            save_patched(model, out_dir / "patched")
        ctx.barrier()

    def save(step):
        import shutil
        import torch.distributed.checkpoint as dcp
        final = out_dir / "checkpoints" / f"{step:07d}"
        tmp = final.with_name(final.name + ".tmp")
        if ctx.is_main and tmp.exists():
            shutil.rmtree(tmp)
        ctx.barrier()
        with _one_process_dcp():
            dcp.save(_dcp_state(model, optimizer), checkpoint_id=str(tmp))
        ctx.barrier()
        if ctx.is_main:
            (tmp / DCP_INFO).write_text(json.dumps({
                "step": step, "model": args.model, "host": host, "plan": str(plan), "lora": lora,
                "schedule": schedule.to_dict() if schedule else None, "args": vars(args)}, default=str))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        ctx.barrier()
        if lora is not None or step == args.steps:
            export()

    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in params)
    source = f"resumed from {resume} (step {step})" if resume else f"{host} host, patched with {plan}"
    what = f"LoRA rank {args.lora_rank}" if lora else "full fine-tuning"
    null = {k: v.to(ctx.device) for k, v in data.null_text.items()} if args.caption_dropout > 0 else None
    drop = (lambda batch, g: drop_captions(batch, null, args.caption_dropout, g)) if null is not None else None
    return _Run(model=model, net=net, optimizer=optimizer, scaler=scaler, schedule=schedule, objective=objective,
                n_items=len(data), fetch=lambda idx: data.batch(idx, device=ctx.device), save=save, step=step,
                drop=drop, resume=resume, suffix="", autocast="fp32" if args.fsdp else None,
                banner=f"{args.model}: {source}; {n_params / 1e6:.2f} M parameters, {n_train / 1e6:.3f} M trained "
                       f"({what}{', FSDP2' if args.fsdp else ''}); {len(data)} samples",
                record={"arch": host, "plan": str(plan), "lora": lora})


def drop_captions(batch: dict, null_text: dict, p: float, generator: torch.Generator) -> dict:
    """`batch` with each sample's text inputs replaced by the empty caption's (`null_text`, (1, ...) tensors, as
    `TextShards.null_text`) with probability `p`, drawn from `generator` (one uniform number per sample); the
    latents stay. Classifier-free guidance needs the unconditional prediction this trains (PixArt-α drops 10% of
    its captions). ValueError naming the argument for p outside [0, 1] or a null_text entry that is not one row of
    a batch entry."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p}")
    for k, null in null_text.items():
        if k not in batch or tuple(null.shape) != (1, *batch[k].shape[1:]):
            want = (1, *batch[k].shape[1:]) if k in batch else "a key of batch"
            raise ValueError(f"null_text[{k!r}] must be {want}, got {tuple(null.shape)}")
    drop = torch.rand(len(batch["latents"]), generator=generator) < p
    if not drop.any():
        return batch
    out = dict(batch)
    for k, null in null_text.items():
        where = drop.to(batch[k].device).view(-1, *[1] * (batch[k].ndim - 1))
        out[k] = torch.where(where, null.to(batch[k]), batch[k])
    return out


def _print_memory_plan(args, model, objective, data, batch: int, targets) -> None:
    """--dry-run: `flexdit.memory`'s estimate for the model (on the meta device), world size and micro-batch."""
    from .memory import format_memory_plan, memory_plan
    sample = {k: v[None].to("meta") for k, v in data[0].items()}
    inputs = objective.model_inputs(model, sample, sample["latents"], torch.zeros(1, dtype=torch.long))
    plan = memory_plan(model, world_size=args.world_size, batch_size=batch, precision=args.precision,
                       lora_rank=args.lora_rank, lora_targets=targets, fsdp=args.fsdp,
                       checkpointing=args.grad_checkpointing, sample_inputs=inputs)
    print(format_memory_plan(plan))


def make_synthetic_text_shards(folder, host: str = "flux", n: int = 256, num_classes: int = 4, size: int = 16,
                               channels: int = 4, text_tokens: int = 8, text_dim: int = 64, pooled_dim: int = 32,
                               seed: int = 0) -> list[Path]:
    """Caption-conditioned toy data for a tiny host: `synthetic_latents` (class c is a grating of its own
    orientation and frequency) with a fixed random caption embedding per class (plus a little noise per sample) as
    `encoder_hidden_states` (and a pooled vector for SD3 / FLUX), written by `write_text_shards`."""
    from .data import synthetic_latents, write_text_shards
    latents, labels = synthetic_latents(n, num_classes=num_classes, size=size, channels=channels, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    words = torch.randn(num_classes, text_tokens, text_dim, generator=g)
    pooled = torch.randn(num_classes, pooled_dim, generator=g)
    y = torch.from_numpy(labels).long()
    items = {"latents": latents.astype("float16"),
             "encoder_hidden_states": (words[y] + 0.05 * torch.randn(n, text_tokens, text_dim, generator=g)).half()
             .numpy()}
    if host == "pixart":
        items["encoder_attention_mask"] = torch.ones(n, text_tokens, dtype=torch.uint8).numpy()
    else:
        items["pooled_projections"] = pooled[y].half().numpy()
    meta = {"host": host, "image_size": size * 8, "latent_channels": channels, "max_sequence_length": text_tokens,
            "count": n, "encoders": ["synthetic"]}
    # the empty caption: an embedding of its own (a one-token mask for PixArt-α, as T5 encodes "" to </s>)
    null = {"encoder_hidden_states": torch.randn(1, text_tokens, text_dim, generator=g).half().numpy()}
    if host == "pixart":
        null["encoder_attention_mask"] = (torch.arange(text_tokens) < 1).to(torch.uint8)[None].numpy()
    else:
        null["pooled_projections"] = torch.randn(1, pooled_dim, generator=g).half().numpy()
    return write_text_shards(folder, items, meta, null_text=null)


def _progress_bar(args, step: int):
    """A tqdm bar (steps, loss, ETA) on stderr when it is a terminal, unless --quiet/--no-progress or tqdm is
    missing."""
    if args.quiet or args.no_progress or not sys.stderr.isatty():
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=args.steps, initial=step, desc=PROG, unit="step", dynamic_ncols=True)


STOP_CHECK_EVERY = 10   # under DDP, steps between the collective that asks every process about Ctrl-C


def _stop_requested(stop: StopOnSigint, ctx: DistContext, step: int) -> bool:
    """Whether any process got Ctrl-C; under DDP asked every STOP_CHECK_EVERY steps (a collective and a host sync),
    so that all processes stop at the same step."""
    if not ctx.distributed:
        return stop.requested
    if step % STOP_CHECK_EVERY:
        return False
    import torch.distributed as dist
    flag = torch.tensor([float(stop.requested)], device=ctx.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


if __name__ == "__main__":
    raise SystemExit(main())
