"""Pieces shared by the command-line tools (`flexdit-sample`, `flexdit-finetune`, `python -m flexdit.data`):
model loading, the density-schedule flags, devices and torchrun, precision and kernel backend, and the error
convention (a bad argument, file or device ends the run with one line `prog: error: ...` and exit status 2)."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Mapping

import torch

from .schedule import DensitySchedule

__all__ = ["build_model", "model_config", "parse_model_args", "schedule_from_args", "add_schedule_args",
           "sample_seed", "DistContext", "resolve_device", "add_device_args", "backend_context", "autocast_context",
           "usage_errors", "fail"]


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

def _looks_like_flexdit(state_dict: Mapping) -> bool:
    """A FlexDiT state dict has split attention projections or recovery fusions that a dense DiT lacks."""
    return any(".attn.kv." in k or ".attn.v." in k or ".fuse_sparse." in k for k in state_dict)


def _size_of(state_dict: Mapping) -> str:
    """ "depth 28, hidden 1152" for a DiT-like state dict (empty when it cannot tell)."""
    blocks = {k.split(".")[1] for k in state_dict if k.startswith("blocks.") and k.count(".") > 1}
    pos = state_dict.get("pos_embed")
    hidden = f", hidden {pos.shape[-1]}" if isinstance(pos, torch.Tensor) and pos.ndim >= 1 else ""
    return f"depth {len(blocks)}{hidden}" if blocks else ""


def _fit_error(err: ValueError, what: str, state_dict: Mapping, model_cfg: Mapping) -> ValueError:
    """One line: the file, the sizes when they differ (the usual cause), then the key check's summary."""
    have = _size_of(state_dict)
    want = f"depth {model_cfg.get('depth')}, hidden {model_cfg.get('hidden_size')}"
    size = f" holds a model of {have}, the model built has {want} (check --model/--model-args);" \
        if have and have != want else ""
    return ValueError(f"{what}{size or ':'} {err}")


def build_model(name: str, ckpt=None, weights: str = "ema", **overrides):
    """A DiT ("DiT-XL/2") or FlexDiT ("FlexDiT-XL/2") from a registry name, with weights from `ckpt`:

    - None: random initialisation (smoke tests);
    - a FlexDiT checkpoint with a "config" entry (`save_flexdit`, or a `flexdit-finetune` checkpoint; `weights`
      picks its "ema" or "model" weights): the config comes from the file and `overrides` are ignored;
    - a plain state dict (`.pt` / `.safetensors`) of a dense DiT: loaded into the DiT, or, for a FlexDiT name,
      converted by the paper's weight mapping (`from_dit`); a plain FlexDiT state dict is loaded as is.
    Returns (model, source) where source says which case applied. Every problem is a one-line ValueError naming
    the file.
    """
    from . import checkpoint
    from .convert import from_dit
    from .models import FlexDiT, create_model, flexdit_config

    if name == "FlexLatte":
        return _build_latte(ckpt, weights, **overrides)
    flex = name.startswith("FlexDiT")
    if ckpt is None:
        return create_model(name, **overrides), "random initialisation"
    what = f"checkpoint {os.fspath(ckpt)!r}"
    obj = checkpoint.read_checkpoint(ckpt)
    if isinstance(obj, Mapping) and "config" in obj:
        key = weights if weights in obj else "model"
        if not isinstance(obj.get(key), Mapping):
            raise ValueError(f"{what} has no {weights!r} or 'model' weights")
        if obj.get("arch", "FlexDiT") == "FlexDiT":
            if not flex:
                raise ValueError(f"{what} is a FlexDiT checkpoint; use a FlexDiT-* model name")
            model = FlexDiT(checkpoint.config_from_dict(obj["config"], what))
            checkpoint.load_state_dict_strict(model, obj[key], what=what)
            return model, f"FlexDiT checkpoint ({key} weights)"
        # a dense training checkpoint of flexdit-finetune: its config gives the DiT's size
        if not isinstance(obj["config"], Mapping):
            raise ValueError(f"{what}: 'config' must be a dict")
        overrides = {**obj["config"], **overrides}
        state_dict = obj[key]
        source = f"dense DiT training checkpoint ({key} weights)"
    else:
        state_dict = checkpoint.load_dit_checkpoint(ckpt)
        source = "dense DiT checkpoint"
    if not flex:
        model = create_model(name, **overrides)
        try:
            checkpoint.load_state_dict_strict(model, state_dict, what="the state dict")
        except ValueError as err:
            raise _fit_error(err, what, state_dict, dict(depth=len(model.blocks),
                                                         hidden_size=model.pos_embed.shape[-1])) from None
        return model, source
    config = flexdit_config(name, **overrides)
    model_cfg = dict(depth=config.depth, hidden_size=config.hidden_size)
    if not _looks_like_flexdit(state_dict):
        try:
            return from_dit(state_dict, config), source + " converted to FlexDiT"
        except ValueError as err:
            raise _fit_error(err, what, state_dict, model_cfg) from None
    model = FlexDiT(config)
    try:
        checkpoint.load_state_dict_strict(model, state_dict, what="the FlexDiT state dict")
    except ValueError as err:
        raise _fit_error(err, what, state_dict, model_cfg) from None
    return model, "FlexDiT state dict"


def _build_latte(ckpt, weights: str, **overrides):
    """A `FlexLatte` (class-conditional video FlexDiT on diffusers' Latte): random (overrides: FlexLatteConfig
    fields, `transformer` a diffusers config dict), from a diffusers Latte folder (`from_pretrained`, local), or
    from a `flexdit-finetune` checkpoint of one."""
    from . import checkpoint
    from .video import FlexLatte, FlexLatteConfig

    if ckpt is None:
        return FlexLatte(FlexLatteConfig(**overrides)), "random initialisation"
    what = f"checkpoint {os.fspath(ckpt)!r}"
    if os.path.isdir(ckpt):
        import diffusers
        try:
            host = diffusers.LatteTransformer3DModel.from_pretrained(ckpt, local_files_only=True)
        except (OSError, ValueError) as e:
            raise ValueError(f"{what}: not a diffusers LatteTransformer3DModel folder ({e})") from None
        host_config = {k: v for k, v in host.config.items() if not k.startswith("_")}
        config = FlexLatteConfig(**{**overrides, "transformer": host_config})
        return FlexLatte(config, host), "diffusers Latte"
    obj = checkpoint.read_checkpoint(ckpt)
    if not isinstance(obj, Mapping) or obj.get("arch") != "FlexLatte" or not isinstance(obj.get("config"), Mapping):
        raise ValueError(f"{what} is not a FlexLatte checkpoint of flexdit-finetune")
    key = weights if weights in obj else "model"
    config = FlexLatteConfig.from_dict(obj["config"])
    model = FlexLatte(config)
    checkpoint.load_state_dict_strict(model, obj[key], what=what)
    return model, f"FlexLatte checkpoint ({key} weights)"


def model_config(model) -> tuple[str, dict]:
    """("FlexDiT" or "FlexLatte", config dict) or ("DiT", constructor kwargs): enough to rebuild the model."""
    model = getattr(model, "module", model)
    if hasattr(model, "config"):
        return type(model).__name__ if type(model).__name__ == "FlexLatte" else "FlexDiT", model.config.to_dict()
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


def create_checked(name: str, ckpt, weights: str, **overrides):
    """`build_model` with the registry's and the config's own complaints (unknown name or field, a grid that
    does not fit) turned into ValueErrors that name the flags."""
    try:
        return build_model(name, ckpt, weights=weights, **overrides)
    except TypeError as e:       # an unknown --model-args field reaches a constructor as a keyword
        raise ValueError(f"--model-args: {e}") from None


# ---------------------------------------------------------------------------------------------------------------
# Density schedule flags
# ---------------------------------------------------------------------------------------------------------------

def add_schedule_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("token density (FlexDiT)")
    g.add_argument("--r-min", type=float, default=None, help="pruning rate at the least noisy stage (e.g. 0.61)")
    g.add_argument("--r-max", type=float, default=None, help="pruning rate at the noisiest stage (e.g. 0.86)")
    g.add_argument("--grid", type=int, default=None, help="one fixed sparse grid side G (G×G tokens)")


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


def autocast_context(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device_type=device.type, dtype=dtype)
