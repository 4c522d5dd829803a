"""Dense/patched model pairs at real sizes with random weights, for `python -m bench model --model ...`."""
import contextlib
import copy
from typing import Any, Dict, Optional

import torch

from flexdit import apply_patch
from flexdit.sizes import ModelArgs

TARGETS = ("pixart-alpha", "diffusers-dit", "latte", "flux", "sd3")


# The size of each target in `flexdit.sizes`: its diffusers config, with the latent side (and clip length) of a run.
TARGET_SIZES = {"pixart-alpha": "PixArt-XL/2", "diffusers-dit": "DiT-XL/2", "latte": "Latte-XL/2"}


def _diffusers_config(target: str, latent: int, frames: int) -> Dict[str, Any]:
    """The real-size diffusers config of a target: DiT-XL/2, PixArt-α XL/2 or Latte-XL/2 (Latte-1's config)."""
    cfg = dict(ModelArgs.from_name(TARGET_SIZES[target]).diffusers_config(), sample_size=latent)
    if target == "pixart-alpha":
        cfg["use_additional_conditions"] = latent == 128
    if target == "latte":
        cfg["video_length"] = frames
    return cfg


def build_patched_pair(target: str, image_size: int, device=None, dtype=torch.float32, plan=None, schedule=None,
                       config_overrides: Optional[Dict[str, Any]] = None, frames: int = 16):
    """(dense_model, patched_model, make_inputs) for "pixart-alpha", "diffusers-dit" or "latte" at real size, random
    weights.

    image_size: pixels (256, 512, 1024); the latent is image_size / 8. frames: the clip length of "latte" (its
    temporal position table has this many frames; the host also runs single frames). `make_inputs(batch, t=500)`
    returns the keyword arguments of one forward: `model(**make_inputs(8))[0]` is the prediction (B, 8, S, S), for
    "latte" (B, 8, T, S, S). The patched model is a deep copy of the dense one patched with `plan` (default: the
    decided plan, grid 8) or `schedule`. `config_overrides` replaces diffusers config fields (tiny models for
    tests). On `device="meta"` the models are built without memory (for MAC counts). Needs diffusers.
    """
    import diffusers

    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    if target in ("flux", "sd3"):   # MMDiT hosts: FLUX.1-dev and SD3.5-medium sizes, built by flexdit.mmdit
        from flexdit.mmdit import build_mmdit_pair
        return build_mmdit_pair(target, image_size, device, dtype, plan, schedule, config_overrides)
    latent = image_size // 8
    cfg = {**_diffusers_config(target, latent, frames), **(config_overrides or {})}
    cls = {"pixart-alpha": diffusers.PixArtTransformer2DModel, "diffusers-dit": diffusers.DiTTransformer2DModel,
           "latte": diffusers.LatteTransformer3DModel}[target]
    on_meta = torch.device(device).type == "meta" if device is not None else False
    with torch.random.fork_rng(devices=[]), (torch.device("meta") if on_meta else contextlib.nullcontext()):
        torch.manual_seed(0)  # diffusers' default init: random, nothing zeroed
        dense = cls(**cfg)
    dense = dense.to(device=device, dtype=dtype).eval()
    patched = apply_patch(copy.deepcopy(dense), plan=plan, schedule=schedule, keep_original=False)
    c = dense.config

    def make_inputs(batch: int, t: int = 500, mask: bool = True):
        """The forward's keyword arguments; `mask`: the caption mask (half the 120 caption tokens discarded)."""
        gen = torch.Generator(device="cpu").manual_seed(1)
        shape = (batch, c.in_channels, frames) if target == "latte" else (batch, c.in_channels)
        x = torch.randn(*shape, c.sample_size, c.sample_size, generator=gen)
        inputs = dict(hidden_states=x.to(device=device, dtype=dtype),
                      timestep=torch.full((batch,), t, dtype=torch.long, device=device), return_dict=False)
        if target == "diffusers-dit":
            inputs["class_labels"] = torch.randint(0, 1000, (batch,), generator=gen).to(device)
            return inputs
        text = torch.randn(batch, 120, c.caption_channels, generator=gen)
        inputs["encoder_hidden_states"] = text.to(device=device, dtype=dtype)
        keep = torch.ones(batch, 120, dtype=torch.long)
        keep[:, 60:] = 0
        if target == "latte":
            # Latte passes the mask to its spatial blocks unchanged (one row per frame) and does not turn it into
            # a bias: give the bias (B·T, 1, L), 0 to keep and -10000 to discard (LattePipeline passes none).
            if mask:
                bias = (1 - keep.repeat_interleave(frames, 0)[:, None].to(dtype)) * -10000.0
                inputs["encoder_attention_mask"] = bias.to(device)
            return inputs
        if mask:
            inputs["encoder_attention_mask"] = keep.to(device)
        inputs["added_cond_kwargs"] = {"resolution": None, "aspect_ratio": None}
        if dense.use_additional_conditions:
            side = float(image_size)
            inputs["added_cond_kwargs"] = {
                "resolution": torch.tensor([[side, side]] * batch, device=device, dtype=dtype),
                "aspect_ratio": torch.tensor([[1.0]] * batch, device=device, dtype=dtype)}
        return inputs

    return dense, patched, make_inputs


def patched_pair_macs(target: str, image_size: int, batch: int = 1, plan=None, schedule=None, frames: int = 16,
                      config_overrides: Optional[Dict[str, Any]] = None) -> Dict[str, int]:
    """MACs of one forward of the dense and the patched model of `build_patched_pair` ({"dense": ..., "flexdit":
    ...}), counted on the meta device by `flexdit.flops.count_macs_dispatch` (attention counted). For "latte" one
    forward is a clip of `frames` frames per sample; `batch` = 1 gives MACs per image or per clip."""
    from flexdit.flops import count_macs_dispatch

    dense, patched, make_inputs = build_patched_pair(target, image_size, device="meta", plan=plan, schedule=schedule,
                                                     config_overrides=config_overrides, frames=frames)
    inputs = make_inputs(batch)
    return {"dense": count_macs_dispatch(dense, **inputs).total,
            "flexdit": count_macs_dispatch(patched, **inputs).total}
