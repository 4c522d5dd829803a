"""Activation checkpointing on the native models and on patched hosts: every layer recomputed in the backward, the
same outputs and gradients as without."""
import pytest
import torch
import torch.nn as nn

import flexdit
import flexdit_kernels as fk
from flexdit import apply_patch, set_checkpointing

from .models.helpers import TOY_PLAN, randomize_, toy_config, toy_dit, toy_inputs

diffusers = pytest.importorskip("diffusers")

PLAN = flexdit.Plan(**TOY_PLAN)


def gradients(model, forward):
    """(output, {parameter name: gradient}) of one forward and a backward with a fixed upstream gradient."""
    model.zero_grad(set_to_none=True)
    out = forward(model)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    (out * upstream).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def check_recomputed(model, forward, layers, switch=set_checkpointing, kernels=False):
    """With checkpointing on, every layer in `layers` runs twice (forward, then recomputation in the backward) and
    the output and every gradient equal those of the plain run."""
    calls = []
    hooks = [layer.register_forward_pre_hook(lambda *_: calls.append(1)) for layer in layers]
    try:
        with fk.backend("auto" if kernels else "reference"):
            ref, ref_grads = gradients(model, forward)
            plain = len(calls)
            switch(model, True)
            out, grads = gradients(model, forward)
            recomputed = len(calls) - plain
            switch(model, False)
            gradients(model, forward)
            off = len(calls) - plain - recomputed
    finally:
        for h in hooks:
            h.remove()
    assert plain == len(layers) and recomputed == 2 * len(layers) and off == len(layers)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-6, atol=1e-7, msg=name)


def diffusers_switch(model, on):
    """The diffusers host's own switch, as a training script calls it."""
    host = getattr(model, "transformer", model)
    host.enable_gradient_checkpointing() if on else host.disable_gradient_checkpointing()


# ----------------------------------------------------------------------------------------------------------------
# Native models
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["DiT", "FlexDiT", "patched DiT"])
def test_native_models(name):
    model = {"DiT": toy_dit, "FlexDiT": lambda: randomize_(flexdit.FlexDiT(toy_config())).eval(),
             "patched DiT": lambda: randomize_(apply_patch(toy_dit(), PLAN))}[name]()
    x, t, y = toy_inputs()
    check_recomputed(model, lambda m: m(x, t, y), list(model.blocks))


def test_flexdit_with_the_kernels(device):
    model = randomize_(flexdit.FlexDiT(toy_config())).to(device).eval()
    x, t, y = (v[:1].to(device) for v in toy_inputs())
    check_recomputed(model, lambda m: m(x, t, y), list(model.blocks), kernels=True)


def test_flexlatte():
    from .test_latte import TINY, clip
    model = randomize_(flexdit.FlexLatte(flexdit.FlexLatteConfig(transformer={**TINY, "video_length": 3}, num_classes=2,
                                                                plan=PLAN)), std=0.1)
    model.eval()
    x, t, _ = clip(frames=3)
    y = torch.tensor([0, 2])
    layers = [*model.transformer.transformer_blocks, *model.transformer.temporal_transformer_blocks]
    check_recomputed(model, lambda m: m(x, t, y), layers)


def test_refuses_other_modules():
    with pytest.raises(ValueError, match="model: cannot checkpoint a Linear"):
        set_checkpointing(nn.Linear(2, 2))


# ----------------------------------------------------------------------------------------------------------------
# Patched diffusers hosts, switched by their own enable_gradient_checkpointing()
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("target", ["diffusers-dit", "pixart-alpha"])
def test_patched_diffusers_dit_and_pixart(target):
    from .test_patch import call, tiny_diffusers_dit, tiny_pixart
    host = randomize_(apply_patch({"diffusers-dit": tiny_diffusers_dit, "pixart-alpha": tiny_pixart}[target](),
                                  PLAN), std=0.1)
    x, t, y = toy_inputs()
    check_recomputed(host, lambda m: call(m, target, x, t, y), list(host.transformer_blocks), diffusers_switch)


def test_patched_latte():
    from .test_latte import clip, run, tiny_latte
    host = randomize_(apply_patch(tiny_latte(frames=3), PLAN), std=0.1)
    x, t, text = clip(frames=3)
    layers = [*host.transformer_blocks, *host.temporal_transformer_blocks]
    check_recomputed(host, lambda m: run(m, x, t, text), layers, diffusers_switch)


@pytest.mark.parametrize("target", ["sd3", "flux"])
def test_patched_mmdit(target):
    from .test_mmdit import PLAN as MMDIT_PLAN, inputs, tiny_flux, tiny_sd3
    host = randomize_(apply_patch({"sd3": tiny_sd3, "flux": tiny_flux}[target](), MMDIT_PLAN), std=0.1)
    kw = inputs(target)
    layers = [*host.transformer_blocks, *getattr(host, "single_transformer_blocks", [])]
    check_recomputed(host, lambda m: m(**kw)[0], layers, diffusers_switch)
