"""LoRA for FlexDiT fine-tuning through `peft`: adapters on the blocks' attention and MLP projections, the recovery
fusion weights W1 / W2 of the Sparse-Dense Token Modules trained in full, everything else frozen.

A patched host's FlexDiT layers start from the dense host's weights (the paper's mapping, W1 = 0, W2 = I); a LoRA
adapts the projections while W1 / W2, which exist only in the patched model, are learned outright (DyDiT++ shows a
LoRA suffices to adapt FLUX to dynamic computation). `save_adapters` writes one safetensors file holding the LoRA
weights, the fusion weights and a JSON header (rank, alpha, the adapted modules, the plan); `load_adapters` reads it
back into a freshly patched model and can merge the adapters into the base weights for sampling.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
import torch.nn as nn

from .patch import host_module, patch_record

__all__ = ["DEFAULT_TARGETS", "FUSION", "add_lora", "lora_targets", "save_adapters", "load_adapters", "merge_lora",
           "trainable_state_dict", "lora_info", "parse_targets"]

# Name suffixes of the projections adapted by default, inside the block lists only (the embedders and final layer
# stay frozen). diffusers' attention (self, cross, SD3 / FLUX joint: to_q ... to_add_out), the project's attention
# (qkv, q, kv, v, proj of a layer's `attn`), diffusers' feed-forwards (ff, ff_context, a FlexDiT layer's `mlp`:
# net.0.proj, net.2), FLUX's single-stream MLP (proj_mlp, proj_out) and the native DiT's MLP (fc1, fc2).
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                   "attn.qkv", "attn.q", "attn.kv", "attn.v", "attn.proj", "net.0.proj", "net.2", "proj_mlp",
                   "proj_out", "fc1", "fc2")
FUSION = ("fuse_sparse", "fuse_dense")     # W1 and W2 of the recovery fusion, always trained in full
UNUSED_IN_POOL = ("to_q", "to_k", "add_q_proj", "add_k_proj")   # a Poolingformer needs no queries or keys
BLOCK_LISTS = ("blocks", "transformer_blocks", "single_transformer_blocks", "temporal_transformer_blocks")
HEADER = "flexdit_lora"
FORMAT = 1


def _is_fusion(name: str) -> bool:
    return any(part in FUSION for part in name.split("."))


def _unused(model: nn.Module, name: str) -> bool:
    """Whether the layer holding module `name` never calls it (the query and key projections of a Poolingformer
    copy of an MMDiT block): an adapter there would get no gradient."""
    from .mmdit import MMDiTFlexLayer
    parts = name.split(".")
    layer = model.get_submodule(".".join(parts[:2]))
    return isinstance(layer, MMDiTFlexLayer) and layer.kind == "pool" and parts[-1] in UNUSED_IN_POOL


def lora_targets(model: nn.Module, targets=None) -> list[str]:
    """The full names of the `nn.Linear` modules a LoRA adapts: inside the block lists, ending in one of `targets`
    (default `DEFAULT_TARGETS`), the fusion layers and projections a Poolingformer never calls excepted.
    ValueError naming `targets` when none matches."""
    suffixes = tuple(DEFAULT_TARGETS if targets is None else targets)
    if isinstance(targets, str) or not suffixes or not all(isinstance(s, str) and s for s in suffixes):
        raise ValueError(f"targets must be a non-empty list of module name suffixes, got {targets!r}")
    names = [name for name, m in model.named_modules()
             if isinstance(m, nn.Linear) and name.split(".")[0] in BLOCK_LISTS and not _is_fusion(name)
             and any(name.endswith("." + s) for s in suffixes) and not _unused(model, name)]
    if not names:
        raise ValueError(f"targets {list(suffixes)} match no linear layer in the blocks of this "
                         f"{type(model).__name__}")
    return names


def _plan_of(module) -> str | None:
    rec = patch_record(module)
    plan = rec.plan if rec is not None else getattr(getattr(module, "config", None), "plan", None)
    return None if plan is None or isinstance(plan, dict) else str(plan)


def add_lora(model, rank: int, targets=None, alpha: float | None = None, modules=None):
    """Inject LoRA adapters of rank `rank` (scale alpha / rank; alpha defaults to rank) into the projections named by
    `targets` (suffixes, default `DEFAULT_TARGETS`) and freeze everything but them and the fusion weights W1 / W2.

    `modules` (full names) replaces the suffix search (`load_adapters` passes the saved list). Returns `model`;
    `lora_info(model)["modules"]` lists the adapted modules.
    """
    from peft import LoraConfig, inject_adapter_in_model
    module = host_module(model)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    alpha = float(rank if alpha is None else alpha)
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if HEADER in module.__dict__:
        raise ValueError("model already has LoRA adapters (add_lora once; load_adapters on a fresh model)")
    names = lora_targets(module, targets) if modules is None else list(modules)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=names, lora_dropout=0.0, bias="none")
    inject_adapter_in_model(config, module)
    for name, p in module.named_parameters():
        p.requires_grad_("lora_" in name or _is_fusion(name))
    module.__dict__[HEADER] = {"rank": rank, "alpha": alpha, "targets": None if targets is None else list(targets),
                               "modules": names}
    return model


def lora_info(model) -> dict | None:
    """{"rank", "alpha", "targets", "modules"} of the adapters in `model`, None without adapters."""
    return host_module(model).__dict__.get(HEADER)


def trainable_state_dict(model, state_dict=None) -> dict:
    """What a LoRA run trains: the LoRA weights (peft's names, without the adapter name) and the fusion weights,
    taken from `state_dict` (a gathered copy of a sharded model's, module names as keys) when given."""
    from peft import get_peft_model_state_dict
    module = host_module(model)
    source = dict(module.named_parameters()) if state_dict is None else state_dict
    state = dict(get_peft_model_state_dict(module, state_dict=state_dict))
    state.update({name: p for name, p in source.items() if _is_fusion(name)})
    return state


def save_adapters(model, path, state_dict=None) -> Path:
    """Write the LoRA weights, the fusion weights W1 / W2 and a JSON header (rank, alpha, targets, adapted modules,
    plan) to one safetensors file, atomically. `state_dict` replaces `trainable_state_dict(model)` (a gathered copy
    of a sharded model's)."""
    from safetensors.torch import save_file
    module = host_module(model)
    info = module.__dict__.get(HEADER)
    if info is None:
        raise ValueError("model has no LoRA adapters (add_lora or load_adapters first)")
    state = trainable_state_dict(module) if state_dict is None else state_dict
    header = {"format": FORMAT, **info, "plan": _plan_of(module)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp),
              metadata={HEADER: json.dumps(header)})
    os.replace(tmp, path)
    return path


def read_adapters(path) -> tuple[dict, dict]:
    """(header, tensors) of a file written by `save_adapters`; ValueError naming the file."""
    from safetensors import safe_open
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"adapters {str(path)!r}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        header = json.loads(meta[HEADER])
    except KeyError:
        raise ValueError(f"adapters {str(path)!r}: not a flexdit LoRA file (no {HEADER} header)") from None
    except Exception as err:       # safetensors raises its own error types for a truncated or foreign file
        raise ValueError(f"adapters {str(path)!r}: cannot read ({str(err).splitlines()[0]})") from None
    return header, tensors


def load_adapters(model, path, merge: bool = False):
    """Load a file of `save_adapters` into `model` (patched with the same plan, without adapters): inject the saved
    adapters, load their weights and the fusion weights (strict: every key must fit), and with `merge` fold the
    adapters into the base weights (plain `nn.Linear` again). Returns `model`. ValueError naming the file on a
    plan or key mismatch."""
    from peft import set_peft_model_state_dict
    module = host_module(model)
    header, tensors = read_adapters(path)
    plan = _plan_of(module)
    if header.get("plan") != plan:
        raise ValueError(f"adapters {str(path)!r} were trained on plan {header.get('plan')}, the model has {plan}")
    missing = [m for m in header["modules"] if m not in dict(module.named_modules())]
    if missing:
        raise ValueError(f"adapters {str(path)!r}: the model has no module {missing[0]!r} "
                         f"({len(missing)} of {len(header['modules'])} missing)")
    add_lora(module, int(header["rank"]), header.get("targets"), header["alpha"], modules=header["modules"])
    fusion = {k: v for k, v in tensors.items() if _is_fusion(k)}
    params = dict(module.named_parameters())
    expected = {k for k in params if _is_fusion(k)}
    if set(fusion) != expected:
        raise ValueError(f"adapters {str(path)!r}: fusion weights {sorted(set(fusion) ^ expected)[:3]} do not match "
                         f"the model's")
    lora = {k: v for k, v in tensors.items() if not _is_fusion(k)}
    result = set_peft_model_state_dict(module, lora)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    absent = [k for k in (getattr(result, "missing_keys", []) or []) if "lora_" in k]
    if unexpected or absent:
        raise ValueError(f"adapters {str(path)!r}: LoRA keys do not match the model "
                         f"(unexpected {unexpected[:3]}, missing {absent[:3]})")
    with torch.no_grad():
        for k, v in fusion.items():
            if params[k].shape != v.shape:
                raise ValueError(f"adapters {str(path)!r}: {k} has shape {tuple(v.shape)}, the model's is "
                                 f"{tuple(params[k].shape)}")
            params[k].copy_(v)
    if merge:
        merge_lora(module)
    return model


def merge_lora(model):
    """Fold every LoRA adapter into its base layer and put the base `nn.Linear` back (peft's merge_and_unload for
    adapters injected without a PeftModel). Returns `model`."""
    from peft.tuners.lora import LoraLayer
    module = host_module(model)
    found = [(name, m) for name, m in module.named_modules() if isinstance(m, LoraLayer)]
    for name, layer in found:
        layer.merge(safe_merge=True)
        parent, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, child, layer.get_base_layer())
    module.__dict__.pop(HEADER, None)
    return model


def parse_targets(text: str | None):
    """--lora-targets: comma-separated module name suffixes (`to_q,to_k,to_v`); None or empty: the defaults."""
    if not text:
        return None
    names = [s.strip() for s in re.split(r"[,\s]+", text) if s.strip()]
    if not names:
        raise ValueError(f"--lora-targets: no module names in {text!r}")
    return names
