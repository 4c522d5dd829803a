"""Loading published DiT checkpoints and FlexDiT checkpoints safely (`weights_only=True`), with strict key checks.

Every error is a ValueError that names the file and says what is wrong with it (empty, truncated or not a
checkpoint, objects other than tensors, keys that do not fit the model), in one line.
"""
import os
import pickle
import re
import zipfile
from typing import Dict, Mapping, Union

import torch
import torch.nn as nn

StateDict = Dict[str, torch.Tensor]

MAX_NAMES = 5   # keys named per kind in a key-check error; the rest are counted


def read_checkpoint(path: Union[str, os.PathLike]):
    """The object stored in a `.pt` (loaded with `weights_only=True`) or `.safetensors` file, on the CPU.

    Raises ValueError naming the file for: no such file, an empty file, a truncated or corrupt file, and a file
    holding Python objects other than tensors and plain containers (they are never unpickled).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {path!r} is not a file")
    size = os.path.getsize(path)
    if size == 0:
        raise ValueError(f"checkpoint {path!r} is empty (0 bytes)")
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ValueError(f"checkpoint {path!r}: reading .safetensors needs the safetensors package "
                             "(pip install safetensors)") from None
        try:
            return load_file(path, device="cpu")
        except Exception as e:   # safetensors raises its own SafetensorError (and OSError) for bad headers
            raise ValueError(f"checkpoint {path!r} ({size} bytes) is not a readable .safetensors file: "
                             f"{_first_line(e)}") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if found:
            raise ValueError(f"checkpoint {path!r} holds a {found.group(1)} object; only tensors and plain "
                             "containers are loaded (weights_only=True)") from None
        detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", str(e))
        raise ValueError(f"checkpoint {path!r} ({size} bytes) is not a PyTorch checkpoint (its data cannot be "
                         f"unpickled: {detail.group(1) if detail else _first_line(e)})") from None
    except (EOFError, RuntimeError, zipfile.BadZipFile, KeyError, OSError, UnicodeDecodeError) as e:
        raise ValueError(f"checkpoint {path!r} ({size} bytes) is truncated or not a PyTorch checkpoint "
                         f"({type(e).__name__}: {_first_line(e) or 'unexpected end of file'})") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    if text.startswith("PytorchStreamReader failed reading zip archive"):
        return "its zip archive is incomplete"
    return text.splitlines()[0][:200] if text else ""


def load_dit_checkpoint(path) -> StateDict:
    """State dict of a dense DiT from a published-format `.pt` (plain state dict, e.g. DiT-XL-2-256x256.pt) or
    `.safetensors` file. A DiT training checkpoint ({"model", "ema", ...}) yields its EMA weights."""
    obj = read_checkpoint(path)
    if isinstance(obj, Mapping) and "pos_embed" not in obj:
        for key in ("ema", "model", "state_dict"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"checkpoint {os.fspath(path)!r} does not hold a state dict of tensors")
    return dict(obj)


def _names(keys, limit: int = MAX_NAMES) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... (+{len(keys) - limit} more)" if len(keys) > limit else "")


def check_state_dict(expected: Mapping[str, torch.Size], state_dict: Mapping[str, torch.Tensor],
                     what: str = "checkpoint") -> None:
    """Raise ValueError, in one line, naming missing and unexpected keys and shape mismatches (a few of each,
    with their counts)."""
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = [k for k in sorted(set(expected) & set(state_dict))
                  if tuple(state_dict[k].shape) != tuple(expected[k])]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_names(unexpected)}")
    if len(mismatched) == 1:
        k = mismatched[0]
        problems.append(f"shape mismatch for {k}: {what} has {tuple(state_dict[k].shape)}, "
                        f"model expects {tuple(expected[k])}")
    elif mismatched:
        shown = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(expected[k])}" for k in mismatched[:MAX_NAMES]]
        more = f", ... (+{len(mismatched) - MAX_NAMES} more)" if len(mismatched) > MAX_NAMES else ""
        problems.append(f"shape mismatch for {len(mismatched)} keys ({what} vs model): {', '.join(shown)}{more}")
    if problems:
        raise ValueError(f"{what} does not fit the model: " + "; ".join(problems))


def load_state_dict_strict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], what: str = "checkpoint",
                           assign: bool = False) -> nn.Module:
    """`model.load_state_dict` after a check that names missing/unexpected keys and mismatched shapes."""
    check_state_dict({k: v.shape for k, v in model.state_dict().items()}, state_dict, what)
    model.load_state_dict(state_dict, strict=True, assign=assign)
    return model


def save_flexdit(model, path) -> None:
    """Write a FlexDiT as {"config": dict, "model": state dict}, atomically (temporary file, then rename)."""
    tmp = f"{os.fspath(path)}.tmp"
    torch.save({"config": model.config.to_dict(), "model": model.state_dict()}, tmp)
    os.replace(tmp, path)


def load_flexdit(path, map_location="cpu"):
    """Read a FlexDiT written by `save_flexdit` (or a training checkpoint with "config" and "ema"/"model")."""
    from .models import FlexDiT
    what = f"checkpoint {os.fspath(path)!r}"
    obj = read_checkpoint(path)
    if not isinstance(obj, Mapping) or "config" not in obj:
        raise ValueError(f"{what} is not a FlexDiT checkpoint (no 'config' entry)")
    if obj.get("arch", "FlexDiT") != "FlexDiT":
        raise ValueError(f"{what} holds a {obj['arch']} model, not a FlexDiT")
    weights = obj.get("ema", obj.get("model"))
    if weights is None:
        raise ValueError(f"{what} has no 'model' or 'ema' weights")
    model = FlexDiT(config_from_dict(obj["config"], what))
    return load_state_dict_strict(model, weights, what=what).to(map_location)


def config_from_dict(config: Mapping, what: str = "checkpoint"):
    """FlexDiTConfig from a checkpoint's "config" entry; ValueError naming `what` for unknown or bad fields."""
    from .models import FlexDiTConfig
    if not isinstance(config, Mapping):
        raise ValueError(f"{what}: 'config' must be a dict, got {type(config).__name__}")
    try:
        return FlexDiTConfig.from_dict(config)
    except TypeError as e:
        raise ValueError(f"{what}: its 'config' does not describe a FlexDiT ({e})") from None
    except ValueError as e:
        raise ValueError(f"{what}: its 'config' is invalid ({e})") from None
