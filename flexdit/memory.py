"""Per-GPU memory plan of a fine-tuning run: weights, gradients, optimizer state and activations, before any GPU.

Weights, gradients and optimizer state follow from parameter counts. Activations are measured, not guessed: one
forward at batch 1 on the meta device (no memory, no compute) under `torch.autograd.graph.saved_tensors_hooks`,
summing the bytes of every distinct tensor autograd keeps for the backward pass (parameters excluded), each tensor
attributed to the block that saved it. Attention is counted as the fused kernels a GPU runs (they keep q, k, v,
the output and the log-sum-exp, never the L×L weights): `scaled_dot_product_attention` runs as
`aten._scaled_dot_product_efficient_attention` during the measurement. With activation checkpointing per block, a
block keeps only its inputs; the backward pass then recomputes one block at a time, so the estimate is what the
blocks' inputs and the rest of the model keep, plus the most that any one block keeps.

Not included: the CUDA context and allocator slack, NCCL buffers, temporaries inside one op, the gradients of
activations during the backward pass. Weights, gradients and optimizer state are exact byte counts of the stated
layout; the activations are the saved set of this forward, scaled linearly with the batch.
"""
from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn as nn

__all__ = ["memory_plan", "format_memory_plan", "saved_activation_bytes"]

_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_BLOCK_LISTS = ("blocks", "transformer_blocks", "single_transformer_blocks", "temporal_transformer_blocks")
GiB = 2 ** 30


def _size(nbytes: float) -> str:
    return f"{nbytes / GiB:.2f} GiB" if nbytes >= GiB / 10 else f"{nbytes / 2 ** 20:.2f} MiB"


# ---------------------------------------------------------------------------------------------------------------
# Measuring what the forward keeps for the backward pass
# ---------------------------------------------------------------------------------------------------------------

def _fused_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """`scaled_dot_product_attention` through the memory-efficient kernel's op, which saves what fused GPU kernels
    save (on the meta device the plain call would decompose and save the attention weights)."""
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        rep = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(rep, -3), value.repeat_interleave(rep, -3)
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device).masked_fill(
            ~attn_mask, float("-inf"))
    if attn_mask is not None:
        attn_mask = attn_mask.to(query.dtype).expand(*query.shape[:-1], key.shape[-2])
    return torch.ops.aten._scaled_dot_product_efficient_attention(
        query, key, value, attn_mask, True, dropout_p, is_causal, scale=scale)[0]


@contextlib.contextmanager
def _sdpa_as_fused():
    original = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = _fused_sdpa
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = original


def _storage(t: torch.Tensor):
    s = t.untyped_storage()
    return s._cdata, s.nbytes()


def _blocks(module: nn.Module) -> list[nn.Module]:
    """The host's blocks (a patched host's FlexDiT layers), in order, from its block lists."""
    out = []
    for name in _BLOCK_LISTS:
        blocks = getattr(module, name, None)
        if isinstance(blocks, nn.ModuleList):
            out.extend(blocks)
    return out


def _tensors(obj):
    """The tensors inside nested args / kwargs."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)


def _to_meta(model: nn.Module) -> nn.Module:
    """A copy of `model` on the meta device; its parameters and buffers are never copied on their own device."""
    memo = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo).to("meta")


def saved_activation_bytes(model: nn.Module, inputs: dict) -> dict:
    """Bytes the forward `model(**inputs)` keeps for the backward pass, measured on the meta device:
    {"total": all distinct saved tensors, "outside": those saved outside the blocks, "blocks": per block saved,
    "block_inputs": the distinct tensors the blocks receive (what checkpointing keeps)}."""
    params = {_storage(t)[0] for t in (*model.parameters(), *model.buffers())}
    seen: dict[int, int] = {}
    owner: dict[int, int] = {}
    blocks = _blocks(model)
    per_block = [0] * len(blocks)
    block_inputs: dict[int, int] = {}
    keep = []                                   # hold inputs so that no storage address is reused meanwhile
    current = [None]

    def pack(t):
        key, nbytes = _storage(t)
        if key not in params and key not in seen:
            seen[key] = nbytes
            owner[key] = current[0]
            if current[0] is not None:
                per_block[current[0]] += nbytes
        return t

    def pre(k):
        def hook(module, args, kwargs):
            current[0] = k
            for t in _tensors((args, kwargs)):
                key, nbytes = _storage(t)
                if key not in params and t.is_floating_point():
                    block_inputs[key] = nbytes
                    keep.append(t)
        return hook

    def post(module, args, kwargs, output):
        current[0] = None

    handles = [b.register_forward_pre_hook(pre(k), with_kwargs=True) for k, b in enumerate(blocks)]
    handles += [b.register_forward_hook(post, with_kwargs=True) for b in blocks]
    try:
        with _sdpa_as_fused(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(**inputs)
    finally:
        for h in handles:
            h.remove()
    del out, keep
    outside = {k: v for k, v in seen.items() if owner[k] is None}
    return {"total": sum(seen.values()), "outside": sum(outside.values()), "blocks": per_block,
            "block_inputs": sum(v for k, v in block_inputs.items() if k not in outside)}


# ---------------------------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------------------------

def memory_plan(model, *, world_size: int, batch_size: int, precision: str, lora_rank: int | None = None,
                fsdp: bool = False, checkpointing: bool = False, sample_inputs=None, lora_targets=None,
                ema: bool = False) -> dict:
    """Per-GPU memory of fine-tuning `model` (a host or patched host, best built on the meta device: nothing of it
    is allocated or changed) with AdamW.

    The arguments that matter:
        world_size: GPUs; batch_size: samples per GPU per forward; precision: "fp32", "bf16" or "fp16" (the compute
            dtype: activations and the weight copies the matmuls read).
        lora_rank: a LoRA of that rank (`flexdit.lora.add_lora` with `lora_targets`) trains the adapters and the
            fusion weights; None: full fine-tuning (every parameter that requires grad).
        fsdp: FSDP2 (one unit per block): weights, gradients, optimizer and EMA states are sharded over world_size,
            and each GPU holds the unsharded compute copies of two blocks (the one running, the one prefetched);
            else DDP: everything replicated, and with world_size > 1 the reduction buckets hold a second copy of the
            gradients.
        checkpointing: activation checkpointing per block (both figures are measured; this picks the total's).
        sample_inputs: the forward's keyword arguments at batch 1, or a callable batch -> those.

    Layout: every parameter in the dtype the model stores it in (LoRA adapters in peft's); gradients, AdamW's two
    states (and an EMA with `ema`) in the trainable parameters' dtypes. The compute copies are, under FSDP2, the
    unsharded parameters of two blocks in the compute dtype (FSDP2's bf16 / fp16 mixed-precision policy) or as
    stored (fp32); under DDP with bf16 / fp16, autocast's compute-dtype copies of the weights stored wider, which the
    backward pass keeps. Returns a dict of counts and bytes (`format_memory_plan` prints it). ValueError naming the
    argument for a bad one.
    """
    for name, value in (("world_size", world_size), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if precision not in _BYTES:
        raise ValueError(f"precision must be one of {sorted(_BYTES)}, got {precision!r}")
    if lora_rank is not None and (isinstance(lora_rank, bool) or not isinstance(lora_rank, int) or lora_rank < 1):
        raise ValueError(f"lora_rank must be a positive int or None, got {lora_rank!r}")
    module = model if isinstance(model, nn.Module) else getattr(model, "transformer", None)
    if not isinstance(module, nn.Module):
        raise ValueError(f"model must be an nn.Module or a pipeline with a .transformer, got {type(model).__name__}")
    if sample_inputs is None:
        raise ValueError("sample_inputs: give the forward's keyword arguments at batch 1 (or a callable batch -> "
                         "them)")
    inputs = sample_inputs(1) if callable(sample_inputs) else sample_inputs
    if not isinstance(inputs, dict):
        raise ValueError(f"sample_inputs must be a dict of keyword arguments (or a callable returning one), got "
                         f"{type(inputs).__name__}")

    compute = _DTYPES[precision]
    meta = _to_meta(module)
    if lora_rank is not None:
        from .lora import add_lora, lora_info
        if lora_info(meta) is None:
            add_lora(meta, lora_rank, lora_targets)
    meta.train()
    for m in meta.modules():     # both figures are measured here: the host's own checkpointing would hide the first
        if getattr(m, "gradient_checkpointing", False) is True:
            m.gradient_checkpointing = False
    c = _BYTES[precision]
    params = list(meta.parameters())
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    stored = sum(p.numel() * p.element_size() for p in params)
    train_bytes = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    if fsdp:        # the running and the prefetched block, all-gathered
        copies = 2 * max((sum(p.numel() * (c if precision != "fp32" else p.element_size()) for p in b.parameters())
                          for b in _blocks(meta)), default=0)
    else:           # autocast's casts of the weights stored wider than the compute dtype
        copies = sum(p.numel() * c for p in params if p.is_floating_point() and p.element_size() > c)

    nn.Module.to(meta, compute)                 # (diffusers' own `to` warns about fp32 modules on a cast)
    meta_inputs = {k: v.to("meta", dtype=compute if v.is_floating_point() else v.dtype)
                   if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    saved = saved_activation_bytes(meta, meta_inputs)
    per_sample = {"full": saved["total"],
                  "checkpointed": saved["outside"] + saved["block_inputs"] + max(saved["blocks"], default=0)}

    shard = world_size if fsdp else 1
    grads = train_bytes * (2 if not fsdp and world_size > 1 else 1)
    parts = {"weights": stored / shard, "compute_copies": copies, "gradients": grads / shard,
             "optimizer": 2 * train_bytes / shard, "ema": (train_bytes if ema else 0) / shard,
             "activations": per_sample["checkpointed" if checkpointing else "full"] * batch_size}
    parts = {k: int(round(v)) for k, v in parts.items()}
    return {"model": type(module).__name__, "world_size": world_size, "batch_size": batch_size,
            "precision": precision, "lora_rank": lora_rank, "fsdp": bool(fsdp), "checkpointing": bool(checkpointing),
            "ema": bool(ema), "parameters": total, "trainable_parameters": trainable,
            "activations_per_sample": per_sample, "bytes": parts, "total_bytes": sum(parts.values())}


def format_memory_plan(plan: dict) -> str:
    """`memory_plan`'s dict as a few lines of text (GiB = 2^30 bytes, MiB = 2^20)."""
    how = (f"{'LoRA rank ' + str(plan['lora_rank']) if plan['lora_rank'] else 'full fine-tuning'}, "
           f"{'FSDP2' if plan['fsdp'] else 'DDP'} on {plan['world_size']} GPU(s), batch {plan['batch_size']} per GPU, "
           f"{plan['precision']}, activation checkpointing {'on' if plan['checkpointing'] else 'off'}")
    b, act = plan["bytes"], plan["activations_per_sample"]
    lines = [f"memory plan: {plan['model']}, {how}",
             f"  parameters {plan['parameters'] / 1e6:,.2f} M, trainable {plan['trainable_parameters'] / 1e6:,.2f} M "
             f"({plan['trainable_parameters'] / max(plan['parameters'], 1):.2%})",
             f"  activations per sample: {_size(act['full'])} without checkpointing, "
             f"{_size(act['checkpointed'])} with"]
    names = {"weights": "weights", "compute_copies": "compute copies", "gradients": "gradients",
             "optimizer": "optimizer (AdamW)", "ema": "EMA", "activations": "activations"}
    lines += [f"  {names[k]:<18} {_size(v):>12}" for k, v in b.items() if v or k != "ema"]
    lines.append(f"  {'total per GPU':<18} {_size(plan['total_bytes']):>12} (without CUDA context, allocator slack "
                 "and temporaries)")
    return "\n".join(lines)
