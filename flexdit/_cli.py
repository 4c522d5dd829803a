"""Pieces shared by the command-line tools (`flexdit-sample`, `flexdit-finetune`, `python -m flexdit.data`):
model loading through `flexdit.checkpoint.load_model` with errors naming the flags, the output folder check, the
density-schedule flags, devices and torchrun, precision and kernel backend, and the error
convention (a bad argument, file or device ends the run with one line `prog: error: ...` and exit status 2)."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

import torch

from .checkpoint import model_config
from .schedule import DensitySchedule

__all__ = ["build_model", "model_config", "add_model_args", "parse_model_args", "schedule_from_args",
           "add_schedule_args", "sample_seed", "check_out_dir", "DistContext", "resolve_device", "add_device_args",
           "backend_context", "add_precision_arg", "autocast_context", "usage_errors", "fail"]


# ---------------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------------

def fail(prog: str, message: str, status: int = 2):
    """Print `prog: error: message` on one line to stderr and exit with `status` (argparse's convention)."""
    text = " ".join(str(message).split())     # one line, whatever the message holds
    sys.stderr.write(f"{prog}: error: {text}\n")
    raise SystemExit(status)


@contextlib.contextmanager
def usage_errors(prog: str):
    """Turn a ValueError raised inside the block (a bad argument, file, device or data) into `fail(prog, ...)`.

    Wrap only the checks and set-up done before any work starts, so that a failure in the middle of a run keeps
    its traceback.
    """
    try:
        yield
    except ValueError as err:
        fail(prog, str(err))


def resolve_device(text: str | None, local_rank: int = 0) -> torch.device:
    """The torch.device for --device: None picks cuda:LOCAL_RANK when a GPU is present, else the CPU; "cuda"
    without an index means cuda:LOCAL_RANK. ValueError for a malformed name or a GPU that is not there."""
    if text is None:
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {text!r} is not a device name (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {text}: no CUDA GPU is available (torch.cuda.is_available() is False)")
        index = local_rank if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise ValueError(f"--device {text}: GPU {index} does not exist ({torch.cuda.device_count()} visible)")
        device = torch.device("cuda", index)
    elif device.type != "cpu":
        raise ValueError(f"--device {text}: only cpu and cuda are supported")
    return device


# ---------------------------------------------------------------------------------------------------------------
# Model loading
# ---------------------------------------------------------------------------------------------------------------

def build_model(name: str, ckpt=None, weights: str = "ema", **overrides):
    """`flexdit.load_model(ckpt, name, weights, **overrides)` as (model, source): the loader's older spelling."""
    from .checkpoint import load_model
    return load_model(ckpt, name, weights=weights, return_source=True, **overrides)


def add_model_args(p: argparse.ArgumentParser, model_help: str, model_args_help: str) -> None:
    """--model, --model-args, --image-size and --num-classes: the model and its config overrides, read by
    `create_checked` (whose errors name these flags)."""
    p.add_argument("--model", default=None, help=model_help)
    p.add_argument("--model-args", default=None, help=model_args_help)
    p.add_argument("--image-size", type=int, default=None,
                   help="image side; latents are image-size / 8 (default: the checkpoint's, else 256)")
    p.add_argument("--num-classes", type=int, default=None, help="default: the checkpoint's, else 1000")


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


FLAG_OF = {"input_size": "--image-size", "num_classes": "--num-classes", "*": "--model-args"}


def create_checked(name, ckpt, weights: str, **overrides):
    """(model, source, name): `load_model` with the registry's and the config's own complaints (unknown name or
    field, a grid that does not fit, an option the checkpoint contradicts) as ValueErrors that name the flags."""
    from .checkpoint import _load
    try:
        return _load(ckpt, name, weights, FLAG_OF, overrides)
    except TypeError as e:       # an unknown --model-args field reaches a constructor as a keyword
        raise ValueError(f"--model-args: {e}") from None


# ---------------------------------------------------------------------------------------------------------------
# Density schedule flags
# ---------------------------------------------------------------------------------------------------------------

def add_schedule_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("token density (FlexDiT)")
    g.add_argument("--r-min", type=float, default=None, help="pruning rate at the least noisy stage (e.g. 0.61)")
    g.add_argument("--r-max", type=float, default=None, help="pruning rate at the noisiest stage (e.g. 0.86)")
    g.add_argument("--grid", default=None, help="one fixed sparse grid: G (G×G tokens) or GhxGw")


def schedule_from_args(args, model, default_rates: tuple[float, float] | None = None):
    """The density schedule asked for on the command line: --r-min/--r-max, --grid, else `default_rates`, else
    None (the model's configured grid). A dense model takes none of these flags."""
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
    if rates[0] is None and args.grid is None:
        if default_rates is None:
            return None
        rates = default_rates
    try:
        if args.grid is not None:
            return DensitySchedule.fixed(args.grid, token_grid=model.token_grid)
        return DensitySchedule.from_rates(rates[0], rates[1], model.token_grid)
    except ValueError as err:
        flag = "--grid" if args.grid is not None else "--r-min/--r-max"
        raise ValueError(f"{flag}: {err}") from None


def check_out_dir(path, flag: str = "--out-dir"):
    """The output folder, created (with its parents) and proved writable by writing a file in it; ValueError
    naming the flag for a path that is a file, lies under a file, or cannot be written."""
    from pathlib import Path
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path}: exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot write there ({e.strerror or type(e).__name__})") from None
    return path


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample `index`: distinct for every (seed, index) pair, independent of batching and ranks."""
    return (int(seed) * 1_000_003 + int(index)) % (2 ** 63)


# ---------------------------------------------------------------------------------------------------------------
# torchrun, precision, kernels
# ---------------------------------------------------------------------------------------------------------------

class DistContext:
    """Rank, world size and device; a process group only when WORLD_SIZE > 1 (nccl on CUDA, gloo on the CPU).

    ValueError (before any process group starts) for a --device that is malformed or not present.
    """

    def __init__(self, device: str | None = None):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = resolve_device(device, int(os.environ.get("LOCAL_RANK", "0")))
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


def add_device_args(p: argparse.ArgumentParser) -> None:
    """--device and --backend, read by `DistContext` and `backend_context`."""
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK when available, else cpu")
    p.add_argument("--backend", choices=["auto", "triton", "reference"], default="auto",
                   help="flexdit_kernels backend (auto: Triton on CUDA, the PyTorch reference on the CPU)")


def backend_context(name: str, device: torch.device):
    """flexdit_kernels' backend: "auto" means Triton on CUDA and the PyTorch reference on the CPU for the CLIs
    (the Triton interpreter is for kernel tests, far too slow for a model)."""
    import flexdit_kernels
    if name == "auto" and device.type != "cuda":
        name = "reference"
    return flexdit_kernels.backend(name)


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def add_precision_arg(p: argparse.ArgumentParser, default: str) -> None:
    """--precision, read by `autocast_context`."""
    p.add_argument("--precision", choices=list(PRECISIONS), default=default)


def autocast_context(precision: str, device: torch.device):
    """Autocast to --precision's dtype on `device`; no autocast for fp32."""
    dtype = PRECISIONS[precision]
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type=device.type, dtype=dtype)
