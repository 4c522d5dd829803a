"""Save and reload a model patched by `apply_patch` (any diffusers host it patches, or the project's DiT), in
safetensors, with its plan and density schedule.

A patched module's state dict holds FlexDiT layers where the host's `from_pretrained` expects dense blocks, so the
host's own `save_pretrained` would write a file that reloads with randomly initialised blocks; on a patched model
it raises instead and points here. `save_patched(model, DIR)` writes

    DIR/flexdit_patch.json        host class and config, plan, schedule, format version
    DIR/patched.safetensors       the patched module's state dict (fine-tuned weights included)
    DIR/original.safetensors      the dense host's weights at patching time, so that `remove_patch` after
                                  `load_patched` restores them exactly as it would on the saved model

and `load_patched(DIR)` rebuilds the host from its config (no download), patches it with the recorded plan and
schedule, and loads both files with strict key checks.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch

from ._cli import check_out_dir
from .checkpoint import check_state_dict, model_config
from .patch import apply_patch, host_module, is_patched, patch_record
from .plan import Plan
from .schedule import DensitySchedule

__all__ = ["save_patched", "load_patched", "MANIFEST"]

MANIFEST = "flexdit_patch.json"
PATCHED = "patched.safetensors"
ORIGINAL = "original.safetensors"
FORMAT = 1


def _schedule_to_json(schedule):
    if schedule is None:
        return None
    if isinstance(schedule, DensitySchedule):
        return {"density": schedule.to_dict()}
    if isinstance(schedule, int) or (isinstance(schedule, (tuple, list)) and len(schedule) == 2):
        return {"fixed": schedule if isinstance(schedule, int) else list(schedule)}
    raise ValueError(f"schedule: a {type(schedule).__name__} cannot be saved (a DensitySchedule, a fixed grid or "
                     "None can); save without it (schedule=None) and pass it to load_patched(..., schedule=)")


def _schedule_from_json(d):
    if d is None:
        return None
    if "density" in d:
        return DensitySchedule.from_dict(d["density"])
    grid = d["fixed"]
    return grid if isinstance(grid, int) else tuple(grid)


def _host_config(module) -> tuple[str, dict]:
    """(class name, constructor config) of a patched host: a diffusers model's registered config, or the project's
    DiT's constructor kwargs."""
    name = type(module).__name__
    if hasattr(module, "config") and hasattr(module, "from_config"):          # a diffusers ModelMixin
        return name, {k: v for k, v in dict(module.config).items() if not k.startswith("_")}
    if name == "DiT" and type(module).__module__ == "flexdit.models":
        patched, module.blocks = module.blocks, patch_record(module).originals["blocks"]   # sizes of the dense blocks
        try:
            return name, model_config(module)[1]
        finally:
            module.blocks = patched
    raise ValueError(f"model: save_patched saves diffusers models and flexdit.DiT, got a {name}")


def _dense_state_dict(module) -> dict:
    """The host's state dict as it was when patched: the original block lists and the weights outside them."""
    rec = patch_record(module)
    state = dict(rec.outside)
    for attr, blocks in rec.originals.items():
        state.update({f"{attr}.{k}": v for k, v in blocks.state_dict().items()})
    return state


def _save_tensors(state: dict, path: Path) -> None:
    from safetensors.torch import save_file
    tensors, seen = {}, {}
    for key, value in state.items():     # safetensors stores no shared storage: one copy per tensor
        value = value.detach()
        ptr = (value.data_ptr(), value.dtype, tuple(value.shape), value.stride()) if value.numel() else None
        tensors[key] = value.clone().contiguous() if ptr in seen or not value.is_contiguous() else value
        if ptr is not None:
            seen[ptr] = key
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.cpu() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def save_patched(model, directory) -> Path:
    """Write a patched model (or a pipeline's patched `.transformer`) to `directory`: the host's class and config,
    the plan, the schedule (a `DensitySchedule`, a fixed grid or none), the patched weights and the dense weights
    at patching time, in safetensors. Returns the folder. ValueError for a model that is not patched, a host
    `load_patched` cannot rebuild, or a schedule that cannot be written. `load_patched(directory)` reads it back."""
    try:
        import safetensors  # noqa: F401
    except ImportError:
        raise ValueError("save_patched needs safetensors (pip install 'flexdit[diffusers]')") from None
    module = host_module(model)
    if not is_patched(module):
        raise ValueError(f"model: this {type(module).__name__} is not patched; use its own save_pretrained "
                         "(or flexdit.save_flexdit for a FlexDiT)")
    rec = patch_record(module)
    if rec.originals is None:
        raise ValueError(f"model: this {type(module).__name__} was patched with keep_original=False: the dense "
                         "weights that load_patched rebuilds it from are gone; patch with keep_original=True to save")
    host, config = _host_config(module)
    manifest = {"format": FORMAT, "host": host, "config": config, "plan": dataclasses.asdict(rec.plan),
                "schedule": _schedule_to_json(rec.schedule), "dtype": str(next(module.parameters()).dtype)}
    directory = check_out_dir(directory, "directory")
    _save_tensors(module.state_dict(), directory / PATCHED)
    _save_tensors(_dense_state_dict(module), directory / ORIGINAL)
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, default=list))
    return directory


def _build_host(host: str, config: dict):
    if host == "DiT":
        from .models import DiT
        return DiT(**config)
    try:
        import diffusers
    except ImportError:
        raise ValueError(f"load_patched: a patched {host} needs diffusers (pip install 'flexdit[diffusers]')") from None
    cls = getattr(diffusers, host, None)
    if cls is None or not hasattr(cls, "from_config"):
        raise ValueError(f"load_patched: {host} is not a diffusers model class")
    return cls.from_config(config)


def _read_tensors(path: Path) -> dict:
    from safetensors.torch import load_file
    if not path.is_file():
        raise ValueError(f"{path}: missing (a folder written by flexdit.save_patched holds {MANIFEST}, {PATCHED} "
                         f"and {ORIGINAL})")
    try:
        return load_file(str(path), device="cpu")
    except Exception as e:   # safetensors raises its own SafetensorError for a bad header
        raise ValueError(f"{path}: not a readable .safetensors file ({str(e).splitlines()[0][:200]})") from None


def _load_checked(module, path: Path) -> None:
    state = _read_tensors(path)
    check_state_dict({k: v.shape for k, v in module.state_dict().items()}, state, what=str(path))
    module.load_state_dict(state, strict=True)


def load_patched(directory, schedule=None, device=None):
    """The patched model `save_patched` wrote to `directory`, rebuilt from its config (no download), patched with the
    recorded plan and schedule (or `schedule` when given), its patched and dense weights loaded with strict key
    checks; `remove_patch` on it restores the dense host. For a pipeline: `pipe.transformer = load_patched(DIR)`.
    ValueError naming the file for a missing, foreign or partial folder (missing and unexpected keys named)."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise ValueError(f"directory {directory}: no {MANIFEST} (not written by flexdit.save_patched)")
    try:
        manifest = json.loads(path.read_text())
        host, config, plan = manifest["host"], manifest["config"], Plan(**manifest["plan"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a flexdit.save_patched manifest ({e})") from None
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: format {manifest.get('format')!r}, this flexdit reads format {FORMAT}")
    module = _build_host(host, config).eval()
    dtype = getattr(torch, str(manifest.get("dtype", "torch.float32")).replace("torch.", ""))
    module.to(dtype)
    _load_checked(module, directory / ORIGINAL)          # the dense host, as it was when patched
    apply_patch(module, plan, schedule=schedule if schedule is not None
                else _schedule_from_json(manifest.get("schedule")))
    _load_checked(module, directory / PATCHED)           # the patched (fine-tuned) weights
    if device is not None:
        module.to(device)
    return module
