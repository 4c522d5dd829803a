"""Fused adaLN kernels in the model: same function as the unfused layers, far fewer ops per forward."""
import pytest
import torch

import flexdit
import flexdit_kernels as fk

from .helpers import randomize_, toy_config, toy_dit, toy_inputs


def _xl_shaped(name):
    """DiT-XL/2's depth and plan at a toy width: the op count depends on the layers, not on their size."""
    return flexdit.create_model(name, input_size=16, hidden_size=64, num_heads=8).eval()


def test_fused_flexdit_runs_far_fewer_ops():
    """Ops per forward (aten + flexdit, about one GPU launch each) under bf16 autocast, counted on a warm autocast
    region (weights already cast, as in a sampling loop). FlexDiT-XL/2's layers: 690 unfused, 405 fused; the dense
    DiT-XL/2: 673 and 361. (On a fresh region every count grows by ~320 weight casts: 1012 and 727 for FlexDiT.)"""
    x, t, y = toy_inputs(batch=2, size=(16, 16))
    flex = _xl_shaped("FlexDiT-XL/2")
    with fk.backend("reference"):
        fused = sum(flexdit.count_ops(flex, x, t, y, autocast_dtype=torch.bfloat16).values())
        unfused = sum(flexdit.count_ops(flexdit.set_fused(flex, False), x, t, y,
                                        autocast_dtype=torch.bfloat16).values())
        dense = _xl_shaped("DiT-XL/2")
        dense_ops = sum(flexdit.count_ops(dense, x, t, y, autocast_dtype=torch.bfloat16).values())
        dense_fused = sum(flexdit.count_ops(flexdit.set_fused(dense), x, t, y,
                                            autocast_dtype=torch.bfloat16).values())
    assert fused <= 0.6 * unfused and dense_fused <= 0.6 * dense_ops, (fused, unfused, dense_fused, dense_ops)
    assert fused <= 410, fused   # regression guard on today's count


@pytest.mark.parametrize("kind", ["flexdit", "dense"])
def test_fused_model_equals_unfused(kind):
    """Kernel path (interpreter on the CPU), fp32: outputs and every parameter gradient of the fused model match the
    unfused one."""
    base = flexdit.from_dit(toy_dit(), toy_config()) if kind == "flexdit" else toy_dit()
    model = randomize_(base, seed=3).eval()
    x, t, y = toy_inputs()

    def run(fused):
        flexdit.set_fused(model, fused)
        model.zero_grad()
        out = model(x, t, y)
        out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    out_a, grads_a = run(False)
    out_b, grads_b = run(True)
    torch.testing.assert_close(out_b, out_a, rtol=1e-4, atol=1e-5)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.gpu
def test_fused_flexdit_xl_within_bf16_noise():
    """FlexDiT-XL/2 at 256², bf16 autocast: the fused kernel path's error against fp32 is at most 2x the error of the
    unfused reference path in bf16."""
    torch.manual_seed(0)
    flex = randomize_(flexdit.create_model("FlexDiT-XL/2", input_size=32), std=0.02).cuda().eval()
    x, t, y = (v.cuda() for v in toy_inputs(batch=4, size=(32, 32)))
    with torch.no_grad():
        with fk.backend("reference"):
            exact = flexdit.set_fused(flex, False)(x, t, y).double()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                ref = flex(x, t, y).double()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            fused = flexdit.set_fused(flex, True)(x, t, y).double()
    scale = exact.norm()
    assert (fused - exact).norm() / scale <= 2 * (ref - exact).norm() / scale + 1e-6
