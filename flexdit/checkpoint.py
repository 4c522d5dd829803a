"""Loading published DiT checkpoints and FlexDiT checkpoints safely (`weights_only=True`), with strict key checks."""
import os
from typing import Dict, Mapping, Union

import torch
import torch.nn as nn

StateDict = Dict[str, torch.Tensor]


def read_checkpoint(path: Union[str, os.PathLike]):
    """The object stored in a `.pt` (loaded with `weights_only=True`) or `.safetensors` file, on the CPU."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"path {path!r} is not a file")
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError as e:
            raise ValueError("reading .safetensors needs the safetensors package: pip install safetensors") from e
        return load_file(path, device="cpu")
    return torch.load(path, map_location="cpu", weights_only=True)


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


def check_state_dict(expected: Mapping[str, torch.Size], state_dict: Mapping[str, torch.Tensor],
                     what: str = "checkpoint") -> None:
    """Raise ValueError listing missing and unexpected keys and every shape mismatch (by key)."""
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
    for key in sorted(set(expected) & set(state_dict)):
        if tuple(state_dict[key].shape) != tuple(expected[key]):
            problems.append(f"shape mismatch for {key}: {what} has {tuple(state_dict[key].shape)}, "
                            f"model expects {tuple(expected[key])}")
    if problems:
        raise ValueError(f"{what} does not fit the model:\n  " + "\n  ".join(problems))


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
    from .models import FlexDiT, FlexDiTConfig
    obj = read_checkpoint(path)
    if not isinstance(obj, Mapping) or "config" not in obj:
        raise ValueError(f"{os.fspath(path)!r} is not a FlexDiT checkpoint (no 'config' entry)")
    model = FlexDiT(FlexDiTConfig.from_dict(obj["config"]))
    weights = obj.get("ema", obj.get("model"))
    if weights is None:
        raise ValueError(f"{os.fspath(path)!r} has no 'model' or 'ema' weights")
    return load_state_dict_strict(model, weights, what=os.fspath(path)).to(map_location)
