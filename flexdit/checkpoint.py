"""Loading published DiT checkpoints and FlexDiT checkpoints safely (`weights_only=True`), with strict key checks.

Every error is a ValueError that names the file and says what is wrong with it (empty, truncated or not a
checkpoint, objects other than tensors, keys that do not fit the model), in one line.
"""
import os
import pickle
import re
import zipfile
from typing import Dict, Mapping, Optional, Tuple, Union

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
    except (EOFError, RuntimeError, zipfile.BadZipFile, KeyError, IndexError, OSError, UnicodeDecodeError,
            ValueError, TypeError) as e:     # what torch.load raises on a truncated or foreign file
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


def save_flexdit(model, path, name: Optional[str] = None) -> None:
    """Write a FlexDiT, a dense DiT or a FlexLatte as {"arch", "config", "model"} (plus "name", the registry name,
    when given), atomically (temporary file, then rename). `load_model` reads it back."""
    arch, config = model_config(model)
    state = {"arch": arch, "config": config, "model": getattr(model, "module", model).state_dict()}
    if name is not None:
        state["name"] = str(name)
    tmp = f"{os.fspath(path)}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_flexdit(path, map_location="cpu"):
    """The model of a checkpoint that records its config (`save_flexdit`, or a `flexdit-finetune` checkpoint of a
    FlexDiT, a dense DiT or a FlexLatte: its EMA weights), on `map_location`. `load_model` with more choices."""
    what = f"checkpoint {os.fspath(path)!r}"
    obj = read_checkpoint(path)
    if not isinstance(obj, Mapping) or "config" not in obj:
        raise ValueError(f"{what} does not record its model (no 'config' entry); for a plain state dict use "
                         "load_model(path, name='FlexDiT-XL/2', ...)")
    return load_model(path).to(map_location)


# ---------------------------------------------------------------------------------------------------------------
# The one loader
# ---------------------------------------------------------------------------------------------------------------

ARCHS = ("FlexDiT", "DiT", "FlexLatte")


def model_config(model) -> Tuple[str, dict]:
    """(arch, config dict) of a FlexDiT ("FlexDiT"), a FlexLatte ("FlexLatte") or a dense DiT ("DiT", its
    constructor kwargs): what a checkpoint records to rebuild the model. DDP wrappers are looked through."""
    model = getattr(model, "module", model)
    if hasattr(model, "config") and hasattr(model.config, "to_dict"):
        arch = "FlexLatte" if type(model).__name__ == "FlexLatte" else "FlexDiT"
        return arch, model.config.to_dict()
    blk = model.blocks[0]
    hidden = model.pos_embed.shape[-1]
    h, w = model.input_size
    return "DiT", dict(input_size=h if h == w else (h, w), patch_size=model.patch_size,
                       in_channels=model.in_channels, hidden_size=hidden, depth=len(model.blocks),
                       num_heads=model.num_heads, mlp_ratio=blk.mlp.fc1.out_features / hidden,
                       class_dropout_prob=model.y_embedder.dropout_prob, num_classes=model.y_embedder.num_classes,
                       learn_sigma=model.learn_sigma)


def arch_of_name(name: str) -> str:
    """The family a model name builds: "FlexLatte", "FlexDiT" (FlexDiT-*) or "DiT"."""
    if name == "FlexLatte":
        return "FlexLatte"
    return "FlexDiT" if name.startswith("FlexDiT") else "DiT"


def is_registry_name(name) -> bool:
    """Whether `name` is a model name the loader builds: a DiT_models or FlexDiT_models key, or "FlexLatte"."""
    from .models import DiT_models, FlexDiT_models
    return name == "FlexLatte" or name in DiT_models or name in FlexDiT_models


def _registry_name(arch: str, config: Mapping) -> Optional[str]:
    """The registry name ("FlexDiT-S/2", "DiT-XL/2") whose size a DiT-like config has, or None (a custom size)."""
    from .models import DiT_models
    if arch == "FlexLatte":
        return "FlexLatte"
    for name, size in DiT_models.items():
        if all(config.get(k) == v for k, v in size.items()):
            return ("Flex" if arch == "FlexDiT" else "") + name
    return None


def _same(given, recorded) -> bool:
    """Equal up to list/tuple and int/pair spelling (a grid 4 and (4, 4); a group [1, 2, 1, 1] and (1, 2, 1, 1))."""
    if isinstance(given, (list, tuple)) and isinstance(recorded, (list, tuple)):
        return len(given) == len(recorded) and all(_same(a, b) for a, b in zip(given, recorded))
    if isinstance(given, int) and isinstance(recorded, (list, tuple)):
        return all(_same(given, b) for b in recorded)
    return given == recorded


def _conflicts(given: Mapping, recorded: Mapping, prefix: str = ""):
    """([(key, given, recorded)] for values that differ, [unknown keys]) of overrides against a recorded config;
    nested dicts (a Latte's "transformer", a "plan") are compared key by key."""
    differ, unknown = [], []
    for key, value in given.items():
        name = prefix + key
        if key not in recorded:
            unknown.append(name)
        elif isinstance(value, Mapping) and isinstance(recorded[key], Mapping):
            d, u = _conflicts(value, recorded[key], name + ".")
            differ += d
            unknown += u
        elif not _same(value, recorded[key]):
            differ.append((name, value, recorded[key]))
    return differ, unknown


def _check_overrides(overrides: Mapping, config: Mapping, what: str, labels: Mapping, allowed=()) -> dict:
    """Refuse overrides that a checkpoint's recorded config contradicts or does not know; returns the `allowed`
    ones (plan fields when a dense checkpoint is converted to FlexDiT), which the config does not hold."""
    from .plan import PLAN_FIELDS, split_plan_fields
    extra = {k: v for k, v in overrides.items() if k in allowed}
    rest = {k: v for k, v in overrides.items() if k not in allowed}
    plan_kw, rest = split_plan_fields(rest) if isinstance(config.get("plan"), Mapping) else ({}, rest)
    if plan_kw:   # flat plan fields of a FlexDiT config stand for its plan's
        rest["plan"] = {**plan_kw, **(rest.get("plan") or {})} if isinstance(rest.get("plan"), Mapping) else \
            rest.get("plan", plan_kw)
    differ, unknown = _conflicts(rest, config)
    if unknown:
        known = sorted(set(config) | (set(PLAN_FIELDS) if "plan" in config else set()) | set(allowed))
        raise ValueError(f"{labels.get(unknown[0].split('.')[0], labels.get('*', 'model override'))}: unknown field "
                         f"{unknown[0]!r} for the model of "
                         f"{what} (known: {', '.join(known)})")
    if differ:
        key, given, recorded = differ[0]
        label = labels.get(key.split(".")[0], labels.get("*", "model override"))
        raise ValueError(f"{label}: {key}={given!r} conflicts with {what}, which records {key}={recorded!r}")
    return extra


def _check_name(name: Optional[str], arch: str, config: Mapping, recorded_name: Optional[str], what: str) -> str:
    """The model name to report: the given one if it agrees with the checkpoint's (its recorded name, else the
    registry size its config matches), else a ValueError naming both."""
    have = recorded_name if is_registry_name(recorded_name) else _registry_name(arch, config)
    if name is None:
        return have or arch
    want_arch = arch_of_name(name)
    if want_arch != arch and not (arch == "DiT" and want_arch == "FlexDiT"):
        raise ValueError(f"--model {name} conflicts with {what}, which holds a {arch} model"
                         + (f" ({have})" if have else "") + f"; use a {arch}{'-*' if arch != 'FlexLatte' else ''} "
                         "name")
    if have and name.replace("FlexDiT", "DiT") != have.replace("FlexDiT", "DiT"):
        raise ValueError(f"--model {name} conflicts with {what}, which records {have}")
    return name


def _looks_like_flexdit(state_dict: Mapping) -> bool:
    """A FlexDiT state dict has split attention projections or recovery fusions that a dense DiT lacks."""
    return any(".attn.kv." in k or ".attn.v." in k or ".fuse_sparse." in k for k in state_dict)


def _size_of(state_dict: Mapping) -> str:
    """ "depth 28, hidden 1152" for a DiT-like state dict (empty when it cannot tell)."""
    blocks = {k.split(".")[1] for k in state_dict if k.startswith("blocks.") and k.count(".") > 1}
    pos = state_dict.get("pos_embed")
    hidden = f", hidden {pos.shape[-1]}" if isinstance(pos, torch.Tensor) and pos.ndim >= 1 else ""
    return f"depth {len(blocks)}{hidden}" if blocks else ""


def _fit_error(err: ValueError, what: str, state_dict: Mapping, depth: int, hidden: int) -> ValueError:
    """One line: the file, the sizes when they differ (the usual cause), then the key check's summary."""
    have = _size_of(state_dict)
    want = f"depth {depth}, hidden {hidden}"
    size = f" holds a model of {have}, the model built has {want} (check --model/--model-args);" \
        if have and have != want else ""
    return ValueError(f"{what}{size or ':'} {err}")


def _load_fitting(model, state_dict, what: str, label: str):
    try:
        return load_state_dict_strict(model, state_dict, what=label)
    except ValueError as err:
        raise _fit_error(err, what, state_dict, len(model.blocks), model.pos_embed.shape[-1]) from None


def _weights(obj: Mapping, weights: str, what: str) -> Tuple[str, Mapping]:
    if weights not in ("ema", "model"):
        raise ValueError(f"weights must be 'ema' or 'model', got {weights!r}")
    key = weights if weights in obj else "model"
    if not isinstance(obj.get(key), Mapping):
        raise ValueError(f"{what} has no {weights!r} or 'model' weights")
    return key, obj[key]


def load_model(ckpt=None, name: Optional[str] = None, weights: str = "ema", return_source: bool = False,
               labels: Optional[Mapping[str, str]] = None, **overrides):
    """The one loader of the command-line tools and the Python API: a model from a registry name and/or a file.

    ckpt:
      - None: `name` with random initialisation (`overrides` replace config fields);
      - a checkpoint that records its model ({"arch", "config", ...}: `save_flexdit`, every checkpoint
        `flexdit-finetune` writes, of a FlexDiT, a dense DiT or a FlexLatte): built from its config, with its
        `weights` ("ema" or "model"). `name` may be omitted; a name of another family or size, an override that
        contradicts the recorded config and an unknown override are ValueErrors naming both values. A dense
        checkpoint given with a FlexDiT name is converted by the paper's weight mapping (plan fields allowed);
      - a plain state dict (`.pt` / `.safetensors`, e.g. DiT-XL-2-256x256.pt): loaded into the dense DiT `name`,
        or converted for a FlexDiT name; a plain FlexDiT state dict is loaded as is;
      - a diffusers `LatteTransformer3DModel` folder for name "FlexLatte".
    Checkpoints are read with `weights_only=True`; keys that do not fit are named (missing, unexpected, shapes).
    labels: how to name override keys in errors (the CLIs map "input_size" to "--image-size"; "*": the rest).
    Returns the model, or (model, source) with `return_source`, source saying which case applied.
    """
    model, source, _ = _load(ckpt, name, weights, dict(labels or {}), overrides)
    return (model, source) if return_source else model


def _load(ckpt, name, weights, labels, overrides):
    from .convert import from_dit
    from .models import DiT, FlexDiT, create_model, flexdit_config

    if ckpt is None:
        if name is None:
            raise ValueError("name: give a registry name (FlexDiT-XL/2, DiT-XL/2, FlexLatte) or a checkpoint")
        if name == "FlexLatte":
            from .video import FlexLatte, FlexLatteConfig
            return FlexLatte(FlexLatteConfig(**overrides)), "random initialisation", name
        return create_model(name, **overrides), "random initialisation", name
    what = f"checkpoint {os.fspath(ckpt)!r}"
    if os.path.isdir(ckpt):
        return (*_load_latte_folder(ckpt, name, what, overrides), "FlexLatte")
    obj = read_checkpoint(ckpt)
    if isinstance(obj, Mapping) and "config" in obj:
        arch = obj.get("arch", "FlexDiT")
        if arch not in ARCHS:
            raise ValueError(f"{what} holds a {arch!r} model; known: {', '.join(ARCHS)}")
        config = obj["config"]
        if not isinstance(config, Mapping):
            raise ValueError(f"{what}: 'config' must be a dict, got {type(config).__name__}")
        args = obj.get("args")
        recorded = obj.get("name") or (args.get("model") if isinstance(args, Mapping) else None)
        name = _check_name(name, arch, config, recorded, what)
        key, state_dict = _weights(obj, weights, what)
        convert = arch == "DiT" and arch_of_name(name) == "FlexDiT"
        from .plan import PLAN_FIELDS
        extra = _check_overrides(overrides, config, what, labels, allowed=(*PLAN_FIELDS, "plan") if convert else ())
        source = f"{'dense DiT' if arch == 'DiT' else arch} checkpoint ({key} weights)"
        if arch == "FlexLatte":
            from .video import FlexLatte, FlexLatteConfig
            model = FlexLatte(FlexLatteConfig.from_dict(config))
        elif arch == "FlexDiT":
            model = FlexDiT(config_from_dict(config, what))
        elif not convert:
            model = DiT(**config)
        else:
            try:
                model = from_dit(state_dict, flexdit_config(name, **config, **extra))
            except ValueError as err:
                raise _fit_error(err, what, state_dict, config.get("depth"), config.get("hidden_size")) from None
            return model, source + " converted to FlexDiT", name
        if arch == "FlexLatte":
            load_state_dict_strict(model, state_dict, what=what)
        else:
            _load_fitting(model, state_dict, what, f"the {arch} state dict")
        return model, source, name
    # a plain state dict: the name and the overrides give the model
    name = name or "FlexDiT-XL/2"
    if name == "FlexLatte":
        raise ValueError(f"{what} is not a FlexLatte checkpoint of flexdit-finetune (nor a diffusers Latte folder)")
    state_dict = load_dit_checkpoint(ckpt)
    if arch_of_name(name) == "DiT":
        return (_load_fitting(create_model(name, **overrides), state_dict, what, "the state dict"),
                "dense DiT checkpoint", name)
    config = flexdit_config(name, **overrides)
    if not _looks_like_flexdit(state_dict):
        try:
            return from_dit(state_dict, config), "dense DiT checkpoint converted to FlexDiT", name
        except ValueError as err:
            raise _fit_error(err, what, state_dict, config.depth, config.hidden_size) from None
    return _load_fitting(FlexDiT(config), state_dict, what, "the FlexDiT state dict"), "FlexDiT state dict", name


def _load_latte_folder(folder, name, what, overrides):
    """A FlexLatte over a diffusers `LatteTransformer3DModel` saved with `save_pretrained` (local files only)."""
    from .video import FlexLatte, FlexLatteConfig
    if name not in (None, "FlexLatte"):
        raise ValueError(f"--model {name}: {what} is a folder, which only FlexLatte reads (a diffusers Latte)")
    try:
        import diffusers
        host = diffusers.LatteTransformer3DModel.from_pretrained(folder, local_files_only=True)
    except ImportError:
        raise ValueError(f"{what}: reading a diffusers Latte folder needs diffusers (pip install "
                         "'flexdit[diffusers]')") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"{what}: not a diffusers LatteTransformer3DModel folder ({_first_line(e)})") from None
    host_config = {k: v for k, v in host.config.items() if not k.startswith("_")}
    config = FlexLatteConfig(**{**overrides, "transformer": host_config})
    return FlexLatte(config, host), "diffusers Latte"


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
