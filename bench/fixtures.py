"""Dense/patched model pairs at real sizes with random weights, for `python -m bench model --model ...`."""
import copy
from typing import Any, Dict, Optional

import torch

from flexdit import apply_patch


def build_patched_pair(target: str, image_size: int, device=None, dtype=torch.float32, plan=None, schedule=None,
                       config_overrides: Optional[Dict[str, Any]] = None):
    """(dense_model, patched_model, make_inputs) for "pixart-alpha" or "diffusers-dit" at real size, random weights.

    image_size: pixels (256, 512, 1024); the latent is image_size / 8. `make_inputs(batch, t=500)` returns the
    keyword arguments of one forward: `model(**make_inputs(8))[0]` is the prediction (B, 8, S, S). The patched model
    is a deep copy of the dense one patched with `plan` (default: the decided plan, grid 8) or `schedule`.
    `config_overrides` replaces diffusers config fields (tiny models for tests). Needs diffusers.
    """
    import diffusers

    latent = image_size // 8
    if target == "pixart-alpha":
        cfg = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                   cross_attention_dim=1152, caption_channels=4096, sample_size=latent,
                   use_additional_conditions=latent == 128)
        cfg.update(config_overrides or {})
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # diffusers' default init: random, nothing zeroed
            dense = diffusers.PixArtTransformer2DModel(**cfg)
    elif target == "diffusers-dit":
        cfg = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                   sample_size=latent)
        cfg.update(config_overrides or {})
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            dense = diffusers.DiTTransformer2DModel(**cfg)
    else:
        raise ValueError(f"target must be 'pixart-alpha' or 'diffusers-dit', got {target!r}")
    dense = dense.to(device=device, dtype=dtype).eval()
    patched = apply_patch(copy.deepcopy(dense), plan=plan, schedule=schedule)
    c = dense.config

    def make_inputs(batch: int, t: int = 500):
        gen = torch.Generator(device="cpu").manual_seed(1)
        x = torch.randn(batch, c.in_channels, c.sample_size, c.sample_size, generator=gen)
        inputs = dict(hidden_states=x.to(device=device, dtype=dtype),
                      timestep=torch.full((batch,), t, dtype=torch.long, device=device), return_dict=False)
        if target == "pixart-alpha":
            text = torch.randn(batch, 120, c.caption_channels, generator=gen)
            mask = torch.ones(batch, 120, dtype=torch.long)
            mask[:, 60:] = 0
            inputs.update(encoder_hidden_states=text.to(device=device, dtype=dtype),
                          encoder_attention_mask=mask.to(device),
                          added_cond_kwargs={"resolution": None, "aspect_ratio": None})
            if dense.use_additional_conditions:
                side = float(image_size)
                inputs["added_cond_kwargs"] = {
                    "resolution": torch.tensor([[side, side]] * batch, device=device, dtype=dtype),
                    "aspect_ratio": torch.tensor([[1.0]] * batch, device=device, dtype=dtype)}
        else:
            inputs["class_labels"] = torch.randint(0, 1000, (batch,), generator=gen).to(device)
        return inputs

    return dense, patched, make_inputs
