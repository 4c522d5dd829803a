"""Dense DiT checkpoints → FlexDiT by the paper's weight mapping: block i becomes layer i of the plan."""
from typing import Mapping, Union

import torch
import torch.nn as nn

from .checkpoint import check_state_dict, load_state_dict_strict
from .models import DiT, FlexDiT, FlexDiTConfig


def dense_shapes(config: FlexDiTConfig):
    """Key → shape of the dense DiT state dict that `config` converts from (built on the meta device)."""
    with torch.device("meta"):
        dit = DiT(**config.dit_kwargs())
    return {k: v.shape for k, v in dit.state_dict().items()}


def map_dense_state_dict(state_dict: Mapping[str, torch.Tensor], config: FlexDiTConfig):
    """FlexDiT state dict from a dense one: Poolingformers keep the V rows of qkv, cross layers split Q and KV,
    recovery layers get W1 = 0, W2 = I; everything else is copied by name (cloned, never shared)."""
    check_state_dict(dense_shapes(config), state_dict, what="dense DiT state dict")
    c, prefix = config.hidden_size, "blocks."
    out = {k: v.clone() for k, v in state_dict.items() if not k.startswith(prefix)}
    for i, kind in enumerate(config.layer_kinds()):
        block_prefix = f"{prefix}{i}."
        for key, value in state_dict.items():
            if not key.startswith(block_prefix):
                continue
            name = key[len(block_prefix):]
            if name.startswith("attn.qkv.") and kind != "sparse" and kind != "dense":
                suffix = name[len("attn.qkv."):]  # weight or bias: rows are [q; k; v]
                if kind == "pool":
                    out[f"{block_prefix}attn.v.{suffix}"] = value[2 * c:3 * c].clone()
                else:
                    out[f"{block_prefix}attn.q.{suffix}"] = value[:c].clone()
                    out[f"{block_prefix}attn.kv.{suffix}"] = value[c:3 * c].clone()
            else:
                out[key] = value.clone()
        if kind == "recover":
            ref = state_dict[f"{block_prefix}attn.proj.weight"]
            out[f"{block_prefix}fuse_sparse.weight"] = torch.zeros(c, c, dtype=ref.dtype, device=ref.device)
            out[f"{block_prefix}fuse_sparse.bias"] = torch.zeros(c, dtype=ref.dtype, device=ref.device)
            out[f"{block_prefix}fuse_dense.weight"] = torch.eye(c, dtype=ref.dtype, device=ref.device)
            out[f"{block_prefix}fuse_dense.bias"] = torch.zeros(c, dtype=ref.dtype, device=ref.device)
    return out


def from_dit(dit_or_state_dict: Union[nn.Module, Mapping[str, torch.Tensor]], config: FlexDiTConfig) -> FlexDiT:
    """Build a FlexDiT from a dense DiT (module or published-format state dict) by the paper's weight mapping.

    The result lives on the source's device and dtype and shares no storage with it. Fine-tune before sampling.
    """
    if not isinstance(config, FlexDiTConfig):
        raise ValueError(f"config must be a FlexDiTConfig, got {type(config).__name__}")
    if isinstance(dit_or_state_dict, nn.Module):
        state_dict = dit_or_state_dict.state_dict()
    elif isinstance(dit_or_state_dict, Mapping):
        state_dict = dit_or_state_dict
    else:
        raise ValueError(f"dit_or_state_dict must be an nn.Module or a state dict, "
                         f"got {type(dit_or_state_dict).__name__}")
    mapped = map_dense_state_dict(state_dict, config)
    with torch.device("meta"):
        model = FlexDiT(config)
    load_state_dict_strict(model, mapped, what="converted state dict", assign=True)
    model.pos_embed.requires_grad_(False)
    return model
