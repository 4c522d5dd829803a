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
Exit status: 0 on success, 2 with one line `flexdit-finetune: error: ...` for a bad argument, file, data or device,
130 after Ctrl-C.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

import torch

from . import checkpoint
from .checkpoint import arch_of_name, is_registry_name
from ._cli import (DistContext, add_device_args, add_schedule_args, autocast_context, backend_context, check_out_dir,
                   create_checked, model_config, parse_model_args, schedule_from_args, usage_errors)
from .data import LatentShards
from .diffusion import create_diffusion
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


def train_step(model, diffusion, optimizer, scaler, x, y, t, noise, grid, precision, device):
    """One optimisation step; returns the mean loss (a float tensor, detached)."""
    kwargs = {} if grid is None else {"grid": grid}
    with autocast_context(precision, device):
        losses = diffusion.training_losses(lambda xt, tt: model(xt, tt, y, **kwargs), x, t, noise)
    loss = losses["loss"].mean()
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.detach()


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
    p.add_argument("--model", default=None,
                   help="registry name (FlexDiT-XL/2; DiT-* trains a dense DiT), or FlexLatte: class-conditional "
                        "video on diffusers' Latte, trained on (n, T, C, H, W) clip shards (needs diffusers). "
                        "Default: the resumed run's, else the one --init records, else FlexDiT-XL/2")
    p.add_argument("--model-args", default=None, help="JSON object of config overrides (tiny models, layer plans)")
    p.add_argument("--init", default=None,
                   help="dense DiT checkpoint (converted by the mapping) or FlexDiT checkpoint; none: random")
    p.add_argument("--init-weights", choices=["ema", "model"], default="ema",
                   help="which weights of a training checkpoint given to --init")
    p.add_argument("--data", required=True, help="folder of .npz latent shards (see flexdit.data)")
    p.add_argument("--image-size", type=int, default=None,
                   help="image side; latents must be image-size / 8 (default: the checkpoint's, else 256)")
    p.add_argument("--num-classes", type=int, default=None, help="default: the checkpoint's, else 1000")
    p.add_argument("--out-dir", default="runs/finetune")
    p.add_argument("--steps", type=int, default=400_000, help="total steps (a resumed run counts its past steps)")
    p.add_argument("--global-batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--ema-decay", type=float, default=0.9999)
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="bf16")
    add_schedule_args(p)
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


def _train(args, ctx: DistContext):
    with usage_errors(PROG):   # every check before anything trains
        for flag, value, low in (("--global-batch-size", args.global_batch_size, 1), ("--steps", args.steps, 1),
                                 ("--log-every", args.log_every, 1), ("--ckpt-every", args.ckpt_every, 1),
                                 ("--num-classes", args.num_classes, 1)):
            if value is not None and value < low:
                raise ValueError(f"{flag} must be >= {low}, got {value}")
        if not args.lr > 0:
            raise ValueError(f"--lr must be > 0, got {args.lr}")
        if not args.weight_decay >= 0:
            raise ValueError(f"--weight-decay must be >= 0, got {args.weight_decay}")
        if not 0.0 <= args.ema_decay <= 1.0:
            raise ValueError(f"--ema-decay must be in [0, 1], got {args.ema_decay}")
        if args.global_batch_size % ctx.world_size:
            raise ValueError(f"--global-batch-size {args.global_batch_size} is not divisible by the "
                             f"{ctx.world_size} processes")
        batch = args.global_batch_size // ctx.world_size
        if args.image_size is not None and (args.image_size < 8 or args.image_size % 8):
            raise ValueError(f"--image-size must be a positive multiple of 8, got {args.image_size}")
        out_dir = Path(args.out_dir)
        if ctx.is_main:
            check_out_dir(out_dir)
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
        if state is not None and state.get("schedule") and schedule is not None \
                and tuple(state["schedule"]["grids"]) != schedule.grids:
            raise ValueError(f"--resume: the checkpoint trained with grids {state['schedule']['grids']}, "
                             f"this run asks for {schedule.grids}")

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

    diffusion = create_diffusion()
    sampler = EpochSampler(len(data), batch, ctx.world_size, args.seed)
    n_stages = schedule.num_stages if schedule is not None else 1
    if ctx.is_main and not args.quiet:
        n_params = sum(p.numel() for p in model.parameters()) / 1e6
        print(f"{arch} {args.model}: {source}; {n_params:.2f} M parameters; {len(data)} latents; "
              f"batch {batch} x {ctx.world_size} processes; schedule {schedule}")
    (out_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    if ctx.is_main:
        trim_log(out_dir / "log.jsonl", step)
        record = {**vars(args), "arch": arch, "model_config": config, "resumed_from": str(resume) if resume else None,
                  "start_step": step, "schedule": schedule.to_dict() if schedule else None}
        (out_dir / "args.json").write_text(json.dumps(record, indent=2, default=str))
    if step >= args.steps and ctx.is_main:
        print(f"{resume} is at step {step}; --steps {args.steps}: nothing to train")

    def save(step):
        if ctx.is_main:
            save_checkpoint(out_dir / "checkpoints" / f"{step:07d}.pt", {
                "arch": arch, "name": args.model, "config": config, "model": model.state_dict(),
                "ema": ema.state_dict(), "opt": optimizer.state_dict(), "scaler": scaler.state_dict(), "step": step,
                "schedule": schedule.to_dict() if schedule else None, "args": vars(args), "rng": _rng_state(),
            })
        ctx.barrier()

    bar = _progress_bar(args, step) if ctx.is_main else None
    loss_sum = torch.zeros(n_stages, dtype=torch.float64, device=ctx.device)
    loss_cnt = torch.zeros(n_stages, dtype=torch.float64, device=ctx.device)
    t0 = time.time()
    with StopOnSigint() as stop:
        while step < args.steps:
            # everything random in this step derives from (seed, rank, step): stage, t, noise, label dropout
            g = torch.Generator().manual_seed(_mix(args.seed, ctx.rank, step))
            if schedule is not None:
                stage, t = schedule.sample_timesteps(batch, g)
                grid = schedule.grids[stage]
            else:
                stage, t, grid = 0, torch.randint(0, diffusion.num_timesteps, (batch,), generator=g), None
            x, y = data.batch(sampler.indices(step, ctx.rank), device=ctx.device)
            noise = torch.randn(x.shape, generator=g).to(ctx.device)
            torch.manual_seed(_mix(args.seed, ctx.rank, step, 1))
            loss = train_step(net, diffusion, optimizer, scaler, x, y, t.to(ctx.device), noise, grid,
                              args.precision, ctx.device)
            update_ema(ema, model, args.ema_decay)
            step += 1
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
                           "grids": list(schedule.grids) if schedule else None, "steps_per_s": rate}
                    with open(out_dir / "log.jsonl", "a") as f:
                        f.write(json.dumps(rec) + "\n")
                    if not args.quiet:
                        stages = " ".join(f"s{k}/G{schedule.grids[k]}:" + (f"{v:.4f}" if v is not None else "-")
                                          for k, v in enumerate(per_stage)) if schedule else ""
                        line = f"step {step:7d}  loss {mean:.4f}  {stages}  {rate:.2f} steps/s"
                        print(line, flush=True) if bar is None else bar.write(line)
                loss_sum.zero_()
                loss_cnt.zero_()
                t0 = time.time()

            stopping = _stop_requested(stop, ctx, step) and step < args.steps
            if step % args.ckpt_every == 0 or step == args.steps or stopping:
                save(step)
            if stopping:
                if bar is not None:
                    bar.close()
                if ctx.is_main:
                    print(f"interrupted: wrote checkpoint {out_dir / 'checkpoints' / f'{step:07d}.pt'} "
                          f"(step {step}); run again to resume", file=sys.stderr, flush=True)
                raise SystemExit(130)
    if bar is not None:
        bar.close()
    return out_dir


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
